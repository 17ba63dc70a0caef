// Parity of the add + RMSNorm and the SiLU fused into the small-M BF16 GEMV (the fixture and the
// plain GEMV's tolerance: cuda_gemv_fixture.h, cuda_gemv_test.cc).
//
// The add + RMSNorm fused into the decode projections (Backend::NormMatmulSiluMul /
// NormMatmulRopeKvWrite, kernels::LaunchGemvNorm; M = 1, 3, 8, 9, 16, K = 256 and 1048 (a 24-wide
// tail after 8 warp chunks), with and without the add): the stream the fused call stores is bit
// for bit FusedAddRmsNorm's (without the add `next` is untouched), and the projections are within
// bounds of the CPU's RmsNorm then Matmul (then SiluMul / RopeKvWrite) in fp32 on the same bf16
// stream. The normed input differs from the reference by one bf16 rounding (at most 2^-8 of each
// term, the fused kernel rounding r * weight and the RmsNorm kernel r * weight / rms) and the
// projection by one more of the result, so a projection element y_j, S_j = sum_k |w_jk normed_k|:
//   |cuda - cpu| <= 2^-7 S_j + 2^-8 |y_j|
// (twice the input term: room for fp32 accumulation, <= K 2^-24 S_j, and the rsqrt); silu(g) * u
// from g and u within t_g and t_u of the reference (|silu'| <= 1.1), plus its own rounding:
//   |cuda - cpu| <= (1 + 2^-7) (1.1 t_g (|u| + t_u) + |silu(g)| t_u + 2^-8 |silu(g) u|);
// a rotated element and its partner p (|cos|, |sin| <= 1, one more rounding):
//   |cuda - cpu| <= 2^-7 (S_i + S_p + |y_i| + |y_p|).
// Fused against the unfused CUDA ops: twice these (both within them of the CPU). These bounds are
// worst cases (every rounding error of a sum in the same direction), so the errors' RMS over an
// output must also stay under 2^-6 of the reference's: independent roundings give about 2^-9 to
// 2^-8, one missing 8-wide k vector of the 1048-wide tail about 2^-3.5 (sqrt(8 / 1048)). The
// inputs make the bounds bite: the stream in [-6, 6] (rms about 3.5, 4.2 with the add: a missing
// 1 / rms is off by that factor) and the add in [-4, 4] (a missing add moves every input by about
// half), and the test checks that such wrong results (no 1 / rms, no add, gate rows paired with
// the wrong up rows) fail both checks (ExpectRejected). In place (next == residual) and past
// kGemvNormMaxRows the backend runs the unfused ops, bit for bit; the kernel refuses bad operands;
// the fused call replays from a CUDA graph bit for bit.
// Skipped without a CUDA device (except the operand checks, which launch nothing).
#include <cmath>
#include <cstdlib>
#include <functional>
#include <string_view>
#include <tuple>
#include <utility>

#include "tests/backend/cuda_gemv_fixture.h"

