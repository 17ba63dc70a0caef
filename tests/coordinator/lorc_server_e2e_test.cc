// A LoRC-compressed fixture model (`lorcserve compress`, issue #9) served end to end: `lorcserve
// coordinator --local-workers 2` (tensor parallelism 2 over Gloo, worker processes, gRPC) streams
// the same greedy tokens for the golden prompts as the same directory run in this process at
// TP = 1 (LoadModel + Engine::Generate, as the other parity tests), for a uniform plain-SVD
// compression (64:64) and a whitened progressive one (unequal ranks per layer); ModelInfo reports
// the compression and the per-rank KV bytes per token. Corrupt compressed directories (a rank
// beyond head_dim in lorc.json, a missing factor tensor, a truncated model.safetensors) end the
// coordinator's startup with an error naming the field, tensor or file, and a plain exit code.
// Fixture: server_e2e_fixture.h; the in-process LoRC runner cases: worker/lorc_model_runner_test.cc.
#include <sys/wait.h>

#include "model/safetensors.h"
#include "model/safetensors_writer.h"
#include "tests/coordinator/in_process_golden.h"
#include "tests/coordinator/server_e2e_fixture.h"
#include "tests/testing/run_lorcserve.h"
#include "tests/testing/scratch_dir.h"

namespace lorc {
namespace e2e {
namespace {

constexpr char kScratch[] = "lorc_lorc_server_e2e";
const auto* const kCleanup =
    ::testing::AddGlobalTestEnvironment(new ::lorc::testing::ScratchCleanup(kScratch));

constexpr int kMaxTokens = 48;

// `lorcserve compress --model <fixture> --out <scratch>/name args...`; empty path on failure.
fs::path CompressInto(const std::string& name, const std::vector<std::string>& args) {
  const fs::path out = ::lorc::testing::MakeScratchDir(kScratch, name);
  std::vector<std::string> argv = {"compress", "--model", Tiny(), "--out", out.string(), "--force"};
  argv.insert(argv.end(), args.begin(), args.end());
  const ::lorc::testing::RunResult r = ::lorc::testing::RunLorcserve(argv);
  EXPECT_EQ(r.exit_code, 0) << r;
  return r.exit_code == 0 ? out : fs::path();
}

// The in-process TP = 1 reference: greedy tokens of every golden prompt through the engine, and
// the KV spec's compression name and bytes per token.
struct InProcess {
  std::vector<std::vector<int32_t>> tokens;
  std::string compression;
  int64_t bytes_per_token = 0;
};

InProcess RunInProcess(const fs::path& dir) {
  InProcess out;
  KvCacheSpec spec;
  out.tokens = GoldenGreedyInProcess(dir.string(), {}, kMaxTokens, &spec);
  out.compression = spec.CompressionName();
  out.bytes_per_token = spec.BytesPerToken();
  return out;
}

struct Compressed {
  std::string name;
  std::vector<std::string> args;
};
// gtest prints the parameter in the test list (and so in the ctest names): the name, not bytes.
void PrintTo(const Compressed& c, std::ostream* os) { *os << c.name; }

class LorcServerTest : public ServerE2ETest, public ::testing::WithParamInterface<Compressed> {};

TEST_P(LorcServerTest, TensorParallelTwoStreamsTheInProcessTokens) {
  const fs::path dir = CompressInto(GetParam().name, GetParam().args);
  ASSERT_FALSE(dir.empty());
  const InProcess want = RunInProcess(dir);
  ASSERT_EQ(want.tokens.size(), GoldenPrompts().size());
  ASSERT_THAT(want.compression, HasSubstr("lorc:"));
  // The compressed model is a different model: some golden prompt continues differently (else
  // serving the uncompressed directory by mistake would pass too).
  bool differs = false;
  for (size_t i = 0; i < want.tokens.size(); ++i) differs |= want.tokens[i] != GoldenPrompts()[i].greedy_ids;
  EXPECT_TRUE(differs) << GetParam().name << " gives the uncompressed golden tokens";

  ASSERT_NO_FATAL_FAILURE(StartServer(2, {"--model", dir.string()}));
  const v1::ModelInfoResponse info = Info();
  EXPECT_EQ(info.model(), dir.string());
  EXPECT_EQ(info.tensor_parallel_size(), 2);
  EXPECT_EQ(info.kv_compression(), want.compression);
  // Per rank: one of the two KV heads' latents.
  EXPECT_EQ(info.kv_bytes_per_token(), want.bytes_per_token / 2);

  ExpectGoldenStreams(want.tokens, kMaxTokens);
}

INSTANTIATE_TEST_SUITE_P(
    Lorc, LorcServerTest,
    ::testing::Values(Compressed{"uniform_svd_64_64", {"--ranks", "64:64"}},
                      Compressed{"progressive_whitened_0_4",
                                 {"--kv-ratio", "0.4", "--schedule", "progressive", "--whiten", "--tp", "2"}}),
    [](const ::testing::TestParamInfo<Compressed>& p) { return p.param.name; });

// ---- corrupt compressed directories -------------------------------------------------------------

// Copies `src`'s files into a fresh scratch directory `name` (model.safetensors only if `weights`).
fs::path CopyDir(const fs::path& src, const std::string& name, bool weights) {
  const fs::path dir = ::lorc::testing::MakeScratchDir(kScratch, name);
  for (const fs::directory_entry& e : fs::directory_iterator(src)) {
    if (weights || e.path().filename() != "model.safetensors") fs::copy_file(e.path(), dir / e.path().filename());
  }
  return dir;
}

// `src`'s model.safetensors rewritten into `dst` without the tensor `drop`.
void WriteWithout(const fs::path& src, const fs::path& dst, const std::string& drop) {
  absl::StatusOr<std::unique_ptr<SafetensorsFile>> f = SafetensorsFile::Open((src / "model.safetensors").string());
  ASSERT_TRUE(f.ok()) << f.status();
  ASSERT_TRUE((*f)->tensors().contains(drop)) << drop;
  SafetensorsWriter w;
  for (const auto& [name, t] : (*f)->tensors()) {
    if (name != drop) {
      ASSERT_TRUE(w.AddView(name, t.dtype, t.shape, t.data, t.nbytes).ok()) << name;
    }
  }
  const absl::Status s = w.Write((dst / "model.safetensors").string());
  ASSERT_TRUE(s.ok()) << s;
}

// Starts a coordinator with 2 local workers on `dir`, which must fail: returns the error text
// (the coordinator's and its workers' stderr) after checking it exited with a plain non-zero
// code, not a signal.
std::string FailedStart(const fs::path& dir) {
  ServerProcess server;
  const std::string error = server.Start(2, {"--model", dir.string(), "--threads", "1"});
  EXPECT_THAT(error, HasSubstr("exited before printing LISTENING"));
  const auto t0 = Clock::now();
  while (server.Alive() && SecondsSince(t0) < 30) std::this_thread::sleep_for(std::chrono::milliseconds(20));
  EXPECT_FALSE(server.Alive()) << "still running 30 s after closing its stdout";
  const int status = server.exit_status();
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) != 0)
      << "wait status " << status << " (signal " << (WIFSIGNALED(status) ? WTERMSIG(status) : 0) << ")\n"
      << error;
  return error;
}

TEST_F(ServerE2ETest, CorruptCompressedDirectoriesFailStartupNamingTheFieldOrTensor) {
  const fs::path good = CompressInto("corrupt_source", {"--ranks", "64:64"});
  ASSERT_FALSE(good.empty());

  // lorc.json: a key rank beyond head_dim (128).
  {
    const fs::path dir = CopyDir(good, "rank_too_large", true);
    absl::StatusOr<nlohmann::json> j = ReadJsonFile((dir / "lorc.json").string());
    ASSERT_TRUE(j.ok()) << j.status();
    (*j)["layers"][3]["k_rank"] = 200;
    std::ofstream(dir / "lorc.json") << j->dump(2);
    const std::string error = FailedStart(dir);
    EXPECT_THAT(error, HasSubstr("lorc.json"));
    EXPECT_THAT(error, HasSubstr("layers[3].k_rank: 200 is outside [1, 128]"));
  }
  // A factor tensor missing from model.safetensors (found by the workers, reported by the
  // coordinator).
  {
    const fs::path dir = CopyDir(good, "missing_factor", false);
    const std::string tensor = "model.layers.5.self_attn.k_up_proj.weight";
    ASSERT_NO_FATAL_FAILURE(WriteWithout(good, dir, tensor));
    const std::string error = FailedStart(dir);
    EXPECT_THAT(error, HasSubstr(tensor));
    EXPECT_THAT(error, HasSubstr("lorcserve coordinator: NOT_FOUND"));
  }
  // model.safetensors cut in the middle of the data section.
  {
    const fs::path dir = CopyDir(good, "truncated", true);
    const fs::path weights = dir / "model.safetensors";
    fs::resize_file(weights, fs::file_size(weights) / 2);
    const std::string error = FailedStart(dir);
    EXPECT_THAT(error, HasSubstr((dir / "model.safetensors").string()));
    EXPECT_THAT(error, HasSubstr("truncated"));
  }
}

}  // namespace
}  // namespace e2e
}  // namespace lorc
