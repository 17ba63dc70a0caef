// Tensor parallelism at 8 ranks, served (issue #13: nothing may assume at most 4 GPUs). The
// fixture has 2 KV heads (TP = 4 already replicates each on two ranks, server_e2e_test.cc); this
// test serves a model of 8 KV heads, Llama-3-70B's count, so that TP = 8 holds one KV head per
// rank: tiny-llama-a's tokenizer with a config of hidden 512, 8 query and 8 KV heads of 64, 2
// layers, intermediate 1,408, vocabulary 4,096, seeded random weights (the same full model at
// every TP size: model/weights.h RandomWeights). Eight worker processes over Gloo, LM head
// replicated and split by vocabulary (512 ids a rank).
//
// Tolerance: the greedy tokens of the four golden prompts (16 each, batched) equal TP = 1's, and
// every token's log-probability and top-5 log-probabilities lie within 1e-4 of TP = 1's (fp32 on
// the CPU backend; the sums differ only in order across ranks).
#include <thread>

#include "nlohmann/json.hpp"
#include "tests/coordinator/server_e2e_fixture.h"

namespace lorc {
namespace e2e {
namespace {

// The model directory: the fixture's tokenizer, a config of 8 KV heads (no weights file:
// --random-weights).
std::string EightKvHeadModel() {
  return TinyTokenizerModel("lorc_server_tp8_e2e", "model", [](nlohmann::json& c) {
    c["hidden_size"] = 512;
    c["num_attention_heads"] = 8;
    c["num_key_value_heads"] = 8;
    c["head_dim"] = 64;
    c["num_hidden_layers"] = 2;
    c["intermediate_size"] = 1408;
  });
}

struct Outputs {
  std::vector<std::vector<int32_t>> ids;
  std::vector<std::vector<TokenLogprobs>> logprobs;
};

class ServerTp8Test : public ServerE2ETest {
 protected:
  static constexpr int kTokens = 16;

  void SetUp() override {
    ServerE2ETest::SetUp();
    if (HasFatalFailure() || IsSkipped()) return;
    model_ = EightKvHeadModel();
  }

  // Serves the model at `tp` and streams the golden prompts concurrently (greedy, logprobs 5).
  void Serve(int tp, const std::vector<std::string>& flags, Outputs* out) {
    std::vector<std::string> extra = {"--model", model_, "--random-weights"};
    extra.insert(extra.end(), flags.begin(), flags.end());
    ASSERT_NO_FATAL_FAILURE(StartServer(tp, extra));
    const v1::ModelInfoResponse info = Info();
    EXPECT_EQ(info.tensor_parallel_size(), tp);
    EXPECT_EQ(info.num_kv_heads(), 8);
    const std::vector<Golden>& golden = GoldenPrompts();
    std::vector<cli::StreamResult> got(golden.size());
    std::vector<std::thread> threads;
    for (size_t i = 0; i < golden.size(); ++i) {
      threads.emplace_back([&, i] {
        v1::GenerateRequest req = IdsRequest(golden[i].prompt_ids, kTokens);
        req.mutable_sampling()->set_ignore_eos(true);
        req.mutable_sampling()->set_logprobs(5);
        got[i] = Generate(req);
      });
    }
    for (std::thread& t : threads) t.join();
    for (size_t i = 0; i < golden.size(); ++i) {
      ASSERT_TRUE(got[i].status.ok()) << "prompt " << i << ": " << StatusText(got[i].status);
      ASSERT_EQ(got[i].ids.size(), static_cast<size_t>(kTokens)) << "prompt " << i;
      ASSERT_EQ(got[i].completions.size(), 1u);
      ASSERT_EQ(got[i].completions[0].logprobs.size(), static_cast<size_t>(kTokens)) << "prompt " << i;
      out->ids.push_back(got[i].ids);
      out->logprobs.push_back(got[i].completions[0].logprobs);
    }
    // Every block free once the requests ended.
    EXPECT_EQ(WaitIdle(10).kv_free_blocks(), info.kv_capacity_blocks());
    StopServer();
  }

  void ExpectClose(const Outputs& ref, const Outputs& got, const std::string& what) {
    ASSERT_EQ(got.ids.size(), ref.ids.size());
    for (size_t i = 0; i < ref.ids.size(); ++i) {
      SCOPED_TRACE(absl::StrCat(what, ", golden prompt ", i));
      EXPECT_EQ(got.ids[i], ref.ids[i]);
      for (int t = 0; t < kTokens; ++t) {
        const TokenLogprobs& a = ref.logprobs[i][t];
        const TokenLogprobs& b = got.logprobs[i][t];
        EXPECT_NEAR(b.logprob, a.logprob, 1e-4) << "token " << t;
        ASSERT_EQ(b.top_logprobs.size(), 5u) << "token " << t;
        ASSERT_EQ(a.top_logprobs.size(), 5u) << "token " << t;
        for (int k = 0; k < 5; ++k) EXPECT_NEAR(b.top_logprobs[k], a.top_logprobs[k], 1e-4) << "token " << t << " top " << k;
        EXPECT_EQ(b.top_ids[0], a.top_ids[0]) << "token " << t;
      }
    }
  }

  std::string model_;
};

TEST_F(ServerTp8Test, EightRanksOfOneKvHeadEachMatchOneRank) {
  Outputs tp1, tp8, tp8_split;
  ASSERT_NO_FATAL_FAILURE(Serve(1, {}, &tp1));
  ASSERT_NO_FATAL_FAILURE(Serve(8, {}, &tp8));
  ASSERT_NO_FATAL_FAILURE(Serve(8, {"--lm-head", "split"}, &tp8_split));
  ExpectClose(tp1, tp8, "TP = 8, LM head replicated");
  ExpectClose(tp1, tp8_split, "TP = 8, LM head split");
  // Not a degenerate model: the greedy continuations differ between prompts.
  EXPECT_NE(tp1.ids[0], tp1.ids[1]);
}

}  // namespace
}  // namespace e2e
}  // namespace lorc
