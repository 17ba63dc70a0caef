// Tokenizer internals: UTF-8 validation / lossy decoding and the GPT-2 byte-level alphabet.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

#include "absl/status/status.h"

namespace lorc::tokenizer_internal {

// Byte offset of the first byte that makes `text` invalid UTF-8 (strict, like Rust's str: no
// overlong forms, surrogates or code points above U+10FFFF), or nullopt if it is valid.
std::optional<size_t> FindInvalidUtf8(std::string_view text);

// OK, or InvalidArgument "<field> is not valid UTF-8 at byte offset N (byte 0xXX)": the one
// message every layer gives for a request's text field that is not UTF-8.
absl::Status CheckUtf8(std::string_view field, std::string_view bytes);

// Length in bytes of the UTF-8 sequence that starts with lead byte `lead` (1 for invalid leads).
size_t Utf8SequenceLength(uint8_t lead);

// Decodes the code point at `*pos` of valid UTF-8 `text` and advances `*pos` past it.
char32_t NextCodePoint(std::string_view text, size_t* pos);

// Appends the UTF-8 encoding of `cp`.
void AppendUtf8(char32_t cp, std::string* out);

// Appends `bytes` converted to UTF-8, each invalid sequence (maximal subpart) replaced by U+FFFD,
// exactly like Rust's String::from_utf8_lossy. With `hold_incomplete_tail`, a truncated but so
// far valid sequence at the end is left unconsumed. Returns the number of bytes consumed.
size_t AppendLossyUtf8(std::string_view bytes, bool hold_incomplete_tail, std::string* out);

// Unicode White_Space (what Rust's char::is_whitespace and regex \s match).
bool IsWhiteSpace(char32_t cp);

// GPT-2 bytes_to_unicode: the UTF-8 text of the character that stands for each byte.
const std::array<std::string, 256>& ByteToUnicode();

// Inverse of ByteToUnicode, for one character; nullopt if `cp` is not in the alphabet.
std::optional<uint8_t> UnicodeToByte(char32_t cp);

// Maps every byte of `text` to its byte-level character (appending to `out`).
void AppendByteLevel(std::string_view text, std::string* out);

// Bytes of a byte-level token: every character mapped back to its byte, or, if some character is
// outside the alphabet, the token's own UTF-8 (what HF's ByteLevel decoder does).
std::string ByteLevelTokenBytes(std::string_view token);

}  // namespace lorc::tokenizer_internal
