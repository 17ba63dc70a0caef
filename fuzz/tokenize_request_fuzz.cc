// TokenizeRequest bytes as the public service receives them: ParseRequest, then
// TokenizeRequestIds with the fixture tokenizer and config, exactly as LorcServeService::Tokenize
// does. An accepted text (valid UTF-8 by then) must round-trip through Decode when no special
// tokens were added, and start with the model's BOS when they were.
#include <cstdint>
#include <memory>
#include <string>

#include "coordinator/request_conversion.h"
#include "fuzz/fuzz_util.h"
#include "fuzz/protobuf_log.h"
#include "model/model_config.h"
#include "tokenizer/tokenizer.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace lorc;
  static const Tokenizer* tok = [] {
    auto t = Tokenizer::FromModelDir(fuzz::ModelsDir() + "/tiny-llama-a");
    if (!t.ok()) fuzz::Fail("fixture tokenizer: " + t.status().ToString());
    return t->release();
  }();
  static const ModelConfig config = [] {
    auto c = LoadModelConfig(fuzz::ModelsDir() + "/tiny-llama-a");
    if (!c.ok()) fuzz::Fail("fixture config: " + c.status().ToString());
    return *std::move(c);
  }();
  fuzz::FailOnProtobufLog();
  lorcserve::v1::TokenizeRequest req;
  if (absl::Status s = ParseRequest(std::string_view(reinterpret_cast<const char*>(data), size), &req);
      !s.ok()) {
    if (s.code() != absl::StatusCode::kInvalidArgument) fuzz::Fail("parse: " + s.ToString());
    return 0;
  }
  absl::StatusOr<std::vector<int32_t>> ids = TokenizeRequestIds(req, config, tok);
  if (!ids.ok()) fuzz::Fail("a parsed request's text does not tokenize: " + ids.status().ToString());
  if (!req.add_special_tokens()) {
    absl::StatusOr<std::string> back = tok->Decode(*ids);
    if (!back.ok() || *back != req.text()) fuzz::Fail("Decode(Tokenize(text)) != text");
  } else if (ids->empty() || (*ids)[0] != config.bos_token_id) {
    fuzz::Fail("Tokenize with special tokens does not start with the model's BOS");
  }
  return 0;
}
