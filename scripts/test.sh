#!/usr/bin/env bash
# Command (2) of the README: install what is missing, build, and run every test (ctest).
# GPU tests skip themselves on machines without a CUDA device.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
bash scripts/build.sh
(cd "${BUILD_DIR:-build}" && ctest --output-on-failure -j "${CTEST_JOBS:-2}" --timeout 1800)

# Sanitizer builds (tests/README.md, "Sanitizers"): ASan+UBSan over the unit and end-to-end tests,
# TSan over the threaded serving parts. On when LORC_SANITIZERS=1; the default is on in CI
# (CI=true; .ci/run sets LORC_SANITIZERS=1) and off locally (they add ~40 min on 2 cores).
default_sanitizers=0
[ "${CI:-}" = true ] && default_sanitizers=1
if [ "${LORC_SANITIZERS:-$default_sanitizers}" = 1 ]; then
  bash scripts/sanitize.sh asan
  bash scripts/sanitize.sh tsan
fi
