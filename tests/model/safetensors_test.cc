#include "model/safetensors.h"

#include <stdlib.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "common/dtype.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/testing/fixtures.h"
#include "tests/testing/status_matchers.h"
#include "model/model_config.h"

namespace lorc {
namespace {

using ::lorc::testing::IsOk;
using ::lorc::testing::StatusIs;
using ::testing::AllOf;
using ::testing::ElementsAre;
using ::testing::ElementsAreArray;
using ::testing::HasSubstr;
using ::testing::Not;
using json = nlohmann::json;

const std::string kTinyDir = ::lorc::testing::TinyLlamaDir();

// ---- A tiny safetensors writer -------------------------------------------------------------

struct TestTensor {
  std::string name;
  std::string dtype;  // safetensors spelling
  std::vector<int64_t> shape;
  std::string bytes;
};

std::string EncodeF32(const std::vector<float>& v, const std::string& dtype) {
  std::string out;
  for (float f : v) {
    if (dtype == "F32") {
      out.append(reinterpret_cast<const char*>(&f), 4);
    } else {
      const uint16_t h = dtype == "BF16" ? F32ToBf16(f) : F32ToF16(f);
      out.append(reinterpret_cast<const char*>(&h), 2);
    }
  }
  return out;
}

// 8-byte little-endian header length + header + data.
std::string RawFile(const std::string& header, const std::string& data) {
  std::string out(8, '\0');
  const uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((n >> (8 * i)) & 0xff);
  return out + header + data;
}

// Lays the tensors out back to back; the header is padded with spaces to a multiple of 8.
std::string BuildFile(const std::vector<TestTensor>& tensors, const json& metadata = nullptr) {
  json header = json::object();
  if (!metadata.is_null()) header["__metadata__"] = metadata;
  std::string data;
  for (const TestTensor& t : tensors) {
    header[t.name] = {{"dtype", t.dtype},
                      {"shape", t.shape},
                      {"data_offsets", {data.size(), data.size() + t.bytes.size()}}};
    data += t.bytes;
  }
  std::string h = header.dump();
  while ((h.size() + 8) % 8 != 0) h += ' ';
  return RawFile(h, data);
}

void WriteFile(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  ASSERT_TRUE(out.good()) << path;
}

// 3x4 matrix with values exactly representable in F32, BF16 and F16.
std::vector<float> Matrix34() {
  std::vector<float> v(12);
  for (int i = 0; i < 12; ++i) v[i] = 0.5f * i - 2.0f;
  return v;
}

class SafetensorsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string tmpl = (std::filesystem::temp_directory_path() / "lorc_st_XXXXXX").string();
    ASSERT_NE(mkdtemp(tmpl.data()), nullptr);
    dir_ = tmpl;
  }
  void TearDown() override {
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
  }
  std::string Path(const std::string& name) const { return dir_ + "/" + name; }
  std::string Write(const std::string& name, const std::string& bytes) {
    WriteFile(Path(name), bytes);
    return Path(name);
  }
  // Writes `bytes` as DIR/model.safetensors and opens it as a single file.
  absl::StatusOr<std::unique_ptr<SafetensorsFile>> OpenBytes(const std::string& bytes) {
    return SafetensorsFile::Open(Write("model.safetensors", bytes));
  }

  std::string dir_;
};

// ---- Reading values ------------------------------------------------------------------------

