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
    if (stopped) {
      EXPECT_TRUE(d.text.empty()) << "text after the stop";
    }
    out += d.text;
    stopped = stopped || d.stopped;
  }
  EXPECT_TRUE(stopped);
  EXPECT_EQ(out + p.Finish(), "a ");
  OutputProcessor none(nullptr, {});
  EXPECT_TRUE(none.Push(ids[0]).text.empty());
  EXPECT_TRUE(none.Finish().empty());
}

// Streams `text` through a processor with the given options: (text, the stop that matched, the
// 1-based token at which it matched; 0: none).
struct Streamed {
  std::string text;
  std::string stop_string;
  int at_token = 0;
};

TEST_F(OutputProcessorTest, IncludeStopStrKeepsTheMatchAndTheMatchIsReported) {
  auto run = [&](const std::string& text, std::vector<std::string> stops, bool include,
                 int32_t min_tokens) {
    OutputProcessor p(tok_.get(), std::move(stops), include, min_tokens);
    Streamed out;
    int k = 0;
    for (int32_t id : Ids(text)) {
      ++k;
      const OutputProcessor::Delta d = p.Push(id);
      out.text += d.text;
      if (d.stopped) {
        out.stop_string = d.stop_string;
        out.at_token = k;
        return out;
      }
      EXPECT_TRUE(d.stop_string.empty());
    }
    out.text += p.Finish();
    return out;
  };
  Streamed s = run("The pass key of Alice is 12345.", {"12345", "key of"}, true, 0);
  EXPECT_EQ(s.text, "The pass key of");
  EXPECT_EQ(s.stop_string, "key of");
  s = run("The pass key of Alice is 12345.", {"12345", "key of"}, false, 0);
  EXPECT_EQ(s.text, "The pass ");
  EXPECT_EQ(s.stop_string, "key of");
  s = run("one two three four", {"four", "two"}, false, 0);
  EXPECT_EQ(s.stop_string, "two");

  // min_tokens: a stop string completing before the min_tokens-th token does not count (its
  // text is sent); one completing at it or later does.
  const std::string text = "a b a b c";
  const Streamed first = run(text, {"b"}, false, 0);
  ASSERT_GT(first.at_token, 0);
  EXPECT_EQ(first.text, "a ");
  EXPECT_EQ(run(text, {"b"}, false, first.at_token).at_token, first.at_token);
  s = run(text, {"b"}, false, first.at_token + 1);
  EXPECT_GT(s.at_token, first.at_token);
  EXPECT_EQ(s.text, "a b a ");
  EXPECT_EQ(s.stop_string, "b");
  s = run(text, {"b"}, true, first.at_token + 1);
  EXPECT_EQ(s.text, "a b a b");
  // Never reached: all the text, no stop.
  s = run(text, {"b"}, false, 1000);
  EXPECT_EQ(s.text, text);
  EXPECT_EQ(s.at_token, 0);
}

}  // namespace
}  // namespace lorc
