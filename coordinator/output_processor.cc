#include "coordinator/output_processor.h"

#include <algorithm>

namespace lorc {

OutputProcessor::OutputProcessor(const Tokenizer* tokenizer, std::vector<std::string> stop_strings)
    : stops_(std::move(stop_strings)) {
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
  size_t cut = std::string::npos;
  for (const std::string& s : stops_) cut = std::min(cut, pending_.find(s));
  if (cut != std::string::npos) {
    d.text = pending_.substr(0, cut);
    d.stopped = stopped_ = true;
    pending_.clear();
  } else {
    const size_t safe = SafeEnd();
    d.text = pending_.substr(0, safe);
    pending_.erase(0, safe);
  }
  text_ += d.text;
  return d;
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