TEST_F(SafetensorsTest, ReadsF32Bf16F16AndSlices) {
  const std::vector<float> m = Matrix34();
  Write("model.safetensors",
        BuildFile({{"a.f32", "F32", {3, 4}, EncodeF32(m, "F32")},
                   {"b.bf16", "BF16", {3, 4}, EncodeF32(m, "BF16")},
                   {"c.f16", "F16", {3, 4}, EncodeF32(m, "F16")},
                   {"d.vec", "BF16", {5}, EncodeF32({1, 2, 3, 4, 5}, "BF16")}},
                  {{"format", "pt"}}));
  absl::StatusOr<std::unique_ptr<CheckpointReader>> r = CheckpointReader::Open(dir_);
  ASSERT_OK(r);
  EXPECT_THAT((*r)->TensorNames(), ElementsAre("a.f32", "b.bf16", "c.f16", "d.vec"));
  EXPECT_TRUE((*r)->Has("b.bf16"));
  EXPECT_FALSE((*r)->Has("zzz"));

  for (const char* name : {"a.f32", "b.bf16", "c.f16"}) {
    SCOPED_TRACE(name);
    absl::StatusOr<const TensorInfo*> info = (*r)->Find(name);
    ASSERT_OK(info);
    EXPECT_THAT((*info)->shape, ElementsAre(3, 4));
    EXPECT_EQ((*info)->numel(), 12);
    EXPECT_EQ((*info)->nbytes, 12 * DTypeSize((*info)->dtype));

    std::vector<float> all(12);
    ASSERT_OK((*r)->ReadF32(name, {3, 4}, absl::MakeSpan(all)));
    EXPECT_EQ(all, m);

    std::vector<float> rows(8);  // rows [1, 3)
    ASSERT_OK((*r)->ReadF32Slice(name, {3, 4}, TensorSlice{0, 1, 3}, absl::MakeSpan(rows)));
    EXPECT_EQ(rows, std::vector<float>(m.begin() + 4, m.end()));

    std::vector<float> cols(6);  // columns [1, 3)
    ASSERT_OK((*r)->ReadF32Slice(name, {3, 4}, TensorSlice{1, 1, 3}, absl::MakeSpan(cols)));
    EXPECT_EQ(cols, (std::vector<float>{m[1], m[2], m[5], m[6], m[9], m[10]}));

    std::vector<float> tail(3);  // columns [3, end)
    ASSERT_OK((*r)->ReadF32Slice(name, {3, 4}, TensorSlice{1, 3, -1}, absl::MakeSpan(tail)));
    EXPECT_EQ(tail, (std::vector<float>{m[3], m[7], m[11]}));
  }
  std::vector<float> v(2);
  ASSERT_OK((*r)->ReadF32Slice("d.vec", {5}, TensorSlice{0, 3, 5}, absl::MakeSpan(v)));
  EXPECT_THAT(v, ElementsAre(4.0f, 5.0f));
}

// A zero-size tensor read whole and as a slice into empty outputs: OK, nothing written. The empty
// vector's data() is null, which memcpy must not receive even for 0 bytes (UBSan nonnull-attribute
// in the ASan+UBSan build; found by safetensors_fuzz in CI, regression input
// fuzz/corpus/safetensors_fuzz/crash-zero-element-memcpy).
TEST_F(SafetensorsTest, ZeroElementTensorsReadAsEmpty) {
  Write("model.safetensors", BuildFile({{"empty.f32", "F32", {0}, ""},
                                        {"empty.bf16", "BF16", {0, 4}, ""},
                                        {"rows.f32", "F32", {4, 0}, ""},
                                        {"x", "F32", {1}, EncodeF32({7}, "F32")}}));
  absl::StatusOr<std::unique_ptr<CheckpointReader>> r = CheckpointReader::Open(dir_);
  ASSERT_OK(r);
  std::vector<float> none;
  ASSERT_EQ(none.data(), nullptr);
  EXPECT_OK((*r)->ReadF32("empty.f32", {0}, absl::MakeSpan(none)));
  EXPECT_OK((*r)->ReadF32("empty.bf16", {0, 4}, absl::MakeSpan(none)));
  EXPECT_OK((*r)->ReadF32Slice("empty.bf16", {0, 4}, TensorSlice{1, 2, -1}, absl::MakeSpan(none)));
  // Rows [2, 4) of a [4, 0] tensor: one run of zero elements, converted into a null pointer.
  EXPECT_OK((*r)->ReadF32Slice("rows.f32", {4, 0}, TensorSlice{0, 2, -1}, absl::MakeSpan(none)));
  std::vector<float> one(1);
  EXPECT_THAT((*r)->ReadF32("empty.f32", {0}, absl::MakeSpan(one)),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("0 elements")));
  ASSERT_OK((*r)->ReadF32("x", {1}, absl::MakeSpan(one)));
  EXPECT_EQ(one[0], 7.0f);
}

