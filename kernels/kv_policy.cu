// Token-level KV policies on the GPU: the policy decode on CUDA cores (scores, P V with
// importance, reduce; the tensor-core one is kv_policy_decode_mma.cu, chosen in
// LaunchKvPolicyDecode), the state of new positions, CORM's choice, MiKV's low entries and
// compaction. Interface and algorithms: kv_policy.cuh.
#include "kernels/kv_policy.cuh"

#include <cuda_bf16.h>

#include <cmath>
#include <cstdint>
#include <tuple>

#include "kernels/kv_policy_device.cuh"

namespace lorc::kernels {
namespace {

using namespace kvp;  // NOLINT: this file's own helpers (kv_policy_device.cuh)

constexpr int kWarps = 4, kThreads = 32 * kWarps;

// Entry e of a packed run, dequantized into this lane's E values (kvpolicy DecodeLowEntry before
// the balance). Entries and their (scale, zero) start at even bytes and a slot region is even
// (bf16: 2 D bytes; quantized: the head's codes, a multiple of 4),
// so a lane's 16 code bits (int4, D 128) and each fp16 are one aligned 2-byte load.
template <int D>
__device__ __forceinline__ void ReadLowEntry(CacheSide side, int head, const int32_t* table,
                                             int32_t block_size, int32_t base, int32_t e, int bits, int lane,
                                             float (&out)[D / 32]) {
  constexpr int E = D / 32;
  const int code_bytes = D * bits / 8, entry = code_bytes + 4, nbits = E * bits;
  const int32_t first = e * entry;
  const int32_t byte = first + ((lane * nbits) >> 3), shift = (lane * nbits) & 7;  // entries start on a byte
  uint32_t word;
  if (nbits == 16) {
    word = *reinterpret_cast<const uint16_t*>(RunByte(side, head, table, block_size, base, byte));
  } else {  // 8 bits (on a byte) or 4 (the low or high half of one)
    word = uint32_t{*RunByte(side, head, table, block_size, base, byte)} >> shift;
  }
  const uint16_t scale16 =
      *reinterpret_cast<const uint16_t*>(RunByte(side, head, table, block_size, base, first + code_bytes));
  const uint16_t zero16 =
      *reinterpret_cast<const uint16_t*>(RunByte(side, head, table, block_size, base, first + code_bytes + 2));
  int code[E];
#pragma unroll
  for (int i = 0; i < E; ++i) code[i] = static_cast<int>((word >> (i * bits)) & ((1u << bits) - 1u));
  DequantizeLane<E>(code, scale16, zero16, out);
}

// The K (kV false) or V row of walk index v of head kvh: a slot's key as cached (kFull), a
// demoted key's quantized on the fly (kKvPolicyLow), or packed entry v - len; false when the walk
// index holds no key this query reads. *position: the slot's key position for importance (-1 for
// a low key: never chosen again).
template <int D, bool kV, bool kLow>
__device__ __forceinline__ bool WalkRow(const KvPolicyDecodeArgs& a, const uint8_t* state, const int32_t* pos,
                                        const int32_t* table, const LowHead& low, int kvh, int len, int v,
                                        int lane, float (&x)[D / 32], int* position) {
  constexpr int E = D / 32;
  const CacheSide side = MakeSide(kV ? a.v_cache : a.k_cache, a.layout, kV, a.kv_stride, D);
  *position = -1;
  if constexpr (!kLow) {  // CORM: slots of kFull keys only (its own instantiation: registers)
    const int kp = pos[v];
    if (kp < 0 || state[kp] != kKvPolicyFull) return false;
    LoadValues<E>(side, CacheSlot(table, v, a.block_size), kvh, lane * E, x);
    *position = kp;
    return true;
  }
  if (v >= len) {
    const int e = v - len;
    if (e >= low.packed) return false;
    ReadLowEntry<D>(side, kvh, table, a.block_size, low.base, e, a.low_bits, lane, x);
  } else {
    const int kp = pos[v];
    if (kp < 0) return false;
    const uint8_t st = state[kp];
    if (st != kKvPolicyFull && st != kKvPolicyLow) return false;
    LoadValues<E>(side, CacheSlot(table, v, a.block_size), kvh, lane * E, x);
    if (st == kKvPolicyFull) {
      *position = kp;
      return true;
    }
    int code[E];
    uint16_t scale16, zero16;
    QuantizeBalancedLane<E>(x, kV ? nullptr : low.balance, lane, a.low_bits, code, &scale16, &zero16);
    DequantizeLane<E>(code, scale16, zero16, x);
  }
  if (!kV && low.balance != nullptr) {
#pragma unroll
    for (int e = 0; e < E; ++e) x[e] = __fdiv_rn(x[e], low.balance[lane * E + e]);
  }
  return true;
}

// (1) Scores of one chunk: grid (max_chunks, num_kv_heads, num_seqs). Warp w takes positions
// p0 + w, p0 + w + 4, ...; lane h < group keeps the online (max, sum) of query head h.
template <int D, bool kLow>
__global__ void __launch_bounds__(kThreads) ScoresKernel(KvPolicyDecodeArgs a, Scratch sc) {
  constexpr int E = D / 32;
  const int c = blockIdx.x, kvh = blockIdx.y, s = blockIdx.z;
  const KvPolicySeq seq = a.seqs[s];
  const int len = seq.seq_len - seq.slot_offset, walk = WalkLength(seq, a.low_bits), p0 = c * kKvPolicyChunk;
  if (p0 >= walk) return;
  const int group = a.num_heads / a.num_kv_heads;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  float q[kMaxGroup][E];
#pragma unroll
  for (int h = 0; h < kMaxGroup; ++h) {
    if (h < group) {
      LoadRow<E>(a.q + QRow(seq, s) * a.q_stride + static_cast<int64_t>(kvh * group + h) * D + lane * E, q[h]);
#pragma unroll
      for (int e = 0; e < E; ++e) q[h][e] *= a.scale;
    }
  }
  const int lhead = a.layer * a.num_kv_heads + kvh;
  const size_t lh = static_cast<size_t>(lhead) * seq.capacity;
  const uint8_t* state = seq.state + lh;
  const int32_t* pos = seq.pos + lh;
  const int32_t* table = a.block_tables + TableRow(seq, s) * a.max_blocks;
  const LowHead low = LowHeadOf(seq, a.low_bits, lhead, D);
  float* scores = sc.scores + (static_cast<size_t>(s) * a.num_heads + kvh * group) * a.max_seq_len;
  float m = -INFINITY, l = 0.f;
  int n = 0;
  const int end = min(walk, p0 + kKvPolicyChunk);
  // p: a walk index (a slot, then a packed entry); pos -1: no key there. One key per warp at a
  // time: keeping several in flight per warp (their loads together, the reductions interleaved)
  // was measured slower (docs/PERFORMANCE.md "Token-level KV policies on the GPU, served":
  // registers, and dead slots cost as much as kept ones).
  for (int p = p0 + warp; p < end; p += kWarps) {
    float k[E];
    int kp;
    if (!WalkRow<D, false, kLow>(a, state, pos, table, low, kvh, len, p, lane, k, &kp)) {
      if (lane < group) scores[static_cast<size_t>(lane) * a.max_seq_len + p] = -INFINITY;
      continue;
    }
    ++n;
    float mine = 0.f;
#pragma unroll
    for (int h = 0; h < kMaxGroup; ++h) {
      if (h < group) {
        float d = 0.f;
#pragma unroll
        for (int e = 0; e < E; ++e) d = fmaf(q[h][e], k[e], d);
        d = WarpSum(d);
        if (lane == h) mine = d;
      }
    }
    if (lane < group) {
      scores[static_cast<size_t>(lane) * a.max_seq_len + p] = mine;
      const float nm = fmaxf(m, mine);
      l = l * __expf(m - nm) + __expf(mine - nm);
      m = nm;
    }
  }
  __shared__ float sm_m[kWarps][kMaxGroup], sm_l[kWarps][kMaxGroup];
  __shared__ int sm_n[kWarps];
  if (lane < group) {
    sm_m[warp][lane] = m;
    sm_l[warp][lane] = l;
  }
  if (lane == 0) sm_n[warp] = n;
  __syncthreads();
  if (threadIdx.x < group) {
    const int h = threadIdx.x;
    float mm = -INFINITY;
    for (int w = 0; w < kWarps; ++w) mm = fmaxf(mm, sm_m[w][h]);
    float ll = 0.f;
    if (mm != -INFINITY) {
      for (int w = 0; w < kWarps; ++w) ll += sm_l[w][h] * __expf(sm_m[w][h] - mm);
    }
    float* ml = sc.chunk_ml + ((static_cast<size_t>(s) * a.num_heads + kvh * group + h) * sc.max_chunks + c) * 2;
    ml[0] = mm;
    ml[1] = ll;
  }
  if (threadIdx.x == 0) {
    sc.chunk_n[(static_cast<size_t>(s) * a.num_kv_heads + kvh) * sc.max_chunks + c] =
        sm_n[0] + sm_n[1] + sm_n[2] + sm_n[3];
  }
}

// (2) P V of one chunk with the importance: grid as (1). First the sequence's softmax (max, 1 /
// sum) per query head of the group and the kept count t, from every chunk's.
template <int D, bool kLow>
__global__ void __launch_bounds__(kThreads) PvKernel(KvPolicyDecodeArgs a, Scratch sc) {
  constexpr int E = D / 32;
  const int c = blockIdx.x, kvh = blockIdx.y, s = blockIdx.z;
  const KvPolicySeq seq = a.seqs[s];
  const int len = seq.seq_len - seq.slot_offset, walk = WalkLength(seq, a.low_bits), p0 = c * kKvPolicyChunk;
  if (p0 >= walk) return;
  const int group = a.num_heads / a.num_kv_heads;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int chunks = (walk + kKvPolicyChunk - 1) / kKvPolicyChunk;
  __shared__ float sm_max[kMaxGroup], sm_inv[kMaxGroup];
  __shared__ int sm_t;
  SequenceSoftmax(sc, s, kvh, a.num_heads, a.num_kv_heads, chunks, sm_max, sm_inv, &sm_t);
  __syncthreads();
  const float threshold = 1.0f / static_cast<float>(max(sm_t, 1));
  const int32_t query_pos = seq.seq_len - 1;
  const int lhead = a.layer * a.num_kv_heads + kvh;
  const size_t lh = static_cast<size_t>(lhead) * seq.capacity;
  const uint8_t* state = seq.state + lh;
  const int32_t* pos = seq.pos + lh;
  int32_t* last_hit = seq.last_hit + lh;
  const int32_t* table = a.block_tables + TableRow(seq, s) * a.max_blocks;
  const LowHead low = LowHeadOf(seq, a.low_bits, lhead, D);
  const float* scores = sc.scores + (static_cast<size_t>(s) * a.num_heads + kvh * group) * a.max_seq_len;
  float acc[kMaxGroup][E] = {};
  const int end = min(walk, p0 + kKvPolicyChunk);
  for (int p = p0 + warp; p < end; p += kWarps) {  // p: a walk index, kp a full key's position
    float v[E];
    int kp;
    if (!WalkRow<D, true, kLow>(a, state, pos, table, low, kvh, len, p, lane, v, &kp)) continue;
    bool hit = false;
#pragma unroll
    for (int h = 0; h < kMaxGroup; ++h) {
      if (h < group) {
        const float pr = __expf(scores[static_cast<size_t>(h) * a.max_seq_len + p] - sm_max[h]) * sm_inv[h];
        hit |= pr >= threshold;
#pragma unroll
        for (int e = 0; e < E; ++e) acc[h][e] = fmaf(pr, v[e], acc[h][e]);
      }
    }
    // atomicMax: several entries may be query rows of one sequence (KvPolicySeq::q_row).
    // Low keys are never chosen again: no record.
    if (a.record_hits && hit && kp >= 0 && lane == 0 && last_hit[kp] < query_pos) atomicMax(&last_hit[kp], query_pos);
  }
  // The warps' sums through shared memory: [warp][group][D].
  __shared__ float sm_acc[kWarps][kMaxGroup][D];
#pragma unroll
  for (int h = 0; h < kMaxGroup; ++h) {
    if (h < group) {
#pragma unroll
      for (int e = 0; e < E; ++e) sm_acc[warp][h][lane * E + e] = acc[h][e];
    }
  }
  __syncthreads();
  float* partial = sc.partial + (static_cast<size_t>(s) * sc.max_chunks + c) * a.num_heads * D;
  for (int i = threadIdx.x; i < group * D; i += kThreads) {
    const int h = i / D, d = i % D;
    const float sum = sm_acc[0][h][d] + sm_acc[1][h][d] + sm_acc[2][h][d] + sm_acc[3][h][d];
    partial[static_cast<size_t>(kvh * group + h) * D + d] = sum;
  }
}

// (3) out = the chunks' partials summed in chunk order: grid (num_heads, num_seqs), D threads.
template <int D>
__global__ void __launch_bounds__(D) ReduceKernel(KvPolicyDecodeArgs a, Scratch sc) {
  const int h = blockIdx.x, s = blockIdx.y, d = threadIdx.x;
  const KvPolicySeq& seq = a.seqs[s];
  if (seq.no_out) return;
  const int chunks = (WalkLength(seq, a.low_bits) + kKvPolicyChunk - 1) / kKvPolicyChunk;
  const float* partial = sc.partial + static_cast<size_t>(s) * sc.max_chunks * a.num_heads * D +
                         static_cast<size_t>(h) * D + d;
  float sum = 0.f;
  for (int i = 0; i < chunks; ++i) sum += partial[static_cast<size_t>(i) * a.num_heads * D];
  a.out[QRow(seq, s) * a.out_stride + static_cast<int64_t>(h) * D + d] = __float2bfloat16(sum);
}

template <int D>
cudaError_t LaunchDecode(const KvPolicyDecodeArgs& a, cudaStream_t stream) {
  size_t bytes = 0;
  const Scratch sc = Carve(a.scratch, a.num_seqs, a.num_heads, a.num_kv_heads, D, a.max_seq_len, &bytes);
  const dim3 grid(sc.max_chunks, a.num_kv_heads, a.num_seqs);
  if (a.low_bits > 0) {
    ScoresKernel<D, true><<<grid, kThreads, 0, stream>>>(a, sc);
    PvKernel<D, true><<<grid, kThreads, 0, stream>>>(a, sc);
  } else {
    ScoresKernel<D, false><<<grid, kThreads, 0, stream>>>(a, sc);
    PvKernel<D, false><<<grid, kThreads, 0, stream>>>(a, sc);
  }
  ReduceKernel<D><<<dim3(a.num_heads, a.num_seqs), D, 0, stream>>>(a, sc);
  return cudaGetLastError();
}

__global__ void ExtendKernel(const KvPolicySeq* seqs, int num_kv_heads) {
  const KvPolicySeq seq = seqs[blockIdx.y];
  const size_t base = static_cast<size_t>(blockIdx.x) * seq.capacity;  // (layer * heads + head)
  for (int p = seq.extend_from + threadIdx.x; p < seq.seq_len; p += blockDim.x) {
    seq.state[base + p] = kKvPolicyFull;
    seq.last_hit[base + p] = p;
    seq.slot[base + p] = p - seq.slot_offset;
    seq.pos[base + p - seq.slot_offset] = p;
  }
}

// Block-wide sum of one int per thread (blockDim.x == 256).
__device__ int BlockSumInt(int v, int* shared) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  __syncthreads();
  if ((threadIdx.x & 31) == 0) shared[threadIdx.x >> 5] = v;
  __syncthreads();
  int total = 0;
  for (int w = 0; w < static_cast<int>(blockDim.x >> 5); ++w) total += shared[w];
  return total;
}

constexpr int kChooseThreads = 256;

// This thread's share of the kFull keys (low = false) or the low entries, unpacked or packed (low
// = true), at positions [from, len).
__device__ __forceinline__ int CountFrom(const uint8_t* state, int from, int len, bool low) {
  int n = 0;
  for (int p = max(from, 0) + threadIdx.x; p < len; p += blockDim.x) {
    n += low ? IsLow(state[p]) : state[p] == kKvPolicyFull;
  }
  return n;
}

// The max over the block of each thread's `m` for its channel threadIdx.x % D (kChooseThreads /
// D rows of D threads): every thread of row 0 gets its channel's; the others an undefined value.
template <int D>
__device__ __forceinline__ float BlockChannelMax(float m) {
  constexpr int kRows = kChooseThreads / D;
  __shared__ float sm[kRows][D];
  const int ch = threadIdx.x % D, row = threadIdx.x / D;
  sm[row][ch] = m;
  __syncthreads();
  if (row == 0) {
    for (int r = 1; r < kRows; ++r) m = fmaxf(m, sm[r][ch]);
  }
  return m;
}

// MiKV: fixes the balance of head `lhead` (kvpolicy SequenceKvPolicy::Apply): max |k_c| over the
// keys the head keeps (every slot with a position not dead), then b_c from q_absmax.
template <int D>
__device__ void FixBalance(const KvPolicyChooseArgs& a, const KvPolicySeq& seq, int lhead, const uint8_t* state,
                           const int32_t* pos) {
  constexpr int kRows = kChooseThreads / D;
  const int layer = lhead / a.num_kv_heads, head = lhead % a.num_kv_heads;
  const CacheSide k = MakeSide(a.k_layers[layer], a.layout, false, a.kv_stride, D);
  const int32_t* table = a.block_tables + static_cast<int64_t>(blockIdx.y) * a.max_blocks;
  const int ch = threadIdx.x % D, row = threadIdx.x / D, slots = seq.seq_len - seq.slot_offset;
  float m = 0.f;
#pragma unroll 4
  for (int sl = row; sl < slots; sl += kRows) {
    const int kp = pos[sl];
    if (kp < 0 || state[kp] == kKvPolicyDead || state[kp] == kKvPolicyLowPacked) continue;
    float x[1];
    LoadValues<1>(k, CacheSlot(table, sl, a.block_size), head, ch, x);
    m = fmaxf(m, fabsf(x[0]));
  }
  m = BlockChannelMax<D>(m);
  if (row == 0) {
    const float qm = seq.q_absmax[static_cast<size_t>(lhead) * D + ch];
    float b = 1.f;
    if (qm > 0.f && m > 0.f) b = fminf(fmaxf(__fsqrt_rn(__fdiv_rn(qm, m)), 1.0f / 64), 64.0f);
    seq.balance[static_cast<size_t>(lhead) * D + ch] = b;
  }
  if (threadIdx.x == 0) seq.balance_set[lhead] = kKvBalanceFixed;
}

__global__ void __launch_bounds__(kChooseThreads) ChooseKernel(KvPolicyChooseArgs a) {
  const KvPolicySeq seq = a.seqs[blockIdx.y];
  const int lhead = blockIdx.x;  // layer * num_kv_heads + head
  const size_t base = static_cast<size_t>(lhead) * seq.capacity;
  uint8_t* state = seq.state + base;
  const int32_t* last_hit = seq.last_hit + base;
  const int len = seq.seq_len;
  // Read before any thread can fix it (FixBalance, below).
  const bool balance_unset = seq.balance_set != nullptr && seq.balance_set[lhead] == kKvBalanceUnset;
  __shared__ int red[kChooseThreads / 32];
  int full = 0;
  for (int p = threadIdx.x; p < len; p += kChooseThreads) full += state[p] == kKvPolicyFull;
  __syncthreads();  // counted before any thread marks a victim
  const size_t out_at = static_cast<size_t>(blockIdx.y) * gridDim.x + lhead;
  // The counts after the choice (or without one): every victim marked before they are taken.
  auto counts = [&](int full_left) {
    if (a.full_counts != nullptr && threadIdx.x == 0) a.full_counts[out_at] = full_left;
    if (a.from_counts == nullptr && a.low_counts == nullptr && a.low_from_counts == nullptr) return;
    __syncthreads();
    if (a.from_counts != nullptr) {
      const int n = BlockSumInt(CountFrom(state, seq.count_from, len, false), red);
      if (threadIdx.x == 0) a.from_counts[out_at] = n;
    }
    if (a.low_counts != nullptr) {
      const int n = BlockSumInt(CountFrom(state, 0, len, true), red);
      if (threadIdx.x == 0) a.low_counts[out_at] = n;
    }
    if (a.low_from_counts != nullptr) {
      const int n = BlockSumInt(CountFrom(state, seq.count_from, len, true), red);
      if (threadIdx.x == 0) a.low_from_counts[out_at] = n;
    }
  };
  if (!seq.choose) {
    counts(BlockSumInt(full, red));
    return;
  }
  const int lo = max(a.sinks, seq.pinned), hi = len - a.recent, oldest = len - a.window;
  // The w rule, and the survivors the budget may take.
  int rule = 0, rest = 0;
  for (int p = max(lo, 0) + threadIdx.x; p < hi; p += kChooseThreads) {
    if (state[p] != kKvPolicyFull) continue;
    if (last_hit[p] < oldest) {
      state[p] = a.victim_state;
      ++rule;
    } else {
      ++rest;
    }
  }
  full = BlockSumInt(full, red);
  rule = BlockSumInt(rule, red);
  rest = BlockSumInt(rest, red);
  int left = full - rule;
  int over = 0;
  if (seq.budget >= 0 && left > seq.budget && rest > 0) {
    over = min(left - seq.budget, rest);
    // The over-th smallest key (last_hit << 24 | p) among the survivors: 8-bit digits from the
    // highest one a key of this length can have.
    __shared__ int hist[256];
    __shared__ unsigned long long sm_prefix;
    __shared__ int sm_k;
    const int bits = 24 + (32 - __clz(max(len, 1)));
    int shift = (bits - 1) / 8 * 8;
    if (threadIdx.x == 0) {
      sm_prefix = 0;
      sm_k = over;
    }
    for (; shift >= 0; shift -= 8) {
      for (int i = threadIdx.x; i < 256; i += kChooseThreads) hist[i] = 0;
      __syncthreads();
      const unsigned long long prefix = sm_prefix;
      for (int p = max(lo, 0) + threadIdx.x; p < hi; p += kChooseThreads) {
        if (state[p] != kKvPolicyFull) continue;
        const unsigned long long key = (static_cast<unsigned long long>(last_hit[p]) << 24) | p;
        if ((key >> (shift + 8)) == (prefix >> (shift + 8))) atomicAdd(&hist[(key >> shift) & 255], 1);
      }
      __syncthreads();
      if (threadIdx.x == 0) {
        int k = sm_k, d = 0;
        while (d < 255 && hist[d] < k) k -= hist[d++];
        sm_k = k;
        sm_prefix = prefix | (static_cast<unsigned long long>(d) << shift);
      }
      __syncthreads();
    }
    const unsigned long long cut = sm_prefix;
    for (int p = max(lo, 0) + threadIdx.x; p < hi; p += kChooseThreads) {
      if (state[p] != kKvPolicyFull) continue;
      const unsigned long long key = (static_cast<unsigned long long>(last_hit[p]) << 24) | p;
      if (key <= cut) state[p] = a.victim_state;
    }
    left -= over;
  }
  // MiKV: the head's first demotion fixes its balance (the keys' values do not depend on the
  // states just marked: every key not dead is read).
  if (a.balance_keys && a.victim_state == kKvPolicyLow && rule + over > 0 && balance_unset) {
    __syncthreads();  // marks done (FixBalance reads state)
    const int32_t* pos = seq.pos + base;
    if (a.head_dim == 128) {
      FixBalance<128>(a, seq, lhead, state, pos);
    } else {
      FixBalance<64>(a, seq, lhead, state, pos);
    }
  }
  counts(left);
}

// MiKV's running max |q_c| (kvpolicy SequenceKvPolicy::ObserveQueries): grid (KV heads, states),
// kChooseThreads threads, kChooseThreads / D rows at a time.
template <int D>
__global__ void __launch_bounds__(kChooseThreads) ObserveKernel(const KvPolicySeq* seqs, int layer, const __nv_bfloat16* q,
                                                                int64_t q_stride, int num_heads, int num_kv_heads) {
  constexpr int kRows = kChooseThreads / D;
  const KvPolicySeq& seq = seqs[blockIdx.y];
  const int kvh = blockIdx.x, lhead = layer * num_kv_heads + kvh;
  if (seq.q_len <= 0 || seq.balance_set == nullptr || seq.balance_set[lhead] != kKvBalanceUnset) return;
  const int group = num_heads / num_kv_heads, ch = threadIdx.x % D, row = threadIdx.x / D;
  float m = 0.f;
  for (int r = row; r < seq.q_len; r += kRows) {
    const __nv_bfloat16* x = q + static_cast<int64_t>(seq.q_row + r) * q_stride + static_cast<int64_t>(kvh) * group * D + ch;
    for (int h = 0; h < group; ++h) m = fmaxf(m, fabsf(__bfloat162float(x[h * D])));
  }
  m = BlockChannelMax<D>(m);
  if (row == 0) {
    float* qa = seq.q_absmax + static_cast<size_t>(lhead) * D + ch;
    *qa = fmaxf(*qa, m);
  }
}

// Compaction: one CTA of kCompactThreads per (layer, head); chunks of kCompactChunk positions,
// kCompactThreads / kCompactChunk threads per key row (each a slice of its K and V rows).
constexpr int kCompactThreads = 256, kCompactChunk = 64, kCompactParts = kCompactThreads / kCompactChunk;

// Copies `entries` entries between a head's run from sequence slot `base` (K entries of kb bytes
// through the K rows' region, V's of vb through V's) and the stage (entry i's K then V bytes at
// i * (kb + vb)): into the stage (to_run false) or out of it. The CTA's threads share the bytes.
__device__ void CopyRun(const KvPolicyCompactArgs& a, CacheSide kc, CacheSide vc, int head,
                        int32_t base, int32_t entries, int kb, int vb, uint8_t* stage, bool to_run) {
  const int32_t k_bytes = entries * kb, total = entries * (kb + vb);
  for (int32_t b = threadIdx.x; b < total; b += blockDim.x) {
    const bool v_side = b >= k_bytes;
    const int32_t rb = v_side ? b - k_bytes : b;
    const int entry = v_side ? vb : kb;
    uint8_t* run = RunByte(v_side ? vc : kc, head, a.block_table, a.block_size, base, rb);
    uint8_t* staged = stage + static_cast<int64_t>(rb / entry) * (kb + vb) + (v_side ? kb : 0) + rb % entry;
    if (to_run) {
      *run = *staged;
    } else {
      *staged = *run;
    }
  }
}

// The bytes of one side's low entry of a head of `width` values (kvpolicy::LowEntryBytes).
__device__ __forceinline__ int LowEntryBytesOf(int width, int bits) { return width * bits / 8 + 4; }

// MiKV compaction, the staging (kvpolicy SequenceKvPolicy::Compact's LowRepack sources, read
// before any move): entry i of the head's new run at stage + i * (kb + vb) (K entry, then V
// entry; kb / vb: LowEntryBytesOf the sides' widths, head_dim, or a LoRC layer's r_k / r_v):
// first the old run's entries [0, num_packed), then the kKvPolicyLow keys at positions >= from in
// position order, quantized from their slots (kvpolicy EncodeLowEntry: K times the balance, where
// fixed: never over latents, whose layers do not balance), which become kKvPolicyLowPacked with
// slot = their entry's index (and packed_pos[entry] = their position). A warp per key, lane
// i holding channels [4 i, 4 i + 4) of a side (widths <= 128, multiples of 8); lanes past the
// width hold a copy of channel 0, which leaves the row's min and max as they are. Returns the
// entries staged (every thread).
__device__ int StageLowEntries(const KvPolicyCompactArgs& a, const KvPolicySeq& seq, int lhead, int head,
                               uint8_t* state, int32_t* slot, CacheSide kc, CacheSide vc, uint8_t* stage,
                               int* sm_rank, int* sm_count) {
  constexpr int E = 4;
  const int bits = a.low_bits;
  const int kb = LowEntryBytesOf(kc.head_dim, bits), vb = LowEntryBytesOf(vc.head_dim, bits);
  const int old = seq.num_packed[lhead];
  const int64_t capacity = a.stage_head_bytes / (kb + vb);
  // The old run.
  CopyRun(a, kc, vc, head, seq.low_base[lhead], static_cast<int32_t>(min(static_cast<int64_t>(old), capacity)), kb,
          vb, stage, /*to_run=*/false);
  // The demoted keys since, a chunk of kCompactChunk positions at a time; a warp per key.
  const float* balance =
      seq.balance_set[lhead] == kKvBalanceFixed ? seq.balance + static_cast<size_t>(lhead) * kc.head_dim : nullptr;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  int n = old;
  for (int p0 = a.from; p0 < seq.seq_len; p0 += kCompactChunk) {
    if (threadIdx.x < kCompactChunk) {
      const int p = p0 + threadIdx.x;
      const bool low = p < seq.seq_len && state[p] == kKvPolicyLow;
      const unsigned bal = __ballot_sync(0xffffffffu, low);
      if (lane == 0) sm_count[threadIdx.x >> 5] = __popc(bal);
      sm_rank[threadIdx.x] = low ? __popc(bal & ((1u << lane) - 1u)) : -1;
    }
    __syncthreads();
    for (int k = warp; k < kCompactChunk; k += warps) {
      int rank = sm_rank[k];
      if (rank < 0) continue;
      if (k >= 32) rank += sm_count[0];
      const int64_t e = n + rank;
      if (e >= capacity) continue;  // the host sized the stage from the counts: never
      const int p = p0 + k;
      const int64_t cs = CacheSlot(a.block_table, slot[p], a.block_size);
      for (int side = 0; side < 2; ++side) {
        const CacheSide& c = side == 0 ? kc : vc;
        const int width = c.head_dim, ch = lane * E;
        const bool mine = ch < width;
        float x[E];
        LoadValues<E>(c, cs, head, mine ? ch : 0, x);
        if (side == 0 && balance != nullptr && mine) {
#pragma unroll
          for (int i = 0; i < E; ++i) x[i] = __fmul_rn(x[i], balance[ch + i]);
        }
        const float x0 = __shfl_sync(0xffffffffu, x[0], 0);  // balanced, as the row's values
#pragma unroll
        for (int i = 0; i < E; ++i) x[i] = mine ? x[i] : x0;
        int code[E];
        uint16_t scale16, zero16;
        QuantizeLane<E>(x, bits, code, &scale16, &zero16);
        // This lane's 4 * bits bits (16 or 8) at byte lane * bits / 2 of the codes.
        uint32_t word = 0;
#pragma unroll
        for (int i = 0; i < E; ++i) word |= static_cast<uint32_t>(code[i]) << (i * bits);
        uint8_t* out = stage + e * (kb + vb) + (side == 0 ? 0 : kb);
        const int code_bytes = width * bits / 8;
        if (mine) {
          for (int i = 0; i < bits / 2; ++i) out[lane * bits / 2 + i] = static_cast<uint8_t>(word >> (8 * i));
        }
        if (lane == 0) {
          out[code_bytes] = static_cast<uint8_t>(scale16);
          out[code_bytes + 1] = static_cast<uint8_t>(scale16 >> 8);
          out[code_bytes + 2] = static_cast<uint8_t>(zero16);
          out[code_bytes + 3] = static_cast<uint8_t>(zero16 >> 8);
        }
      }
      if (lane == 0) {
        state[p] = kKvPolicyLowPacked;
        slot[p] = static_cast<int32_t>(e);
        if (seq.packed_pos != nullptr) seq.packed_pos[static_cast<size_t>(lhead) * seq.capacity + e] = p;
      }
    }
    n += sm_count[0] + sm_count[1];
    __syncthreads();  // sm_* reused by the next chunk
  }
  __syncthreads();  // staged (and the states marked) before the moves
  return static_cast<int>(min(static_cast<int64_t>(n), capacity));
}

// A head's entry of one side moves through shared memory as 8-byte words (its region: at most
// kMoveWords, bf16 D 128's 256 bytes; quantized regions at D 64 / 128 are multiples of 8 bytes:
// 32 at the least, int4 D 64) shared by the key's kCompactParts threads, and its fp16 scales
// (quantized; at most kMoveScales: int4 D 128's 4 groups x (scale, zero)) by part 0.
constexpr int kMoveWords = 32, kMoveScales = 8;

template <int D>
__global__ void __launch_bounds__(kCompactThreads, 1) CompactKernel(KvPolicyCompactArgs a) {
  const KvPolicySeq seq = *a.seq;
  const int lhead = a.layer0 * a.num_kv_heads + blockIdx.x, layer = lhead / a.num_kv_heads,
            head = lhead % a.num_kv_heads;
  const size_t base = static_cast<size_t>(lhead) * seq.capacity;
  uint8_t* state = seq.state + base;
  int32_t* slot = seq.slot + base;
  int32_t* pos = seq.pos + base;
  CacheSide kc = MakeSide(a.k_layers[layer], a.layout, false, a.kv_stride, D);
  CacheSide vc = MakeSide(a.v_layers[layer], a.layout, true, a.kv_stride, D);
  if (a.sides != nullptr) {  // this layer's own widths (a LoRC latent layer: r_k / r_v)
    const KvPolicyLayerSides& ls = a.sides[layer];
    kc.q = ls.k_q, kc.row = ls.k_stride, kc.head_dim = ls.k_dim;
    vc.q = ls.v_q, vc.row = ls.v_stride, vc.head_dim = ls.v_dim;
  }
  const int key = threadIdx.x / kCompactParts, part = threadIdx.x % kCompactParts;
  // An entry's region moves as 8-byte words where both sides' regions are whole words (every
  // full-KV layout), else as 4-byte ones (int4 latents of r % 16 == 8); (part 0) its scales.
  const bool wide = kc.RegionBytes() % 8 == 0 && vc.RegionBytes() % 8 == 0;
  const int word_bytes = wide ? 8 : 4;
  __shared__ uint2 sm_words[kCompactChunk][2][kMoveWords];  // the chunk's moving entries, K then V
  __shared__ uint16_t sm_scales[kCompactChunk][2][kMoveScales];
  __shared__ int sm_rank[kCompactChunk];  // a position's rank among the chunk's kept keys, or -1
  __shared__ int sm_count[kCompactChunk / 32];
  // MiKV: this head's low entries staged before any move (the old run's, then the demoted keys'
  // at positions >= from), written as the new run after them.
  int staged = 0;
  uint8_t* stage = a.low_bits > 0 ? a.stage + static_cast<int64_t>(blockIdx.x) * a.stage_head_bytes : nullptr;
  if (stage != nullptr) staged = StageLowEntries(a, seq, lhead, head, state, slot, kc, vc, stage, sm_rank, sm_count);
  int next = a.from;  // the next destination slot
  for (int p0 = a.from; p0 < seq.seq_len; p0 += kCompactChunk) {
    if (threadIdx.x < kCompactChunk) {  // two whole warps: ballots
      const int p = p0 + threadIdx.x, lane = threadIdx.x & 31;
      const bool keep = p < seq.seq_len && state[p] == kKvPolicyFull;
      const unsigned bal = __ballot_sync(0xffffffffu, keep);
      if (lane == 0) sm_count[threadIdx.x >> 5] = __popc(bal);
      sm_rank[threadIdx.x] = keep ? __popc(bal & ((1u << lane) - 1u)) : -1;
    }
    __syncthreads();
    int rank = sm_rank[key];
    if (rank >= 0 && key >= 32) rank += sm_count[0];
    const int total = sm_count[0] + sm_count[1];
    // Read this thread's slice of its key's rows, then (after every read) write it.
    const int p = p0 + key;
    int64_t dst = -1;
    if (rank >= 0) {
      const int32_t s_old = slot[p], s_new = next + rank;
      if (s_old != s_new) {
        const int64_t src = CacheSlot(a.block_table, s_old, a.block_size);
        dst = CacheSlot(a.block_table, s_new, a.block_size);
        for (int side = 0; side < 2; ++side) {
          const CacheSide c = side == 0 ? kc : vc;
          const int words = c.RegionBytes() / word_bytes, scales = part == 0 ? c.NumScales() : 0;
          const uint8_t* from = c.Region(src, head);
          if (wide) {
            for (int w = part; w < words; w += kCompactParts) sm_words[key][side][w] = reinterpret_cast<const uint2*>(from)[w];
          } else {
            uint32_t* to = reinterpret_cast<uint32_t*>(sm_words[key][side]);
            for (int w = part; w < words; w += kCompactParts) to[w] = reinterpret_cast<const uint32_t*>(from)[w];
          }
          const uint16_t* from_scales = scales > 0 ? c.Scales(src, head) : nullptr;
          for (int i = 0; i < scales; ++i) sm_scales[key][side][i] = from_scales[i];
        }
      }
    }
    __syncthreads();  // every read of the chunk done
    if (dst >= 0) {
      for (int side = 0; side < 2; ++side) {
        const CacheSide c = side == 0 ? kc : vc;
        const int words = c.RegionBytes() / word_bytes, scales = part == 0 ? c.NumScales() : 0;
        uint8_t* to = c.Region(dst, head);
        if (wide) {
          for (int w = part; w < words; w += kCompactParts) reinterpret_cast<uint2*>(to)[w] = sm_words[key][side][w];
        } else {
          const uint32_t* from = reinterpret_cast<const uint32_t*>(sm_words[key][side]);
          for (int w = part; w < words; w += kCompactParts) reinterpret_cast<uint32_t*>(to)[w] = from[w];
        }
        uint16_t* to_scales = scales > 0 ? c.Scales(dst, head) : nullptr;
        for (int i = 0; i < scales; ++i) to_scales[i] = sm_scales[key][side][i];
      }
      if (part == 0) {
        slot[p] = next + rank;
        pos[next + rank] = p;
      }
    }
    next += total;
    __syncthreads();  // the chunk's writes before the next chunk's reads; sm_* reused
  }
  // The slots past this head's run held keys that moved down or died: no key there now (a head
  // keeping fewer keys than the longest run leaves such slots below the new slot count; MiKV's
  // packed run lies there too, read by entry index).
  for (int s = next + static_cast<int>(threadIdx.x); s < a.old_slots; s += kCompactThreads) pos[s] = -1;
  if (stage == nullptr) return;
  // The new run, right after the full one.
  CopyRun(a, kc, vc, head, next, staged, LowEntryBytesOf(kc.head_dim, a.low_bits), LowEntryBytesOf(vc.head_dim, a.low_bits),
          stage, /*to_run=*/true);
  if (threadIdx.x == 0) {
    seq.low_base[lhead] = next;
    seq.num_packed[lhead] = staged;
  }
}

// Whether a quantized layout is one the kernels address (kv_policy.cuh KvPolicyCacheLayout): both
// sides exactly MakeKvqSide's for this block size, KV heads and head_dim, and readable (bf16:
// nothing to check here).
bool SideIs(const KvqSide& s, const KvqSide& want) {
  return s.code_row == want.code_row && s.scale_row == want.scale_row && s.head_code == want.head_code &&
         s.head_scales == want.head_scales && s.block_size == want.block_size;
}
bool LayoutReadable(const KvPolicyCacheLayout& l, int32_t block_size, int32_t num_kv_heads, int32_t head_dim) {
  if (l.kv_quant == KvQuant::kNone) return true;
  const KvqSide want = MakeKvqSide(l.kv_quant, block_size, num_kv_heads, head_dim);
  return SideIs(l.k_q, want) && SideIs(l.v_q, want) && KvqSideReadable(l.kv_quant, l.k_q, block_size);
}

}  // namespace

