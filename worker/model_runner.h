// Runs the Llama forward pass for one step of a batch of sequences over the paged KV cache.
//
// A step carries, per sequence, the new tokens to compute (a prefill chunk or one decode token),
// how many tokens of it are already cached, and its block table (covering all of them). The
// runner writes the new tokens' K/V into the cache and returns logits for the rows asked for.
// It owns the cache memory, the weights and scratch buffers; block allocation belongs to the
// caller (kvstore/KvBlockManager). One thread calls it at a time.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "common/defaults.h"
#include "kvstore/kv_block_manager.h"
#include "kvstore/kv_spec.h"
#include "worker/backend.h"
#include "worker/model_config.h"
#include "worker/weights.h"

namespace lorc {

class Communicator;

struct SequenceStep {
  int64_t seq_id = 0;
  std::vector<int32_t> tokens;       // new tokens, computed at positions [num_cached, ...)
  int64_t num_cached = 0;            // tokens already in the cache for this sequence
  std::vector<int32_t> block_table;  // covers num_cached + tokens.size() tokens
  enum class Logits : uint8_t { kNone, kLast, kAll } logits = Logits::kLast;
};

struct StepOutput {
  int64_t vocab_size = 0;
  // Logit rows in step order: for each sequence, none, its last token's, or one per new token.
  std::vector<float> logits;
  std::vector<int32_t> row_begin;  // per sequence: first row in `logits` (rows of s: [begin[s], begin[s+1]))
  const float* Row(int64_t r) const { return logits.data() + r * vocab_size; }
};

struct KvCacheOptions {
  int32_t block_size = defaults::kBlockSize;
  int32_t num_blocks = 0;         // when 0: as many as `memory_bytes` holds
  int64_t memory_bytes = defaults::kKvCacheMiB << 20;
};

class ModelRunner {
 public:
  // `comm` may be null when tp_size is 1; it must outlive the runner.
  static absl::StatusOr<std::unique_ptr<ModelRunner>> Create(const ModelConfig& config,
                                                             ModelWeights weights,
                                                             Backend* backend, Communicator* comm,
                                                             const KvCacheOptions& kv);

  // InvalidArgument for malformed steps (token ids outside the vocabulary, block tables that do
  // not cover the tokens or name blocks outside the cache, positions past the model's context).
  absl::StatusOr<StepOutput> Execute(absl::Span<const SequenceStep> steps);
  // Copy-on-write block copies requested by the block manager, in every layer.
  absl::Status CopyBlocks(absl::Span<const BlockCopy> copies);

  const KvCacheSpec& kv_spec() const { return kv_spec_; }
  const ModelConfig& config() const { return config_; }
  const ShardLayout& shard() const { return weights_.shard; }
  // With a sharded LM head every rank must ask for the same logit rows (they all-gather them).
  bool lm_head_sharded() const { return weights_.shard.lm_head_sharded; }
  Backend& backend() { return *backend_; }

 private:
  ModelRunner(const ModelConfig& config, ModelWeights weights, Backend* backend, Communicator* comm)
      : config_(config), weights_(std::move(weights)), backend_(backend), comm_(comm) {}
  absl::Status Init(const KvCacheOptions& kv);
  absl::Status Validate(absl::Span<const SequenceStep> steps) const;
  absl::Status EnsureScratch(int64_t num_tokens, int64_t num_rows, int64_t meta_ints);
  absl::Status AllReduce(Tensor2D t);
  // Logits of `rows` [n, hidden] into out->logits: one matmul, or with a sharded LM head a
  // matmul over this rank's vocabulary slice and an all-gather.
  absl::Status ComputeLogits(const Tensor2D& rows, StepOutput* out);
  Tensor2D Weight(const DeviceBuffer& b, int64_t rows, int64_t cols) const;

  ModelConfig config_;
  ModelWeights weights_;
  Backend* backend_;
  Communicator* comm_;
  KvCacheSpec kv_spec_;
  std::vector<DeviceBuffer> k_cache_, v_cache_;
  DeviceBuffer inv_freq_;

  // Scratch, grown on demand.
  int64_t cap_tokens_ = 0, cap_rows_ = 0, cap_meta_ = 0;
  DeviceBuffer x_, h_, qkv_, attn_, gate_up_, act_, rows_, logits_, logits_local_, meta_;
};

}  // namespace lorc