TEST_F(SafetensorsTest, KeepsMetadata) {
  absl::StatusOr<std::unique_ptr<SafetensorsFile>> f =
      OpenBytes(BuildFile({{"x", "F32", {1}, EncodeF32({1}, "F32")}},
                          {{"format", "pt"}, {"note", "hi"}}));
  ASSERT_OK(f);
  EXPECT_EQ((*f)->metadata().at("format"), "pt");
  EXPECT_EQ((*f)->metadata().at("note"), "hi");
  EXPECT_EQ((*f)->tensors().size(), 1u);
  EXPECT_EQ((*f)->tensors().at("x").file, (*f)->path());
}

TEST_F(SafetensorsTest, F16ConversionMatchesReferenceForAllBitPatterns) {
  std::string bytes;
  for (uint32_t h = 0; h < 65536; ++h) {
    const uint16_t v = static_cast<uint16_t>(h);
    bytes.append(reinterpret_cast<const char*>(&v), 2);
  }
  Write("model.safetensors", BuildFile({{"all", "F16", {256, 256}, bytes}}));
  absl::StatusOr<std::unique_ptr<CheckpointReader>> r = CheckpointReader::Open(dir_);
  ASSERT_OK(r);
  std::vector<float> out(65536);
  ASSERT_OK((*r)->ReadF32("all", {256, 256}, absl::MakeSpan(out)));
  for (uint32_t h = 0; h < 65536; ++h) {
    const float want = F16ToF32(static_cast<uint16_t>(h));
    if (std::isnan(want)) {
      EXPECT_TRUE(std::isnan(out[h])) << h;
    } else {
      uint32_t a, b;
      std::memcpy(&a, &out[h], 4);
      std::memcpy(&b, &want, 4);
      ASSERT_EQ(a, b) << "half bits " << h;
    }
  }
}

TEST_F(SafetensorsTest, ReadErrors) {
  const std::vector<float> m = Matrix34();
  Write("model.safetensors", BuildFile({{"w", "BF16", {3, 4}, EncodeF32(m, "BF16")},
                                        {"ids", "I64", {2}, std::string(16, '\0')}}));
  absl::StatusOr<std::unique_ptr<CheckpointReader>> r = CheckpointReader::Open(dir_);
  ASSERT_OK(r);
  std::vector<float> out(12);
  EXPECT_THAT((*r)->ReadF32("w", {4, 3}, absl::MakeSpan(out)),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("model.safetensors: tensor 'w' has shape [3, 4], expected [4, 3]")));
  std::vector<float> small(11);
  EXPECT_THAT((*r)->ReadF32("w", {3, 4}, absl::MakeSpan(small)),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       AllOf(HasSubstr("'w'"), HasSubstr("12 elements"), HasSubstr("11"))));
  std::vector<float> two(2);
  EXPECT_THAT((*r)->ReadF32("ids", {2}, absl::MakeSpan(two)),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       AllOf(HasSubstr("'ids'"), HasSubstr("I64"))));
  EXPECT_THAT((*r)->ReadF32("nope", {3, 4}, absl::MakeSpan(out)),
              StatusIs(absl::StatusCode::kNotFound, AllOf(HasSubstr("'nope'"), HasSubstr(dir_))));
  EXPECT_THAT((*r)->Find("nope"), StatusIs(absl::StatusCode::kNotFound, HasSubstr("'nope'")));

  // Bad slices.
  std::vector<float> s(4);
  EXPECT_THAT((*r)->ReadF32Slice("w", {3, 4}, TensorSlice{0, 2, 4}, absl::MakeSpan(s)),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("invalid slice")));
  EXPECT_THAT((*r)->ReadF32Slice("w", {3, 4}, TensorSlice{1, 3, 2}, absl::MakeSpan(s)),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("invalid slice")));
  EXPECT_THAT((*r)->ReadF32Slice("w", {3, 4}, TensorSlice{0, -1, 2}, absl::MakeSpan(s)),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("invalid slice")));
  EXPECT_THAT((*r)->ReadF32Slice("w", {3, 4}, TensorSlice{2, 0, 1}, absl::MakeSpan(s)),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("dimension 2")));
  EXPECT_THAT((*r)->ReadF32Slice("w", {3, 4}, TensorSlice{1, 0, 2}, absl::MakeSpan(s)),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("6 elements")));
}

