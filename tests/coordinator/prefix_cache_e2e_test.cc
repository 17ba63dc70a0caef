// Prefix caching over gRPC against a real `lorcserve coordinator --local-workers 1`: usage's
// cached_prompt_tokens, ModelInfo's prefix-cache fields, salts, sessions and CloseSession, the
// host KV tier, and a worker restart dropping the whole index and the host tier.
#include "tests/coordinator/server_e2e_fixture.h"

namespace lorc {
namespace e2e {
namespace {

class PrefixCacheE2ETest : public ServerE2ETest {
 protected:
  // The golden prompts one after another: a ~90-token shared context.
  std::vector<int32_t> Context() {
    std::vector<int32_t> ids;
    for (const Golden& g : GoldenPrompts()) ids.insert(ids.end(), g.prompt_ids.begin(), g.prompt_ids.end());
    return ids;
  }
};

TEST_F(PrefixCacheE2ETest, CachedPromptTokensSaltsAndSessions) {
  // With a host tier on the worker (ModelInfo reports its slots; none used: nothing evicted).
  ASSERT_NO_FATAL_FAILURE(StartServer(1, {"--kv-offloading-size", "0.01"}));
  const std::vector<int32_t> ctx = Context();
  const int expected_hit = static_cast<int>((ctx.size() - 1) / 16 * 16);
  const cli::StreamResult first = Generate(IdsRequest(ctx, 8));
  ASSERT_TRUE(first.status.ok()) << StatusText(first.status);
  EXPECT_EQ(first.final.usage().cached_prompt_tokens(), 0);
  const cli::StreamResult second = Generate(IdsRequest(ctx, 8));
  ASSERT_TRUE(second.status.ok()) << StatusText(second.status);
  EXPECT_EQ(second.final.usage().cached_prompt_tokens(), expected_hit);
  EXPECT_EQ(second.ids, first.ids);
  // Another tenant finds nothing.
  v1::GenerateRequest salted = IdsRequest(ctx, 8);
  salted.set_cache_salt("tenant-b");
  const cli::StreamResult other = Generate(salted);
  ASSERT_TRUE(other.status.ok()) << StatusText(other.status);
  EXPECT_EQ(other.final.usage().cached_prompt_tokens(), 0);
  EXPECT_EQ(other.ids, first.ids);

  v1::ModelInfoResponse info = Info();
  EXPECT_TRUE(info.prefix_cache().enabled());
  EXPECT_EQ(info.prefix_cache().queries(), 3);
  EXPECT_EQ(info.prefix_cache().hit_tokens(), expected_hit);
  EXPECT_NEAR(info.prefix_cache().hit_rate(), 1.0 / 3, 1e-9);
  EXPECT_GT(info.prefix_cache().cached_blocks(), 0);
  EXPECT_GT(info.host_kv_blocks_total(), 0);
  EXPECT_EQ(info.host_kv_blocks_used(), 0);

  // A session keeps its blocks after the request; CloseSession releases them.
  v1::GenerateRequest turn = IdsRequest(ctx, 8);
  turn.set_session_id("conversation-1");
  ASSERT_TRUE(Generate(turn).status.ok());
  info = Info();
  EXPECT_EQ(info.prefix_cache().pinned_sessions(), 1);
  EXPECT_GT(info.prefix_cache().pinned_session_blocks(), 0);
  EXPECT_LT(info.kv_free_blocks(), info.kv_capacity_blocks());
  EXPECT_TRUE(CloseSession("conversation-1").ok());
  info = Info();
  EXPECT_EQ(info.prefix_cache().pinned_sessions(), 0);
  EXPECT_EQ(info.prefix_cache().sessions_closed(), 1);
  EXPECT_EQ(info.kv_free_blocks(), info.kv_capacity_blocks());
  const grpc::Status again = CloseSession("conversation-1");
  EXPECT_EQ(again.error_code(), grpc::StatusCode::NOT_FOUND) << StatusText(again);
  // An unknown id is echoed escaped: a newline in it does not split the message.
  const grpc::Status odd = CloseSession("a\nb");
  EXPECT_EQ(odd.error_code(), grpc::StatusCode::NOT_FOUND) << StatusText(odd);
  EXPECT_THAT(odd.error_message(), ::testing::StartsWith("session_id 'a\\nb'"));
  EXPECT_EQ(odd.error_message().find('\n'), std::string::npos);
  EXPECT_EQ(CloseSession("").error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  // The sizes Generate accepts, no more (the message names the field, not the id's bytes).
  const grpc::Status long_id = CloseSession(std::string(257, 'x'));
  EXPECT_EQ(long_id.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(long_id.error_message(), "session_id: 257 bytes exceeds 256");
  EXPECT_EQ(CloseSession("conversation-1", std::string(257, 's')).error_message(), "cache_salt: 257 bytes exceeds 256");

  // Sessions are per (cache_salt, session_id): only the same salt closes a salted session.
  v1::GenerateRequest tenant_turn = IdsRequest(ctx, 8);
  tenant_turn.set_session_id("conversation-2");
  tenant_turn.set_cache_salt("tenant-b");
  ASSERT_TRUE(Generate(tenant_turn).status.ok());
  EXPECT_EQ(Info().prefix_cache().pinned_sessions(), 1);
  EXPECT_EQ(CloseSession("conversation-2").error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_EQ(CloseSession("conversation-2", "tenant-a").error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_TRUE(CloseSession("conversation-2", "tenant-b").ok());
  EXPECT_EQ(Info().prefix_cache().pinned_sessions(), 0);  // applied before CloseSession returned
  EXPECT_EQ(Health(), HealthCheckResponse::SERVING);
}

TEST_F(PrefixCacheE2ETest, TheHostTierServesAnEvictedPrefixAndARestartClearsIt) {
  // 12 device blocks of 16 tokens and a host tier: a 180-token request takes the whole pool,
  // evicting the context's blocks to the host; the context comes back from there.
  ASSERT_NO_FATAL_FAILURE(
      StartServer(1, {"--num-blocks", "12", "--kv-offloading-size", "0.01"}));
  const std::vector<int32_t> ctx = Context();
  const int expected_hit = static_cast<int>((ctx.size() - 1) / 16 * 16);
  ASSERT_GT(expected_hit, 0);
  std::vector<int32_t> filler;
  for (int i = 0; i < 180; ++i) filler.push_back(100 + (i * 37) % 3000);
  const cli::StreamResult first = Generate(IdsRequest(ctx, 8));
  ASSERT_TRUE(first.status.ok()) << StatusText(first.status);
  const cli::StreamResult fill = Generate(IdsRequest(filler, 4));
  ASSERT_TRUE(fill.status.ok()) << StatusText(fill.status);
  v1::ModelInfoResponse info = Info();
  EXPECT_GT(info.prefix_cache().host_offloads(), 0);
  EXPECT_GT(info.host_kv_blocks_used(), 0);
  EXPECT_LE(info.host_kv_blocks_used(), info.host_kv_blocks_total());
  const cli::StreamResult again = Generate(IdsRequest(ctx, 8));
  ASSERT_TRUE(again.status.ok()) << StatusText(again.status);
  EXPECT_EQ(again.final.usage().cached_prompt_tokens(), expected_hit);
  EXPECT_EQ(again.ids, first.ids);
  info = Info();
  EXPECT_EQ(info.prefix_cache().host_hit_tokens(), expected_hit);
  EXPECT_EQ(info.prefix_cache().host_loads(), expected_hit / 16);
  EXPECT_EQ(info.prefix_cache().hit_tokens(), 0);  // nothing of it was left on the device

  // A restarted worker's host memory is new: nothing is served from it.
  ASSERT_TRUE(Generate(IdsRequest(filler, 4)).status.ok());  // the context on the host again
  ASSERT_NO_FATAL_FAILURE(KillWorkerAndAwaitRestart());
  info = Info();
  EXPECT_GT(info.host_kv_blocks_total(), 0);
  EXPECT_EQ(info.host_kv_blocks_used(), 0);
  const cli::StreamResult after = Generate(IdsRequest(ctx, 8));
  ASSERT_TRUE(after.status.ok()) << StatusText(after.status);
  EXPECT_EQ(after.final.usage().cached_prompt_tokens(), 0);
  EXPECT_EQ(after.ids, first.ids);
  EXPECT_EQ(Info().prefix_cache().host_loads(), 0);
}

TEST_F(PrefixCacheE2ETest, AWorkerRestartDropsTheWholeIndex) {
  ASSERT_NO_FATAL_FAILURE(StartServer(1));
  const std::vector<int32_t> ctx = Context();
  v1::GenerateRequest s = IdsRequest(ctx, 8);
  s.set_session_id("kept");
  const cli::StreamResult before = Generate(s);
  ASSERT_TRUE(before.status.ok()) << StatusText(before.status);
  ASSERT_GT(Info().prefix_cache().cached_blocks(), 0);
  ASSERT_NO_FATAL_FAILURE(KillWorkerAndAwaitRestart());
  const v1::ModelInfoResponse info = Info();
  EXPECT_EQ(info.host_kv_blocks_total(), 0);  // no --kv-offloading-size here
  EXPECT_EQ(info.prefix_cache().cached_blocks(), 0);
  EXPECT_EQ(info.prefix_cache().pinned_sessions(), 0);
  EXPECT_EQ(info.prefix_cache().queries(), 0);
  // The same prompt computes again (the new worker's cache is empty) and gives the same tokens.
  const cli::StreamResult after = Generate(IdsRequest(ctx, 8));
  ASSERT_TRUE(after.status.ok()) << StatusText(after.status);
  EXPECT_EQ(after.final.usage().cached_prompt_tokens(), 0);
  EXPECT_EQ(after.ids, before.ids);
  EXPECT_EQ(CloseSession("kept").error_code(), grpc::StatusCode::NOT_FOUND);
}

}  // namespace
}  // namespace e2e
}  // namespace lorc
