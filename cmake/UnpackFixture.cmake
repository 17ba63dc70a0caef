# cmake -DIN=<file.tar.zst> -DOUT=<file> -DSHA256_FILE=<file.sha256> -P UnpackFixture.cmake
# Restores a fixture stored compressed in git (a tar.zst holding one file named like OUT; CMake
# reads it itself, no zstd tool needed) and checks it against its recorded SHA-256; a mismatch
# leaves no output and fails the build with both hashes named.
get_filename_component(name "${OUT}" NAME)
set(tmp "${OUT}.unpack")
file(REMOVE_RECURSE "${tmp}")
file(ARCHIVE_EXTRACT INPUT "${IN}" DESTINATION "${tmp}" PATTERNS "${name}")
if(NOT EXISTS "${tmp}/${name}")
  file(REMOVE_RECURSE "${tmp}")
  message(FATAL_ERROR "fixture: ${IN} holds no ${name}")
endif()
file(READ "${SHA256_FILE}" expected_line)
string(REGEX MATCH "^[0-9a-f]+" expected "${expected_line}")
file(SHA256 "${tmp}/${name}" actual)
if(NOT actual STREQUAL expected)
  file(REMOVE_RECURSE "${tmp}")
  message(FATAL_ERROR "fixture: ${IN} gives SHA-256 ${actual}, ${SHA256_FILE} records ${expected}")
endif()
file(RENAME "${tmp}/${name}" "${OUT}")
file(REMOVE_RECURSE "${tmp}")
file(TOUCH "${OUT}")  # the archive keeps the file's old mtime; the build must see it as new
