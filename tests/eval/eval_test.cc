// Evaluation through the engine on the fixture model: perplexity aggregates the per-token NLLs
// of every window, and errors in evaluation files name the file and line.
#include "eval/eval.h"

#include <cmath>
#include <filesystem>
#include <fstream>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/testing/fixture_model.h"
#include "tests/testing/fixtures.h"
#include "tests/testing/status_matchers.h"
#include "tokenizer/tokenizer.h"
#include "worker/model_loader.h"
#include "worker/step_executor.h"

namespace lorc {
namespace {

using ::lorc::testing::StatusIs;
using ::testing::AllOf;
using ::testing::HasSubstr;

std::string WriteTemp(const std::string& name, const std::string& text) {
  const std::string path = (std::filesystem::temp_directory_path() / name).string();
  std::ofstream(path) << text;
  return path;
}

class EvalTest : public ::lorc::testing::FixtureModelTest<> {
 protected:
  void SetUp() override {
    ASSERT_NO_FATAL_FAILURE(FixtureModelTest::SetUp());
    ASSERT_OK(LoadFixtureModel({}));
    auto engine = Engine::Create(exec_.get(), model_.config, model_.runner->kv_spec(), nullptr,
                                 EngineOptions());
    ASSERT_OK(engine);
    engine_ = *std::move(engine);
  }
  std::unique_ptr<Engine> engine_;
};

TEST_F(EvalTest, PerplexityIsTheExpOfTheMeanNllOverAllWindows) {
  const std::vector<int32_t> a = {0, 611, 3310, 42, 17}, b = {0, 5, 99, 1000};
  auto shifted = [&](const std::vector<int32_t>& v) {
    return ScorePromptNll(*engine_, absl::MakeConstSpan(v).subspan(0, v.size() - 1),
                          absl::MakeConstSpan(v).subspan(1));
  };
  auto nll_a = shifted(a);
  auto nll_b = shifted(b);
  ASSERT_OK(nll_a);
  ASSERT_OK(nll_b);
  double sum = 0;
  for (double x : *nll_a) sum += x;
  for (double x : *nll_b) sum += x;
  const std::string path = WriteTemp(
      "lorc_eval_windows.jsonl",
      R"({"ids": [0, 611, 3310, 42], "targets": [611, 3310, 42, 17]}
{"ids": [0, 5, 99], "targets": [5, 99, 1000]}
)");
  auto ppl = EvalPerplexity(*engine_, path, 0);
  ASSERT_OK(ppl);
  EXPECT_EQ(ppl->windows, 2);
  EXPECT_EQ(ppl->tokens, 7);
  EXPECT_NEAR(ppl->ppl, std::exp(sum / 7), 1e-3 * ppl->ppl);
  auto first = EvalPerplexity(*engine_, path, 1);
  ASSERT_OK(first);
  EXPECT_EQ(first->windows, 1);
}

TEST_F(EvalTest, BadFilesNameTheFileAndLine) {
  const std::string misaligned = WriteTemp(
      "lorc_eval_misaligned.jsonl", "{\"ids\": [0, 5], \"targets\": [6, 7]}\n");
  EXPECT_THAT(EvalPerplexity(*engine_, misaligned, 0),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("lorc_eval_misaligned.jsonl:1: score: target 0 (6) is not the next id (5)")));
  const std::string vocab = WriteTemp(
      "lorc_eval_vocab.jsonl", "\n{\"ids\": [0, 99999], \"targets\": [99999, 7]}\n");
  EXPECT_THAT(EvalPerplexity(*engine_, vocab, 0),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("lorc_eval_vocab.jsonl:2")));
  const std::string passkey = WriteTemp("lorc_eval_passkey.jsonl", "{\"prompt_ids\": [0, 5]}\n");
  EXPECT_THAT(EvalPasskey(*engine_, passkey, 0),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("lorc_eval_passkey.jsonl:1: needs integer 'filler_tokens'")));
  // Found by a tester: accepted silently (an empty file, a negative filler bucket, an empty
  // answer scoring 100 %), or a prompt's error without its line.
  const std::vector<std::pair<std::string, std::string>> passkey_cases = {
      {"", "lorc_eval_passkey_bad.jsonl: no prompts"},
      {"{\"prompt_ids\": [0, 5], \"filler_tokens\": -5, \"answer\": \"1\"}\n",
       "lorc_eval_passkey_bad.jsonl:1: 'filler_tokens' must be >= 0, got -5"},
      {"{\"prompt_ids\": [0, 5], \"filler_tokens\": 5, \"answer\": \"\"}\n",
       "lorc_eval_passkey_bad.jsonl:1: 'answer' is empty"},
      {"{\"prompt_ids\": [0, 5], \"filler_tokens\": 5, \"answer\": \"1\"}\n"
       "{\"prompt_ids\": [0, 99999], \"filler_tokens\": 5, \"answer\": \"1\"}\n",
       "lorc_eval_passkey_bad.jsonl:2: prompt token id 99999"},
  };
  for (const auto& [text, message] : passkey_cases) {
    SCOPED_TRACE(message);
    EXPECT_THAT(EvalPasskey(*engine_, WriteTemp("lorc_eval_passkey_bad.jsonl", text), 0),
                StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr(message)));
  }
  EXPECT_EQ(engine_->scheduler().num_free_blocks(), model_.runner->kv_spec().num_blocks);
}

