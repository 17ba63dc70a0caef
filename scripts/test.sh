#!/usr/bin/env bash
# Command (2) of the README: install what is missing, build, and run every test (ctest).
# GPU tests skip themselves on machines without a CUDA device.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
bash scripts/build.sh
cd "${BUILD_DIR:-build}"
ctest --output-on-failure -j "${CTEST_JOBS:-2}" --timeout 1800

# --- Fuzzing (fuzz/README.md): every libFuzzer harness for LORC_FUZZ_SECONDS (default 30; 0
# skips) over its seed corpus, in its own clang ASan+UBSan build (build-fuzz/). A finding fails
# the run and prints the reproducer's path.
if [ "${LORC_FUZZ_SECONDS:-30}" != 0 ]; then
  cd - >/dev/null  # the repository root, from the build directory
  bash scripts/fuzz.sh --seconds "${LORC_FUZZ_SECONDS:-30}"
fi
