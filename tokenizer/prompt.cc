#include "tokenizer/prompt.h"

#include "common/status_macros.h"

namespace lorc {

absl::StatusOr<std::vector<int32_t>> PromptToIds(const Tokenizer& tokenizer, std::string_view text,
                                                 int64_t bos_token_id) {
  ASSIGN_OR_RETURN(std::vector<int32_t> ids, tokenizer.Encode(text, /*add_special_tokens=*/true));
  if (bos_token_id < 0) return ids;
  const int32_t bos = static_cast<int32_t>(bos_token_id);
  size_t leading = 0;
  while (leading < ids.size() && ids[leading] == bos) ++leading;
  if (leading == 0) {
    ids.insert(ids.begin(), bos);
  } else if (leading > 1) {
    ids.erase(ids.begin(), ids.begin() + static_cast<std::ptrdiff_t>(leading - 1));
  }
  return ids;
}

}  // namespace lorc
