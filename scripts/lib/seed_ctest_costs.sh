#!/usr/bin/env bash
# Usage: bash scripts/lib/seed_ctest_costs.sh BUILD_DIR
# Gives ctest the measured run time of the slow tests (tests/ctest-costs.txt) where the build
# folder has no history of its own, so that a fresh clone's `ctest -j N` starts the longest tests
# first instead of last (ctest orders by the costs in Testing/Temporary/CTestCostData.txt, which
# it writes after each run; without the file it runs in declaration order and, on CI's 2 cores,
# FullEvalMatchesReference's 265 s started with ~60 tests left, one core idle for most of it).
# A folder that already has the file keeps it: its own history is newer than the seed.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
dest=$1/Testing/Temporary
if [ ! -f "$dest/CTestCostData.txt" ]; then
  mkdir -p "$dest"
  cp "$root/tests/ctest-costs.txt" "$dest/CTestCostData.txt"
fi
