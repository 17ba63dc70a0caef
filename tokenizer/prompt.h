// The one rule that turns a prompt text into the ids the model sees, used everywhere a prompt is
// tokenized for generation (the gRPC service, `lorcserve generate`).
#pragma once

#include <cstdint>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "tokenizer/tokenizer.h"

namespace lorc {

// Encodes `text` with the tokenizer's special tokens (its post-processor template, e.g. Llama-3's
// `<|begin_of_text|>` + text), then makes the ids start with exactly one BOS when the model has
// one (`bos_token_id` >= 0, from config.json): one is added when neither the template nor the
// text supplied it, and a BOS the text itself spells out (`<|begin_of_text|>Hello`) is not
// doubled. Errors: the tokenizer's (INVALID_ARGUMENT naming the byte offset of invalid UTF-8).
absl::StatusOr<std::vector<int32_t>> PromptToIds(const Tokenizer& tokenizer, std::string_view text,
                                                 int64_t bos_token_id);

}  // namespace lorc
