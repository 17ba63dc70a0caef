#!/usr/bin/env bash
# Builds and runs the tests under a sanitizer (tests/README.md, "Sanitizers"):
#   scripts/sanitize.sh asan [ctest args...]   AddressSanitizer + UndefinedBehaviorSanitizer (and
#       LeakSanitizer) in build-asan/: every unit test and the serving end-to-end tests (CPU
#       backend; the slow FullEval cases and the GPU cases are left out).
#   scripts/sanitize.sh tsan [ctest args...]   ThreadSanitizer in build-tsan/: the scheduler,
#       engine loop, worker group, worker service and coordinator server (end-to-end) tests.
# Host C++ only, CPU backend: LORC_CUDA defaults to OFF here (no CUDA code runs without a device
# and scripts/build.sh compiles all of it in the same CI run); LORC_CUDA=AUTO compiles the .cu
# kernels with plain nvcc flags and links them in. Findings fail the run: every report of the tests and of the lorcserve
# processes they start is written under <build>/sanitizer-logs/ and printed at the end.
# Suppressions (third-party code only, each with its reason): scripts/sanitizers/*.supp.
# Env: JOBS (nproc), CTEST_JOBS (2), LORC_CCACHE=0 to build
# without ccache (cold-build timing).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
kind=${1:-}
shift || true
supp=$root/scripts/sanitizers
case "$kind" in
  asan)
    sanitize=address,undefined
    build="build-asan"
    # Every test executable (found after configuring) but those whose every case is left out
    # below (the GPU-only ones and the rank search: a CPU case added to one of these must take it
    # off this list), and lorcserve for the end-to-end tests.
    unbuilt='backend_cuda_[a-z_]*|worker_comm_nccl|worker_cuda_host_kv_step|worker_cuda_kv_policy|compress_rank_search'
    targets=(lorcserve)
    # Left out, besides the GPU cases: the 4-minute evaluation (FullEval) and tests that run
    # long numeric work (OpenBLAS, not instrumented) many times over code the other tests cover:
    # the multi-turn pass-key accuracies, the progressive-rank TP test, the rank search; the
    # multi-host test (network namespaces), the soak, and the Python / Node tests (gateway,
    # manifests), which instrument nothing of ours beyond what the end-to-end tests start.
    # (gtest_discover_tests names an executable that was not built <target>_NOT_BUILT.)
    select=(-E "FullEval|Cuda|Nccl|MultiTurnPassKey|progressive_whitened|RankSearch|MultiHostNetns|SoakFaults|Gateway|DeployManifests|^(${unbuilt})_test_NOT_BUILT\$")
    ;;
  tsan)
    sanitize=thread
    build="build-tsan"
    tsan_tests=(coordinator_scheduler_test coordinator_engine_loop_test coordinator_worker_group_test
                coordinator_server_e2e_test worker_service_test sanitizers_tsan_absl_sync_test)
    targets=("${tsan_tests[@]}" lorcserve)
    select=(-L "^($(IFS='|'; echo "${tsan_tests[*]}"))\$" -E 'Cuda|Nccl')
    ;;
  *)
    echo "usage: scripts/sanitize.sh asan|tsan [ctest args...]" >&2
    exit 2
    ;;
esac

launcher=()
if [ "${LORC_CCACHE:-1}" != 0 ] && command -v ccache >/dev/null; then
  launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache -DCMAKE_CUDA_COMPILER_LAUNCHER=ccache)
else
  launcher=(-UCMAKE_CXX_COMPILER_LAUNCHER -UCMAKE_CUDA_COMPILER_LAUNCHER)
fi
start=$(date +%s)
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DLORC_CUDA="${LORC_CUDA:-OFF}" \
  -DLORC_SANITIZE="$sanitize" "${launcher[@]}" >/dev/null
