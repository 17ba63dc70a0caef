// End-to-end tests of request semantics over gRPC against a real coordinator (fixture:
// server_e2e_fixture.h): invalid requests rejected with the status and message naming the field
// while serving continues, every sampling field and its invalid values, invalid UTF-8 in any
// string field, n > 1 completions each with its own final message, log-probabilities and stop
// reasons, and the bounded admission queue.
#include "tests/coordinator/server_e2e_fixture.h"

namespace lorc {
namespace e2e {
namespace {

TEST_F(ServerE2ETest, InvalidRequestsAreRejectedAndServingContinues) {
  ASSERT_NO_FATAL_FAILURE(StartServer(1));
  const Golden& g = GoldenPrompts()[0];
  struct Case {
    std::string name;
    v1::GenerateRequest req;
    std::string message;  // a substring of the expected message
  };
  std::vector<Case> cases;
  {
    v1::GenerateRequest r;
    r.mutable_sampling()->set_max_tokens(4);
    cases.push_back({"no prompt", r, "empty prompt: set text or token_ids"});
  }
  {
    v1::GenerateRequest r;
    r.set_text("");
    cases.push_back({"empty text", r, "empty prompt"});
  }
  {
    v1::GenerateRequest r = IdsRequest({}, 4);
    cases.push_back({"empty token ids", r, "token_ids: empty prompt"});
  }
  cases.push_back({"token id 5000", IdsRequest({0, 5000, 3}, 4),
                   "prompt token id 5000 at position 1 outside the vocabulary [0, 4096)"});
  cases.push_back({"negative token id", IdsRequest({0, -1}, 4),
                   "prompt token id -1 at position 1 outside the vocabulary [0, 4096)"});
  cases.push_back({"prompt + max_tokens > 4096", IdsRequest(g.prompt_ids, 4091),
                   "prompt (6 tokens) + max_tokens (4091) = 4097 exceeds the maximum model length of 4096"});
  {
    v1::GenerateRequest r = IdsRequest(g.prompt_ids, 4);
    r.mutable_sampling()->set_temperature(-1);
    cases.push_back({"temperature -1", r, "temperature must be a finite value >= 0, got -1"});
  }
  {
    v1::GenerateRequest r = IdsRequest(g.prompt_ids, 4);
    r.mutable_sampling()->set_top_p(0);
    cases.push_back({"top_p 0", r, "top_p must be in (0, 1], got 0"});
  }
  {
    v1::GenerateRequest r = IdsRequest(g.prompt_ids, 4);
    r.mutable_sampling()->set_max_tokens(-3);
    cases.push_back({"max_tokens -3", r, "max_tokens must be >= 1, got -3"});
  }
  {
    v1::GenerateRequest r = IdsRequest(g.prompt_ids, 4);
    r.mutable_sampling()->add_stop_token_ids(4096);
    cases.push_back({"stop token id 4096", r, "stop_token_ids: id 4096 outside the vocabulary [0, 4096)"});
  }
  {
    v1::GenerateRequest r;
    r.set_text(std::string((4 << 20) + 1024, 'a'));  // > 4 MiB, under the 64 MiB transport limit
    r.mutable_sampling()->set_max_tokens(4);
    cases.push_back({"4 MiB text prompt", r, "bytes exceeds the limit of 4194304 bytes"});
  }
  {
    v1::GenerateRequest r = IdsRequest(g.prompt_ids, 4);
    for (int i = 0; i < 65; ++i) r.mutable_sampling()->add_stop(absl::StrCat("stop", i));
    cases.push_back({"65 stop strings", r, "at most 64 stop strings"});
  }
  {
    v1::GenerateRequest r = IdsRequest(g.prompt_ids, 4);
    r.mutable_sampling()->add_stop(std::string(513, 'x'));
    cases.push_back({"513-byte stop string", r, "stop string of 513 bytes exceeds 512"});
  }
  {
    // Echoed in every response and written into the request's log line: bounded like session_id.
    v1::GenerateRequest r = IdsRequest(g.prompt_ids, 4);
    r.set_request_id(std::string(257, 'r'));
    cases.push_back({"257-byte request_id", r, "request_id: 257 bytes exceeds 256"});
  }
  {
    v1::GenerateRequest r = IdsRequest(g.prompt_ids, 4);
    r.mutable_sampling()->add_stop("a");
    r.mutable_sampling()->add_stop("");
    cases.push_back({"empty stop string", r, "stop[1]: stop strings must not be empty"});
  }
  {
    // Plain decimals, not "-1e-04" (a tester, 2026-12-05).
    v1::GenerateRequest r = IdsRequest(g.prompt_ids, 4);
    r.mutable_sampling()->set_temperature(-0.0001f);
    cases.push_back({"temperature -0.0001", r, "temperature must be a finite value >= 0, got -0.0001"});
  }
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    const auto t0 = Clock::now();
    const cli::StreamResult r = Generate(c.req, 60);
    EXPECT_EQ(r.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << StatusText(r.status);
    EXPECT_THAT(r.status.error_message(), HasSubstr(c.message));
    EXPECT_TRUE(r.ids.empty());
    EXPECT_LT(SecondsSince(t0), 10);
  }
  // The exact texts of the ones whose message is the whole story.
  EXPECT_EQ(Generate(cases[0].req).status.error_message(), "empty prompt: set text or token_ids");
  EXPECT_EQ(Generate(cases[1].req).status.error_message(), "text: empty prompt");
  const std::string big = Generate(cases[10].req).status.error_message();
  EXPECT_EQ(big, absl::StrCat("request of ", cases[10].req.ByteSizeLong(),
                              " bytes exceeds the limit of 4194304 bytes"));

  // The server keeps serving, correctly.
  EXPECT_EQ(Health(), HealthCheckResponse::SERVING);
  const cli::StreamResult ok = Generate(IdsRequest(g.prompt_ids, 48));
  ASSERT_TRUE(ok.status.ok()) << StatusText(ok.status);
  EXPECT_EQ(ok.ids, g.greedy_ids);
  EXPECT_EQ(ok.text, g.greedy_text);
  const v1::ModelInfoResponse info = WaitIdle(5);
  EXPECT_EQ(info.kv_free_blocks(), info.kv_capacity_blocks());
}

// ---- 3b. the request fields of issue #7: validation over gRPC -----------------------------------

// `msg` serialized, with the first occurrence of `marker` turned into `bytes` (so that a
// string field can hold invalid UTF-8, which protobuf would refuse to serialize).
std::string SerializedWith(const google::protobuf::Message& msg, const std::string& marker,
                           const std::string& bytes) {
  std::string wire = msg.SerializeAsString();
  const size_t at = wire.find(marker);
  EXPECT_NE(at, std::string::npos) << marker;
  if (at != std::string::npos) wire.replace(at, marker.size(), bytes);
  return wire;
}

TEST_F(ServerE2ETest, NewSamplingFieldsAreValidatedNamingTheField) {
  ASSERT_NO_FATAL_FAILURE(StartServer(1));
  const Golden& g = GoldenPrompts()[0];
  struct Case {
    std::string name;
    std::function<void(v1::SamplingOptions*)> set;
    std::string message;  // a substring of the expected message
  };
  const std::vector<Case> cases = {
      {"max_tokens 0", [](auto* s) { s->set_max_tokens(0); }, "max_tokens must be >= 1, got 0"},
      {"n 0", [](auto* s) { s->set_n(0); }, "n must be >= 1, got 0"},
      {"n 65", [](auto* s) { s->set_n(65); }, "n must be in [1, 64], got 65"},
      {"min_tokens -1", [](auto* s) { s->set_min_tokens(-1); }, "min_tokens must be in [0, max_tokens = 4], got -1"},
      {"min_tokens 5 > max_tokens 4", [](auto* s) { s->set_min_tokens(5); }, "min_tokens must be in [0, max_tokens = 4], got 5"},
      {"allowed_token_ids 4096", [](auto* s) { s->add_allowed_token_ids(4096); },
       "allowed_token_ids: id 4096 outside the vocabulary [0, 4096)"},
      {"allowed_token_ids -1", [](auto* s) { s->add_allowed_token_ids(-1); },
       "allowed_token_ids: id -1 outside the vocabulary"},
      {"logit_bias id 4096", [](auto* s) { (*s->mutable_logit_bias())[4096] = 1; },
       "logit_bias: id 4096 outside the vocabulary [0, 4096)"},
      {"logit_bias 101", [](auto* s) { (*s->mutable_logit_bias())[5] = 101; },
       "logit_bias: bias of id 5 must be in [-100, 100], got 101"},
      // Six significant digits printed this one as "got 100" (a tester, 2026-12-05).
      {"logit_bias 100.0001", [](auto* s) { (*s->mutable_logit_bias())[5] = 100.0001f; },
       "logit_bias: bias of id 5 must be in [-100, 100], got 100.0001"},
      {"logit_bias NaN", [](auto* s) { (*s->mutable_logit_bias())[5] = std::nanf(""); },
       "logit_bias: bias of id 5 must be in [-100, 100], got nan"},
      {"presence_penalty 3", [](auto* s) { s->set_presence_penalty(3); },
       "presence_penalty must be in [-2, 2], got 3"},
      {"frequency_penalty -2.5", [](auto* s) { s->set_frequency_penalty(-2.5); },
       "frequency_penalty must be in [-2, 2], got -2.5"},
      {"logprobs 21", [](auto* s) { s->set_logprobs(21); }, "logprobs must be in [0, 20]"},
      {"logprobs -1", [](auto* s) { s->set_logprobs(-1); }, "logprobs must be in [0, 20]"},
      {"prompt_logprobs 21", [](auto* s) { s->set_prompt_logprobs(21); }, "prompt_logprobs must be in [0, 20]"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    v1::GenerateRequest req = IdsRequest(g.prompt_ids, 4);
    c.set(req.mutable_sampling());
    const cli::StreamResult r = Generate(req, 60);
    EXPECT_EQ(r.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << StatusText(r.status);
    EXPECT_THAT(r.status.error_message(), HasSubstr(c.message));
    EXPECT_TRUE(r.ids.empty());
  }
  // max_tokens unset is the default (16), not an error.
  {
    v1::GenerateRequest req;
    req.mutable_token_ids()->mutable_ids()->Add(g.prompt_ids.begin(), g.prompt_ids.end());
    req.mutable_sampling()->set_ignore_eos(true);
    const cli::StreamResult r = Generate(req);
    ASSERT_TRUE(r.status.ok()) << StatusText(r.status);
    EXPECT_EQ(r.ids.size(), 16u);
    EXPECT_EQ(r.final.usage().completion_tokens(), 16);
  }
  // `lorcserve client --json` sends them and prints the completions.
  {
    int exit_code = 0;
    const std::string out = RunLorcserve(
        {"client", "--server", server_->address(), "--prompt-ids", "0,611,896,1229,287",
         "--max-tokens", "3", "--min-tokens", "1", "--presence-penalty", "0.5", "--logit-bias",
         "5:-1", "--json"},
        &exit_code);
    ASSERT_EQ(exit_code, 0) << out;
    const nlohmann::json j = nlohmann::json::parse(out, nullptr, false);
    ASSERT_FALSE(j.is_discarded()) << out;
    EXPECT_EQ(j["n"], 1);
    ASSERT_EQ(j["completions"].size(), 1u);
    EXPECT_EQ(j["completions"][0]["output_ids"], j["output_ids"]);
    EXPECT_EQ(j["output_ids"].size(), 3u);
    EXPECT_EQ(j["finish_reason"], "length");
    EXPECT_TRUE(j.contains("stop_reason")) << out;
    EXPECT_EQ(j["usage"]["completion_tokens"], 3);
  }
  EXPECT_EQ(Health(), HealthCheckResponse::SERVING);
  const v1::ModelInfoResponse info = WaitIdle(5);
  EXPECT_EQ(info.kv_free_blocks(), info.kv_capacity_blocks());
}

// `lorcserve bench --server --json` against a live server: every request served, and the KV
// figures of ModelInfo after the run (every block free again; null only without a live worker
// group, which this server has).
TEST_F(ServerE2ETest, BenchAgainstTheServerReportsTheKvPool) {
  ASSERT_NO_FATAL_FAILURE(StartServer(1));
  int exit_code = 0;
  const std::string out = RunLorcserve({"bench", "--server", server_->address(), "--requests", "3", "--concurrency",
                                        "2", "--prompt-len", "8", "--max-tokens", "4", "--json"},
                                       &exit_code);
  ASSERT_EQ(exit_code, 0) << out;
  const nlohmann::json j = nlohmann::json::parse(out, nullptr, false);  // --json: one JSON line
  ASSERT_FALSE(j.is_discarded()) << out;
  EXPECT_EQ(j["ok"], 3);
  ASSERT_TRUE(j["kv_capacity_blocks"].is_number_integer()) << out;
  EXPECT_GT(j["kv_capacity_blocks"].get<int64_t>(), 0);
  EXPECT_EQ(j["kv_free_blocks_after"], j["kv_capacity_blocks"]) << "blocks still held after the run";
  EXPECT_FALSE(j.contains("worker_failure")) << out;
  // Prompts longer than the server takes are refused before any is built (found by a tester:
  // --prompt-len 2147483647 grew the client to 7.5 GB).
  const std::string too_long = RunLorcserve({"bench", "--server", server_->address(), "--prompt-len", "2147483647",
                                             "--max-tokens", "4"},
                                            &exit_code, /*with_stderr=*/true);
  EXPECT_NE(exit_code, 0) << too_long;
  EXPECT_THAT(too_long, HasSubstr("--prompt-len 2147483647 + --max-tokens 4 = 2147483651 exceeds the server's "
                                  "max_model_len 4096"));
}

// Fault 4 of issue #7: a string field that is not valid UTF-8 used to fail inside gRPC (INTERNAL,
// empty message). Every such field is named, with the byte offset.
TEST_F(ServerE2ETest, InvalidUtf8IsInvalidArgumentNamingFieldAndOffset) {
  ASSERT_NO_FATAL_FAILURE(StartServer(1));
  const Golden& g = GoldenPrompts()[0];
  struct Case {
    std::string name, method, bytes, message;
  };
  std::vector<Case> cases;
  {
    v1::GenerateRequest r;
    r.set_text("ab#");
    r.mutable_sampling()->set_max_tokens(4);
    cases.push_back({"text", "Generate", SerializedWith(r, "ab#", "ab\xff"),
                     "text is not valid UTF-8 at byte offset 2 (byte 0xFF)"});
  }
  {
    v1::GenerateRequest r = IdsRequest(g.prompt_ids, 4);
    r.mutable_sampling()->add_stop("fine");
    r.mutable_sampling()->add_stop("xy#");
    cases.push_back({"stop[1]", "Generate", SerializedWith(r, "xy#", "xy\xc3"),
                     "sampling.stop[1] is not valid UTF-8 at byte offset 2 (byte 0xC3)"});
  }
  for (const std::string field : {"request_id", "session_id", "cache_salt"}) {
    v1::GenerateRequest r = IdsRequest(g.prompt_ids, 4);
    const google::protobuf::FieldDescriptor* fd = r.GetDescriptor()->FindFieldByName(field);
    ASSERT_NE(fd, nullptr) << field;
    r.GetReflection()->SetString(&r, fd, "id-#");
    cases.push_back({field, "Generate", SerializedWith(r, "id-#", "\xe2\x82id"),
                     field + " is not valid UTF-8 at byte offset 0 (byte 0xE2)"});
  }
  {
    v1::TokenizeRequest r;
    r.set_text("ab#");
    cases.push_back({"Tokenize text", "Tokenize", SerializedWith(r, "ab#", "ab\xff"),
                     "text is not valid UTF-8 at byte offset 2 (byte 0xFF)"});
  }
  // Not a GenerateRequest at all: field 1 (request_id) claims 255 bytes, 1 follows.
  cases.push_back({"truncated", "Generate", std::string("\x0a\xff\x01x", 4),
                   "request is not a valid lorcserve.v1.GenerateRequest"});
  cases.push_back({"truncated ModelInfo", "ModelInfo", std::string("\x0a\xff\x01x", 4),
                   "request is not a valid lorcserve.v1.ModelInfoRequest"});
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    int messages = 0;
    const grpc::Status s = RawCall(c.method, c.bytes, &messages);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << StatusText(s);
    EXPECT_EQ(s.error_message(), c.message);
    EXPECT_EQ(messages, 0);
  }
  // The same request with valid bytes goes through the raw path too (a sanity check of the
  // test's own encoding), and the server keeps serving.
  {
    v1::GenerateRequest r;
    r.set_text(g.prompt);
    r.mutable_sampling()->set_max_tokens(4);
    int messages = 0;
    const grpc::Status s = RawCall("Generate", r.SerializeAsString(), &messages);
    EXPECT_TRUE(s.ok()) << StatusText(s);
    EXPECT_GE(messages, 1);
  }
  EXPECT_EQ(Health(), HealthCheckResponse::SERVING);
  const cli::StreamResult ok = Generate(IdsRequest(g.prompt_ids, 48));
  ASSERT_TRUE(ok.status.ok()) << StatusText(ok.status);
  EXPECT_EQ(ok.ids, g.greedy_ids);
  // `lorcserve client` checks before sending (cli_test).
}

// ---- 3c. the request semantics of issue #7 over gRPC (the engine side lands separately) --------

TEST_F(ServerE2ETest, ParallelCompletionsEachEndWithTheirOwnFinalMessage) {
  ASSERT_NO_FATAL_FAILURE(StartServer(1));
  const Golden& g = GoldenPrompts()[0];
  v1::GenerateRequest req = IdsRequest(g.prompt_ids, 6);
  req.mutable_sampling()->set_n(3);
  req.mutable_sampling()->set_temperature(1.0f);
  req.mutable_sampling()->set_seed(7);
  req.mutable_sampling()->set_ignore_eos(true);
  std::vector<v1::GenerateResponse> finals;
  // The stream ends only after all 3 final messages (a deadline ends it otherwise).
  const cli::StreamResult r = Generate(req, 20, [&](const v1::GenerateResponse& m) {
    EXPECT_GE(m.index(), 0);
    EXPECT_LT(m.index(), 3);
    if (m.final()) finals.push_back(m);
  });
  ASSERT_TRUE(r.status.ok()) << StatusText(r.status);
  ASSERT_EQ(finals.size(), 3u);
  std::vector<int32_t> indices;
  for (const v1::GenerateResponse& f : finals) {
    indices.push_back(f.index());
    EXPECT_EQ(f.finish_reason(), v1::FINISH_REASON_LENGTH);
    EXPECT_EQ(f.usage().completion_tokens(), 6);
    EXPECT_EQ(f.usage().prompt_tokens(), static_cast<int32_t>(g.prompt_ids.size()));
  }
  std::sort(indices.begin(), indices.end());
  EXPECT_EQ(indices, (std::vector<int32_t>{0, 1, 2}));
  ASSERT_EQ(r.completions.size(), 3u);
  for (const CompletionOutput& c : r.completions) EXPECT_EQ(c.output_ids.size(), 6u);
  EXPECT_EQ(WaitIdle(5).kv_free_blocks(), Info().kv_capacity_blocks());
}

TEST_F(ServerE2ETest, LogprobsStopReasonsAndPromptLogprobs) {
  ASSERT_NO_FATAL_FAILURE(StartServer(1));
  const Golden& g = GoldenPrompts()[0];
  // Greedy with logprobs 2: each token is the most likely (rank 1, first of the top 2).
  {
    v1::GenerateRequest req = IdsRequest(g.prompt_ids, 8);
    req.mutable_sampling()->set_logprobs(2);
    req.mutable_sampling()->set_prompt_logprobs(1);
    std::vector<v1::GenerateResponse> msgs;
    const cli::StreamResult r = Generate(req, 60, [&](const v1::GenerateResponse& m) { msgs.push_back(m); });
    ASSERT_TRUE(r.status.ok()) << StatusText(r.status);
    EXPECT_TRUE(IsPrefix(r.ids, g.greedy_ids));
    for (const v1::GenerateResponse& m : msgs) {
      EXPECT_EQ(m.logprobs_size(), m.token_ids_size());
      for (int i = 0; i < m.token_ids_size() && i < m.logprobs_size(); ++i) {
        const v1::TokenLogprobs& t = m.logprobs(i);
        EXPECT_EQ(t.rank(), 1);
        EXPECT_LE(t.logprob(), 0.0f);
        ASSERT_EQ(t.top_size(), 2);
        EXPECT_EQ(t.top(0).id(), m.token_ids(i));
        EXPECT_FLOAT_EQ(t.top(0).logprob(), t.logprob());
        EXPECT_GE(t.top(0).logprob(), t.top(1).logprob());
      }
    }
    // Once, with the first token (a stream that echoes the prompt need not wait for the end).
    ASSERT_FALSE(msgs.empty());
    EXPECT_GT(msgs[0].token_ids_size(), 0);
    EXPECT_EQ(msgs[0].prompt_logprobs_size(), static_cast<int>(g.prompt_ids.size()) - 1);
    for (size_t i = 1; i < msgs.size(); ++i) EXPECT_EQ(msgs[i].prompt_logprobs_size(), 0) << i;
    for (const v1::TokenLogprobs& t : msgs[0].prompt_logprobs()) {
      EXPECT_LE(t.logprob(), 0.0f);
      EXPECT_GE(t.rank(), 1);
      EXPECT_EQ(t.top_size(), 1);
    }
  }
  // A stop string that completes on the last allowed token is a stop, and is reported.
  const std::string stop = g.greedy_text.substr(0, std::min<size_t>(6, g.greedy_text.size()));
  for (const bool include : {false, true}) {
    SCOPED_TRACE(include ? "include_stop_str_in_output" : "cut");
    v1::GenerateRequest req = IdsRequest(g.prompt_ids, 48);
    req.mutable_sampling()->add_stop(stop);
    req.mutable_sampling()->set_include_stop_str_in_output(include);
    const cli::StreamResult r = Generate(req);
    ASSERT_TRUE(r.status.ok()) << StatusText(r.status);
    EXPECT_EQ(r.final.finish_reason(), v1::FINISH_REASON_STOP);
    EXPECT_EQ(r.final.stop_reason_case(), v1::GenerateResponse::kStopString);
    EXPECT_EQ(r.final.stop_string(), stop);
    EXPECT_EQ(r.text, include ? stop : "");
  }
  // A stop token id is reported as such.
  {
    v1::GenerateRequest req = IdsRequest(g.prompt_ids, 48);
    req.mutable_sampling()->add_stop_token_ids(g.greedy_ids[2]);
    const cli::StreamResult r = Generate(req);
    ASSERT_TRUE(r.status.ok()) << StatusText(r.status);
    EXPECT_EQ(r.final.finish_reason(), v1::FINISH_REASON_STOP);
    EXPECT_EQ(r.final.stop_reason_case(), v1::GenerateResponse::kStopTokenId);
    EXPECT_EQ(r.final.stop_token_id(), g.greedy_ids[2]);
    EXPECT_TRUE(IsPrefix(r.ids, g.greedy_ids));
    EXPECT_LE(r.ids.size(), 3u);  // whether the stop id itself is listed is the engine's contract
  }
  // allowed_token_ids / logit_bias steer greedy decoding.
  {
    v1::GenerateRequest req = IdsRequest(g.prompt_ids, 4);
    req.mutable_sampling()->add_allowed_token_ids(7);
    req.mutable_sampling()->add_allowed_token_ids(9);
    req.mutable_sampling()->set_ignore_eos(true);
    const cli::StreamResult r = Generate(req);
    ASSERT_TRUE(r.status.ok()) << StatusText(r.status);
    for (int32_t id : r.ids) EXPECT_TRUE(id == 7 || id == 9) << id;
    v1::GenerateRequest biased = IdsRequest(g.prompt_ids, 3);
    (*biased.mutable_sampling()->mutable_logit_bias())[11] = 100;
    biased.mutable_sampling()->set_ignore_eos(true);
    const cli::StreamResult b = Generate(biased);
    ASSERT_TRUE(b.status.ok()) << StatusText(b.status);
    EXPECT_EQ(b.ids, (std::vector<int32_t>{11, 11, 11}));
  }
}

// ---- 4. the bounded admission queue ------------------------------------------------------------

TEST_F(ServerE2ETest, BoundedQueueRejectsWithResourceExhausted) {
  ASSERT_NO_FATAL_FAILURE(
      StartServer(1, {"--num-blocks", "8", "--max-num-seqs", "1", "--max-waiting", "2"}));
  const Golden& g = GoldenPrompts()[0];
  ASSERT_EQ(Info().kv_capacity_blocks(), 8);

  // A request that can never fit: 6 + 200 - 1 cached tokens need 13 blocks of 16, the cache has 8. Not
  // retryable, so INVALID_ARGUMENT (RESOURCE_EXHAUSTED is only for the full queue below).
  {
    const cli::StreamResult r = Generate(IdsRequest(g.prompt_ids, 200), 30);
    EXPECT_EQ(r.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << StatusText(r.status);
    // Starting with the field (the gateway's `param`).
    EXPECT_THAT(r.status.error_message(), ::testing::StartsWith("max_tokens: request needs 13 KV blocks for 205 cached tokens"));
    EXPECT_THAT(r.status.error_message(), HasSubstr("the whole cache has 8"));
  }

  // 8 simultaneous long requests (6 + 100 tokens: 7 blocks each): one runs, two wait, the rest
  // find the queue full.
  constexpr int kClients = 8;
  std::vector<cli::StreamResult> results(kClients);
  std::latch start(kClients);
  std::vector<std::thread> threads;
  const auto t0 = Clock::now();
  for (int i = 0; i < kClients; ++i) {
    threads.emplace_back([&, i] {
      v1::GenerateRequest req = IdsRequest(g.prompt_ids, 100);
      req.mutable_sampling()->set_ignore_eos(true);
      start.arrive_and_wait();
      results[i] = Generate(req, 300);
    });
  }
  // Meanwhile the live state never exceeds the bounds.
  std::atomic<bool> done{false};
  int max_num_seqs = 0, max_waiting = 0, samples = 0;
  std::thread poller([&] {
    while (!done.load()) {
      const v1::ModelInfoResponse info = Info();
      max_num_seqs = std::max(max_num_seqs, info.num_running());
      max_waiting = std::max(max_waiting, info.num_waiting());
      ++samples;
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
  });
  for (std::thread& t : threads) t.join();
  done = true;
  poller.join();
  std::cerr << "[queue] 8 clients done in " << SecondsSince(t0) << " s; " << samples
            << " ModelInfo samples, at most " << max_num_seqs << " running, " << max_waiting
            << " waiting\n";
  EXPECT_LE(max_num_seqs, 1);
  EXPECT_LE(max_waiting, 2);
  EXPECT_GE(max_num_seqs, 1);
  int admitted = 0, rejected = 0;
  for (int i = 0; i < kClients; ++i) {
    const cli::StreamResult& r = results[i];
    SCOPED_TRACE(absl::StrCat("client ", i));
    if (r.status.ok()) {
      ++admitted;
      EXPECT_EQ(r.ids.size(), 100u);
      EXPECT_EQ(r.final.finish_reason(), v1::FINISH_REASON_LENGTH);
      EXPECT_EQ(r.final.usage().completion_tokens(), 100);
      EXPECT_TRUE(IsPrefix(g.greedy_ids, r.ids));  // greedy: the golden 48 first
    } else {
      ++rejected;
      EXPECT_EQ(r.status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << StatusText(r.status);
      EXPECT_THAT(r.status.error_message(), HasSubstr("queue full"));
      EXPECT_TRUE(r.ids.empty());
    }
  }
  // max_num_seqs 1 + max_waiting 2: at most 3 are admitted while the 8 arrive together (one
  // request takes far longer than their arrival); the others find the queue full.
  EXPECT_GE(admitted, 1);
  EXPECT_GE(rejected, 1);
  EXPECT_EQ(admitted + rejected, kClients);
  std::cerr << "[queue] " << admitted << " admitted, " << rejected << " rejected\n";
  const v1::ModelInfoResponse info = WaitIdle(5);
  EXPECT_EQ(info.kv_free_blocks(), 8);
  EXPECT_TRUE(info.serving());
}

// ---- 5. a worker killed mid-generation ---------------------------------------------------------


}  // namespace
}  // namespace e2e
}  // namespace lorc
