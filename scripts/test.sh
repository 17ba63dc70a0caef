#!/usr/bin/env bash
# Command (2) of the README: install what is missing, build, and run every test (ctest).
# GPU tests skip themselves on machines without a CUDA device.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
bash scripts/build.sh
(cd "${BUILD_DIR:-build}" && ctest --output-on-failure -j "${CTEST_JOBS:-2}" --timeout 1800)

# Sanitizer builds (tests/README.md, "Sanitizers"): ASan+UBSan over the unit and end-to-end tests,
# TSan over the threaded serving parts. On when LORC_SANITIZERS=1 (off by default, also in CI,
# until a full run of both on the 2-core CI machine is measured: estimated ~40 min).
if [ "${LORC_SANITIZERS:-0}" = 1 ]; then
  bash scripts/sanitize.sh asan
  bash scripts/sanitize.sh tsan
fi

# --- Fuzzing (fuzz/README.md): every libFuzzer harness for LORC_FUZZ_SECONDS seconds (default 0:
# skipped, until its time on the CI machine is measured; 30 is the intended CI budget) over its
# seed corpus, in its own clang ASan+UBSan build (build-fuzz/). A finding fails the run and
# prints the reproducer's path.
if [ "${LORC_FUZZ_SECONDS:-0}" != 0 ]; then
  bash scripts/fuzz.sh --seconds "${LORC_FUZZ_SECONDS}"
fi
