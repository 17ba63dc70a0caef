// The CPU backend's side of the token-level KV policies (kvpolicy/, backend.h KvPolicyAttention):
// gathering the keys a sequence's policy keeps (full-precision slots from the paged cache,
// low-precision ones from the policy's entries) and the importance statistics from the
// attention probabilities. Shared by the full-KV path (cpu_backend.cc) and the LoRC latent path
// (cpu_latent_attention.cc), the reference the CUDA kernels will be checked against.
#include "backend/cpu_kernels.h"
#include "kvpolicy/sequence_policy.h"

namespace lorc::cpu_internal {

int GatherKeptHead(const KvLayer& cache, kvpolicy::SequenceKvPolicy* policy, int layer,
                   const int32_t* table, int32_t block_size, int len, int q_len, int head, int64_t k_width,
                   int64_t v_width, std::vector<int32_t>* kept, std::vector<float>* k,
                   std::vector<float>* v) {
  kept->clear();
  const uint8_t* state = policy != nullptr ? policy->states(layer, head) : nullptr;
  for (int pos = 0; pos < len; ++pos) {
    if (state == nullptr || state[pos] != static_cast<uint8_t>(kvpolicy::SlotState::kDead)) {
      kept->push_back(pos);
    }
  }
  const int n = static_cast<int>(kept->size());
  // The step's own tokens must all be kept (the causal mask assumes they end the list).
  if (n < q_len || (*kept)[n - q_len] != len - q_len) return -1;
  k->resize(static_cast<size_t>(n) * k_width);
  v->resize(static_cast<size_t>(n) * v_width);
  for (int j = 0; j < n; ++j) {
    const int pos = (*kept)[j];
    float* kj = k->data() + static_cast<size_t>(j) * k_width;
    float* vj = v->data() + static_cast<size_t>(j) * v_width;
    if (state != nullptr && state[pos] == static_cast<uint8_t>(kvpolicy::SlotState::kLow)) {
      policy->LoadLow(layer, head, pos, kj, vj);
      continue;
    }
    // The sequence's cache slot of the key: its position, or where a compaction put it.
    const int64_t at = policy != nullptr ? policy->slot(layer, head, pos) : pos;
    const int64_t slot = static_cast<int64_t>(table[at / block_size]) * block_size + at % block_size;
    LoadKvHead(cache, false, slot, head, k_width, kj);
    LoadKvHead(cache, true, slot, head, v_width, vj);
  }
  return n;
}

void RecordImportance(const float* probs, int q_len, int n, int len, const int32_t* kept,
                      int32_t* last_hit) {
  for (int i = 0; i < q_len; ++i) {
    const int t = n - q_len + i + 1;  // keys this query attends (causal over the kept list)
    const float threshold = 1.0f / static_cast<float>(t);
    const int32_t query_pos = len - q_len + i;
    const float* row = probs + static_cast<size_t>(i) * n;
    for (int j = 0; j < t; ++j) {
      if (row[j] >= threshold && last_hit[kept[j]] < query_pos) last_hit[kept[j]] = query_pos;
    }
  }
}

}  // namespace lorc::cpu_internal
