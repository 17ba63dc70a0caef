#include "worker/model_loader.h"

#include <chrono>
#include <cstdio>
#include <string>

#include "backend/backend.h"
#include "common/status_macros.h"
#include "kvstore/kv_spec.h"
#include "model/safetensors.h"
#include "model/weights.h"

namespace lorc {

absl::StatusOr<LoadedModel> LoadModel(const ModelSource& source, Backend* backend,
                                      int32_t tp_rank, int32_t tp_size, Communicator* comm,
                                      const KvCacheOptions& kv) {
  const auto t0 = std::chrono::steady_clock::now();
  LoadedModel m;
  ASSIGN_OR_RETURN(m.config, LoadModelConfig(source.dir));
  ASSIGN_OR_RETURN(ShardLayout shard,
                   ShardLayout::Make(m.config, tp_rank, tp_size, source.shard_lm_head,
                                     /*cuda=*/IsBackendKind(backend->name(), BackendKind::kCuda)));
  // Progress lines (one per checkpoint file, or one for random weights) on stderr, by the worker
  // process and the in-process CLI alike; each rank prints its own.
  const WeightsProgress progress = [tp_rank, tp_size](const std::string& line) {
    if (tp_size > 1) {
      std::fprintf(stderr, "[rank %d/%d] %s\n", tp_rank, tp_size, line.c_str());
    } else {
      std::fprintf(stderr, "%s\n", line.c_str());
    }
  };
  ModelWeights weights;
  if (source.random_weights) {
    ASSIGN_OR_RETURN(weights, RandomWeights(m.config, source.seed, shard, *backend, progress));
  } else {
    ASSIGN_OR_RETURN(std::unique_ptr<CheckpointReader> reader, CheckpointReader::Open(source.dir));
    ASSIGN_OR_RETURN(weights, LoadWeights(m.config, *reader, shard, *backend, progress));
  }
  // The KV geometry comes from kvstore/ (one per-layer spec); the runner only sizes and allocates.
  KvSpecOptions spec_options;
  spec_options.block_size = kv.block_size;
  spec_options.dtype = backend->compute_dtype();  // CPU: F32, CUDA: BF16 (as the weights)
  spec_options.num_kv_heads = shard.num_kv_heads;
  spec_options.kv_cache_dtype = kv.kv_cache_dtype;  // --kv-cache-dtype
  ASSIGN_OR_RETURN(const KvCacheSpec spec, MakeKvCacheSpec(m.config, spec_options));
  ASSIGN_OR_RETURN(m.runner,
                   ModelRunner::Create(m.config, std::move(weights), backend, comm, spec, kv));
  m.load_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return m;
}

}  // namespace lorc