// ---- The real checkpoint -------------------------------------------------------------------

TEST(SafetensorsRealModelTest, OpensTinyLlama) {
  absl::StatusOr<std::unique_ptr<CheckpointReader>> r = CheckpointReader::Open(kTinyDir);
  ASSERT_OK(r);
  const std::vector<std::string> names = (*r)->TensorNames();
  EXPECT_EQ(names.size(), 75u);  // 8 layers x 9 + embed_tokens + norm + lm_head
  absl::StatusOr<const TensorInfo*> embed = (*r)->Find("model.embed_tokens.weight");
  ASSERT_OK(embed);
  EXPECT_THAT((*embed)->shape, ElementsAre(4096, 512));
  EXPECT_EQ((*embed)->dtype, DType::kBF16);

  // Total element count agrees with the config's parameter count.
  absl::StatusOr<ModelConfig> config = LoadModelConfig(kTinyDir);
  ASSERT_OK(config);
  int64_t total = 0;
  for (const std::string& n : names) total += (*(*r)->Find(n))->numel();
  EXPECT_EQ(total, config->NumParameters());

  // Row and column slices of q_proj agree with the full read.
  const std::string q = "model.layers.0.self_attn.q_proj.weight";
  std::vector<float> full(512 * 512);
  ASSERT_OK((*r)->ReadF32(q, {512, 512}, absl::MakeSpan(full)));
  std::vector<float> rows(128 * 512);
  ASSERT_OK((*r)->ReadF32Slice(q, {512, 512}, TensorSlice{0, 128, 256}, absl::MakeSpan(rows)));
  EXPECT_TRUE(std::equal(rows.begin(), rows.end(), full.begin() + 128 * 512));
  std::vector<float> cols(512 * 256);
  ASSERT_OK((*r)->ReadF32Slice(q, {512, 512}, TensorSlice{1, 256, 512}, absl::MakeSpan(cols)));
  for (int i = 0; i < 512; ++i) {
    for (int j = 0; j < 256; ++j) ASSERT_EQ(cols[i * 256 + j], full[i * 512 + 256 + j]);
  }
  double sum_sq = 0;
  for (float v : full) sum_sq += double{v} * v;
  EXPECT_GT(sum_sq, 0.0);
  EXPECT_TRUE(std::isfinite(sum_sq));

  EXPECT_THAT((*r)->ReadF32(q, {512, 256}, absl::MakeSpan(full)),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("model.safetensors: tensor "
                                 "'model.layers.0.self_attn.q_proj.weight' has shape "
                                 "[512, 512], expected [512, 256]")));
}

// ---- Sharded checkpoints -------------------------------------------------------------------

json IndexJson(const std::map<std::string, std::string>& weight_map) {
  return {{"metadata", {{"total_size", 0}}}, {"weight_map", weight_map}};
}

TEST_F(SafetensorsTest, ShardedCheckpoint) {
  Write("model-00001-of-00002.safetensors",
        BuildFile({{"a", "F32", {2, 2}, EncodeF32({1, 2, 3, 4}, "F32")},
                   {"b", "BF16", {2}, EncodeF32({5, 6}, "BF16")}}));
  Write("model-00002-of-00002.safetensors",
        BuildFile({{"c", "F16", {1, 3}, EncodeF32({7, 8, 9}, "F16")}}));
  Write("model.safetensors.index.json",
        IndexJson({{"a", "model-00001-of-00002.safetensors"},
                   {"b", "model-00001-of-00002.safetensors"},
                   {"c", "model-00002-of-00002.safetensors"}})
            .dump());
  absl::StatusOr<std::unique_ptr<CheckpointReader>> r = CheckpointReader::Open(dir_);
  ASSERT_OK(r);
  EXPECT_THAT((*r)->TensorNames(), ElementsAre("a", "b", "c"));
  std::vector<float> a(4), b(2), c(3);
  ASSERT_OK((*r)->ReadF32("a", {2, 2}, absl::MakeSpan(a)));
  ASSERT_OK((*r)->ReadF32("b", {2}, absl::MakeSpan(b)));
  ASSERT_OK((*r)->ReadF32("c", {1, 3}, absl::MakeSpan(c)));
  EXPECT_THAT(a, ElementsAre(1, 2, 3, 4));
  EXPECT_THAT(b, ElementsAre(5, 6));
  EXPECT_THAT(c, ElementsAre(7, 8, 9));
  EXPECT_THAT((*(*r)->Find("c"))->file, HasSubstr("model-00002-of-00002.safetensors"));
}

