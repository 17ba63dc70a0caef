// CORM's decode over a LoRC latent layer (kv_policy.cuh LaunchKvPolicyLatentDecode): the latent
// decode's item body (attention_latent_decode_item.cuh DecodeItemT) walking the keys a policy
// keeps instead of a sequence's tokens, then the tensor-core policy decode's importance and
// reduce passes (kv_policy_decode_mma.cu LaunchImportanceAndReduce).
//
// (1) PolicyLatentKernel, one CTA of 8 warps per (span of 1, 2 or 4 chunks of kKvPolicyChunk
//     walk indices, KV head, entry): each thread classifies its walk indices (slot -> pos ->
//     state), a block scan lists the span's full keys in walk order with their cache slots and
//     positions, then one item runs over the list: 16-key tiles of C_K and C_V by cp.async
//     (bf16, or codes dequantized as the paged latent decode does), K = C_K B_K^T on mma.sync,
//     RoPE at each listed key's own position (a compaction moves keys, so slots are not
//     positions; a tile of 16 consecutive positions rotates row g + 8 on from row g, as the
//     paged decode), S = K Q^T, the online softmax and O^T += C_V^T P^T. Each valid score (scale x q . k, fp32) is saved for (2); the
//     span's first chunk gets its key count (t's share), its normalised partial O (r_v of each
//     head's head_dim columns) and (its log-sum-exp in natural-log units, 1) as the chunk's (max,
//     sum): exp(lse_c - M) = l_c exp(m_c - M), so the shared passes combine chunks unchanged; the
//     span's other chunks get no keys and (-inf, 0), which those passes skip.
// (2) The importance of the full keys (p = exp(s - M) / Z >= 1 / t) and (3) the reduce, r_v
//     columns per query head.
// Against the CPU (fp32 throughout): K and P enter the mma as bf16 (the latent decode's
// tolerance), the scores are summed in another order.
#include <cuda_bf16.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>

#include "kernels/attention_latent_decode_item.cuh"
#include "kernels/kv_policy.cuh"
#include "kernels/kv_policy_device.cuh"

