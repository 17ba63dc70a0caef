// The all-reduce share of a tensor-parallel step (issue #8), measured without the engine: one
// process drives N GPUs. For each message of `rows x hidden` bf16 elements (rows 1, 8, 64, 256,
// 512, 4096 by default; hidden 8192, the Llama-3-70B width) it times
//   nccl          ncclAllReduce (sum, bf16, out of place; communicators from ncclCommInitAll),
//   oneshot       a prototype one-shot all-reduce through peer memory: every GPU reads every
//                 GPU's input buffer over NVLink (cudaDeviceEnablePeerAccess), sums in fp32 and
//                 writes bf16; block b of each GPU meets block b of the others at a flag barrier
//                 before reading (inputs ready) and after (inputs no longer read), with per-block
//                 epochs kept in device memory, so the kernel is graph-capturable,
//   oneshot_copy  the same after a device copy of the activations into the peer-visible buffer
//                 (what it costs when the producer cannot write there directly),
//   engine        the engine's all-reduce: the NCCL communicator of worker/comm with its custom
//                 one-shot path (kernels/one_shot_all_reduce.cu: in place, the input copied into
//                 the peer-visible buffer inside the kernel, one launch) forced for every size
//                 (limit raised to the largest message), through Communicator::AllReduceSum,
// each as `--iters` back-to-back calls captured into one CUDA graph per GPU, the graphs launched
// on all GPUs together, `--replays` times; the median replay over --iters is the time per call.
// Before timing, one eager call of each is checked against a host reference (fp32 sums of the
// same inputs in rank order, rounded to bf16) and against each other; a mismatch beyond bf16
// rounding fails the run (exit 1); the engine's result must equal the reference bit for bit on
// every GPU. The prototype (out of place, two barriers, separate copy) stays for comparison; the
// crossover of `engine` and `nccl` sets the engine's limit (common/defaults.h).
//
// Prints a config line and one JSON line per size (microseconds per all-reduce, bus bandwidth
// 2 (N-1)/N x bytes / time as nccl-tests, per_step_ms = 2 x --num-layers x us / 1000: the two
// all-reduces of a decoder layer over the model), then a table. With fewer than 2 GPUs it prints
// a "skipped" line and exits 0.
//
// Usage: build/bin/allreduce_bench [--gpus N] [--hidden 8192] [--rows 1,8,64,256,512,1024,2048,4096]
//        [--num-layers 80] [--iters 100] [--replays 20]
// Set NCCL_NVLS_ENABLE=0 on the lent H200 machines (see /work/shared/device).
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <nccl.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "bench/src/allreduce_bench_engine.h"
#include "kernels/peer_sync.cuh"

