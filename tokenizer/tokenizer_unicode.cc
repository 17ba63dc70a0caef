#include "tokenizer/tokenizer_unicode.h"

#include <vector>

#include "absl/strings/str_format.h"

namespace lorc::tokenizer_internal {
namespace {

enum class SeqKind { kValid, kInvalid, kTruncated };

struct SeqInfo {
  SeqKind kind;
  size_t len;  // kValid: sequence length; kInvalid: maximal subpart; kTruncated: bytes present
};

// Classifies the UTF-8 sequence starting at bytes[i] (Unicode table 3-7, well-formed sequences).
SeqInfo ClassifySequence(std::string_view bytes, size_t i) {
  const uint8_t c = static_cast<uint8_t>(bytes[i]);
  if (c < 0x80) return {SeqKind::kValid, 1};
  int need = 0;
  uint8_t lo = 0x80, hi = 0xBF;
  if (c >= 0xC2 && c <= 0xDF) {
    need = 1;
  } else if (c == 0xE0) {
    need = 2, lo = 0xA0;
  } else if ((c >= 0xE1 && c <= 0xEC) || c == 0xEE || c == 0xEF) {
    need = 2;
  } else if (c == 0xED) {
    need = 2, hi = 0x9F;
  } else if (c == 0xF0) {
    need = 3, lo = 0x90;
  } else if (c >= 0xF1 && c <= 0xF3) {
    need = 3;
  } else if (c == 0xF4) {
    need = 3, hi = 0x8F;
  } else {
    return {SeqKind::kInvalid, 1};
  }
  size_t len = 1;
  for (int k = 0; k < need; ++k) {
    if (i + len >= bytes.size()) return {SeqKind::kTruncated, len};
    const uint8_t d = static_cast<uint8_t>(bytes[i + len]);
    if (d < lo || d > hi) return {SeqKind::kInvalid, len};
    lo = 0x80, hi = 0xBF;
    ++len;
  }
  return {SeqKind::kValid, len};
}

// Code point of each byte in GPT-2's bytes_to_unicode.
std::array<char32_t, 256> BuildByteToCodePoint() {
  std::array<char32_t, 256> table{};
  char32_t next_extra = 256;
  for (int b = 0; b < 256; ++b) {
    const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE);
    table[b] = printable ? static_cast<char32_t>(b) : next_extra++;
  }
  return table;
}

const std::array<char32_t, 256>& ByteToCodePoint() {
  static const std::array<char32_t, 256> table = BuildByteToCodePoint();
  return table;
}

}  // namespace

std::optional<size_t> FindInvalidUtf8(std::string_view text) {
  size_t i = 0;
  while (i < text.size()) {
    const SeqInfo info = ClassifySequence(text, i);
    if (info.kind != SeqKind::kValid) return i;
    i += info.len;
  }
  return std::nullopt;
}

absl::Status CheckUtf8(std::string_view field, std::string_view bytes) {
  const std::optional<size_t> bad = FindInvalidUtf8(bytes);
  if (!bad.has_value()) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrFormat(
      "%s is not valid UTF-8 at byte offset %d (byte 0x%02X)", field, *bad,
      static_cast<unsigned>(static_cast<uint8_t>(bytes[*bad]))));
}

size_t Utf8SequenceLength(uint8_t lead) {
  if (lead < 0xC0) return 1;
  if (lead < 0xE0) return 2;
  if (lead < 0xF0) return 3;
  return lead < 0xF8 ? 4 : 1;
}

char32_t NextCodePoint(std::string_view text, size_t* pos) {
  const uint8_t c = static_cast<uint8_t>(text[*pos]);
  const size_t len = Utf8SequenceLength(c);
  if (len == 1 || *pos + len > text.size()) {
    ++*pos;
    return c;
  }
  static constexpr uint8_t kLeadMask[5] = {0, 0x7F, 0x1F, 0x0F, 0x07};
  char32_t cp = c & kLeadMask[len];
  for (size_t k = 1; k < len; ++k) cp = (cp << 6) | (static_cast<uint8_t>(text[*pos + k]) & 0x3F);
  *pos += len;
  return cp;
}

void AppendUtf8(char32_t cp, std::string* out) {
  if (cp < 0x80) {
    out->push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out->push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out->push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out->push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

size_t AppendLossyUtf8(std::string_view bytes, bool hold_incomplete_tail, std::string* out) {
  static constexpr std::string_view kReplacement = "\xEF\xBF\xBD";
  size_t i = 0;
  while (i < bytes.size()) {
    const SeqInfo info = ClassifySequence(bytes, i);
    if (info.kind == SeqKind::kValid) {
      out->append(bytes.substr(i, info.len));
    } else if (info.kind == SeqKind::kTruncated && hold_incomplete_tail) {
      return i;
    } else {
      out->append(kReplacement);
    }
    i += info.len;
  }
  return i;
}

bool IsWhiteSpace(char32_t cp) {
  if (cp <= 0x20) return cp == 0x20 || (cp >= 0x09 && cp <= 0x0D);
  if (cp < 0x85) return false;
  switch (cp) {
    case 0x85: case 0xA0: case 0x1680: case 0x2028: case 0x2029: case 0x202F: case 0x205F:
    case 0x3000:
      return true;
    default:
      return cp >= 0x2000 && cp <= 0x200A;
  }
}

const std::array<std::string, 256>& ByteToUnicode() {
  static const std::array<std::string, 256> table = [] {
    std::array<std::string, 256> t;
    for (int b = 0; b < 256; ++b) AppendUtf8(ByteToCodePoint()[b], &t[b]);
    return t;
  }();
  return table;
}

std::optional<uint8_t> UnicodeToByte(char32_t cp) {
  static const std::vector<int16_t> inverse = [] {
    std::vector<int16_t> inv(512, -1);
    for (int b = 0; b < 256; ++b) inv[ByteToCodePoint()[b]] = static_cast<int16_t>(b);
    return inv;
  }();
  if (cp >= inverse.size() || inverse[cp] < 0) return std::nullopt;
  return static_cast<uint8_t>(inverse[cp]);
}

void AppendByteLevel(std::string_view text, std::string* out) {
  const auto& table = ByteToUnicode();
  for (char c : text) out->append(table[static_cast<uint8_t>(c)]);
}

std::string ByteLevelTokenBytes(std::string_view token) {
  std::string bytes;
  bytes.reserve(token.size());
  size_t pos = 0;
  while (pos < token.size()) {
    const std::optional<uint8_t> b = UnicodeToByte(NextCodePoint(token, &pos));
    if (!b.has_value()) return std::string(token);
    bytes.push_back(static_cast<char>(*b));
  }
  return bytes;
}

}  // namespace lorc::tokenizer_internal