namespace lorc::kernels {
namespace {

using namespace latent_internal;  // NOLINT: the latent kernels' internal helpers
using kvp::Scratch;

// A CTA takes a span of `span` consecutive policy chunks (1, 2 or 4; LaunchKvPolicyLatentDecode
// picks it), listing up to kMaxSpan x kKvPolicyChunk keys for one item: longer items amortize the
// item's start (B_K, Q, the cp.async pipeline filling) over more 16-key tiles.
constexpr int kMaxSpan = 4;
constexpr int kSpanKeys = kMaxSpan * kKvPolicyChunk;
constexpr int kMaxPer = kSpanKeys / kThreads;  // walk indices a thread classifies, at most
static_assert(kMaxPer * kThreads == kSpanKeys && kSpanKeys <= 65536, "s_off holds a uint16_t");

// The span's list (shared memory): key j's cache slot, position and walk index - p0.
struct ListKeys {
  static constexpr bool kConsecutive = false;
  static constexpr bool kScores = true;
  const int32_t* slot;
  const int32_t* pos;
  const uint16_t* off;
  int n;
  float* scores;        // the entry's (head 0 of the group, walk index p0); null: not recorded
  int64_t head_stride;  // max_seq_len
  __device__ __forceinline__ int Slot(int j) const { return j < n ? slot[j] : -1; }
  __device__ __forceinline__ int Pos(int j) const { return j < n ? pos[j] : 0; }
  __device__ __forceinline__ void Score(int j, int h, float s) const {
    if (scores != nullptr) scores[h * head_stride + off[j]] = s;
  }
};

// The chunk's results in the policy scratch: partial [head][128] (r_v columns used) and the
// (lse, 1) pair standing for (max, sum).
struct ChunkOut {
  float* partial;  // the chunk's [num_heads][kD]
  float* ml;       // the entry's query head 0, this chunk: head h's pair at h * max_chunks * 2
  int32_t max_chunks;
  __device__ __forceinline__ void operator()(int, int head, int col, float value, float lse2) const {
    partial[static_cast<int64_t>(head) * kD + col] = value;
    if (col == 0) {
      ml[static_cast<int64_t>(head) * max_chunks * 2] = lse2 * 0.6931471805599453f;  // ln 2: natural-log units
      ml[static_cast<int64_t>(head) * max_chunks * 2 + 1] = 1.0f;
    }
  }
};

// Grid (ceil(max_chunks / span), num_kv_heads, num_seqs), kThreads threads. KS / VM / QF as
// DecodeItemT's (4, 4: the fixed Layout(64, 64) for ranks <= 64; QF its quantized loader).
// The span's first chunk carries its keys' count and results (partial O and (lse, 1)); its other
// chunks none (count 0, (-inf, 0): the passes after skip them, and t sums the counts).
template <int KS, int VM, bool QF>
__global__ void __launch_bounds__(kThreads, KS <= 4 && VM <= 4 ? 2 : 1)
    PolicyLatentKernel(const LatentAttentionArgs a, const KvPolicySeq* seqs, int32_t layer, int32_t max_seq_len,
                       bool record_hits, int span, Scratch sc) {
  const int c0 = blockIdx.x * span, kvh = blockIdx.y, s = blockIdx.z;
  const KvPolicySeq seq = seqs[s];
  const int len = seq.seq_len - seq.slot_offset, p0 = c0 * kKvPolicyChunk;
  if (p0 >= len) return;  // uniform over the CTA
  const int tid = threadIdx.x;
  const int group = a.num_heads / a.num_kv_heads;
  const int per = span * kKvPolicyChunk / kThreads;  // walk indices of this thread: tid * per + k
  __shared__ int32_t s_slot[kSpanKeys], s_pos[kSpanKeys];
  __shared__ uint16_t s_off[kSpanKeys];
  __shared__ int s_warp[kWarps];

  // This thread's walk indices: a full key's cache slot, or none; then the list in walk order.
  const size_t lh = static_cast<size_t>(layer * a.num_kv_heads + kvh) * seq.capacity;
  const int32_t* table = a.block_tables + kvp::TableRow(seq, s) * a.max_blocks_per_seq;
  int32_t slot[kMaxPer], kp[kMaxPer];
  int mine = 0;
#pragma unroll
  for (int k = 0; k < kMaxPer; ++k) {
    const int v = p0 + tid * per + k;
    slot[k] = -1;
    kp[k] = -1;
    if (k < per && v < len) {
      kp[k] = seq.pos[lh + v];
      // Cache slots fit 32 bits (backend.h slot_mapping).
      if (kp[k] >= 0 && seq.state[lh + kp[k]] == kKvPolicyFull) {
        slot[k] = static_cast<int32_t>(kvp::CacheSlot(table, v, a.block_size));
      }
    }
    mine += slot[k] >= 0;
  }
  int at = 0, n = 0;
  kvp::BlockExclusiveScan<kWarps>(mine, s_warp, &at, &n);
#pragma unroll
  for (int k = 0; k < kMaxPer; ++k) {
    if (slot[k] < 0) continue;
    s_slot[at] = slot[k];
    s_pos[at] = kp[k];
    s_off[at] = static_cast<uint16_t>(tid * per + k);
    ++at;
  }
  // The span's chunks of this entry: counts, and (-inf, 0) for those without results.
  const int chunks = (len + kKvPolicyChunk - 1) / kKvPolicyChunk;
  float* const ml = sc.chunk_ml + static_cast<size_t>(s) * a.num_heads * sc.max_chunks * 2;  // query head 0, chunk 0
  if (tid < span && c0 + tid < chunks) {
    sc.chunk_n[(static_cast<size_t>(s) * a.num_kv_heads + kvh) * sc.max_chunks + c0 + tid] = tid == 0 ? n : 0;
  }
  for (int i = tid; i < span * group; i += kThreads) {
    const int cc = i / group, h = kvh * group + i % group;
    if (c0 + cc < chunks && (cc > 0 || n == 0)) {
      ml[(static_cast<size_t>(h) * sc.max_chunks + c0 + cc) * 2] = -INFINITY;
      ml[(static_cast<size_t>(h) * sc.max_chunks + c0 + cc) * 2 + 1] = 0.f;
    }
  }
  if (n == 0) return;  // uniform: no key in the span
  const Layout L = KS == 4 && VM == 4 ? FixedTileLoader<QF>::L : Layout(a.k_rank, a.v_rank);
  const Smem sm = Setup(a, L);  // DecodeItemT's first barrier publishes it and the list
  float* const scores = record_hits ? sc.scores + (static_cast<size_t>(s) * a.num_heads + kvh * group) * max_seq_len + p0
                                    : nullptr;
  const ListKeys keys{s_slot, s_pos, s_off, n, scores, max_seq_len};
  const ChunkOut out{sc.partial + (static_cast<size_t>(s) * sc.max_chunks + c0) * a.num_heads * kD, ml + 2 * c0,
                     sc.max_chunks};
  const Item it{s, 0, 1, 0, n, c0};
  DecodeItemT<KS, VM, false, QF>(a, L, sm, it, kvp::QRow(seq, s), keys, out);
}

// The span: the longest (4, 2, 1 chunks) that still gives about two resident waves of CTAs (2 an
// SM) over the device; LORC_KV_POLICY_LATENT_SPAN=1|2|4 fixes it (A/B measurements).
int SpanFor(const KvPolicyLatentDecodeArgs& p, int max_chunks) {
  if (p.span > 0) return p.span;
  static int num_sms = 0, fixed = 0;  // a worker drives one device
  if (num_sms == 0) {
    int dev = 0;
    if (cudaGetDevice(&dev) != cudaSuccess ||
        cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess) {
      num_sms = 132;
    }
    if (const char* e = std::getenv("LORC_KV_POLICY_LATENT_SPAN"); e != nullptr) {
      const int v = std::atoi(e);
      fixed = v == 1 || v == 2 || v == 4 ? v : 0;
    }
  }
  if (fixed > 0) return fixed;
  const int64_t pairs = int64_t{p.latent.num_kv_heads} * p.num_seqs;
  for (int span = kMaxSpan; span > 1; span /= 2) {
    if ((max_chunks + span - 1) / span * pairs >= int64_t{4} * num_sms) return span;
  }
  return 1;
}

template <int KS, int VM, bool QF>
cudaError_t Launch(const KvPolicyLatentDecodeArgs& p, const Scratch& sc, size_t smem, cudaStream_t stream) {
  static bool smem_set = false;  // once per process and instantiation (a worker drives one device)
  const cudaError_t e = AllowSmem(PolicyLatentKernel<KS, VM, QF>, &smem_set);
  if (e != cudaSuccess) return e;
  const int span = SpanFor(p, sc.max_chunks);
  const dim3 grid((sc.max_chunks + span - 1) / span, p.latent.num_kv_heads, p.num_seqs);
  PolicyLatentKernel<KS, VM, QF><<<grid, kThreads, smem, stream>>>(p.latent, p.seqs, p.layer, p.max_seq_len,
                                                                   p.record_hits, span, sc);
  return cudaGetLastError();
}

}  // namespace

cudaError_t LaunchKvPolicyLatentDecode(const KvPolicyLatentDecodeArgs& p, cudaStream_t stream) {
  const LatentAttentionArgs& a = p.latent;
  if (!ArgsOk(a) || p.seqs == nullptr || p.num_seqs < 1 || p.max_seq_len < 1 || p.scratch == nullptr ||
      p.layer < 0 || a.num_heads / a.num_kv_heads > kvp::kMaxGroup ||
      (p.span != 0 && p.span != 1 && p.span != 2 && p.span != kMaxSpan)) {
    return cudaErrorInvalidValue;
  }
  size_t bytes = 0;
  const Scratch sc = kvp::Carve(p.scratch, p.num_seqs, a.num_heads, a.num_kv_heads, kD, p.max_seq_len, &bytes);
  cudaError_t e;
  if (a.k_rank <= 64 && a.v_rank <= 64) {
    const size_t smem = FixedTileLoader<false>::L.bytes();
    e = a.kv_quant != KvQuant::kNone ? Launch<4, 4, true>(p, sc, smem, stream) : Launch<4, 4, false>(p, sc, smem, stream);
  } else {  // TileLoader: bf16 or quantized (dequantized as it loads)
    e = Launch<8, 8, false>(p, sc, Layout(a.k_rank, a.v_rank).bytes(), stream);
  }
  if (e != cudaSuccess) return e;
  KvPolicyDecodeArgs r;  // what the shared passes read
  r.out = static_cast<__nv_bfloat16*>(a.out);
  r.out_stride = a.out_ld;
  r.seqs = p.seqs;
  r.layer = p.layer;
  r.num_seqs = p.num_seqs;
  r.num_heads = a.num_heads;
  r.num_kv_heads = a.num_kv_heads;
  r.head_dim = kD;
  r.max_seq_len = p.max_seq_len;
  r.record_hits = p.record_hits;
  return kvp::LaunchImportanceAndReduce(r, sc, a.v_rank, stream);
}

}  // namespace lorc::kernels