TEST_F(SafetensorsTest, IndexNamingMissingShard) {
  Write("model-00001-of-00002.safetensors",
        BuildFile({{"a", "F32", {1}, EncodeF32({1}, "F32")}}));
  Write("model.safetensors.index.json",
        IndexJson({{"a", "model-00001-of-00002.safetensors"},
                   {"b", "model-00002-of-00002.safetensors"}})
            .dump());
  EXPECT_THAT(CheckpointReader::Open(dir_),
              StatusIs(absl::StatusCode::kNotFound,
                       AllOf(HasSubstr("model.safetensors.index.json"),
                             HasSubstr("model-00002-of-00002.safetensors"))));
}

TEST_F(SafetensorsTest, IndexNamingTensorAbsentFromItsShard) {
  Write("s1.safetensors", BuildFile({{"a", "F32", {1}, EncodeF32({1}, "F32")}}));
  Write("s2.safetensors", BuildFile({{"b", "F32", {1}, EncodeF32({2}, "F32")}}));
  Write("model.safetensors.index.json",
        IndexJson({{"a", "s1.safetensors"}, {"b", "s1.safetensors"}}).dump());
  EXPECT_THAT(CheckpointReader::Open(dir_),
              StatusIs(absl::StatusCode::kDataLoss,
                       AllOf(HasSubstr("tensor 'b'"), HasSubstr("s1.safetensors"))));
}

TEST_F(SafetensorsTest, DuplicateTensorAcrossShards) {
  Write("s1.safetensors", BuildFile({{"a", "F32", {1}, EncodeF32({1}, "F32")}}));
  Write("s2.safetensors", BuildFile({{"a", "F32", {1}, EncodeF32({2}, "F32")},
                                     {"b", "F32", {1}, EncodeF32({2}, "F32")}}));
  Write("model.safetensors.index.json",
        IndexJson({{"a", "s1.safetensors"}, {"b", "s2.safetensors"}}).dump());
  EXPECT_THAT(CheckpointReader::Open(dir_),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       AllOf(HasSubstr("tensor 'a'"), HasSubstr("two shards"))));
}

TEST_F(SafetensorsTest, MalformedIndex) {
  Write("model.safetensors.index.json", "{\"weight_map\": {\"a\": 3}}");
  EXPECT_THAT(CheckpointReader::Open(dir_),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       AllOf(HasSubstr("model.safetensors.index.json"), HasSubstr("'a'"))));
  Write("model.safetensors.index.json", "{\"weight_map\": {\"a\": \"../x.safetensors\"}}");
  EXPECT_THAT(CheckpointReader::Open(dir_),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("invalid shard")));
  Write("model.safetensors.index.json", "{\"weight_map\": ");
  EXPECT_THAT(CheckpointReader::Open(dir_),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       AllOf(HasSubstr("model.safetensors.index.json"), HasSubstr("JSON"))));
  Write("model.safetensors.index.json", "{}");
  EXPECT_THAT(CheckpointReader::Open(dir_),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("'weight_map'")));
}

TEST_F(SafetensorsTest, NoCheckpoint) {
  EXPECT_THAT(CheckpointReader::Open(dir_),
              StatusIs(absl::StatusCode::kNotFound,
                       AllOf(HasSubstr(dir_), HasSubstr("model.safetensors "),
                             HasSubstr("model.safetensors.index.json"))));
}

// ---- Malformed files -----------------------------------------------------------------------

TEST_F(SafetensorsTest, EmptyAndTruncatedFiles) {
  EXPECT_THAT(OpenBytes(""), StatusIs(absl::StatusCode::kDataLoss,
                                      AllOf(HasSubstr("model.safetensors"), HasSubstr("empty"))));
  EXPECT_THAT(OpenBytes("abcde"),
              StatusIs(absl::StatusCode::kDataLoss,
                       AllOf(HasSubstr("model.safetensors"), HasSubstr("5 bytes"),
                             HasSubstr("shorter than the 8-byte header length"))));
  // Reader-level: the error surfaces through CheckpointReader::Open too.
  EXPECT_THAT(CheckpointReader::Open(dir_),
              StatusIs(absl::StatusCode::kDataLoss, HasSubstr("model.safetensors")));
}