if [ "$kind" = asan ]; then
  mapfile -t exes < <(ninja -C "$build" -t targets all | sed -n 's/^\([a-z0-9_]*_test\): phony$/\1/p' |
                      grep -v '^cmake_object_order_depends_target_' | grep -vxE "(${unbuilt})_test")
  [ ${#exes[@]} -gt 0 ] || { echo "sanitize.sh: no test executables found in $build" >&2; exit 1; }
  targets+=("${exes[@]}")
fi
cmake --build "$build" -j "${JOBS:-$(nproc)}" --target "${targets[@]}"
built=$(date +%s)

logs=$root/$build/sanitizer-logs
rm -rf "$logs"
mkdir -p "$logs"
common="halt_on_error=1:print_stacktrace=1"
# allocator_may_return_null: an allocation too large for ASan returns null as it would from
# malloc, so the code's own out-of-memory errors are what the tests see (KvCacheAllocationFailure...).
export ASAN_OPTIONS="log_path=$logs/asan:allocator_may_return_null=1:detect_leaks=1:strict_string_checks=1:check_initialization_order=1:detect_odr_violation=1"
export LSAN_OPTIONS="suppressions=$supp/lsan.supp:print_suppressions=0"
export UBSAN_OPTIONS="log_path=$logs/ubsan:suppressions=$supp/ubsan.supp:$common"
# ignore_noninstrumented_modules: memmove/free called from inside Debian's uninstrumented gRPC,
# protobuf and abseil are not tracked (their own synchronization is invisible to TSan anyway).
export TSAN_OPTIONS="log_path=$logs/tsan:suppressions=$supp/tsan.supp:ignore_noninstrumented_modules=1:second_deadlock_stack=1:$common"
status=0
bash scripts/lib/seed_ctest_costs.sh "$build"
(cd "$build" && ctest --output-on-failure -j "${CTEST_JOBS:-2}" --timeout 1800 "${select[@]}" "$@") ||
  status=$?
done_at=$(date +%s)

# With allocator_may_return_null, ASan still writes a warning for each allocation it refused
# ("WARNING: AddressSanitizer failed to allocate 0x... bytes"): a file holding only such lines is
# the expected trace of a test that asks for too much memory on purpose, not a finding.
for f in $(find "$logs" -type f); do
  if ! grep -qv 'WARNING: AddressSanitizer failed to allocate' "$f"; then
    echo "sanitize.sh: refused allocation (expected): $(cat "$f")"
    rm -f "$f"
  fi
done
reports=$(find "$logs" -type f | sort)
if [ -n "$reports" ]; then
  for f in $reports; do
    echo "==== $f"
    cat "$f"
  done
  # A digest last: CI shows the head and the tail of a long log, and a report's middle (the other
  # thread's stack, for a race) is what gets cut. One line per report header and per stack (the
  # access, the previous access, the location, each thread's creation): its first six frames,
  # innermost first, joined by " < ", function names only (template arguments and parameter
  # lists elided, paths and module offsets dropped), each line cut at 400 characters.
  echo "==== digest of the reports above"
  for f in $reports; do
    echo "-- $(basename "$f")"
    { sed -E ':a; s/<[^<>]*>/[T]/; ta' "$f" |
        awk '
          function flush() { if (head != "") print substr(head ": " frames, 1, 400); head = ""; frames = "" }
          /^(WARNING|ERROR|SUMMARY)|^==[0-9]+==ERROR/ { flush(); print substr($0, 1, 400); next }
          /^  [A-Z][a-z]|^(READ|WRITE) of size|^(freed|previously allocated) by thread|^(Direct|Indirect) leak|runtime error/ {
            flush(); head = $0; sub(/^  /, "", head); gsub(/ at 0x[0-9a-f]+/, "", head)
            sub(/ here:$/, "", head); sub(/:$/, "", head); n = 0; next }
          /^    #[0-9]+ / && head != "" {
            if (n++ >= 6) next
            fn = $0; sub(/^    #[0-9]+ (0x[0-9a-f]+ in )?/, "", fn); gsub(/ [.\/][^ ]*/, "", fn)
            while (fn ~ /\([^()]*\)/) gsub(/\([^()]*\)/, "", fn)
            gsub(/ const/, "", fn); gsub(/ +$/, "", fn)
            frames = frames (frames == "" ? "" : " < ") fn; next }
          { flush() }
          END { flush() }'; } || true
  done
  echo "sanitize.sh $kind: $(echo "$reports" | wc -l) sanitizer report(s), above" >&2
  status=1
fi
echo "sanitize.sh $kind: build $((built - start)) s, tests $((done_at - built)) s, status $status"
exit $status
