// OutputProcessor with the fixture model's tokenizer: streamed text is never retracted, stop
// strings cut before the match even across token boundaries, and multi-byte characters are only
// emitted whole.
#include "coordinator/output_processor.h"

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/testing/fixtures.h"
#include "tests/testing/status_matchers.h"
#include "tokenizer/tokenizer_unicode.h"

namespace lorc {
namespace {

class OutputProcessorTest : public ::testing::Test {
 protected:
  void SetUp() override {
    REQUIRE_TINY_LLAMA();
    auto tok = Tokenizer::FromModelDir(::lorc::testing::TinyLlamaDir());
    ASSERT_OK(tok);
    tok_ = *std::move(tok);
  }
  std::vector<int32_t> Ids(const std::string& text) {
    auto ids = tok_->Encode(text);
    EXPECT_OK(ids);
    return ids.ok() ? *ids : std::vector<int32_t>();
  }
  // Streams `text`'s tokens one by one; returns the concatenated deltas (+ Finish unless stopped)
  // and whether a stop matched, checking that every delta is whole UTF-8.
  std::pair<std::string, bool> Stream(const std::string& text, std::vector<std::string> stops) {
    OutputProcessor p(tok_.get(), std::move(stops));
    std::string out;
    for (int32_t id : Ids(text)) {
      const OutputProcessor::Delta d = p.Push(id);
      EXPECT_TRUE(tokenizer_internal::FindInvalidUtf8(d.text) == std::nullopt) << "delta " << d.text;
      out += d.text;
      if (d.stopped) return {out, true};
    }
    out += p.Finish();
    EXPECT_EQ(out, p.text());
    return {out, false};
  }
  std::unique_ptr<Tokenizer> tok_;
};

TEST_F(OutputProcessorTest, WithoutStopsTheStreamIsTheDecodedText) {
  const std::string text = "A fool and his money are soon parted. Caf\xc3\xa9 \xe2\x82\xac 42!";
  EXPECT_EQ(Stream(text, {}), std::make_pair(text, false));
}

TEST_F(OutputProcessorTest, AStopStringCutsBeforeItsFirstMatchEvenAcrossTokens) {
  auto [out, stopped] = Stream("The pass key of Alice is 12345. The end.", {"key of", "12345"});
  EXPECT_TRUE(stopped);
  EXPECT_EQ(out, "The pass ");
  // The earliest match wins, whichever stop string it is.
  std::tie(out, stopped) = Stream("one two three four", {"four", "two"});
  EXPECT_TRUE(stopped);
  EXPECT_EQ(out, "one ");
}

TEST_F(OutputProcessorTest, APossibleStopPrefixIsHeldBackThenReleased) {
  OutputProcessor p(tok_.get(), {"STOPPING"});
  std::string streamed;
  for (int32_t id : Ids("all STOP")) {
    const OutputProcessor::Delta d = p.Push(id);
    EXPECT_FALSE(d.stopped);
    streamed += d.text;
  }
  // "STOP" could still grow into "STOPPING": it is held back, not sent.
  EXPECT_EQ(streamed, "all ");
  // " here" proves it was no stop string: it is released, nothing lost.
  for (int32_t id : Ids(" here")) streamed += p.Push(id).text;
  streamed += p.Finish();
  EXPECT_EQ(streamed, "all STOP here");
}

TEST_F(OutputProcessorTest, NothingAfterTheStopAndNoTokenizerMeansNoText) {
  OutputProcessor p(tok_.get(), {"b"});
  const std::vector<int32_t> ids = Ids("a b c");
  std::string out;
  bool stopped = false;
  for (int32_t id : ids) {
    const OutputProcessor::Delta d = p.Push(id);
    if (stopped) EXPECT_TRUE(d.text.empty()) << "text after the stop";
    out += d.text;
    stopped = stopped || d.stopped;
  }
  EXPECT_TRUE(stopped);
  EXPECT_EQ(out + p.Finish(), "a ");
  OutputProcessor none(nullptr, {});
  EXPECT_TRUE(none.Push(ids[0]).text.empty());
  EXPECT_TRUE(none.Finish().empty());
}

}  // namespace
}  // namespace lorc
