// LoRC latent decode of groups <= 8 (see DecodeItemT): the per-CTA work loop, tiles, key
// reconstruction and combine of attention_latent.cu with the score and value products transposed,
// a compile-time layout for ranks <= 64 and half the RoPE sin/cos. Launched by LaunchLatentDecode
// (attention_latent.cu), which then merges split items as for every group.
#include <cuda_bf16.h>

#include "kernels/attention_latent_decode_item.cuh"

namespace lorc::kernels::latent_internal {
namespace {

template <int KS, int VM, bool FR, bool QF = false>
__global__ void __launch_bounds__(kThreads, KS <= 4 && VM <= 4 ? 2 : 1)
    LatentDecodeKernelT(const LatentAttentionArgs a, const DecodeSchedule sch) {
  const int num_work = sch.counts[0];
  if (static_cast<int>(blockIdx.x) >= num_work) return;
  const Layout L = KS == 4 && VM == 4 ? FixedTileLoader<QF>::L : Layout(a.k_rank, a.v_rank);
  const Smem sm = Setup(a, L);
  for (int w = blockIdx.x; w < num_work; w += gridDim.x) {
    const DecodeWorkItem wi = sch.work[w];
    const Item it{wi.seq, 0, 1, wi.kv_start, wi.kv_end, wi.partial};
    const PagedKeys keys{a.block_tables + static_cast<int64_t>(wi.seq) * a.max_blocks_per_seq, a.block_size, wi.kv_end};
    DecodeItemT<KS, VM, FR, QF>(a, L, sm, it, a.query_start[wi.seq], keys, ItemOut{a, it, sch.partial_out, sch.partial_lse});
  }
}

}  // namespace

cudaError_t LaunchLatentDecodeSmallGroup(const LatentAttentionArgs& a, const DecodeSchedule& s, dim3 grid,
                                         cudaStream_t stream) {
  cudaError_t e;
  if (a.k_rank <= 64 && a.v_rank <= 64) {
    static bool smem_set = false;
    if (a.kv_quant != KvQuant::kNone) {  // the quantized fixed-layout loader: its own instantiation
      static bool q_smem_set = false;
      if ((e = AllowSmem(LatentDecodeKernelT<4, 4, true, true>, &q_smem_set)) != cudaSuccess) return e;
      LatentDecodeKernelT<4, 4, true, true><<<grid, kThreads, FixedTileLoader<true>::L.bytes(), stream>>>(a, s);
      return cudaGetLastError();
    }
    if ((e = AllowSmem(LatentDecodeKernelT<4, 4, true>, &smem_set)) != cudaSuccess) return e;
    LatentDecodeKernelT<4, 4, true><<<grid, kThreads, FixedTileLoader<false>::L.bytes(), stream>>>(a, s);
  } else {
    static bool smem_set = false;
    if ((e = AllowSmem(LatentDecodeKernelT<8, 8, false>, &smem_set)) != cudaSuccess) return e;
    LatentDecodeKernelT<8, 8, false><<<grid, kThreads, Layout(a.k_rank, a.v_rank).bytes(), stream>>>(a, s);
  }
  return cudaGetLastError();
}

}  // namespace lorc::kernels::latent_internal
