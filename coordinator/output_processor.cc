#include "coordinator/output_processor.h"

#include <algorithm>

namespace lorc {

OutputProcessor::OutputProcessor(const Tokenizer* tokenizer, std::vector<std::string> stop_strings,
                                 bool include_stop_str_in_output, int32_t min_tokens)
    : stops_(std::move(stop_strings)),
      include_stop_(include_stop_str_in_output),
      min_tokens_(min_tokens) {
  if (tokenizer != nullptr) decoder_ = std::make_unique<IncrementalDecoder>(*tokenizer, true);
}

// Length of the prefix of pending_ that cannot be the start of a stop string.
size_t OutputProcessor::SafeEnd() const {
  size_t hold = 0;
  for (const std::string& s : stops_) {
    const size_t max_len = std::min(s.size() - 1, pending_.size());
    for (size_t len = max_len; len > hold; --len) {
      if (pending_.compare(pending_.size() - len, len, s, 0, len) == 0) {
        hold = len;
        break;
      }
    }
  }
  return pending_.size() - hold;
}

OutputProcessor::Delta OutputProcessor::Push(int32_t token) {
  Delta d;
  if (decoder_ == nullptr || stopped_) return d;
  pending_ += decoder_->Push(token);
  ++num_tokens_;
  size_t cut = std::string::npos;
  const std::string* match = nullptr;
  if (num_tokens_ >= min_tokens_) {
    for (const std::string& s : stops_) {
      const size_t at = pending_.find(s);
      if (at < cut) {
        cut = at;
        match = &s;
      }
    }
  }
  if (match != nullptr) {
    d.text = pending_.substr(0, include_stop_ ? cut + match->size() : cut);
    d.stopped = stopped_ = true;
    d.stop_string = *match;
    pending_.clear();
  } else {
    const size_t safe = SafeEnd();
    d.text = pending_.substr(0, safe);
    pending_.erase(0, safe);
  }
  text_ += d.text;
  return d;
}

void OutputProcessor::PushStopToken(int32_t token) {
  if (decoder_ == nullptr || stopped_ || !include_stop_) return;
  pending_ += decoder_->Push(token);
  ++num_tokens_;
}

std::string OutputProcessor::Finish() {
  if (decoder_ == nullptr || stopped_) return "";
  std::string rest = std::move(pending_) + decoder_->Flush();
  pending_.clear();
  stopped_ = true;
  text_ += rest;
  return rest;
}

}  // namespace lorc
