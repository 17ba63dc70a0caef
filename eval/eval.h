// Quality evaluation through the generation engine: perplexity over held-out windows (teacher
// forcing, from the prompt tokens' log-probabilities) and pass-key retrieval accuracy (greedy
// generation). The reference numbers for the fixture model are in models/tiny-llama-a/README.md;
// docs/EVAL.md holds what lorcserve measures.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "coordinator/engine.h"
#include "tokenizer/tokenizer.h"

namespace lorc {

// Negative log-likelihood (nats) of targets[i] after ids[0..i] (teacher forcing), one per
// target, where targets are the ids shifted by one (targets[i] == ids[i + 1]) plus one more
// token: one request for ids + [targets.back()] with prompt_logprobs and max_tokens 1, through the
// engine's scheduler and cache (chunked by its token budget), so ids.size() + 2 positions must fit
// max_model_len. INVALID_ARGUMENT for empty or misaligned inputs or a window too long for the
// model (naming the longest that fits); the request's own error otherwise.
absl::StatusOr<std::vector<double>> ScorePromptNll(Engine& engine, absl::Span<const int32_t> ids,
                                                   absl::Span<const int32_t> targets);

struct PplResult {
  double ppl = 0;               // exp(mean NLL) over every target of every window
  int64_t windows = 0, tokens = 0;
  double seconds = 0;
};

// One perplexity window of a file, read and checked before any model runs.
struct PplWindow {
  std::vector<int32_t> ids, targets;  // targets[i] == ids[i + 1]; one more target at the end
  std::string where;                  // path:line, for the errors of its request
};

// `path`: JSON lines with "ids" and "targets" (eval_ppl_windows.jsonl); `limit` > 0: the first
// `limit` windows. INVALID_ARGUMENT naming the file and line for a missing or non-integer list, a
// window that is empty or whose targets are not its ids shifted by one, or a file without windows.
// Token ids are checked against the vocabulary when a window runs (the model is not known here).
absl::StatusOr<std::vector<PplWindow>> ReadPplWindows(const std::string& path, int64_t limit);

// exp(mean NLL) over every target of `windows` (ScorePromptNll each); a window's error names it.
absl::StatusOr<PplResult> EvalPerplexity(Engine& engine, absl::Span<const PplWindow> windows);
// ReadPplWindows then the above.
absl::StatusOr<PplResult> EvalPerplexity(Engine& engine, const std::string& path, int64_t limit);

struct PasskeyResult {
  std::map<int64_t, std::pair<int64_t, int64_t>> by_length;  // filler tokens -> (correct, total)
  double seconds = 0;
};

// One pass-key prompt of a file, read and checked before any model runs.
struct PasskeyPrompt {
  std::vector<int32_t> prompt_ids;
  int64_t filler = 0;  // filler tokens, >= 0
  std::string answer;  // non-empty
  std::string where;   // path:line
};

// `path`: JSON lines with "prompt_ids", "filler_tokens" and "answer" (eval_passkey.jsonl);
// `limit` > 0: the first `limit` prompts of each length. INVALID_ARGUMENT naming the file and line
// for a missing or mistyped field, a negative filler count, an empty answer, or a file without
// prompts.
absl::StatusOr<std::vector<PasskeyPrompt>> ReadPasskeyPrompts(const std::string& path, int64_t limit);

// A prompt is correct when its greedy continuation (6 tokens) starts with the answer. All prompts
// run as one batch; a prompt's error names it.
absl::StatusOr<PasskeyResult> EvalPasskey(Engine& engine, absl::Span<const PasskeyPrompt> prompts);
// ReadPasskeyPrompts then the above.
absl::StatusOr<PasskeyResult> EvalPasskey(Engine& engine, const std::string& path, int64_t limit);

// A multi-turn check in the spirit of SCBench (Li et al. 2024, "SCBench: A KV Cache-Centric
// Analysis of Long-Context Methods", shared-context multi-turn mode): each pass-key prompt of
// `filler` filler tokens (eval_passkey.jsonl; 1536: ~1,600 tokens of context) loses its question;
// its context, with its four facts "The pass key of NAME is 12345.", is shared by four turns, each
// a separate request asking for a different fact (in the order they appear), each turn's prompt
// the conversation so far (context, earlier questions and greedy answers) plus its question. With
// prefix caching on, the turns of a conversation are one session ("multi-turn-<i>", closed at the
// end), so turns 2-4 prefill only their new tokens. A turn is correct when its greedy 6-token
// continuation starts with the fact's " 12345". All conversations run as one batch per turn.
// `limit` > 0: the first `limit` prompts. Errors name the file and line.
struct MultiTurnResult {
  struct Turn {
    int64_t correct = 0, total = 0;
    int64_t prompt_tokens = 0, cached_prompt_tokens = 0;  // summed over the conversations
  };
  std::vector<Turn> turns;  // 4
  int64_t conversations = 0;
  int64_t context_tokens = 0;  // of the first conversation (BOS included)
  double seconds = 0;
};
absl::StatusOr<MultiTurnResult> EvalMultiTurnPasskey(Engine& engine, const Tokenizer& tokenizer,
                                                     const std::string& path, int64_t filler,
                                                     int64_t limit);

}  // namespace lorc
