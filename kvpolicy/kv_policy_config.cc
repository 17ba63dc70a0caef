#include "kvpolicy/kv_policy_config.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/strip.h"

namespace lorc::kvpolicy {

int64_t KvPolicyConfig::BudgetFor(int64_t seq_len) const {
  if (budget_tokens > 0) return budget_tokens;
  if (budget_fraction > 0.0) {
    return static_cast<int64_t>(std::ceil(budget_fraction * static_cast<double>(seq_len)));
  }
  return seq_len;
}

// With every-chunk its interval when set: "(w 32, r 32, sinks 4, every-chunk 2048)".
std::string KvPolicyConfig::Describe() const {
  if (!enabled()) return "none";
  std::string s = kind == KvPolicyKind::kCorm ? "corm" : absl::StrCat("mikv-int", low_bits);
  if (budget_tokens > 0) absl::StrAppend(&s, " budget ", budget_tokens, " tokens");
  if (budget_fraction > 0.0) absl::StrAppend(&s, absl::StrFormat(" budget %g%%", 100.0 * budget_fraction));
  if (!has_budget()) absl::StrAppend(&s, " budget-free");
  absl::StrAppend(&s, " (w ", window, ", r ", recent, ", sinks ", sinks, ", ", KvPolicyPrefillName(prefill));
  if (prefill == KvPolicyPrefill::kEveryChunk && prefill_interval > 0) absl::StrAppend(&s, " ", prefill_interval);
  absl::StrAppend(&s, ")");
  return s;
}

absl::StatusOr<KvPolicyKind> ParseKvPolicyKind(absl::string_view s) {
  if (s == "none") return KvPolicyKind::kNone;
  if (s == "corm") return KvPolicyKind::kCorm;
  if (s == "mikv") return KvPolicyKind::kMikv;
  return absl::InvalidArgumentError(
      absl::StrCat("--kv-policy: '", s, "' is not one of none, corm, mikv"));
}

const char* KvPolicyKindName(KvPolicyKind k) {
  switch (k) {
    case KvPolicyKind::kCorm: return "corm";
    case KvPolicyKind::kMikv: return "mikv";
    default: return "none";
  }
}

absl::StatusOr<KvPolicyPrefill> ParseKvPolicyPrefill(absl::string_view s) {
  if (s == "after-prompt") return KvPolicyPrefill::kAfterPrompt;
  if (s == "every-chunk") return KvPolicyPrefill::kEveryChunk;
  return absl::InvalidArgumentError(
      absl::StrCat("--kv-policy-prefill: '", s, "' is not one of after-prompt, every-chunk"));
}

const char* KvPolicyPrefillName(KvPolicyPrefill p) {
  return p == KvPolicyPrefill::kEveryChunk ? "every-chunk" : "after-prompt";
}

absl::Status ParseKvTokenBudget(absl::string_view s, KvPolicyConfig* c) {
  c->budget_fraction = 0.0;
  c->budget_tokens = 0;
  const auto bad = [&](absl::string_view why) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--kv-token-budget: '", s, "' ", why,
        " (a fraction of the sequence in (0, 1] such as 0.3 or 30%, or a token count >= 1)"));
  };
  absl::string_view v = s;
  const bool percent = absl::ConsumeSuffix(&v, "%");
  if (!percent && v.find_first_of(".eE") == absl::string_view::npos) {
    int64_t n = 0;
    if (!absl::SimpleAtoi(v, &n)) {
      const bool digits = !v.empty() && std::all_of(v.begin(), v.end(), [](char ch) { return absl::ascii_isdigit(ch); });
      return bad(digits ? "is too large a count" : "is not a number");
    }
    if (n < 1) return bad("is below 1");
    c->budget_tokens = n;
    return absl::OkStatus();
  }
  double f = 0;
  if (!absl::SimpleAtod(v, &f) || !std::isfinite(f)) return bad("is not a number");
  if (percent) f /= 100.0;
  if (!(f > 0.0 && f <= 1.0)) return bad("is outside (0, 1]");
  c->budget_fraction = f;
  return absl::OkStatus();
}

absl::Status ValidateKvPolicyConfig(const KvPolicyConfig& c) {
  if (c.window < 1) {
    return absl::InvalidArgumentError(absl::StrCat("--kv-policy-window: ", c.window, " is below 1"));
  }
  if (c.recent < 0) {
    return absl::InvalidArgumentError(absl::StrCat("--kv-policy-recent: ", c.recent, " is negative"));
  }
  if (c.sinks < 0) {
    return absl::InvalidArgumentError(absl::StrCat("--kv-policy-sinks: ", c.sinks, " is negative"));
  }
  if (c.low_bits != 4 && c.low_bits != 2) {
    return absl::InvalidArgumentError(
        absl::StrCat("--kv-policy-low-bits: ", c.low_bits, " is not 4 or 2"));
  }
  if (!c.enabled() && c.has_budget()) {
    return absl::InvalidArgumentError("--kv-token-budget needs --kv-policy corm or mikv");
  }
  if (!(c.budget_fraction >= 0.0 && c.budget_fraction <= 1.0) || c.budget_tokens < 0 ||  // NaN too
      (c.budget_fraction > 0.0 && c.budget_tokens > 0)) {
    return absl::InvalidArgumentError(absl::StrCat("--kv-token-budget: fraction ", c.budget_fraction,
                                                   " and count ", c.budget_tokens,
                                                   ": give one, fraction in (0, 1] or count >= 1"));
  }
  if (c.prefill_interval < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("kv policy prefill_interval: ", c.prefill_interval, " is negative"));
  }
  if (c.budget_tokens > 0 && c.budget_tokens < static_cast<int64_t>(c.sinks) + c.recent) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--kv-token-budget: a budget of ", c.budget_tokens, " token(s) cannot hold the ", c.sinks,
        " sinks (--kv-policy-sinks) and ", c.recent, " recent tokens (--kv-policy-recent)"));
  }
  return absl::OkStatus();
}

}  // namespace lorc::kvpolicy
