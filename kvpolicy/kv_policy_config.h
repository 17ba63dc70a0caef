// Token-level KV cache policies (issue #17): which cached tokens a sequence keeps, per layer and
// KV head, and at which precision. The configuration, its flags (vLLM-style names) and its checks.
//   --kv-policy none|corm|mikv    none (default): every token kept at the cache's precision.
//                                 corm: CORM eviction (arXiv 2404.15949), evicted tokens dropped.
//                                 mikv: the same choice, but the tokens CORM would drop are kept
//                                 in --kv-policy-low-bits (MiKV, arXiv 2402.18096).
//   --kv-policy-window W          CORM's w: a key stays while one of the last W queries gave it
//                                 attention probability >= 1/t (t: that query's context length).
//   --kv-policy-recent R          the last R tokens are always kept (CORM: r = w).
//   --kv-policy-sinks S           the first S tokens (attention sinks) are always kept.
//   --kv-token-budget B           hard budget per sequence, layer and KV head of full-precision
//                                 tokens: a fraction of the sequence's length ("0.3", "30%") or
//                                 a count ("512"); absent: budget-free (CORM's w rule).
//   --kv-policy-low-bits 4|2      MiKV's precision for the unimportant tokens.
//   --kv-policy-prefill M         when the policy chooses during a prompt: after-prompt (default)
//                                 gathers statistics over the prompt's chunks and chooses first
//                                 after its last one (from its last W queries); every-chunk
//                                 chooses after every step, prompt chunks included.
#pragma once

#include <cstdint>
#include <string>
#include "absl/strings/string_view.h"

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace lorc::kvpolicy {

// One default per setting, here (the flags' help text reads them too).
namespace defaults {
inline constexpr int32_t kWindow = 32;   // CORM's w
inline constexpr int32_t kRecent = 32;   // CORM's r (= w in the paper)
inline constexpr int32_t kSinks = 4;     // attention sinks
inline constexpr int32_t kLowBits = 4;   // MiKV: int4
// Device-resident states (state_memory.h PositionsPerSlot): positions per cache slot a worker
// sets state memory aside for when the budget does not say (budget-free, a count budget), and
// the most it sets aside for any budget. 8B shape: 13 bytes x 256 (layer, KV head) rows per
// position against 128 KiB per bf16 slot, so 4 positions per slot cost 10 % of the KV memory.
inline constexpr double kPositionsPerSlot = 4.0;
inline constexpr double kMaxPositionsPerSlot = 8.0;
}  // namespace defaults

enum class KvPolicyKind : uint8_t { kNone, kCorm, kMikv };

// When a policy first chooses on a prompt (kvpolicy/README.md "Prompts: when the choice starts").
//  kAfterPrompt: steps whose tokens all lie before the prompt's end only record importance; the
//    first choice follows the step that computes the prompt's last token, so it is made from the
//    prompt's last `window` queries whatever the chunk size, the same as one-step prefill. The
//    budget does not hold during the prompt (all of it is kept until its last chunk).
//  kEveryChunk: the choice also follows each step that ends a prompt position that is a multiple
//    of `prefill_interval` (--max-num-batched-tokens; the scheduler ends a prompt's chunks there,
//    so the choices do not depend on what else shares a step: kvpolicy/README.md) and, with
//    prefill_interval 0 (a runner driven without the scheduler), every step: the budget holds
//    during prefill, but a fact no query of a chunk's last `window` attends to is gone before the
//    question after it arrives.
// After the prompt both choose after every (decode) step.
enum class KvPolicyPrefill : uint8_t { kAfterPrompt, kEveryChunk };

namespace defaults {
// after-prompt: what the choice keeps does not depend on --max-num-batched-tokens (a throughput
// knob), and a dropping policy keeps what the prompt's question attends to (docs/KV_POLICIES.md:
// pass-key and multi-turn, measured both ways). The price: a prompt is held whole until its last
// chunk (every-chunk bounds it by the budget during prefill).
inline constexpr KvPolicyPrefill kPrefill = KvPolicyPrefill::kAfterPrompt;
}  // namespace defaults

struct KvPolicyConfig {
  KvPolicyKind kind = KvPolicyKind::kNone;   // --kv-policy
  int32_t window = defaults::kWindow;        // --kv-policy-window, >= 1
  int32_t recent = defaults::kRecent;        // --kv-policy-recent, >= 0
  int32_t sinks = defaults::kSinks;          // --kv-policy-sinks, >= 0
  // --kv-token-budget: at most one of the two is set (> 0); both 0: budget-free.
  double budget_fraction = 0.0;  // (0, 1]
  int64_t budget_tokens = 0;     // >= 1
  int32_t low_bits = defaults::kLowBits;     // --kv-policy-low-bits: 4 or 2 (mikv only)
  KvPolicyPrefill prefill = defaults::kPrefill;  // --kv-policy-prefill
  // every-chunk: the prompt positions (tokens, >= 0) at whose multiples the choice follows a
  // prompt chunk; 0: after every step. Not a flag: --max-num-batched-tokens, set with it (the
  // scheduler's SchedulerConfig::kv_policy_prefill_interval is the same number).
  int64_t prefill_interval = 0;

  bool enabled() const { return kind != KvPolicyKind::kNone; }
  bool has_budget() const { return budget_fraction > 0.0 || budget_tokens > 0; }
  // Full-precision tokens a sequence of `seq_len` tokens may keep per layer and KV head:
  // ceil(fraction * seq_len) or the count; seq_len when budget-free.
  int64_t BudgetFor(int64_t seq_len) const;
  // Whether a step that leaves the sequence at `seq_len` tokens and ends its prompt
  // (`prompt_done`) or not is followed by the choice: when prompt_done; before, with every-chunk
  // only, when seq_len is a multiple of prefill_interval (every step with prefill_interval 0).
  bool ChoosesAfterStep(bool prompt_done, int64_t seq_len) const {
    if (prompt_done) return true;
    if (prefill != KvPolicyPrefill::kEveryChunk) return false;
    return prefill_interval <= 0 || seq_len % prefill_interval == 0;
  }
  // "corm budget-free (w 32, r 32, sinks 4, after-prompt)", "mikv-int4 budget 30% (...)": for
  // tables and logs.
  std::string Describe() const;
};

// "none" / "corm" / "mikv"; InvalidArgument naming --kv-policy otherwise.
absl::StatusOr<KvPolicyKind> ParseKvPolicyKind(absl::string_view s);
const char* KvPolicyKindName(KvPolicyKind k);
// "after-prompt" / "every-chunk"; InvalidArgument naming --kv-policy-prefill otherwise.
absl::StatusOr<KvPolicyPrefill> ParseKvPolicyPrefill(absl::string_view s);
const char* KvPolicyPrefillName(KvPolicyPrefill p);
// Sets budget_fraction or budget_tokens from "0.3", "30%" (fraction in (0, 1]) or "512" (a count
// >= 1); InvalidArgument naming --kv-token-budget for anything else.
absl::Status ParseKvTokenBudget(absl::string_view s, KvPolicyConfig* config);
// InvalidArgument naming the flag: window < 1, recent / sinks < 0, low_bits not 4 or 2, low_bits
// or a budget given with kind none, a budget count below sinks + recent (it could never hold),
// prefill_interval < 0.
absl::Status ValidateKvPolicyConfig(const KvPolicyConfig& c);

}  // namespace lorc::kvpolicy
