#!/usr/bin/env bash
# Command (2) of the README: install what is missing, build, and run every test (ctest).
# GPU tests skip themselves on machines without a CUDA device.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
bash scripts/build.sh
cd "${BUILD_DIR:-build}"
ctest --output-on-failure -j "${CTEST_JOBS:-2}" --timeout 1800
