// tokenizer.json, any bytes, through Tokenizer::FromJsonString (what FromModelDir calls on the
// file's contents); an accepted tokenizer then encodes a few texts and decodes its ids, so a
// vocabulary, merges or template that load but break encoding are found too.
#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "fuzz/fuzz_util.h"
#include "tokenizer/tokenizer.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace lorc;
  absl::StatusOr<std::unique_ptr<Tokenizer>> tok =
      Tokenizer::FromJsonString(std::string_view(reinterpret_cast<const char*>(data), size), "fuzz");
  if (!tok.ok()) {
    if (tok.status().message().find("fuzz") == std::string_view::npos) {
      fuzz::Fail("error does not name the source: " + tok.status().ToString());
    }
    return 0;
  }
  const Tokenizer& t = **tok;
  static const char* kTexts[] = {"", "Hello world", " a  b\n\n\tc", "123 4567 \xc3\xa9\xe4\xb8\xad",
                                 "<s></s><|endoftext|><unk>", "'s 're don't"};
  for (const char* text : kTexts) {
    for (bool special : {false, true}) {
      absl::StatusOr<std::vector<int32_t>> ids = t.Encode(text, special);
      if (!ids.ok()) continue;
      for (int32_t id : *ids) {
        if (id < 0 || id >= t.vocab_size()) fuzz::Fail("Encode gave an id outside the vocabulary");
      }
      (void)t.Decode(*ids, false);
      (void)t.Decode(*ids, true);
    }
  }
  std::vector<int32_t> all;
  for (int32_t id = 0; id < std::min(t.vocab_size(), 512); ++id) {
    if (t.IsValidId(id)) all.push_back(id);
    (void)t.IdToToken(id);
  }
  (void)t.Decode(all, false);
  IncrementalDecoder dec(t);
  for (int32_t id : all) (void)dec.Push(id);
  (void)dec.Flush();
  return 0;
}
