// Tokenizer: a Hugging Face `tokenizer.json` byte-level BPE tokenizer (GPT-2 / Llama-3 style),
// matching HF `tokenizers` 0.23 on encode and decode.
//
// Supported tokenizer.json parts (anything else is rejected at load time with InvalidArgument
// naming the field, rather than silently mis-tokenizing):
//   normalizer      null
//   pre_tokenizer   ByteLevel (use_regex true/false, add_prefix_space), Split (Regex or String
//                   pattern, any behavior, invert), Sequence of those, or null
//   model           BPE (vocab, merges in "a b" or ["a","b"] form, ignore_merges, unk_token,
//                   fuse_unk, byte_fallback)
//   added_tokens    special and non-special (single_word, lstrip, rstrip, normalized)
//   post_processor  TemplateProcessing, ByteLevel (no-op for ids), BertProcessing,
//                   RobertaProcessing, Sequence of those, or null
//   decoder         ByteLevel
// Encoding splits the text on added tokens first (they are always recognised in the text, as HF
// does), pre-tokenizes the rest with PCRE2 (Oniguruma semantics), and runs the BPE merge loop.
// All methods are const and safe to call concurrently from several threads.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"

namespace lorc {

namespace tokenizer_internal {
class AddedVocabulary;
class BpeModel;
class PreTokenizer;
}  // namespace tokenizer_internal

class Tokenizer {
 public:
  // Parses DIR/tokenizer.json and, if present, DIR/tokenizer_config.json (bos/eos token names).
  static absl::StatusOr<std::unique_ptr<Tokenizer>> FromModelDir(const std::string& dir);
  // Parses one tokenizer.json file. NotFound if it does not exist.
  static absl::StatusOr<std::unique_ptr<Tokenizer>> FromFile(const std::string& tokenizer_json_path);
  // Parses tokenizer.json content; `what` names the source in error messages.
  static absl::StatusOr<std::unique_ptr<Tokenizer>> FromJsonString(std::string_view json,
                                                                   std::string_view what);

  ~Tokenizer();
  Tokenizer(const Tokenizer&) = delete;
  Tokenizer& operator=(const Tokenizer&) = delete;

  // Token ids of `text`. Added tokens written in the text (e.g. "<|eot_id|>") become their ids.
  // With `add_special_tokens`, the post-processor's template (e.g. BOS + text) is applied.
  // InvalidArgument if `text` is not valid UTF-8 (the message gives the byte offset).
  absl::StatusOr<std::vector<int32_t>> Encode(std::string_view text,
                                              bool add_special_tokens = false) const;

  // Text of `ids` (invalid UTF-8 byte sequences become U+FFFD, like HF's lossy decode).
  // InvalidArgument naming the id if an id is out of range or has no token.
  absl::StatusOr<std::string> Decode(absl::Span<const int32_t> ids,
                                     bool skip_special_tokens = false) const;

  // Max id + 1 over the model vocabulary and the added tokens.
  int32_t vocab_size() const { return vocab_size_; }
  // Added tokens first, then the model vocabulary (like HF token_to_id / id_to_token).
  std::optional<int32_t> TokenToId(std::string_view token) const;
  std::optional<std::string> IdToToken(int32_t id) const;
  // True for added tokens marked "special" (the ones skip_special_tokens drops).
  bool IsSpecial(int32_t id) const;
  // True if `id` is in range and has a token.
  bool IsValidId(int32_t id) const;
  // From tokenizer_config.json bos_token / eos_token when given (FromModelDir), else the first
  // special token of the post-processor template (bos), else common names
  // (<|begin_of_text|>, <s>, ... / <|end_of_text|>, </s>, <|endoftext|>, ...).
  std::optional<int32_t> bos_id() const { return bos_id_; }
  std::optional<int32_t> eos_id() const { return eos_id_; }
  // Raw bytes a token decodes to (may be a partial UTF-8 sequence); empty for invalid ids.
  // Decode(ids) is the lossy UTF-8 conversion of the concatenated TokenBytes.
  std::string TokenBytes(int32_t id) const;
  const std::string& TokenBytesRef(int32_t id) const;

 private:
  enum class IdKind : uint8_t { kNone, kModel, kAdded, kSpecial };

  Tokenizer();
  absl::Status Load(std::string_view json, std::string_view what);
  absl::Status LoadConfig(const std::string& config_path);
  void BuildIdTables();
  void PickDefaultSpecialIds();
  absl::Status EncodePlainText(std::string_view text, std::vector<int32_t>* ids) const;

  std::unique_ptr<tokenizer_internal::AddedVocabulary> added_;
  std::unique_ptr<tokenizer_internal::PreTokenizer> pre_tokenizer_;
  std::unique_ptr<tokenizer_internal::BpeModel> model_;
  // Single-sequence post-processing template: special token ids, with kTemplateInput standing
  // for the encoded text ($A). Empty: no post-processing.
  static constexpr int32_t kTemplateInput = -1;
  std::vector<int32_t> template_;
  std::vector<std::string> token_bytes_;  // by id
  std::vector<IdKind> id_kind_;           // by id
  int32_t vocab_size_ = 0;
  std::optional<int32_t> bos_id_;
  std::optional<int32_t> eos_id_;
};

// Streaming detokenizer: feed ids one at a time; each Push returns only complete UTF-8 text,
// holding back a trailing partial multi-byte sequence until it completes. The concatenation of
// all Push results and Flush equals tok.Decode(all ids, skip_special_tokens). Ids that the
// tokenizer does not know are ignored. Not thread-safe (one per stream); `tok` must outlive it.
class IncrementalDecoder {
 public:
  explicit IncrementalDecoder(const Tokenizer& tok, bool skip_special_tokens = false);
  // Complete UTF-8 text since the last call (maybe empty).
  std::string Push(int32_t id);
  // Whatever is held back (an incomplete sequence becomes U+FFFD); resets the decoder.
  std::string Flush();
  // Number of bytes currently held back.
  size_t pending_bytes() const { return pending_.size(); }

 private:
  const Tokenizer& tok_;
  bool skip_special_tokens_;
  std::string pending_;
};

}  // namespace lorc
