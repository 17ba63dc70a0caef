// Turns a request's generated token ids into streamed text: incremental UTF-8-safe
// detokenisation, stop strings (the text is cut before the first match, or after it with
// include_stop_str_in_output) and holding back any tail that could still become a stop string,
// so streamed text never has to be retracted. One per completion.
//
// min_tokens (as vLLM): a stop string counts only when it completes at the min_tokens-th
// generated token or later; text before that is emitted even if it contains a stop string.
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
  OutputProcessor(const Tokenizer* tokenizer, std::vector<std::string> stop_strings,
                  bool include_stop_str_in_output = false, int32_t min_tokens = 0);

  struct Delta {
    std::string text;         // new text that is safe to send
    bool stopped = false;     // a stop string matched: the request ends here
    std::string stop_string;  // stopped: the one that matched (the earliest in the text; on a
                              // tie the first listed)
  };
  // A generated token (not one that ended the request by id: see PushStopToken).
  Delta Push(int32_t token);
  // The token that ended the request by id (EOS, a stop id). With include_stop_str_in_output its
  // text joins the output, without a stop-string check (vLLM's detokenizer: the stop token is
  // detokenized only with that flag; EOS and other special tokens decode to nothing); without
  // the flag it adds nothing. Finish() returns it.
  void PushStopToken(int32_t token);
  // The request ended (length, stop id, EOS, abort): returns the held-back text, if any.
  std::string Finish();

  const std::string& text() const { return text_; }  // all text emitted so far

 private:
  size_t SafeEnd() const;

  std::unique_ptr<IncrementalDecoder> decoder_;
  std::vector<std::string> stops_;
  bool include_stop_;
  int32_t min_tokens_;
  int32_t num_tokens_ = 0;  // pushed so far
  std::string pending_;  // decoded, not yet emitted
  std::string text_;
  bool stopped_ = false;
};

}  // namespace lorc
