// ParseRequest's refusals of bytes that are not a request, without libprotobuf writing a log
// line for them (fuzz finding #4, docs/FUZZING.md: a client could make the server log one line
// per request).
#include "coordinator/request_conversion.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "google/protobuf/stubs/logging.h"
#include "lorcserve/v1/lorcserve.pb.h"

namespace lorc {
namespace {

std::vector<std::string>* g_logged = nullptr;

void Capture(google::protobuf::LogLevel level, const char* file, int line,
             const std::string& message) {
  if (g_logged != nullptr) g_logged->push_back(message);
}

class ParseRequestTest : public ::testing::Test {
 protected:
  void SetUp() override {
    g_logged = &logged_;
    previous_ = google::protobuf::SetLogHandler(&Capture);
  }
  void TearDown() override {
    google::protobuf::SetLogHandler(previous_);
    g_logged = nullptr;
  }
  std::vector<std::string> logged_;
  google::protobuf::LogHandler* previous_ = nullptr;
};

// Field `name` of GenerateRequest as a length-delimited record holding `payload`.
std::string Record(const std::string& name, const std::string& payload) {
  const auto* fd = lorcserve::v1::GenerateRequest::descriptor()->FindFieldByName(name);
  EXPECT_NE(fd, nullptr) << name;
  EXPECT_LT(payload.size(), 128u);
  std::string out;
  out.push_back(static_cast<char>((fd->number() << 3) | 2));
  out.push_back(static_cast<char>(payload.size()));
  return out + payload;
}

const std::string kTruncated("\x0a\xff\x01x", 4);  // field 1 claims 255 bytes; 1 follows

TEST_F(ParseRequestTest, InvalidUtf8FollowedByBrokenBytesIsRefusedWithoutALogLine) {
  lorcserve::v1::GenerateRequest req;
  const absl::Status s = ParseRequest(Record("text", "a\xff\x80") + kTruncated, &req);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(s.message(), "request is not a valid lorcserve.v1.GenerateRequest");
  EXPECT_THAT(logged_, ::testing::IsEmpty());
}

TEST_F(ParseRequestTest, ABrokenNestedMessageIsNamed) {
  lorcserve::v1::GenerateRequest req;
  // Fields are checked in wire order: the broken sampling comes before the invalid text.
  const absl::Status s =
      ParseRequest(Record("sampling", kTruncated) + Record("text", "a\xff\x80"), &req);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(s.message(),
            "request is not a valid lorcserve.v1.GenerateRequest: sampling is not a valid "
            "lorcserve.v1.SamplingOptions");
  EXPECT_THAT(logged_, ::testing::IsEmpty());
}

TEST_F(ParseRequestTest, InvalidUtf8InWellFormedBytesNamesTheFieldAndValidBytesParse) {
  lorcserve::v1::GenerateRequest req;
  const absl::Status s = ParseRequest(Record("text", "a\xff\x80"), &req);
  EXPECT_EQ(s.message(), "text is not valid UTF-8 at byte offset 1 (byte 0xFF)");

  lorcserve::v1::GenerateRequest valid;
  valid.set_text("caf\xc3\xa9");
  valid.mutable_sampling()->set_max_tokens(7);
  valid.mutable_sampling()->add_stop("\xe2\x82\xac");
  ASSERT_TRUE(ParseRequest(valid.SerializeAsString(), &req).ok());
  EXPECT_EQ(req.text(), valid.text());
  EXPECT_EQ(req.sampling().max_tokens(), 7);
  EXPECT_EQ(req.sampling().stop(0), "\xe2\x82\xac");
  EXPECT_THAT(logged_, ::testing::IsEmpty());
}

}  // namespace
}  // namespace lorc
