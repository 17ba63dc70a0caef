// The fixture tokenizers (models/tiny-llama-a, models/tokenizer-llama3-style) on arbitrary
// input. Byte 0 picks the tokenizer and the flags; the rest is (1) a text to Encode (invalid
// UTF-8 must be an InvalidArgument naming the byte offset; valid text must round-trip through
// Decode) and (2) little-endian int32 ids to Decode, whole and through IncrementalDecoder (the
// two must agree, as tokenizer.h promises).
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "fuzz/fuzz_util.h"
#include "tokenizer/tokenizer.h"

namespace {

const lorc::Tokenizer& Fixture(int which) {
  static const lorc::Tokenizer* toks[2] = {nullptr, nullptr};
  static const char* kPaths[2] = {"tiny-llama-a/tokenizer.json",
                                  "tokenizer-llama3-style/tokenizer.json"};
  if (toks[which] == nullptr) {
    auto t = lorc::Tokenizer::FromFile(lorc::fuzz::ModelsDir() + "/" + kPaths[which]);
    if (!t.ok()) lorc::fuzz::Fail("fixture tokenizer: " + t.status().ToString());
    toks[which] = t->release();
  }
  return *toks[which];
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace lorc;
  fuzz::Reader in(data, size);
  const uint8_t flags = in.Byte();
  const Tokenizer& tok = Fixture(flags & 1);
  const bool add_special = (flags & 2) != 0;
  const bool skip_special = (flags & 4) != 0;
  const bool ids_in_range = (flags & 8) != 0;
  const std::string_view text = in.Rest();

  absl::StatusOr<std::vector<int32_t>> ids = tok.Encode(text, add_special);
  if (!ids.ok()) {
    if (ids.status().code() != absl::StatusCode::kInvalidArgument ||
        ids.status().message().find("offset") == std::string_view::npos) {
      fuzz::Fail("Encode error without the byte offset: " + ids.status().ToString());
    }
  } else {
    for (int32_t id : *ids) {
      if (!tok.IsValidId(id)) fuzz::Fail("Encode gave an invalid id");
    }
    if (!add_special) {
      absl::StatusOr<std::string> back = tok.Decode(*ids, false);
      if (!back.ok()) fuzz::Fail("Decode of Encode's ids failed: " + back.status().ToString());
      if (*back != text) fuzz::Fail("Decode(Encode(text)) != text");
    }
  }

  std::vector<int32_t> raw(text.size() / 4);
  if (!raw.empty()) std::memcpy(raw.data(), text.data(), raw.size() * 4);
  if (ids_in_range) {
    // Mostly valid ids (a few past the end), so decoding gets past the range check.
    const uint32_t span = static_cast<uint32_t>(tok.vocab_size()) + 4;
    for (int32_t& id : raw) id = static_cast<int32_t>(static_cast<uint32_t>(id) % span);
  }
  absl::StatusOr<std::string> decoded = tok.Decode(raw, skip_special);
  IncrementalDecoder dec(tok, skip_special);
  std::string streamed;
  for (int32_t id : raw) streamed += dec.Push(id);
  streamed += dec.Flush();
  if (dec.pending_bytes() != 0) fuzz::Fail("IncrementalDecoder holds bytes after Flush");
  if (decoded.ok() && *decoded != streamed) fuzz::Fail("IncrementalDecoder != Decode");
  for (int32_t id : raw) {
    (void)tok.IdToToken(id);
    (void)tok.TokenBytes(id);
    (void)tok.IsSpecial(id);
  }
  return 0;
}