// A FIFO (or device) in place of the checkpoint is refused at once: opening a FIFO to read
// waited for a writer, and every command that loads weights hung (a tester).
TEST_F(SafetensorsTest, AFifoOrDeviceIsRefusedNotWaitedOn) {
  ASSERT_EQ(mkfifo(Path("model.safetensors").c_str(), 0600), 0) << std::strerror(errno);
  const auto t0 = std::chrono::steady_clock::now();
  EXPECT_THAT(CheckpointReader::Open(dir_),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       AllOf(HasSubstr("model.safetensors"), HasSubstr("not a regular file"))));
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(5));
  EXPECT_THAT(SafetensorsFile::Open("/dev/zero"),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("not a regular file")));
  EXPECT_THAT(SafetensorsFile::Open(dir_),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("is a directory, not a file")));
  // A socket: open() fails with ENXIO ("No such device or address").
  const std::string sock_path = Path("sock.safetensors");
  const int sock = socket(AF_UNIX, SOCK_STREAM, 0);
  ASSERT_GE(sock, 0);
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  ASSERT_LT(sock_path.size(), sizeof(addr.sun_path));
  std::memcpy(addr.sun_path, sock_path.c_str(), sock_path.size() + 1);
  ASSERT_EQ(bind(sock, reinterpret_cast<const sockaddr*>(&addr), sizeof(addr)), 0) << std::strerror(errno);
  EXPECT_THAT(SafetensorsFile::Open(sock_path),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("not a regular file")));
  close(sock);
}

TEST_F(SafetensorsTest, HeaderLengthBeyondFile) {
  std::string bytes = RawFile("{}", "");
  bytes[0] = 100;  // claims a 100-byte header
  EXPECT_THAT(OpenBytes(bytes),
              StatusIs(absl::StatusCode::kDataLoss,
                       AllOf(HasSubstr("model.safetensors"), HasSubstr("header length 100"))));
  std::string huge(8, '\xff');
  EXPECT_THAT(OpenBytes(huge + "{}"),
              StatusIs(absl::StatusCode::kDataLoss, HasSubstr("header length")));
}

TEST_F(SafetensorsTest, HeaderNotJsonOrNotObject) {
  EXPECT_THAT(OpenBytes(RawFile("{\"a\": ", "")),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       AllOf(HasSubstr("model.safetensors"), HasSubstr("invalid JSON"))));
  EXPECT_THAT(OpenBytes(RawFile("", "")),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("invalid JSON")));
  EXPECT_THAT(OpenBytes(RawFile("[1, 2]", "")),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       AllOf(HasSubstr("model.safetensors"), HasSubstr("object"))));
  EXPECT_THAT(OpenBytes(RawFile("{\"__metadata__\": {\"a\": 1}}", "")),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("__metadata__")));
}

TEST_F(SafetensorsTest, UnknownDType) {
  EXPECT_THAT(OpenBytes(BuildFile({{"w", "F8_E4M3", {4}, std::string(4, '\0')}})),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       AllOf(HasSubstr("model.safetensors: tensor 'w'"), HasSubstr("F8_E4M3"))));
}

