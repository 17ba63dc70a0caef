#!/usr/bin/env bash
# Command (2) of the README: install what is missing, build, and run every test (ctest).
# GPU tests skip themselves on machines without a CUDA device.
#
# The reliability jobs of tests/README.md run after the ordinary tests when asked; CI (.ci/run)
# asks for all four, a plain local run for none (tests/README.md has each one's measured time on
# 2 cores):
#   LORC_SOAK=1            the 2,000-request soak with faults (SoakFaults2000) joins the ctest run
#                          (docs/RELIABILITY.md);
#   LORC_SANITIZERS=1      ASan+UBSan over the unit and end-to-end tests (scripts/sanitize.sh
#                          asan; tests/README.md);
#   LORC_TSAN=1            TSan over the threaded serving parts: scheduler, engine loop, worker
#                          group, worker service and the coordinator server end to end
#                          (scripts/sanitize.sh tsan; tests/README.md);
#   LORC_FUZZ_SECONDS=N    every libFuzzer harness N seconds over its seed corpus and regression
#                          inputs, in its own clang build (scripts/fuzz.sh; docs/FUZZING.md).
set -euo pipefail
cd "$(dirname "$0")/.."
t0=$SECONDS
phases=""
phase() {
  echo "== scripts/test.sh: $1 done at +$((SECONDS - t0)) s"
  phases+="${phases:+, }$1 +$((SECONDS - t0)) s"
}
# The phases' times again as the last line, pass or fail (CI keeps only the end of the output).
trap 'echo "== scripts/test.sh: exit $? after $((SECONDS - t0)) s${LORC_CHECK_DEMO_S:+ (scripts/demo.sh before it: $LORC_CHECK_DEMO_S s)}; phases: ${phases:-none done}"' EXIT
bash scripts/install-deps.sh
bash scripts/build.sh
phase build
bash scripts/lib/seed_ctest_costs.sh "${BUILD_DIR:-build}"
(cd "${BUILD_DIR:-build}" && ctest --output-on-failure -j "${CTEST_JOBS:-2}" --timeout 1800)
phase ctest
if [ "${LORC_SANITIZERS:-0}" = 1 ]; then
  bash scripts/sanitize.sh asan
  phase "sanitize.sh asan"
fi
if [ "${LORC_TSAN:-0}" = 1 ]; then
  bash scripts/sanitize.sh tsan
  phase "sanitize.sh tsan"
fi
if [ "${LORC_FUZZ_SECONDS:-0}" != 0 ]; then
  bash scripts/fuzz.sh --seconds "${LORC_FUZZ_SECONDS}"
  phase "fuzz.sh --seconds ${LORC_FUZZ_SECONDS}"
fi