namespace lorc {
namespace backend_test {
namespace {

using parity::Get;
using parity::Put;

#ifdef LORC_HAVE_CUDA

// --- The add + RMSNorm fused into the decode projections (header comment) ---

constexpr float kNormEps = 1e-5f;
constexpr float kSentinel = 1024.f;  // in every output buffer that a call may leave alone

std::vector<float> RoundedBf16(std::vector<float> v) {
  for (float& e : v) e = Bf16(e);
  return v;
}

// One problem's host values, all bf16: the stream x [M, K] in [-6, 6], the add [M, K] in [-4, 4]
// (with_add) and the norm weight g [K] in [0.5, 1.5]; `stream` is what the residual stream holds
// after the add, bf16(x + add) (fp32 sum, one rounding: FusedAddRmsNorm's), else x.
struct NormData {
  int64_t M = 0, K = 0;
  bool with_add = false;
  std::vector<float> x, add, g, stream;
};

NormData MakeNormData(std::mt19937& rng, int64_t M, int64_t K, bool with_add) {
  NormData d;
  d.M = M;
  d.K = K;
  d.with_add = with_add;
  d.x = RoundedBf16(RandomVec(rng, M * K, -6.f, 6.f));
  if (with_add) d.add = RoundedBf16(RandomVec(rng, M * K, -4.f, 4.f));
  d.g = RoundedBf16(RandomVec(rng, K, 0.5f, 1.5f));
  d.stream = d.x;
  for (size_t i = 0; i < d.add.size(); ++i) d.stream[i] = Bf16(d.x[i] + d.add[i]);
  return d;
}

// A problem's BF16 operands on `be`: the stream, the add (or none), `next` and the normed scratch
// (both sentinel-filled), the norm weight; `in` views them, `next` distinct from the stream.
struct NormOperands {
  DeviceBuffer x, add, next, g, normed;
  NormedInput in;
};

NormOperands PutNorm(Backend& be, const NormData& d) {
  NormOperands o;
  const std::vector<float> sentinel(d.M * d.K, kSentinel);
  o.x = Put(be, d.x, DType::kBF16);
  o.next = Put(be, sentinel, DType::kBF16);
  o.normed = Put(be, sentinel, DType::kBF16);
  o.g = Put(be, d.g, DType::kBF16);
  o.in.residual = Tensor2D{o.x.data(), DType::kBF16, d.M, d.K};
  if (d.with_add) {
    o.add = Put(be, d.add, DType::kBF16);
    o.in.add = Tensor2D{o.add.data(), DType::kBF16, d.M, d.K};
  }
  o.in.next = Tensor2D{o.next.data(), DType::kBF16, d.M, d.K};
  o.in.weight = Tensor2D{o.g.data(), DType::kBF16, 1, d.K};
  o.in.eps = kNormEps;
  o.in.normed = Tensor2D{o.normed.data(), DType::kBF16, d.M, d.K};
  return o;
}

// The unfused ops the fused call replaces, in place on in.residual: RmsNorm or FusedAddRmsNorm
// into in.normed.
absl::Status UnfusedNorm(Backend& be, const NormedInput& in) {
  return in.add.data != nullptr ? be.FusedAddRmsNorm(in.residual, in.add, in.weight, in.eps, in.normed)
                                : be.RmsNorm(in.residual, in.weight, in.eps, in.normed);
}

// The kernel's arguments for `o` (dense rows of K).
kernels::GemvNormArgs NormArgs(const NormOperands& o, int64_t K) {
  kernels::GemvNormArgs a;
  a.weight = o.g.data();
  a.eps = kNormEps;
  if (o.in.add.data != nullptr) {
    a.add = o.add.data();
    a.ld_add = K;
    a.residual_out = o.next.data();
    a.ld_residual_out = K;
  }
  return a;
}

// x [M, K] * w [N, K]^T on the CPU backend in fp32.
std::vector<float> CpuMatmul(Backend& cpu, const std::vector<float>& x, const std::vector<float>& w, int64_t M,
                             int64_t K, int64_t N) {
  DeviceBuffer dx = Put(cpu, x, DType::kF32), dw = Put(cpu, w, DType::kF32);
  DeviceBuffer out = Put(cpu, std::vector<float>(M * N, 0.f), DType::kF32);
  CHECK_OK(cpu.Matmul({dx.data(), DType::kF32, M, K}, {dw.data(), DType::kF32, N, K}, {out.data(), DType::kF32, M, N}));
  return Get(cpu, out, DType::kF32);
}

// The fp32 reference of a projection of the normed stream on the CPU backend: normed =
// RmsNorm(stream) * g, y = normed * w^T, and the bounds' magnitudes mag = |normed| * |w|^T.
struct NormReference {
  std::vector<float> normed, y, mag;
};

NormReference CpuNormProjection(Backend& cpu, const std::vector<float>& stream, const std::vector<float>& g,
                                const std::vector<float>& w, int64_t M, int64_t K, int64_t N) {
  NormReference r;
  DeviceBuffer ds = Put(cpu, stream, DType::kF32), dg = Put(cpu, g, DType::kF32);
  DeviceBuffer dn = Put(cpu, std::vector<float>(M * K, 0.f), DType::kF32);
  CHECK_OK(cpu.RmsNorm({ds.data(), DType::kF32, M, K}, {dg.data(), DType::kF32, 1, K}, kNormEps,
                       {dn.data(), DType::kF32, M, K}));
  r.normed = Get(cpu, dn, DType::kF32);
  r.y = CpuMatmul(cpu, r.normed, w, M, K, N);
  std::vector<float> an = r.normed, aw = w;
  for (float& v : an) v = std::abs(v);
  for (float& v : aw) v = std::abs(v);
  r.mag = CpuMatmul(cpu, an, aw, M, K, N);
  return r;
}

// The stream's rms per token (what the fused kernel divides by).
std::vector<double> StreamRms(const NormData& d) {
  std::vector<double> rms(d.M);
  for (int64_t t = 0; t < d.M; ++t) {
    double ss = 0;
    for (int64_t k = 0; k < d.K; ++k) ss += static_cast<double>(d.stream[t * d.K + k]) * d.stream[t * d.K + k];
    rms[t] = std::sqrt(ss / d.K + kNormEps);
  }
  return rms;
}

double Silu(double g) { return g / (1.0 + std::exp(-g)); }

// The bounds of the header comment.
double ProjLimit(double y, double mag) { return std::ldexp(mag, -7) + std::ldexp(std::abs(y), -8); }
double ActLimit(double g, double u, double tg, double tu) {
  return (1 + std::ldexp(1.0, -7)) *
         (1.1 * tg * (std::abs(u) + tu) + std::abs(Silu(g)) * tu + std::ldexp(std::abs(Silu(g) * u), -8));
}

std::vector<double> Times(std::vector<double> v, double f) {
  for (double& e : v) e *= f;
  return v;
}

// Columns [c0, c0 + cols) of the `rows` rows (pitch ld) of v, dense.
std::vector<float> Dense(const std::vector<float>& v, int64_t rows, int64_t cols, int64_t ld, int64_t c0 = 0) {
  std::vector<float> out;
  for (int64_t r = 0; r < rows; ++r) out.insert(out.end(), v.begin() + r * ld + c0, v.begin() + r * ld + c0 + cols);
  return out;
}

// Elements with |got - want| > lim (NaN counts).
int64_t CountOutside(const std::vector<float>& got, const std::vector<float>& want, const std::vector<double>& lim) {
  int64_t n = 0;
  for (size_t i = 0; i < want.size(); ++i) n += !(std::abs(static_cast<double>(got[i]) - want[i]) <= lim[i]);
  return n;
}

// sqrt(sum (got - want)^2 / sum want^2).
double ErrorRmsRatio(const std::vector<float>& got, const std::vector<float>& want) {
  double e = 0, w = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    e += (static_cast<double>(got[i]) - want[i]) * (static_cast<double>(got[i]) - want[i]);
    w += static_cast<double>(want[i]) * want[i];
  }
  return std::sqrt(e / w);
}

// |got - want| <= lim everywhere (dense [rows, cols]); the first few failures reported.
void ExpectWithin(const std::vector<float>& got, const std::vector<float>& want, const std::vector<double>& lim,
                  int64_t cols, const char* what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  int bad = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    const double err = std::abs(static_cast<double>(got[i]) - want[i]);
    if (!(err <= lim[i]) && ++bad <= 5) {
      ADD_FAILURE() << what << "[" << i / cols << "," << i % cols << "]: " << got[i] << " vs " << want[i]
                    << " (|err| " << err << " > " << lim[i] << ")";
    }
  }
  EXPECT_EQ(bad, 0) << what << ": elements out of bounds";
}

// Equal element for element (bits, for byte vectors); the first difference reported.
template <typename T>
void ExpectSame(const std::vector<T>& got, const std::vector<T>& want, const char* what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  size_t diff = 0, first = got.size();
  for (size_t i = 0; i < got.size(); ++i) {
    if (!(got[i] == want[i])) {
      if (first == got.size()) first = i;
      ++diff;
    }
  }
  if (diff == 0) return;
  ADD_FAILURE() << what << ": " << diff << " of " << got.size() << " elements differ, the first at " << first << " ("
                << +got[first] << " vs " << +want[first] << ")";
}

// After a fused-norm call on `o`: the stream's input and the add untouched; with the add, `next`
// bit for bit the unfused ops' stream (and the host's bf16(x + add)), else untouched; on the
// fused path the normed scratch untouched (the unfused ops write it: this tells the paths apart).
void ExpectStream(Backend& cuda, const NormData& d, const NormOperands& o, const std::vector<uint8_t>& unfused_stream,
                  bool fused) {
  const std::vector<float> sentinel(d.M * d.K, kSentinel);
  ExpectSame(Get(cuda, o.x, DType::kBF16), d.x, "the stream's input (residual)");
  if (d.with_add) {
    ExpectSame(Get(cuda, o.add, DType::kBF16), d.add, "add");
    ExpectSame(parity::GetBytes(cuda, o.next), unfused_stream, "next vs FusedAddRmsNorm's stream (bits)");
    ExpectSame(Get(cuda, o.next, DType::kBF16), d.stream, "next vs bf16(x + add)");
  } else {
    ExpectSame(Get(cuda, o.next, DType::kBF16), sentinel, "next (no add: untouched)");
  }
  if (fused) ExpectSame(Get(cuda, o.normed, DType::kBF16), sentinel, "normed scratch (fused path: untouched)");
}

// Mutants of the reference: wrong results that the checks above must reject, so that passing them
// means something: outside the element bounds in at least a tenth of the elements (more than half
// for the plain projections; silu squashes negative gates, whose errors then hide under the
// bounds' worst-case sums, so for act as few as a fifth at K = 1048 on an H200, a sixth in 800
// simulated draws), and 4x past the aggregate bound (2^-6; they are 2^-2 and more).
void ExpectRejected(const std::vector<float>& wrong, const std::vector<float>& want, const std::vector<double>& lim,
                    const char* what) {
  const int64_t out = CountOutside(wrong, want, lim);
  EXPECT_GE(10 * out, static_cast<int64_t>(want.size()))
      << "the bounds would pass " << what << " in " << want.size() - out << " of " << want.size() << " elements";
  EXPECT_GT(ErrorRmsRatio(wrong, want), 1.0 / 16) << "the aggregate bound would nearly pass " << what;
}

// NormMatmulSiluMul on `d` with gate_up [2I, K], I = 40 (5 tiles of 8 gate rows and their up rows;
// not a multiple of 16), act at pitch I + 8.
void ExpectNormSiluMul(Backend& cpu, Backend& cuda, std::mt19937& rng, const NormData& d, const NormOperands& unfused,
                       const std::vector<uint8_t>& unfused_stream, bool fused) {
  SCOPED_TRACE("NormMatmulSiluMul");
  const int64_t M = d.M, K = d.K, I = 40, N = 2 * I, act_ld = I + 8;
  const std::vector<float> w = RoundedBf16(RandomVec(rng, N * K));
  DeviceBuffer dw = Put(cuda, w, DType::kBF16);
  const Tensor2D wv{dw.data(), DType::kBF16, N, K};
  const std::vector<float> gu0(M * N, kSentinel), act0(M * act_ld, kSentinel);

  NormOperands f = PutNorm(cuda, d);
  DeviceBuffer gu = Put(cuda, gu0, DType::kBF16), act = Put(cuda, act0, DType::kBF16);
  ASSERT_OK(cuda.NormMatmulSiluMul(f.in, wv, {gu.data(), DType::kBF16, M, N},
                                   Tensor2D{act.data(), DType::kBF16, M, act_ld}.ColSlice(0, I)));
  ExpectStream(cuda, d, f, unfused_stream, fused);
  if (fused) ExpectSame(Get(cuda, gu, DType::kBF16), gu0, "gate_up (fused path: untouched)");
  const std::vector<float> act_all = Get(cuda, act, DType::kBF16);
  ExpectSame(Dense(act_all, M, act_ld - I, act_ld, I), std::vector<float>(M * (act_ld - I), kSentinel),
             "act's columns past I");
  const std::vector<float> got = Dense(act_all, M, I, act_ld);

  // The unfused ops on the unfused normed input.
  DeviceBuffer gu2 = Put(cuda, gu0, DType::kBF16), act2 = Put(cuda, std::vector<float>(M * I, kSentinel), DType::kBF16);
  ASSERT_OK(cuda.Matmul(unfused.in.normed, wv, {gu2.data(), DType::kBF16, M, N}));
  ASSERT_OK(cuda.SiluMul({gu2.data(), DType::kBF16, M, N}, {act2.data(), DType::kBF16, M, I}));
  const std::vector<float> unfused_act = Get(cuda, act2, DType::kBF16);

  // The CPU: RmsNorm, Matmul, SiluMul in fp32.
  const NormReference ref = CpuNormProjection(cpu, d.stream, d.g, w, M, K, N);
  auto silu_mul = [&](const std::vector<float>& y) {
    DeviceBuffer dy = Put(cpu, y, DType::kF32), out = Put(cpu, std::vector<float>(M * I, 0.f), DType::kF32);
    CHECK_OK(cpu.SiluMul({dy.data(), DType::kF32, M, N}, {out.data(), DType::kF32, M, I}));
    return Get(cpu, out, DType::kF32);
  };
  const std::vector<float> want = silu_mul(ref.y);
  std::vector<double> lim(M * I);
  for (int64_t t = 0; t < M; ++t) {
    for (int64_t j = 0; j < I; ++j) {
      const int64_t gi = t * N + j, ui = gi + I;
      lim[t * I + j] =
          ActLimit(ref.y[gi], ref.y[ui], ProjLimit(ref.y[gi], ref.mag[gi]), ProjLimit(ref.y[ui], ref.mag[ui]));
    }
  }
  ExpectWithin(got, want, lim, I, "act (fused) vs cpu");
  ExpectWithin(unfused_act, want, lim, I, "act (unfused) vs cpu");
  ExpectWithin(got, unfused_act, Times(lim, 2), I, "act fused vs unfused");
  EXPECT_LE(ErrorRmsRatio(got, want), 1.0 / 64) << "act (fused) vs cpu in aggregate";

  // What the bounds reject: no 1 / rms (the projection rms times too large), gate row j paired
  // with up row j + 8 (the next tile's) or gate and up swapped, and (with the add) the stream
  // without it.
  const std::vector<double> rms = StreamRms(d);
  std::vector<float> unscaled = ref.y;
  for (int64_t i = 0; i < M * N; ++i) unscaled[i] = static_cast<float>(unscaled[i] * rms[i / N]);
  ExpectRejected(silu_mul(unscaled), want, lim, "a missing 1 / rms");
  std::vector<float> shifted = ref.y, swapped = ref.y;
  for (int64_t t = 0; t < M; ++t) {
    for (int64_t j = 0; j < I; ++j) {
      shifted[t * N + I + j] = ref.y[t * N + I + (j + 8) % I];
      std::swap(swapped[t * N + j], swapped[t * N + I + j]);
    }
  }
  ExpectRejected(silu_mul(shifted), want, lim, "gate rows paired with the next tile's up rows");
  ExpectRejected(silu_mul(swapped), want, lim, "gate and up swapped");
  if (d.with_add) {
    ExpectRejected(silu_mul(CpuNormProjection(cpu, d.x, d.g, w, M, K, N).y), want, lim, "a missing add");
  }
}

// kernels::LaunchGemvNorm with the plain store: N = 37 (a partial 16-row tile), out at pitch 40.
void ExpectNormStore(Backend& cpu, Backend& cuda, std::mt19937& rng, const NormData& d, const NormOperands& unfused,
                     const std::vector<uint8_t>& unfused_stream) {
  SCOPED_TRACE("LaunchGemvNorm kStore");
  const int64_t M = d.M, K = d.K, N = 37, ld = 40;
  const std::vector<float> w = RoundedBf16(RandomVec(rng, N * K));
  DeviceBuffer dw = Put(cuda, w, DType::kBF16);
  NormOperands f = PutNorm(cuda, d);
  const kernels::GemvNormArgs a = NormArgs(f, K);
  DeviceBuffer out = Put(cuda, std::vector<float>(M * ld, kSentinel), DType::kBF16);
  ASSERT_TRUE(kernels::GemvNormSupported(M, N, K, f.x.data(), K, dw.data(), K, ld, a, kernels::GemvEpilogue::kStore,
                                         nullptr));
  ASSERT_EQ(kernels::LaunchGemvNorm(M, N, K, f.x.data(), K, dw.data(), K, out.data(), ld, a,
                                    kernels::GemvEpilogue::kStore, nullptr,
                                    static_cast<cudaStream_t>(cuda.stream_handle())),
            cudaSuccess);
  ExpectStream(cuda, d, f, unfused_stream, /*fused=*/true);
  const std::vector<float> all = Get(cuda, out, DType::kBF16);
  ExpectSame(Dense(all, M, ld - N, ld, N), std::vector<float>(M * (ld - N), kSentinel), "out's columns past N");
  const std::vector<float> got = Dense(all, M, N, ld);

  DeviceBuffer out2 = Put(cuda, std::vector<float>(M * N, kSentinel), DType::kBF16);
  ASSERT_OK(cuda.Matmul(unfused.in.normed, {dw.data(), DType::kBF16, N, K}, {out2.data(), DType::kBF16, M, N}));
  const std::vector<float> unfused_out = Get(cuda, out2, DType::kBF16);

  const NormReference ref = CpuNormProjection(cpu, d.stream, d.g, w, M, K, N);
  std::vector<double> lim(M * N);
  for (int64_t i = 0; i < M * N; ++i) lim[i] = ProjLimit(ref.y[i], ref.mag[i]);
  ExpectWithin(got, ref.y, lim, N, "out (fused) vs cpu");
  ExpectWithin(unfused_out, ref.y, lim, N, "out (unfused) vs cpu");
  ExpectWithin(got, unfused_out, Times(lim, 2), N, "out fused vs unfused");
  EXPECT_LE(ErrorRmsRatio(got, ref.y), 1.0 / 64) << "out (fused) vs cpu in aggregate";
  const std::vector<double> rms = StreamRms(d);
  std::vector<float> unscaled = ref.y;
  for (int64_t i = 0; i < M * N; ++i) unscaled[i] = static_cast<float>(unscaled[i] * rms[i / N]);
  ExpectRejected(unscaled, ref.y, lim, "a missing 1 / rms");
  if (d.with_add) {
    ExpectRejected(CpuNormProjection(cpu, d.x, d.g, w, M, K, N).y, ref.y, lim, "a missing add");
  }
}

// NormMatmulRopeKvWrite on `d` as the fused QKV test sets it up (positions, inv_freq, slots with
// a -1 at token 1, BF16 caches of 2M + 3 slots); rotate_k false (LoRC latents) takes the plain
// store, then RopeKvWrite.
struct RopeShape {
  int heads, kv_heads, hd;
};

void ExpectNormRope(Backend& cpu, Backend& cuda, std::mt19937& rng, const NormData& d, const NormOperands& unfused,
                    const std::vector<uint8_t>& unfused_stream, bool fused, RopeShape sh, bool rotate_k) {
  SCOPED_TRACE(::testing::Message() << "NormMatmulRopeKvWrite " << sh.heads << "/" << sh.kv_heads << "x" << sh.hd
                                    << (rotate_k ? "" : " rotate_k false"));
  const int64_t M = d.M, K = d.K;
  const int64_t qw = int64_t{sh.heads} * sh.hd, kw = int64_t{sh.kv_heads} * sh.hd, N = qw + 2 * kw;
  const int64_t nslots = 2 * M + 3;
  const std::vector<float> w = RoundedBf16(RandomVec(rng, N * K));
  std::vector<int32_t> pos(M), slots(M);
  for (int64_t t = 0; t < M; ++t) {
    pos[t] = static_cast<int32_t>(rng() % 9000);
    slots[t] = static_cast<int32_t>((2 * t + 1) % nslots);
  }
  if (M > 1) slots[1] = -1;  // a padding row: no write
  const std::vector<float> inv_freq = InvFreq(sh.hd, 10000.0);
  const std::vector<float> out0(M * N, kSentinel), cache0(nslots * kw, kSentinel);

  using Op = std::function<absl::Status(const Tensor2D& w, const Tensor2D& out, const RopeKvWriteParams& p)>;
  auto run = [&](Backend& be, DType dt, const Op& op) {
    DeviceBuffer dw = Put(be, w, dt), dout = Put(be, out0, dt), kc = Put(be, cache0, dt), vc = Put(be, cache0, dt);
    DeviceBuffer dp = parity::PutRaw(be, pos), ds = parity::PutRaw(be, slots), df = parity::PutRaw(be, inv_freq);
    const Tensor2D wv{dw.data(), dt, N, K}, ov{dout.data(), dt, M, N};
    RopeKvWriteParams p{ov.ColSlice(0, qw), ov.ColSlice(qw, kw), ov.ColSlice(qw + kw, kw),
                        KvLayer{kc.data(), vc.data(), kw, kw, dt}, sh.heads, sh.kv_heads, sh.hd,
                        dp.as<int32_t>(), df.as<float>(), ds.as<int32_t>()};
    p.rotate_k = rotate_k;
    CHECK_OK(op(wv, ov, p));
    return std::vector<std::vector<float>>{Get(be, dout, dt), Get(be, kc, dt), Get(be, vc, dt)};
  };
  NormOperands f = PutNorm(cuda, d);
  const auto got = run(cuda, DType::kBF16, [&](const Tensor2D& wv, const Tensor2D& ov, const RopeKvWriteParams& p) {
    return cuda.NormMatmulRopeKvWrite(f.in, wv, ov, p);
  });
  ExpectStream(cuda, d, f, unfused_stream, fused);
  const auto unf = run(cuda, DType::kBF16, [&](const Tensor2D& wv, const Tensor2D& ov, const RopeKvWriteParams& p) {
    return cuda.MatmulRopeKvWrite(unfused.in.normed, wv, ov, p);
  });
  const NormReference ref = CpuNormProjection(cpu, d.stream, d.g, w, M, K, N);
  DeviceBuffer cn = Put(cpu, ref.normed, DType::kF32);
  const auto want = run(cpu, DType::kF32, [&](const Tensor2D& wv, const Tensor2D& ov, const RopeKvWriteParams& p) {
    return cpu.MatmulRopeKvWrite({cn.data(), DType::kF32, M, K}, wv, ov, p);
  });

  const int half = sh.hd / 2;
  auto limit = [&](int64_t t, int64_t col) {  // col in [0, N)
    const int64_t in_head = col % sh.hd, partner = col - in_head + (in_head + half) % sh.hd;
    return std::ldexp(ref.mag[t * N + col] + ref.mag[t * N + partner] + std::abs(ref.y[t * N + col]) +
                          std::abs(ref.y[t * N + partner]),
                      -7);
  };
  std::vector<double> lim(M * N);
  for (int64_t t = 0; t < M; ++t) {
    for (int64_t c = 0; c < N; ++c) lim[t * N + c] = limit(t, c);
  }
  ExpectWithin(got[0], want[0], lim, N, "qkv (fused) vs cpu");
  ExpectWithin(unf[0], want[0], lim, N, "qkv (unfused) vs cpu");
  ExpectWithin(got[0], unf[0], Times(lim, 2), N, "qkv fused vs unfused");
  EXPECT_LE(ErrorRmsRatio(got[0], want[0]), 1.0 / 64) << "qkv (fused) vs cpu in aggregate";

  // The cache rows: the slots of the tokens within the bounds of their k / v columns, the others
  // (slot -1's token writes none) untouched.
  for (int side = 1; side <= 2; ++side) {
    SCOPED_TRACE(side == 1 ? "k cache" : "v cache");
    std::vector<float> g_rows, u_rows, w_rows, untouched_f, untouched_u;
    std::vector<double> c_lim;
    for (int64_t slot = 0; slot < nslots; ++slot) {
      int64_t token = -1;
      for (int64_t t = 0; t < M; ++t) token = slots[t] == slot ? t : token;
      for (int64_t c = 0; c < kw; ++c) {
        const size_t i = slot * kw + c;
        if (token < 0) {
          untouched_f.push_back(got[side][i]);
          untouched_u.push_back(unf[side][i]);
          continue;
        }
        g_rows.push_back(got[side][i]);
        u_rows.push_back(unf[side][i]);
        w_rows.push_back(want[side][i]);
        c_lim.push_back(limit(token, qw + (side - 1) * kw + c));
      }
    }
    ExpectWithin(g_rows, w_rows, c_lim, kw, "written rows (fused) vs cpu");
    ExpectWithin(g_rows, u_rows, Times(c_lim, 2), kw, "written rows fused vs unfused");
    ExpectSame(untouched_f, std::vector<float>(untouched_f.size(), kSentinel), "unwritten slots (fused)");
    ExpectSame(untouched_u, std::vector<float>(untouched_u.size(), kSentinel), "unwritten slots (unfused)");
  }
}

// Backend::NormMatmulSiluMul and NormMatmulRopeKvWrite (fused: FusesNormMatmul(M), on in this
// fixture for M <= 16) and kernels::LaunchGemvNorm's plain store, against the unfused
// CUDA ops and the CPU (bounds in the header comment), on every M of the GEMV's two token tiles,
// K = 256 and 1048 (not a multiple of the 128-wide warp chunk), with and without the add.
TEST_F(CudaGemvTest, NormGemvMatchesUnfusedAndCpu) {
  for (const int64_t K : {256, 1048}) {
    for (const int64_t M : {1, 3, 8, 9, 16}) {
      const bool fuses = M <= kernels::kGemvNormMaxRows;
      for (const bool with_add : {false, true}) {
        SCOPED_TRACE(::testing::Message() << "M=" << M << " K=" << K << (with_add ? " add" : " no add"));
        EXPECT_EQ(cuda_->FusesNormMatmul(M), fuses);
        const NormData d = MakeNormData(rng_, M, K, with_add);
        // The unfused ops: the stream (in place) and the normed input, which the projections below
        // take for their unfused runs.
        const NormOperands unfused = PutNorm(*cuda_, d);
        ASSERT_OK(UnfusedNorm(*cuda_, unfused.in));
        const std::vector<uint8_t> unfused_stream = parity::GetBytes(*cuda_, unfused.x);
        ExpectSame(Get(*cuda_, unfused.x, DType::kBF16), d.stream, "FusedAddRmsNorm's stream vs bf16(x + add)");

        ExpectNormSiluMul(*cpu_, *cuda_, rng_, d, unfused, unfused_stream, fuses);
        if (fuses) ExpectNormStore(*cpu_, *cuda_, rng_, d, unfused, unfused_stream);  // the kernel takes M <= 8
        ExpectNormRope(*cpu_, *cuda_, rng_, d, unfused, unfused_stream, fuses, RopeShape{4, 2, 64}, true);
        ExpectNormRope(*cpu_, *cuda_, rng_, d, unfused, unfused_stream, fuses, RopeShape{8, 2, 128}, true);
        ExpectNormRope(*cpu_, *cuda_, rng_, d, unfused, unfused_stream, fuses, RopeShape{4, 2, 64}, false);
      }
    }
  }
}

// The unfused path, bit for bit: next == residual (in place, M = 4: the fused kernel cannot store
// the stream it reads) and M = 9 and 17 (past kernels::kGemvNormMaxRows, and past the GEMV's
// kGemvMaxRows; next distinct: the stream copied into next, then updated there) give exactly the
// ops' stream, normed input, gate_up and act (NormMatmulSiluMul against the norm then
// MatmulSiluMul, which leaves gate_up alone where it fuses) and qkv and cache rows
// (NormMatmulRopeKvWrite).
TEST_F(CudaGemvTest, NormGemvFallsBackInPlace) {
  const int64_t K = 1048, I = 40, N = 2 * I;
  const RopeShape sh{4, 2, 64};
  const int64_t qw = int64_t{sh.heads} * sh.hd, kw = int64_t{sh.kv_heads} * sh.hd, NQ = qw + 2 * kw;
  for (const int64_t M : {4, 9, 17}) {
    const bool in_place = M <= kernels::kGemvNormMaxRows;
    SCOPED_TRACE(::testing::Message() << "M=" << M << (in_place ? " in place" : " next distinct"));
    EXPECT_EQ(cuda_->FusesNormMatmul(M), in_place);
    const NormData d = MakeNormData(rng_, M, K, /*with_add=*/true);
    const std::vector<float> w = RoundedBf16(RandomVec(rng_, N * K)), wq = RoundedBf16(RandomVec(rng_, NQ * K));
    DeviceBuffer dw = Put(*cuda_, w, DType::kBF16), dwq = Put(*cuda_, wq, DType::kBF16);
    const Tensor2D wv{dw.data(), DType::kBF16, N, K}, wqv{dwq.data(), DType::kBF16, NQ, K};
    std::vector<int32_t> pos(M), slots(M);
    for (int64_t t = 0; t < M; ++t) {
      pos[t] = static_cast<int32_t>(rng_() % 9000);
      slots[t] = static_cast<int32_t>(M - 1 - t);
    }
    slots[1] = -1;
    DeviceBuffer dp = parity::PutRaw(*cuda_, pos), ds = parity::PutRaw(*cuda_, slots);
    DeviceBuffer df = parity::PutRaw(*cuda_, InvFreq(sh.hd, 10000.0));

    // Each path on fresh operands: the stream's bytes (where it ends), normed, gate_up, act, qkv, k and v caches.
    auto run = [&](bool fused_call, bool silu) {
      NormOperands o = PutNorm(*cuda_, d);
      if (in_place) o.in.next = o.in.residual;
      const int64_t n = silu ? N : NQ;
      DeviceBuffer out = Put(*cuda_, std::vector<float>(M * n, kSentinel), DType::kBF16);
      DeviceBuffer act = Put(*cuda_, std::vector<float>(M * I, kSentinel), DType::kBF16);
      DeviceBuffer kc = Put(*cuda_, std::vector<float>(M * kw, kSentinel), DType::kBF16);
      DeviceBuffer vc = Put(*cuda_, std::vector<float>(M * kw, kSentinel), DType::kBF16);
      const Tensor2D ov{out.data(), DType::kBF16, M, n}, av{act.data(), DType::kBF16, M, I};
      const RopeKvWriteParams p{ov.ColSlice(0, qw), ov.ColSlice(qw, kw), ov.ColSlice(qw + kw, kw),
                                KvLayer{kc.data(), vc.data(), kw, kw, DType::kBF16}, sh.heads, sh.kv_heads, sh.hd,
                                dp.as<int32_t>(), df.as<float>(), ds.as<int32_t>()};
      if (fused_call) {
        CHECK_OK(silu ? cuda_->NormMatmulSiluMul(o.in, wv, ov, av) : cuda_->NormMatmulRopeKvWrite(o.in, wqv, ov, p));
        // Past kGemvNormMaxRows with next distinct: the stream's input stays as it was.
        if (!in_place) ExpectSame(Get(*cuda_, o.x, DType::kBF16), d.x, "residual (next distinct)");
      } else {
        CHECK_OK(UnfusedNorm(*cuda_, o.in));
        if (silu) {
          CHECK_OK(cuda_->MatmulSiluMul(o.in.normed, wv, ov, av));  // fused or not as the fallback's
        } else {
          CHECK_OK(cuda_->MatmulRopeKvWrite(o.in.normed, wqv, ov, p));
        }
      }
      const DeviceBuffer& stream = fused_call && !in_place ? o.next : o.x;
      return std::vector<std::vector<uint8_t>>{parity::GetBytes(*cuda_, stream), parity::GetBytes(*cuda_, o.normed),
                                               parity::GetBytes(*cuda_, out),    parity::GetBytes(*cuda_, act),
                                               parity::GetBytes(*cuda_, kc),     parity::GetBytes(*cuda_, vc)};
    };
    const char* names[] = {"stream", "normed", "out", "act", "k cache", "v cache"};
    for (const bool silu : {true, false}) {
      SCOPED_TRACE(silu ? "NormMatmulSiluMul" : "NormMatmulRopeKvWrite");
      // Matmul's choice for the shape, then MatmulSiluMul's (which may time the fused kernel and
      // leave gate_up written), so both runs below take the same path.
      run(false, silu);
      run(false, silu);
      const auto got = run(true, silu), want = run(false, silu);
      for (size_t i = 0; i < got.size(); ++i) ExpectSame(got[i], want[i], names[i]);
      EXPECT_TRUE(got[0] != parity::GetBytes(*cuda_, Put(*cuda_, d.x, DType::kBF16))) << "the stream was not updated";
    }
  }
}

// kernels::LaunchGemvNorm without a norm weight (GemvNormArgs::weight null: the weight folded into
// w) is bit for bit the launch with an all-ones weight: out, and the stream it stores with the add.
TEST_F(CudaGemvTest, NormGemvWithoutWeightIsUnitWeight) {
  const int64_t K = 1048, N = 37, ld = 40;
  const auto stream = static_cast<cudaStream_t>(cuda_->stream_handle());
  for (const int64_t M : {1, 5, 8}) {
    for (const bool with_add : {false, true}) {
      SCOPED_TRACE(::testing::Message() << "M=" << M << (with_add ? " add" : " no add"));
      NormData d = MakeNormData(rng_, M, K, with_add);
      d.g.assign(K, 1.f);
      const std::vector<float> w = RoundedBf16(RandomVec(rng_, N * K));
      DeviceBuffer dw = Put(*cuda_, w, DType::kBF16);
      auto run = [&](bool weight) {
        NormOperands o = PutNorm(*cuda_, d);
        kernels::GemvNormArgs a = NormArgs(o, K);
        if (!weight) a.weight = nullptr;
        DeviceBuffer out = Put(*cuda_, std::vector<float>(M * ld, kSentinel), DType::kBF16);
        CHECK_EQ(kernels::LaunchGemvNorm(M, N, K, o.x.data(), K, dw.data(), K, out.data(), ld, a,
                                         kernels::GemvEpilogue::kStore, nullptr, stream),
                 cudaSuccess);
        return std::pair{parity::GetBytes(*cuda_, out), parity::GetBytes(*cuda_, o.next)};
      };
      const auto ones = run(true), none = run(false);
      ExpectSame(none.first, ones.first, "out");
      ExpectSame(none.second, ones.second, "stream");
    }
  }
}

// NormMatmulSiluMul captured in a CUDA graph (after an eager call of the same shape): the capture
// runs nothing; each replay stores next and act bit for bit as an eager call on the operands'
// values at replay time (refreshed between replays).
TEST_F(CudaGemvTest, NormGemvCapturesAndReplays) {
  const int64_t M = 3, K = 1048, I = 40, N = 2 * I;
  NormData d = MakeNormData(rng_, M, K, /*with_add=*/true);
  const std::vector<float> w = RoundedBf16(RandomVec(rng_, N * K));
  DeviceBuffer dw = Put(*cuda_, w, DType::kBF16);
  const Tensor2D wv{dw.data(), DType::kBF16, N, K};
  const std::vector<float> stream0(M * K, kSentinel), act0(M * I, kSentinel);
  NormOperands o = PutNorm(*cuda_, d);
  DeviceBuffer gu = Put(*cuda_, std::vector<float>(M * N, kSentinel), DType::kBF16);
  DeviceBuffer act = Put(*cuda_, act0, DType::kBF16);
  auto call = [&](const NormOperands& ops, const DeviceBuffer& a) {
    return cuda_->NormMatmulSiluMul(ops.in, wv, {gu.data(), DType::kBF16, M, N}, {a.data(), DType::kBF16, M, I});
  };
  // An eager call on fresh operands: next's and act's bytes.
  auto eager = [&](const NormData& data) {
    NormOperands e = PutNorm(*cuda_, data);
    DeviceBuffer a = Put(*cuda_, act0, DType::kBF16);
    CHECK_OK(call(e, a));
    return std::pair{parity::GetBytes(*cuda_, e.next), parity::GetBytes(*cuda_, a)};
  };
  auto reset = [&](const DeviceBuffer& b, const std::vector<float>& v) {
    DeviceBuffer t = Put(*cuda_, v, DType::kBF16);
    CHECK_OK(cuda_->CopyOnDevice(b.data(), t.data(), t.bytes()));
    CHECK_OK(cuda_->Synchronize());
  };
  const auto first = eager(d);
  ASSERT_OK(cuda_->BeginCapture());
  ASSERT_OK(call(o, act));
  auto graph = cuda_->EndCapture();
  ASSERT_OK(graph);
  ExpectSame(Get(*cuda_, act, DType::kBF16), act0, "act after the capture (nothing ran)");
  ExpectSame(Get(*cuda_, o.next, DType::kBF16), stream0, "next after the capture (nothing ran)");
  for (int round = 0; round < 3; ++round) {
    SCOPED_TRACE(::testing::Message() << "replay " << round);
    if (round > 0) {  // new stream and add values in the captured buffers
      const std::vector<float> g = d.g;
      d = MakeNormData(rng_, M, K, true);
      d.g = g;
      reset(o.x, d.x);
      reset(o.add, d.add);
    }
    reset(o.next, stream0);
    reset(act, act0);
    const auto want = round == 0 ? first : eager(d);
    ASSERT_OK(cuda_->ReplayGraph(**graph));
    ASSERT_OK(cuda_->Synchronize());
    ExpectSame(parity::GetBytes(*cuda_, o.next), want.first, "next");
    ExpectSame(parity::GetBytes(*cuda_, act), want.second, "act");
    ExpectSame(Get(*cuda_, o.next, DType::kBF16), d.stream, "next vs bf16(x + add)");
  }
}

// The gate_up GEMV with the SiLU-and-multiply epilogue (kernels::LaunchGemvSiluMul): act is bit
// for bit the GEMV's configuration 0 (unsplit, k_steps 4) then SiluMul, and within the SiLU bound
// of the header comment of the CPU's Matmul then SiluMul in fp32 (the projection bound
// ProjLimit, looser than a plain GEMV's); columns of act past I are not written. I = 40 (5 tiles
// of 8 gate rows with their up rows) and 64, every M of both token tiles, K with and without a
// masked tail. Backend::MatmulSiluMul, once Matmul has chosen for the operands, gives the bits of
// Matmul then SiluMul or of the fused kernel (which it chose, where Matmul's choice is another
// configuration or cuBLASLt, by timing the two once), the same on every call.
TEST_F(CudaGemvTest, FusedSiluMulMatchesUnfusedAndCpu) {
  const auto stream = static_cast<cudaStream_t>(cuda_->stream_handle());
  for (const int64_t I : {40, 64}) {
    for (const int64_t K : {264, 1024}) {
      for (const int64_t M : {1, 2, 5, 8, 11, 16}) {
        SCOPED_TRACE(::testing::Message() << "I=" << I << " K=" << K << " M=" << M);
        const int64_t N = 2 * I, act_ld = I + 8;
        const std::vector<float> x = RoundedBf16(RandomVec(rng_, M * K)), w = RoundedBf16(RandomVec(rng_, N * K));
        DeviceBuffer dx = Put(*cuda_, x, DType::kBF16), dw = Put(*cuda_, w, DType::kBF16);
        const Tensor2D xv{dx.data(), DType::kBF16, M, K}, wv{dw.data(), DType::kBF16, N, K};
        const std::vector<float> gu0(M * N, kSentinel), act0(M * act_ld, kSentinel);

        DeviceBuffer act = Put(*cuda_, act0, DType::kBF16);
        ASSERT_EQ(kernels::LaunchGemvSiluMul(M, N, K, dx.data(), K, dw.data(), K, act.data(), act_ld, stream),
                  cudaSuccess);
        const std::vector<float> act_all = Get(*cuda_, act, DType::kBF16);
        ExpectSame(Dense(act_all, M, act_ld - I, act_ld, I), std::vector<float>(M * (act_ld - I), kSentinel),
                   "act's columns past I");
        const std::vector<float> got = Dense(act_all, M, I, act_ld);

        // The two ops: configuration 0, then SiluMul.
        DeviceBuffer gu = Put(*cuda_, gu0, DType::kBF16), act2 = Put(*cuda_, std::vector<float>(M * I, 0.f), DType::kBF16);
        const Tensor2D guv{gu.data(), DType::kBF16, M, N}, av{act2.data(), DType::kBF16, M, I};
        ASSERT_OK(cuda_internal::RunGemv(xv, wv, guv, /*config: unsplit, k_steps 4*/ 0, stream));
        ASSERT_OK(cuda_->SiluMul(guv, av));
        ExpectSame(got, Get(*cuda_, act2, DType::kBF16), "act fused vs configuration 0 then SiluMul");

        // The CPU: Matmul, SiluMul in fp32.
        const std::vector<float> y = CpuMatmul(*cpu_, x, w, M, K, N);
        std::vector<float> ax = x, aw = w;
        for (float& v : ax) v = std::abs(v);
        for (float& v : aw) v = std::abs(v);
        const std::vector<float> mag = CpuMatmul(*cpu_, ax, aw, M, K, N);
        DeviceBuffer dy = Put(*cpu_, y, DType::kF32), dwant = Put(*cpu_, std::vector<float>(M * I, 0.f), DType::kF32);
        ASSERT_OK(cpu_->SiluMul({dy.data(), DType::kF32, M, N}, {dwant.data(), DType::kF32, M, I}));
        const std::vector<float> want = Get(*cpu_, dwant, DType::kF32);
        std::vector<double> lim(M * I);
        for (int64_t t = 0; t < M; ++t) {
          for (int64_t j = 0; j < I; ++j) {
            const int64_t gi = t * N + j, ui = gi + I;
            lim[t * I + j] = ActLimit(y[gi], y[ui], ProjLimit(y[gi], mag[gi]), ProjLimit(y[ui], mag[ui]));
          }
        }
        ExpectWithin(got, want, lim, I, "act (fused) vs cpu");
        EXPECT_LE(ErrorRmsRatio(got, want), 1.0 / 64) << "act (fused) vs cpu in aggregate";

        // The backend op, twice, against Matmul then SiluMul on the same operands.
        DeviceBuffer gu3 = Put(*cuda_, gu0, DType::kBF16), act3 = Put(*cuda_, std::vector<float>(M * I, 0.f), DType::kBF16);
        const Tensor2D gu3v{gu3.data(), DType::kBF16, M, N}, a3v{act3.data(), DType::kBF16, M, I};
        ASSERT_OK(cuda_->Matmul(xv, wv, gu3v));
        ASSERT_OK(cuda_->SiluMul(gu3v, a3v));
        const std::vector<float> ops = Get(*cuda_, act3, DType::kBF16);
        std::vector<float> first;
        for (int call = 0; call < 3; ++call) {
          SCOPED_TRACE(::testing::Message() << "MatmulSiluMul call " << call);
          ASSERT_OK(cuda_->Memset(act3.data(), 0, act3.bytes()));
          ASSERT_OK(cuda_->MatmulSiluMul(xv, wv, gu3v, a3v));
          const std::vector<float> now = Get(*cuda_, act3, DType::kBF16);
          // The two ops' bits, or the fused kernel's where it timed faster (its bits are `got`);
          // the same from the first call on (Matmul had chosen before it: the Matmul call above).
          EXPECT_TRUE(now == ops || now == got) << "act is neither Matmul then SiluMul nor the fused kernel";
          if (call == 0) first = now;
          ExpectSame(now, first, "act (the choice made at the first call holds)");
        }
      }
    }
  }
}

// kernels::GemvSiluMulSupported / LaunchGemvSiluMul refuse n % 16 != 0, ldo < n / 2 and what the
// GEMV refuses (no launch: cudaErrorInvalidValue first).
TEST(CudaGemvNormOperandsTest, SiluMulRejectsBadOperands) {
  alignas(16) static unsigned char arena[1 << 14];
  const void* x = arena;
  const void* w = arena + 4096;
  void* out = arena + 8192;
  EXPECT_TRUE(kernels::GemvSiluMulSupported(4, 64, 256, x, 256, w, 256, 32));
  struct Bad {
    const char* what;
    int64_t m, n, k, ldo;
    const void* x;
  };
  for (const Bad& b : {Bad{"n % 16 != 0", 4, 72, 256, 36, x}, Bad{"ldo < n / 2", 4, 64, 256, 31, x},
                       Bad{"n = 0", 4, 0, 256, 0, x}, Bad{"m past kGemvMaxRows", kernels::kGemvMaxRows + 1, 64, 256, 32, x},
                       Bad{"k not a multiple of 8", 4, 64, 252, 32, x},
                       Bad{"misaligned x", 4, 64, 256, 32, static_cast<const char*>(x) + 2}}) {
    SCOPED_TRACE(b.what);
    EXPECT_FALSE(kernels::GemvSiluMulSupported(b.m, b.n, b.k, b.x, b.k, w, b.k, b.ldo));
    EXPECT_EQ(kernels::LaunchGemvSiluMul(b.m, b.n, b.k, b.x, b.k, w, b.k, out, b.ldo, nullptr), cudaErrorInvalidValue);
  }
}

// kernels::GemvNormSupported / LaunchGemvNorm refuse what the kernel cannot run, each operand
// changed alone from one that it takes (cudaErrorInvalidValue before any launch, so no device is
// needed and the pointers are never read).
TEST(CudaGemvNormOperandsTest, NormGemvRejectsBadOperands) {
  alignas(16) static unsigned char arena[1 << 16];
  const int64_t m = 4, n = 64, k = 256;
  const void* x = arena;
  const void* w = arena + 4096;
  void* out = arena + 8192;
  kernels::GemvNormArgs ok;
  ok.weight = arena + 12288;
  ok.add = arena + 16384;
  ok.ld_add = k;
  ok.residual_out = arena + 20480;
  ok.ld_residual_out = k;
  kernels::GemvRopeArgs rope;  // n = (2 + 2 * 1) * 16
  rope.head_dim = 16;
  rope.num_heads = 2;
  rope.num_kv_heads = 1;
  rope.positions = reinterpret_cast<const int32_t*>(arena + 24576);
  rope.inv_freq = reinterpret_cast<const float*>(arena + 28672);
  rope.slot_mapping = reinterpret_cast<const int32_t*>(arena + 32768);
  rope.k_cache = arena + 36864;
  rope.v_cache = arena + 40960;
  using E = kernels::GemvEpilogue;

  struct Call {
    int64_t m = 4, n = 64, k = 256, ldx = 256, ldw = 256, ldo = 64;
    const void* x;
    const void* w;
    kernels::GemvNormArgs a;
    E e = E::kStore;
    const kernels::GemvRopeArgs* rope = nullptr;
  };
  const Call base{m, n, k, k, k, n, x, w, ok};
  auto supported = [](const Call& c) {
    return kernels::GemvNormSupported(c.m, c.n, c.k, c.x, c.ldx, c.w, c.ldw, c.ldo, c.a, c.e, c.rope);
  };
  {
    Call c = base;
    c.a.weight = nullptr;  // no norm weight (folded into w)
    EXPECT_TRUE(supported(c)) << "without a norm weight";
  }
  // The unchanged operands are taken, with each epilogue and without the add.
  for (const E e : {E::kStore, E::kSiluMul, E::kRopeKvWrite}) {
    Call c = base;
    c.e = e;
    c.rope = e == E::kRopeKvWrite ? &rope : nullptr;
    EXPECT_TRUE(supported(c)) << static_cast<int>(e);
    c.a.add = nullptr;
    c.a.residual_out = nullptr;
    EXPECT_TRUE(supported(c)) << static_cast<int>(e) << " without the add";
  }
  auto with = [&](const std::function<void(Call&)>& change) {
    Call c = base;
    change(c);
    return c;
  };
  const std::vector<std::pair<const char*, Call>> bad = {
      {"misaligned norm weight", with([](Call& c) { c.a.weight = static_cast<const char*>(c.a.weight) + 2; })},
      {"misaligned add", with([](Call& c) { c.a.add = static_cast<const char*>(c.a.add) + 2; })},
      {"add pitch not a multiple of 8", with([](Call& c) { c.a.ld_add = c.k + 4; })},
      {"add pitch below k", with([](Call& c) { c.a.ld_add = c.k - 8; })},
      {"add without residual_out", with([](Call& c) { c.a.residual_out = nullptr; })},
      {"misaligned residual_out", with([](Call& c) { c.a.residual_out = static_cast<char*>(c.a.residual_out) + 8; })},
      {"residual_out pitch below k", with([](Call& c) { c.a.ld_residual_out = c.k - 8; })},
      {"negative eps", with([](Call& c) { c.a.eps = -1e-6f; })},
      {"NaN eps", with([](Call& c) { c.a.eps = std::nanf(""); })},
      {"misaligned x", with([](Call& c) { c.x = static_cast<const char*>(c.x) + 2; })},
      {"k not a multiple of 8", with([](Call& c) { c.k = 252; })},
      {"m = 0", with([](Call& c) { c.m = 0; })},
      {"m past kGemvNormMaxRows", with([](Call& c) { c.m = kernels::kGemvNormMaxRows + 1; })},
      {"n = 0", with([](Call& c) { c.n = 0; })},
      {"kStore with ldo < n", with([](Call& c) { c.ldo = c.n - 1; })},
      {"kSiluMul with n % 16 != 0", with([](Call& c) {
         c.e = E::kSiluMul;
         c.n = 72;
         c.ldo = 72;
       })},
      {"kSiluMul with ldo < n / 2", with([](Call& c) {
         c.e = E::kSiluMul;
         c.ldo = c.n / 2 - 1;
       })},
      {"kRopeKvWrite without rope", with([](Call& c) { c.e = E::kRopeKvWrite; })},
      {"kRopeKvWrite with ldo < n", with([](Call& c) {
         c.e = E::kRopeKvWrite;
         c.ldo = c.n - 1;
       })},
  };
  for (const auto& [what, c] : bad) {
    SCOPED_TRACE(what);
    Call call = c;
    if (call.e == E::kRopeKvWrite && std::string_view(what) != "kRopeKvWrite without rope") call.rope = &rope;
    if (supported(call)) {  // never launch with these host pointers
      ADD_FAILURE() << "GemvNormSupported takes it";
      continue;
    }
    EXPECT_EQ(kernels::LaunchGemvNorm(call.m, call.n, call.k, call.x, call.ldx, call.w, call.ldw, out, call.ldo,
                                      call.a, call.e, call.rope, nullptr),
              cudaErrorInvalidValue);
  }
  // kRopeKvWrite: n that is not (heads + 2 kv_heads) * head_dim.
  Call c = base;
  c.e = E::kRopeKvWrite;
  c.rope = &rope;
  c.n = 80;
  c.ldo = 80;
  EXPECT_FALSE(supported(c));
}

#endif

}  // namespace
}  // namespace backend_test
}  // namespace lorc