namespace {

constexpr int kMaxRanks = 8;
constexpr int kMaxBlocks = 128;
constexpr int kThreads = 256;
constexpr uint64_t kBarrierTimeoutNs = 2'000'000'000;  // a wedged barrier ends, flagged, in 2 s

#define CUDA_OK(x)                                                                          \
  do {                                                                                      \
    cudaError_t e_ = (x);                                                                   \
    if (e_ != cudaSuccess) {                                                                \
      std::fprintf(stderr, "allreduce_bench: %s: %s (%s:%d)\n", #x, cudaGetErrorString(e_), \
                   __FILE__, __LINE__);                                                     \
      std::exit(1);                                                                         \
    }                                                                                       \
  } while (0)
#define NCCL_OK(x)                                                                          \
  do {                                                                                      \
    ncclResult_t r_ = (x);                                                                  \
    if (r_ != ncclSuccess) {                                                                \
      std::fprintf(stderr, "allreduce_bench: %s: %s (%s:%d)\n", #x, ncclGetErrorString(r_), \
                   __FILE__, __LINE__);                                                     \
      std::exit(1);                                                                         \
    }                                                                                       \
  } while (0)

// Per GPU, in its own memory, written by its peers: block b's arrival flags of each rank for the
// barrier before (start) and after (end) the reads, and the epoch (calls made) of each block.
struct Signal {
  uint32_t start[kMaxBlocks][kMaxRanks];
  uint32_t end[kMaxBlocks][kMaxRanks];
  uint32_t epoch[kMaxBlocks];
};

struct Peers {
  const __nv_bfloat16* in[kMaxRanks];  // every rank's input buffer (peer pointers)
  Signal* sig[kMaxRanks];
};

using lorc::kernels::GlobalTimerNs;
using lorc::kernels::LoadAcquireSys;
using lorc::kernels::StoreReleaseSys;

// Block b of this rank and block b of every other rank: thread r < n tells rank r that this
// rank arrived at `epoch`, then waits until rank r has told us the same.
__device__ void BlockBarrier(const Peers& p, int rank, int n, bool end, uint32_t epoch, int* timed_out) {
  const int b = blockIdx.x;
  const int r = threadIdx.x;
  if (r < n) {
    Signal* peer = p.sig[r];
    StoreReleaseSys(end ? &peer->end[b][rank] : &peer->start[b][rank], epoch);
    const uint32_t* mine = end ? &p.sig[rank]->end[b][r] : &p.sig[rank]->start[b][r];
    const uint64_t t0 = GlobalTimerNs();
    while (LoadAcquireSys(mine) < epoch) {
      if (GlobalTimerNs() - t0 > kBarrierTimeoutNs) {
        atomicExch(timed_out, 1);
        break;
      }
    }
  }
  __syncthreads();
}

// out[i] = sum over ranks of in_r[i], fp32 accumulation in rank order; `vecs` groups of 8.
__global__ void OneShotAllReduce(Peers p, int rank, int n, __nv_bfloat16* out, int64_t vecs, int* timed_out) {
  __shared__ uint32_t epoch;
  if (threadIdx.x == 0) epoch = p.sig[rank]->epoch[blockIdx.x] + 1;
  __syncthreads();
  const uint32_t e = epoch;
  BlockBarrier(p, rank, n, /*end=*/false, e, timed_out);  // every rank's input is written
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < vecs;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float acc[8] = {};
    for (int r = 0; r < n; ++r) {
      const uint4 v = __ldcg(reinterpret_cast<const uint4*>(p.in[r]) + i);  // not through L1
      const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&v);
      for (int k = 0; k < 4; ++k) {
        const float2 f = __bfloat1622float2(h[k]);
        acc[2 * k] += f.x;
        acc[2 * k + 1] += f.y;
      }
    }
    uint4 o;
    __nv_bfloat162* oh = reinterpret_cast<__nv_bfloat162*>(&o);
    for (int k = 0; k < 4; ++k) oh[k] = __floats2bfloat162_rn(acc[2 * k], acc[2 * k + 1]);
    reinterpret_cast<uint4*>(out)[i] = o;
  }
  __syncthreads();
  BlockBarrier(p, rank, n, /*end=*/true, e, timed_out);  // nobody reads this rank's input now
  if (threadIdx.x == 0) p.sig[rank]->epoch[blockIdx.x] = e;
}

// The input of rank `rank`, element i: a value in [-1, 1) with 8 significant bits (exact in bf16).
__host__ __device__ inline float InputValue(int rank, int64_t i) {
  uint64_t x = (static_cast<uint64_t>(rank) << 40) ^ static_cast<uint64_t>(i);
  x = (x ^ (x >> 31)) * 0x7fb5d329728ea185ull;
  x = (x ^ (x >> 27)) * 0x81dadef4bc2dd44dull;
  x ^= x >> 33;
  return static_cast<float>(static_cast<int>(x & 255) - 128) / 128.0f;
}

__global__ void FillInput(__nv_bfloat16* p, int rank, int64_t n) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    p[i] = __float2bfloat16(InputValue(rank, i));
  }
}

