// Device-only wrappers of the sm_80+ tensor-core and async-copy instructions the attention
// kernels share (attention_prefill.cu, attention_latent*.cu): cp.async 16-byte copies with zero
// fill, ldmatrix (plain and transposed), the swizzled tile layout they read, mma.sync m16n8k16
// bf16 -> fp32, bf16x2 packing, bf16x8 unpacking and the SFU exp2. Internal to the kernels' .cu files, not part of their interface.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace lorc::kernels {

__device__ __forceinline__ uint32_t SmemAddr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
// 16 bytes global -> shared; zero-filled when !valid (src is then not read).
__device__ __forceinline__ void CpAsync16(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(SmemAddr(dst)), "l"(src),
               "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void CpAsyncCommit() { asm volatile("cp.async.commit_group;\n" ::); }
// Waits until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void CpAsyncWait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}
// Four 8x8 bf16 matrices; lane l gives the address of row l % 8 of matrix l / 8.
__device__ __forceinline__ void Ldsm4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(SmemAddr(p)));
}
// The same at a shared-memory address (SmemAddr), so constant offsets fold into the instruction.
__device__ __forceinline__ void Ldsm4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void Ldsm4T(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void Ldsm4T(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(SmemAddr(p)));
}
// d += a b (m16n8k16, bf16 inputs (kF16: fp16 inputs, the same fragment layouts), fp32
// accumulators).
template <bool kF16 = false>
__device__ __forceinline__ void Mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (kF16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}
// Element offset of 16-byte chunk c of row r in a [rows][D] bf16 shared-memory tile whose chunks
// are XOR-swizzled by (row % 8), so the 8 rows an ldmatrix phase reads fall in distinct banks.
template <int D>
__device__ __forceinline__ int Swz(int r, int c) {
  return r * D + ((c ^ (r & 7)) << 3);
}
// ldmatrix addresses into Swz<D> tiles, per 32-column step jj & 3 of a 128-column group (add
// 32 * (kk & 4) bytes for step kk): a row a lane addresses has row % 8 == lane % 8 = 2 y + x0, so
// chunk 2 j + b of it sits at chunk 2 (j ^ y) + (b ^ x0) = 2 (j & 4) + 2 ((j & 3) ^ y) + (b ^ x0).
// q: the A operand (rows [0, 16) from the shared address q_base, x4); k: K as the B operand (two
// 8-key n-tiles, x4; offsets relative to the tile); v: V as the B operand of P V (ldmatrix.trans,
// x4; relative to the tile).
template <int D>
__device__ __forceinline__ void SwzLdsmOffsets(int lane, uint32_t q_base, uint32_t (&q)[4], uint32_t (&k)[4],
                                               uint32_t (&v)[4]) {
  const int y = (lane & 7) >> 1, x0 = lane & 1;
#pragma unroll
  for (int jj = 0; jj < 4; ++jj) {
    const int sw = 32 * (jj ^ y);
    q[jj] = q_base + (lane % 16) * D * 2 + sw + 16 * ((lane >> 4) ^ x0);
    k[jj] = (lane % 8 + (lane / 16) * 8) * D * 2 + sw + 16 * (((lane >> 3) & 1) ^ x0);
    v[jj] = (lane % 16) * D * 2 + sw + 16 * ((lane >> 4) ^ x0);
  }
}
// 8 bf16 values (one 16-byte chunk of a row) as fp32.
__device__ __forceinline__ void Bf16x8ToF32(const uint4& raw, float (&out)[8]) {
  const __nv_bfloat162* p = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __bfloat1622float2(p[i]);
    out[2 * i] = f.x;
    out[2 * i + 1] = f.y;
  }
}

__device__ __forceinline__ uint32_t PackBf16(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);  // lo in the low half (the lower column)
  return *reinterpret_cast<uint32_t*>(&v);
}
__device__ __forceinline__ uint32_t PackF16(float lo, float hi) {
  __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}
// 2^x on the SFU (ex2.approx.ftz: relative error ~2^-22, 2^-inf = 0, subnormal results flushed).
__device__ __forceinline__ float Exp2Approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// One 16-key tile of a single-m-tile decode (DecodeMmaKernel, the policy decode): s += Q K^T
// (qa: Q's A fragments, D / 16 k-steps; sk: the tile's shared address, Swz<D> rows; k_off from
// SwzLdsmOffsets; s[n]: keys [8 n, 8 n + 8)). kF16: fp16 Q and K.
template <int D, bool kF16 = false>
__device__ __forceinline__ void TileQK(const uint32_t (&qa)[D / 16][4], uint32_t sk, const uint32_t (&k_off)[4],
                                       float (&s)[2][4]) {
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    uint32_t kb[4];
    Ldsm4(kb, sk + k_off[kk & 3] + 32 * (kk & 4));
    Mma<kF16>(s[0], qa[kk], kb[0], kb[1]);
    Mma<kF16>(s[1], qa[kk], kb[2], kb[3]);
  }
}
// ... and o += P V (pa: P's A fragments from the S accumulators; sv: the V tile, v_off as k_off).
template <int D, bool kF16 = false>
__device__ __forceinline__ void TilePV(const uint32_t (&pa)[4], uint32_t sv, const uint32_t (&v_off)[4],
                                       float (&o)[D / 8][4]) {
#pragma unroll
  for (int dp = 0; dp < D / 16; ++dp) {
    uint32_t vb[4];
    Ldsm4T(vb, sv + v_off[dp & 3] + 32 * (dp & 4));
    Mma<kF16>(o[2 * dp], pa, vb[0], vb[1]);
    Mma<kF16>(o[2 * dp + 1], pa, vb[2], vb[3]);
  }
}