TEST_F(SafetensorsTest, BadEntryFields) {
  const std::string data(16, '\0');
  struct Case {
    std::string header;
    std::string message;
  };
  const std::vector<Case> cases = {
      {R"({"w": 3})", "must be an object"},
      {R"({"w": {"shape": [4], "data_offsets": [0, 16]}})", "missing 'dtype'"},
      {R"({"w": {"dtype": 7, "shape": [4], "data_offsets": [0, 16]}})", "'dtype' must be"},
      {R"({"w": {"dtype": "F32", "data_offsets": [0, 16]}})", "missing 'shape'"},
      {R"({"w": {"dtype": "F32", "shape": "4", "data_offsets": [0, 16]}})", "'shape' must be"},
      {R"({"w": {"dtype": "F32", "shape": [4.5], "data_offsets": [0, 16]}})", "integers"},
      {R"({"w": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}})", "negative"},
      {R"({"w": {"dtype": "F32", "shape": [4]}})", "missing 'data_offsets'"},
      {R"({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0]}})", "'data_offsets' must"},
      {R"({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, "16"]}})", "'data_offsets'"},
      {R"({"w": {"dtype": "F32", "shape": [4], "data_offsets": [-1, 16]}})", "'data_offsets'"},
      {R"({"w": {"dtype": "F32", "shape": [4], "data_offsets": [16, 0]}})", "begin > end"},
      {R"({"w": {"dtype": "F32", "shape": [4294967296, 4294967296, 4294967296],
                 "data_offsets": [0, 16]}})",
       "too large"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.header);
    EXPECT_THAT(OpenBytes(RawFile(c.header, data)),
                StatusIs(absl::StatusCode::kInvalidArgument,
                         AllOf(HasSubstr("model.safetensors: tensor 'w'"),
                               HasSubstr(c.message))));
  }
}

TEST_F(SafetensorsTest, ShapeSizeMismatch) {
  EXPECT_THAT(OpenBytes(RawFile(R"({"w": {"dtype": "BF16", "shape": [2, 3], "data_offsets": [0, 16]}})",
                                std::string(16, '\0'))),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       AllOf(HasSubstr("model.safetensors: tensor 'w'"), HasSubstr("[2, 3]"),
                             HasSubstr("needs 12 bytes"), HasSubstr("span 16 bytes"))));
}

TEST_F(SafetensorsTest, OffsetsOutOfRange) {
  std::string bytes = BuildFile({{"a", "F32", {2}, EncodeF32({1, 2}, "F32")},
                                 {"w", "F32", {4}, EncodeF32({1, 2, 3, 4}, "F32")}});
  bytes.resize(bytes.size() - 4);  // truncated data section
  EXPECT_THAT(OpenBytes(bytes),
              StatusIs(absl::StatusCode::kDataLoss,
                       AllOf(HasSubstr("model.safetensors: tensor 'w'"),
                             HasSubstr("past the end of the data section"))));
}

TEST_F(SafetensorsTest, OverlappingTensors) {
  const std::string header =
      R"({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},)"
      R"( "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}})";
  EXPECT_THAT(OpenBytes(RawFile(header, std::string(16, '\0'))),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       AllOf(HasSubstr("model.safetensors"), HasSubstr("'a'"), HasSubstr("'b'"),
                             HasSubstr("overlap"))));
  // Adjacent and zero-sized tensors are fine.
  const std::string ok =
      R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},)"
      R"( "e": {"dtype": "F32", "shape": [0, 3], "data_offsets": [4, 4]},)"
      R"( "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}})";
  EXPECT_OK(OpenBytes(RawFile(ok, std::string(16, '\0'))));
}

// Every truncation and many random corruptions of a valid file give an error or a valid file,
// never a crash.
TEST_F(SafetensorsTest, CorruptionsNeverCrash) {
  const std::string good =
      BuildFile({{"a", "F32", {2, 2}, EncodeF32({1, 2, 3, 4}, "F32")},
                 {"b", "BF16", {3}, EncodeF32({5, 6, 7}, "BF16")}},
                {{"format", "pt"}});
  ASSERT_OK(OpenBytes(good));
  for (size_t len = 0; len < good.size(); ++len) {
    EXPECT_THAT(OpenBytes(good.substr(0, len)), Not(IsOk())) << len;
  }
  std::mt19937 rng(123);
  for (int i = 0; i < 2000; ++i) {
    std::string bad = good;
    const int flips = 1 + static_cast<int>(rng() % 4);
    for (int k = 0; k < flips; ++k) {
      bad[rng() % bad.size()] = static_cast<char>(rng() % 256);
    }
    absl::StatusOr<std::unique_ptr<SafetensorsFile>> f = OpenBytes(bad);
    if (f.ok()) {
      for (const auto& [name, info] : (*f)->tensors()) {
        EXPECT_EQ(info.nbytes, static_cast<size_t>(info.numel()) * DTypeSize(info.dtype));
      }
    }
  }
}

}  // namespace
}  // namespace lorc
