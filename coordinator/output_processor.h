// Turns a request's generated token ids into streamed text: incremental UTF-8-safe
// detokenisation, stop strings (the text is cut before the first match) and holding back any
// tail that could still become a stop string, so streamed text never has to be retracted.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "common/sampling_params.h"
#include "tokenizer/tokenizer.h"

namespace lorc {

class OutputProcessor {
 public:
  // `tokenizer` may be null: then no text is produced and stop strings cannot match.
  OutputProcessor(const Tokenizer* tokenizer, std::vector<std::string> stop_strings);

  struct Delta {
    std::string text;       // new text that is safe to send
    bool stopped = false;   // a stop string matched: the request ends here
  };
  // A generated token (not one that ended the request by id).
  Delta Push(int32_t token);
  // The request ended (length, stop id, EOS, abort): returns the held-back text, if any.
  std::string Finish();

  const std::string& text() const { return text_; }  // all text emitted so far

 private:
  size_t SafeEnd() const;

  std::unique_ptr<IncrementalDecoder> decoder_;
  std::vector<std::string> stops_;
  std::string pending_;  // decoded, not yet emitted
  std::string text_;
  bool stopped_ = false;
};

}  // namespace lorc