size_t KvPolicyDecodeScratchBytes(int num_seqs, int num_heads, int num_kv_heads, int head_dim,
                                  int max_seq_len) {
  size_t bytes = 0;
  Carve(nullptr, num_seqs, num_heads, num_kv_heads, head_dim, max_seq_len, &bytes);
  return bytes;
}

cudaError_t LaunchKvPolicyDecode(const KvPolicyDecodeArgs& a, cudaStream_t stream) {
  if (a.num_seqs < 1 || a.max_seq_len < 1 || a.num_kv_heads < 1 || a.num_heads % a.num_kv_heads != 0 ||
      a.num_heads / a.num_kv_heads > kMaxGroup || a.scratch == nullptr || a.seqs == nullptr ||
      (a.low_bits != 0 && a.low_bits != 2 && a.low_bits != 4)) {
    return cudaErrorInvalidValue;
  }
  if ((a.head_dim != 128 && a.head_dim != 64) || !LayoutReadable(a.layout, a.block_size, a.num_kv_heads, a.head_dim)) {
    return cudaErrorInvalidValue;
  }
  if (KvPolicyDecodeMmaApplies(a)) return LaunchKvPolicyDecodeMma(a, stream);
  return a.head_dim == 128 ? LaunchDecode<128>(a, stream) : LaunchDecode<64>(a, stream);
}