float Bf16ToFloat(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
float RoundToBf16(float f) {  // round to nearest even (finite values)
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
  std::memcpy(&f, &u, 4);
  return f;
}

struct Gpu {
  int device = 0;
  cudaStream_t stream = nullptr;
  ncclComm_t comm = nullptr;
  __nv_bfloat16 *in = nullptr, *src = nullptr, *out_nccl = nullptr, *out_os = nullptr, *eng = nullptr;
  Signal* sig = nullptr;
  int* timed_out = nullptr;
};

std::vector<int> ParseList(const char* flag, const char* s) {
  std::vector<int> v;
  for (const char* p = s; *p;) {
    char* end = nullptr;
    const long x = std::strtol(p, &end, 10);
    if (end == p || x < 1 || x > (1 << 24)) {
      std::fprintf(stderr, "allreduce_bench: %s: '%s' is not a list of integers in [1, 2^24]\n", flag, s);
      std::exit(2);
    }
    v.push_back(static_cast<int>(x));
    p = *end == ',' ? end + 1 : end;
    if (*end != ',' && *end != '\0') {
      std::fprintf(stderr, "allreduce_bench: %s: '%s' is not a comma-separated list\n", flag, s);
      std::exit(2);
    }
  }
  return v;
}

int ParseInt(const char* flag, const char* s, int lo, int hi) {
  char* end = nullptr;
  const long x = std::strtol(s, &end, 10);
  if (end == s || *end != '\0' || x < lo || x > hi) {
    std::fprintf(stderr, "allreduce_bench: %s: '%s' is not an integer in [%d, %d]\n", flag, s, lo, hi);
    std::exit(2);
  }
  return static_cast<int>(x);
}

// Captures `op(g)` on every GPU's stream into one graph per GPU (a thread each, as one rank
// each), then launches them together `replays` + 1 times; returns the median replay's
// microseconds divided by `iters` (the calls per graph).
template <typename Op>
double TimeGraphs(std::vector<Gpu>& gpus, int iters, int replays, const Op& op) {
  const int n = static_cast<int>(gpus.size());
  std::vector<cudaGraphExec_t> exec(n);
  std::vector<std::thread> threads;
  for (int g = 0; g < n; ++g) {
    threads.emplace_back([&, g] {
      CUDA_OK(cudaSetDevice(gpus[g].device));
      CUDA_OK(cudaStreamBeginCapture(gpus[g].stream, cudaStreamCaptureModeRelaxed));
      for (int i = 0; i < iters; ++i) op(g);
      cudaGraph_t graph;
      CUDA_OK(cudaStreamEndCapture(gpus[g].stream, &graph));
      CUDA_OK(cudaGraphInstantiate(&exec[g], graph, 0));
      CUDA_OK(cudaGraphDestroy(graph));
    });
  }
  for (auto& t : threads) t.join();
  std::vector<double> us;
  for (int r = 0; r <= replays; ++r) {  // replay 0 warms up
    const auto t0 = std::chrono::steady_clock::now();
    for (int g = 0; g < n; ++g) {
      CUDA_OK(cudaSetDevice(gpus[g].device));
      CUDA_OK(cudaGraphLaunch(exec[g], gpus[g].stream));
    }
    for (int g = 0; g < n; ++g) CUDA_OK(cudaStreamSynchronize(gpus[g].stream));
    if (r > 0) us.push_back(std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count());
  }
  for (int g = 0; g < n; ++g) CUDA_OK(cudaGraphExecDestroy(exec[g]));
  std::sort(us.begin(), us.end());
  return us[us.size() / 2] / iters;
}

int Blocks(int64_t vecs) {
  return static_cast<int>(std::min<int64_t>(kMaxBlocks, (vecs + kThreads - 1) / kThreads));
}

}  // namespace