// One 16-key tile's online-softmax step of a single-m-tile decode (DecodeMmaKernel, the policy
// decode; FlashAttention-2's online softmax, Dao 2023, Algorithm 1's inner loop, in exp2 units).
// s: row g's raw scores from TileQK, keys past the end already -inf (a quad's 4 lanes hold the
// row's 16). m: the row's running max (raw score units, -inf before its first key), updated; l:
// this lane's part of the running sum, rescaled and increased; o: rescaled by
// exp2((m_old - m) scale2). pa: P's A fragments for TilePV (rows g + 8 zero: no query head), each
// p times col_scale(n, e) for column 8 n + 2 t4 + e after the sum (a quantized V tile's row
// scales; 1 for bf16 tiles). A tile with no key while m is -inf leaves everything 0.
template <int D, class ColScale>
__device__ __forceinline__ void SoftmaxTileStep(const float (&s)[2][4], float scale2, float& m, float& l,
                                                float (&o)[D / 8][4], uint32_t (&pa)[4], ColScale col_scale) {
  float mx = m;
#pragma unroll
  for (int n = 0; n < 2; ++n) mx = fmaxf(mx, fmaxf(s[n][0], s[n][1]));
  mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
  mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
  const float ref = mx == -INFINITY ? 0.f : mx * scale2;
  const float c = Exp2Approx(m * scale2 - ref);
  m = mx;
  float sum = 0.f;
#pragma unroll
  for (int n = 0; n < 2; ++n) {
    const float p0 = Exp2Approx(fmaf(s[n][0], scale2, -ref));
    const float p1 = Exp2Approx(fmaf(s[n][1], scale2, -ref));
    sum += p0 + p1;
    pa[2 * n] = PackBf16(p0 * col_scale(n, 0), p1 * col_scale(n, 1));
    pa[2 * n + 1] = 0u;  // rows g + 8: no query head
  }
  l = l * c + sum;
#pragma unroll
  for (int n = 0; n < D / 8; ++n) {
    o[n][0] *= c;
    o[n][1] *= c;
  }
}

// A single-m-tile decode's combine of its warps' online-softmax states through shared memory
// (DecodeMmaKernel, the policy decode). StoreWarpState: the warp's rows g < group into
// comb[warp][g][D + 2] floats: O (the o fragments' columns), then the running max m (raw score
// units) and sum l (l already summed over the quad).
template <int D>
__device__ __forceinline__ void StoreWarpState(float* comb, int warp, int g, int t4, int group,
                                               const float (&o)[D / 8][4], float m, float l) {
  if (g >= group) return;
  float* dst = comb + (warp * 8 + g) * (D + 2);
#pragma unroll
  for (int n = 0; n < D / 8; ++n) {
    dst[n * 8 + 2 * t4] = o[n][0];
    dst[n * 8 + 2 * t4 + 1] = o[n][1];
  }
  if (t4 == 0) {
    dst[D] = m;
    dst[D + 1] = l;
  }
}
// ... and element d of query row h over the kWarps states: returns the unnormalized output and
// sets mx (the largest max; finite when warp 0 saw a key) and sum (the softmax denominator, both
// relative to mx; scale2 turns scores into log2 units). A warp without keys (m = -inf) weighs 0.
template <int D, int kWarps>
__device__ __forceinline__ float CombineWarpStates(const float* comb, int h, int d, float scale2, float& mx,
                                                   float& sum) {
  mx = -INFINITY;
#pragma unroll
  for (int v = 0; v < kWarps; ++v) mx = fmaxf(mx, comb[(v * 8 + h) * (D + 2) + D]);
  sum = 0.f;
  float out = 0.f;
#pragma unroll
  for (int v = 0; v < kWarps; ++v) {
    const float* src = comb + (v * 8 + h) * (D + 2);
    const float wgt = Exp2Approx((src[D] - mx) * scale2);
    sum = fmaf(src[D + 1], wgt, sum);
    out = fmaf(src[d], wgt, out);
  }
  return out;
}

}  // namespace lorc::kernels