cudaError_t LaunchKvPolicyExtend(const KvPolicySeq* seqs, int num_seqs, int num_layers, int num_kv_heads,
                                 cudaStream_t stream) {
  if (seqs == nullptr || num_seqs < 1 || num_layers < 1 || num_kv_heads < 1) return cudaErrorInvalidValue;
  ExtendKernel<<<dim3(num_layers * num_kv_heads, num_seqs), 128, 0, stream>>>(seqs, num_kv_heads);
  return cudaGetLastError();
}

cudaError_t LaunchKvPolicyCompact(const KvPolicyCompactArgs& a, cudaStream_t stream) {
  if (a.seq == nullptr || a.k_layers == nullptr || a.v_layers == nullptr || a.block_table == nullptr ||
      a.num_layers < 1 || a.num_kv_heads < 1 || a.block_size < 1 || a.from < 0 || a.old_slots < a.from ||
      a.layer0 < 0 ||
      (a.low_bits != 0 && ((a.low_bits != 2 && a.low_bits != 4) || a.stage == nullptr || a.stage_head_bytes < 0))) {
    return cudaErrorInvalidValue;
  }
  if (a.sides != nullptr) {  // per-layer widths: every side one the kernel moves
    if (a.host_sides == nullptr) return cudaErrorInvalidValue;
    for (int l = a.layer0; l < a.layer0 + a.num_layers; ++l) {
      const KvPolicyLayerSides& ls = a.host_sides[l];
      for (const auto& [dim, stride, q] :
           {std::tuple{ls.k_dim, ls.k_stride, ls.k_q}, std::tuple{ls.v_dim, ls.v_stride, ls.v_q}}) {
        const bool ok = dim >= 8 && dim <= 128 && dim % 8 == 0 &&
                        (a.layout.kv_quant == KvQuant::kNone
                             ? stride % 8 == 0 && stride >= int64_t{dim} * a.num_kv_heads
                             : SideIs(q, MakeKvqSide(a.layout.kv_quant, a.block_size, a.num_kv_heads, dim)) &&
                                   KvqSideReadable(a.layout.kv_quant, q, a.block_size));
        if (!ok) return cudaErrorInvalidValue;
      }
    }
    CompactKernel<128><<<dim3(a.num_layers * a.num_kv_heads), kCompactThreads, 0, stream>>>(a);
    return cudaGetLastError();
  }
  if ((a.layout.kv_quant == KvQuant::kNone && a.kv_stride % 8 != 0) ||
      !LayoutReadable(a.layout, a.block_size, a.num_kv_heads, a.head_dim)) {
    return cudaErrorInvalidValue;
  }
  const dim3 grid(a.num_layers * a.num_kv_heads);
  if (a.head_dim == 128) {
    CompactKernel<128><<<grid, kCompactThreads, 0, stream>>>(a);
  } else if (a.head_dim == 64) {
    CompactKernel<64><<<grid, kCompactThreads, 0, stream>>>(a);
  } else {
    return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

cudaError_t LaunchKvPolicyChoose(const KvPolicyChooseArgs& a, cudaStream_t stream) {
  if (a.seqs == nullptr || a.num_seqs < 1 || a.num_layers < 1 || a.num_kv_heads < 1 || a.sinks < 0 ||
      a.recent < 0 || a.window < 1 ||
      (a.balance_keys && (a.k_layers == nullptr || a.block_tables == nullptr || a.block_size < 1 ||
                          (a.head_dim != 64 && a.head_dim != 128) ||
                          !LayoutReadable(a.layout, a.block_size, a.num_kv_heads, a.head_dim)))) {
    return cudaErrorInvalidValue;
  }
  ChooseKernel<<<dim3(a.num_layers * a.num_kv_heads, a.num_seqs), kChooseThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

cudaError_t LaunchKvPolicyObserveQueries(const KvPolicySeq* seqs, int num_seqs, int layer, const __nv_bfloat16* q,
                                         int64_t q_stride, int num_heads, int num_kv_heads, int head_dim,
                                         cudaStream_t stream) {
  if (seqs == nullptr || q == nullptr || num_seqs < 1 || layer < 0 || num_kv_heads < 1 ||
      num_heads % num_kv_heads != 0) {
    return cudaErrorInvalidValue;
  }
  const dim3 grid(num_kv_heads, num_seqs);
  if (head_dim == 128) {
    ObserveKernel<128><<<grid, kChooseThreads, 0, stream>>>(seqs, layer, q, q_stride, num_heads, num_kv_heads);
  } else if (head_dim == 64) {
    ObserveKernel<64><<<grid, kChooseThreads, 0, stream>>>(seqs, layer, q, q_stride, num_heads, num_kv_heads);
  } else {
    return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace lorc::kernels