// The files are read and checked whole before any window runs (lorcserve eval reads them before
// the model loads); a window the model cannot hold is named with the longest that fits (it was
// refused by the scheduler as "lower max_tokens or shorten the prompt", a tester).
TEST_F(EvalTest, FilesAreCheckedBeforeAnythingRunsAndALongWindowNamesTheLimit) {
  const std::string late_bad = WriteTemp(
      "lorc_eval_late_bad.jsonl",
      "{\"ids\": [0, 5], \"targets\": [5, 7]}\n{\"ids\": [0, 5], \"targets\": [5]}\n");
  EXPECT_THAT(ReadPplWindows(late_bad, 0),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("lorc_eval_late_bad.jsonl:2: score: 2 ids and 1 targets")));
  auto first = ReadPplWindows(late_bad, 1);  // --limit 1 never reads line 2
  ASSERT_OK(first);
  ASSERT_EQ(first->size(), 1u);
  EXPECT_EQ((*first)[0].where, late_bad + ":1");
  EXPECT_THAT(ReadPplWindows(WriteTemp("lorc_eval_empty.jsonl", "\n"), 0),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("lorc_eval_empty.jsonl: no windows")));
  auto keys = ReadPasskeyPrompts(::lorc::testing::TinyLlamaDir() + "/eval_passkey.jsonl", 2);
  ASSERT_OK(keys);
  EXPECT_EQ(keys->size(), 8u);  // 2 of each of the 4 lengths

  const int64_t max_len = engine_->scheduler().config().max_model_len;
  PplWindow w;
  for (int64_t i = 0; i < max_len - 1; ++i) w.ids.push_back(static_cast<int32_t>(5 + i % 100));
  w.targets.assign(w.ids.begin() + 1, w.ids.end());
  w.targets.push_back(7);
  w.where = "long:1";
  EXPECT_THAT(EvalPerplexity(*engine_, std::vector<PplWindow>{w}),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       AllOf(HasSubstr(absl::StrCat("long:1: score: a window of ", max_len - 1, " ids needs ",
                                                    max_len + 1, " positions")),
                             HasSubstr(absl::StrCat("at most ", max_len - 2, " ids a window")))));
  EXPECT_EQ(engine_->scheduler().num_free_blocks(), model_.runner->kv_spec().num_blocks);
}

// Fact names are ASCII words ([A-Za-z0-9_]+, std::regex's \w as the check was first written):
// "Zoë" and a key that is not all digits are no facts, so three of the five count.
TEST_F(EvalTest, MultiTurnFactsAreAsciiNamesWithDigitKeys) {
  auto tok = Tokenizer::FromModelDir(::lorc::testing::TinyLlamaDir());
  ASSERT_OK(tok);
  const std::string path = WriteTemp(
      "lorc_eval_multi_turn.jsonl",
      R"({"filler_tokens": 8, "prompt_ids": [0, 5], "prompt": "The pass key of Ann is 11. )"
      R"(The pass key of Bob_2 is 22. The pass key of Zo\u00eb is 33. The pass key of Cy is 4x. )"
      R"(The pass key of Dee is 55.\nQuestion: what is it?"})"
      "\n");
  EXPECT_THAT(EvalMultiTurnPasskey(*engine_, **tok, path, 8, 0),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("lorc_eval_multi_turn.jsonl:1: 3 pass-key facts in the context, want 4")));
}

}  // namespace
}  // namespace lorc