int main(int argc, char** argv) {
  int want_gpus = 0, hidden = 8192, num_layers = 80, iters = 100, replays = 20;
  std::vector<int> rows = {1, 8, 64, 256, 512, 1024, 2048, 4096};
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--help") {
      std::printf("allreduce_bench [--gpus N] [--hidden 8192] [--rows 1,8,64,256,512,1024,2048,4096] "
                  "[--num-layers 80] [--iters 100] [--replays 20]\n");
      return 0;
    }
    if (i + 1 >= argc) {
      std::fprintf(stderr, "allreduce_bench: %s needs a value (see --help)\n", a.c_str());
      return 2;
    }
    const char* v = argv[++i];
    if (a == "--gpus") want_gpus = ParseInt("--gpus", v, 2, kMaxRanks);
    else if (a == "--hidden") hidden = ParseInt("--hidden", v, 8, 1 << 20);
    else if (a == "--rows") rows = ParseList("--rows", v);
    else if (a == "--num-layers") num_layers = ParseInt("--num-layers", v, 1, 100000);
    else if (a == "--iters") iters = ParseInt("--iters", v, 1, 100000);
    else if (a == "--replays") replays = ParseInt("--replays", v, 1, 100000);
    else {
      std::fprintf(stderr, "allreduce_bench: unknown flag %s (see --help)\n", a.c_str());
      return 2;
    }
  }
  if (hidden % 8 != 0) {
    std::fprintf(stderr, "allreduce_bench: --hidden: %d is not a multiple of 8\n", hidden);
    return 2;
  }
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) count = 0;
  if (count < 2 || (want_gpus > 0 && count < want_gpus)) {
    std::printf("{\"kind\":\"skipped\",\"reason\":\"needs %d CUDA devices, this machine has %d\"}\n",
                std::max(2, want_gpus), count);
    std::fprintf(stderr, "allreduce_bench: skipped: needs at least 2 CUDA devices, found %d\n", count);
    return 0;
  }
  const int n = want_gpus > 0 ? want_gpus : std::min(count, kMaxRanks);
  bool peer = true;
  for (int a = 0; a < n; ++a) {
    for (int b = 0; b < n; ++b) {
      int can = 1;
      if (a != b) CUDA_OK(cudaDeviceCanAccessPeer(&can, a, b));
      peer = peer && can;
    }
  }
  const int max_rows = *std::max_element(rows.begin(), rows.end());
  const int64_t max_elems = static_cast<int64_t>(max_rows) * hidden;
  const size_t max_bytes = static_cast<size_t>(max_elems) * sizeof(__nv_bfloat16);

  std::vector<Gpu> gpus(n);
  std::vector<int> devs(n);
  for (int g = 0; g < n; ++g) devs[g] = g;
  std::vector<ncclComm_t> comms(n);
  NCCL_OK(ncclCommInitAll(comms.data(), n, devs.data()));
  for (int g = 0; g < n; ++g) {
    Gpu& d = gpus[g];
    d.device = g;
    d.comm = comms[g];
    CUDA_OK(cudaSetDevice(g));
    if (peer) {
      for (int o = 0; o < n; ++o) {
        if (o != g) {
          const cudaError_t e = cudaDeviceEnablePeerAccess(o, 0);
          if (e != cudaSuccess && e != cudaErrorPeerAccessAlreadyEnabled) CUDA_OK(e);
          (void)cudaGetLastError();
        }
      }
    }
    CUDA_OK(cudaStreamCreateWithFlags(&d.stream, cudaStreamNonBlocking));
    for (__nv_bfloat16** p : {&d.in, &d.src, &d.out_nccl, &d.out_os, &d.eng}) CUDA_OK(cudaMalloc(p, max_bytes));
    CUDA_OK(cudaMalloc(&d.sig, sizeof(Signal)));
    CUDA_OK(cudaMemset(d.sig, 0, sizeof(Signal)));
    CUDA_OK(cudaMalloc(&d.timed_out, sizeof(int)));
    CUDA_OK(cudaMemset(d.timed_out, 0, sizeof(int)));
    FillInput<<<1024, 256, 0, d.stream>>>(d.src, g, max_elems);
    CUDA_OK(cudaGetLastError());
    CUDA_OK(cudaMemcpyAsync(d.in, d.src, max_bytes, cudaMemcpyDeviceToDevice, d.stream));
    CUDA_OK(cudaStreamSynchronize(d.stream));
  }
  Peers peers{};
  for (int g = 0; g < n; ++g) {
    peers.in[g] = gpus[g].in;
    peers.sig[g] = gpus[g].sig;
  }
  std::vector<void*> streams(n);
  for (int g = 0; g < n; ++g) streams[g] = gpus[g].stream;
  std::string engine_description, engine_error;
  lorc::bench::EngineComms* engine = lorc::bench::CreateEngineComms(
      n, streams.data(), max_bytes, &engine_description, &engine_error);
  if (engine == nullptr) {
    std::fprintf(stderr, "allreduce_bench: the engine's communicator: %s\n", engine_error.c_str());
    return 1;
  }
  const bool engine_custom = engine_description.rfind("custom", 0) == 0;
  cudaDeviceProp prop{};
  CUDA_OK(cudaGetDeviceProperties(&prop, 0));
  int nccl_version = 0;
  NCCL_OK(ncclGetVersion(&nccl_version));
  std::printf("{\"kind\":\"config\",\"bench\":\"allreduce\",\"gpus\":%d,\"device\":\"%s\",\"nccl\":%d,"
              "\"peer_access\":%s,\"hidden\":%d,\"num_layers\":%d,\"iters\":%d,\"replays\":%d,"
              "\"dtype\":\"bf16\",\"statistic\":\"median replay / iters\",\"engine_all_reduce\":\"%s\"}\n",
              n, prop.name, nccl_version, peer ? "true" : "false", hidden, num_layers, iters, replays,
              engine_description.c_str());
  std::fflush(stdout);

  auto nccl = [&](int g, int64_t elems) {
    NCCL_OK(ncclAllReduce(gpus[g].in, gpus[g].out_nccl, static_cast<size_t>(elems), ncclBfloat16, ncclSum,
                          gpus[g].comm, gpus[g].stream));
  };
  auto oneshot = [&](int g, int64_t elems, bool copy) {
    const Gpu& d = gpus[g];
    if (copy) {
      CUDA_OK(cudaMemcpyAsync(d.in, d.src, static_cast<size_t>(elems) * 2, cudaMemcpyDeviceToDevice, d.stream));
    }
    const int64_t vecs = elems / 8;
    OneShotAllReduce<<<Blocks(vecs), kThreads, 0, d.stream>>>(peers, g, n, d.out_os, vecs, d.timed_out);
    CUDA_OK(cudaGetLastError());
  };

  auto engine_call = [&](int g, int64_t elems) {
    const std::string e = lorc::bench::EngineAllReduceBf16(engine, g, gpus[g].eng, static_cast<size_t>(elems));
    if (!e.empty()) {
      std::fprintf(stderr, "allreduce_bench: engine all-reduce on GPU %d: %s\n", g, e.c_str());
      std::exit(1);
    }
  };

  struct Row {
    int rows;
    double nccl_us, os_us, osc_us, diff_nccl, diff_os, eng_us;
    bool eng_exact;
  };
  std::vector<Row> results;
  bool all_ok = true;
  const double tol = n * std::ldexp(1.0, -7);  // bf16 roundings of sums of n values in [-1, 1)
  for (int r : rows) {
    const int64_t elems = static_cast<int64_t>(r) * hidden;
    const double bytes = static_cast<double>(elems) * 2;
    // Correctness: one eager call of each (NCCL as a group from this thread), against the host.
    NCCL_OK(ncclGroupStart());
    for (int g = 0; g < n; ++g) nccl(g, elems);
    NCCL_OK(ncclGroupEnd());
    for (int g = 0; g < n && peer; ++g) {
      CUDA_OK(cudaSetDevice(g));
      oneshot(g, elems, false);
    }
    for (int g = 0; g < n && engine_custom; ++g) {
      CUDA_OK(cudaSetDevice(g));
      CUDA_OK(cudaMemcpyAsync(gpus[g].eng, gpus[g].in, elems * 2, cudaMemcpyDeviceToDevice, gpus[g].stream));
    }
    for (int g = 0; g < n && engine_custom; ++g) engine_call(g, elems);
    std::vector<float> ref(elems);
    for (int64_t i = 0; i < elems; ++i) {
      float s = 0;
      for (int g = 0; g < n; ++g) s += InputValue(g, i);
      ref[i] = RoundToBf16(s);
    }
    double diff_nccl = 0, diff_os = 0;
    std::vector<uint16_t> host(elems), host_os(elems);
    for (int g = 0; g < n; ++g) {
      CUDA_OK(cudaSetDevice(g));
      CUDA_OK(cudaStreamSynchronize(gpus[g].stream));
      CUDA_OK(cudaMemcpy(host.data(), gpus[g].out_nccl, elems * 2, cudaMemcpyDeviceToHost));
      if (peer) CUDA_OK(cudaMemcpy(host_os.data(), gpus[g].out_os, elems * 2, cudaMemcpyDeviceToHost));
      for (int64_t i = 0; i < elems; ++i) {
        const float v = Bf16ToFloat(host[i]);
        diff_nccl = std::max(diff_nccl, static_cast<double>(std::fabs(v - ref[i])));
        if (peer) diff_os = std::max(diff_os, static_cast<double>(std::fabs(Bf16ToFloat(host_os[i]) - v)));
      }
    }
    bool eng_exact = engine_custom;
    for (int g = 0; g < n && engine_custom; ++g) {
      CUDA_OK(cudaSetDevice(g));
      CUDA_OK(cudaStreamSynchronize(gpus[g].stream));
      CUDA_OK(cudaMemcpy(host.data(), gpus[g].eng, elems * 2, cudaMemcpyDeviceToHost));
      for (int64_t i = 0; i < elems && eng_exact; ++i) {
        if (Bf16ToFloat(host[i]) != ref[i]) {
          std::fprintf(stderr, "allreduce_bench: rows %d: engine result on GPU %d differs from the "
                       "reference at element %lld (%g vs %g)\n", r, g, static_cast<long long>(i),
                       Bf16ToFloat(host[i]), ref[i]);
          eng_exact = false;
        }
      }
    }
    int timed_out = 0;
    for (int g = 0; g < n && peer; ++g) {
      int t = 0;
      CUDA_OK(cudaMemcpy(&t, gpus[g].timed_out, sizeof(int), cudaMemcpyDeviceToHost));
      timed_out |= t;
    }
    const bool ok = diff_nccl <= tol && diff_os <= tol && !timed_out && (eng_exact || !engine_custom);
    all_ok = all_ok && ok;

    Row row{r, 0, NAN, NAN, diff_nccl, diff_os, NAN, eng_exact};
    row.nccl_us = TimeGraphs(gpus, iters, replays, [&](int g) { nccl(g, elems); });
    if (peer && ok) {
      row.os_us = TimeGraphs(gpus, iters, replays, [&](int g) { oneshot(g, elems, false); });
      row.osc_us = TimeGraphs(gpus, iters, replays, [&](int g) { oneshot(g, elems, true); });
    }
    if (engine_custom && ok) {
      row.eng_us = TimeGraphs(gpus, iters, replays, [&](int g) { engine_call(g, elems); });
      std::string e;
      for (int g = 0; g < n && e.empty(); ++g) e = lorc::bench::EngineAllReduceBf16(engine, g, gpus[g].eng, 8);
      if (!e.empty()) {  // reports a barrier timeout of the timed calls
        std::fprintf(stderr, "allreduce_bench: engine all-reduce after timing: %s\n", e.c_str());
        all_ok = false;
      }
      for (int g = 0; g < n; ++g) CUDA_OK(cudaStreamSynchronize(gpus[g].stream));
      for (int g = 0; g < n; ++g) {
        int t = 0;
        CUDA_OK(cudaMemcpy(&t, gpus[g].timed_out, sizeof(int), cudaMemcpyDeviceToHost));
        if (t) {
          std::fprintf(stderr, "allreduce_bench: a one-shot barrier timed out on GPU %d (rows %d)\n", g, r);
          all_ok = false;
        }
      }
    }
    results.push_back(row);
    const double bus = 2.0 * (n - 1) / n;
    auto num = [](double x) { return std::isnan(x) ? std::string("null") : std::to_string(x); };
    std::printf("{\"kind\":\"allreduce\",\"gpus\":%d,\"rows\":%d,\"hidden\":%d,\"bytes\":%.0f,"
                "\"nccl_us\":%.3f,\"nccl_busbw_gbps\":%.2f,\"nccl_per_step_ms\":%.4f,"
                "\"oneshot_us\":%s,\"oneshot_busbw_gbps\":%s,\"oneshot_per_step_ms\":%s,"
                "\"oneshot_copy_us\":%s,\"engine_us\":%s,\"engine_per_step_ms\":%s,\"engine_exact\":%s,"
                "\"max_abs_diff_nccl_vs_ref\":%g,"
                "\"max_abs_diff_oneshot_vs_nccl\":%s,\"checked\":%s}\n",
                n, r, hidden, bytes, row.nccl_us, bytes * bus / row.nccl_us * 1e-3,
                2.0 * num_layers * row.nccl_us * 1e-3, num(row.os_us).c_str(),
                num(bytes * bus / row.os_us * 1e-3).c_str(), num(2.0 * num_layers * row.os_us * 1e-3).c_str(),
                num(row.osc_us).c_str(), num(row.eng_us).c_str(), num(2.0 * num_layers * row.eng_us * 1e-3).c_str(),
                eng_exact ? "true" : "false", diff_nccl, peer ? num(diff_os).c_str() : "null",
                ok ? "true" : "false");
    std::fflush(stdout);
    if (!ok) {
      std::fprintf(stderr, "allreduce_bench: rows %d: results differ (NCCL vs host %g, one-shot vs NCCL %g, "
                   "tolerance %g)%s\n", r, diff_nccl, diff_os, tol, timed_out ? "; a barrier timed out" : "");
    }
  }

  std::printf("\n# %d x %s, bf16 all-reduce of rows x %d, per_step = 2 x %d layers (median of %d replays of %d calls)\n",
              n, prop.name, hidden, num_layers, replays, iters);
  std::printf("%6s %10s | %9s %9s %10s | %9s %9s %10s | %11s | %9s %10s\n", "rows", "bytes", "nccl us", "GB/s",
              "step ms", "1shot us", "GB/s", "step ms", "1shot+cp us", "engine us", "step ms");
  for (const Row& row : results) {
    const double bytes = static_cast<double>(row.rows) * hidden * 2;
    const double bus = 2.0 * (n - 1) / n;
    std::printf("%6d %10.0f | %9.2f %9.1f %10.3f | %9.2f %9.1f %10.3f | %11.2f | %9.2f %10.3f\n", row.rows, bytes,
                row.nccl_us, bytes * bus / row.nccl_us * 1e-3, 2.0 * num_layers * row.nccl_us * 1e-3,
                row.os_us, bytes * bus / row.os_us * 1e-3, 2.0 * num_layers * row.os_us * 1e-3, row.osc_us,
                row.eng_us, 2.0 * num_layers * row.eng_us * 1e-3);
  }
  std::printf("# engine: %s\n", engine_description.c_str());
  lorc::bench::DestroyEngineComms(engine);
  for (Gpu& d : gpus) {
    CUDA_OK(cudaSetDevice(d.device));
    NCCL_OK(ncclCommDestroy(d.comm));
    for (void* p : {static_cast<void*>(d.in), static_cast<void*>(d.src), static_cast<void*>(d.out_nccl),
                    static_cast<void*>(d.out_os), static_cast<void*>(d.sig), static_cast<void*>(d.timed_out),
                    static_cast<void*>(d.eng)}) {
      CUDA_OK(cudaFree(p));
    }
    CUDA_OK(cudaStreamDestroy(d.stream));
  }
  return all_ok ? 0 : 1;
}
