# cmake -DZSTD=<zstd> -DIN=<file.zst> -DOUT=<file> -DSHA256_FILE=<file.sha256> -P UnpackFixture.cmake
# Decompresses a fixture stored zstd-compressed in git and checks it against its recorded SHA-256;
# a mismatch removes the output and fails the build with both hashes named.
execute_process(COMMAND "${ZSTD}" -d -q -f "${IN}" -o "${OUT}.tmp" RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
  file(REMOVE "${OUT}.tmp")
  message(FATAL_ERROR "fixture: '${ZSTD} -d ${IN}' failed (exit ${rc})")
endif()
file(READ "${SHA256_FILE}" expected_line)
string(REGEX MATCH "^[0-9a-f]+" expected "${expected_line}")
file(SHA256 "${OUT}.tmp" actual)
if(NOT actual STREQUAL expected)
  file(REMOVE "${OUT}.tmp")
  message(FATAL_ERROR "fixture: ${OUT} has SHA-256 ${actual}, ${SHA256_FILE} records ${expected}")
endif()
file(RENAME "${OUT}.tmp" "${OUT}")
file(TOUCH "${OUT}")  # zstd keeps the archive's mtime; the build must see the output as new
