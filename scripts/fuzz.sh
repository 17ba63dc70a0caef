#!/usr/bin/env bash
# Builds the libFuzzer harnesses (fuzz/README.md) into $FUZZ_BUILD_DIR (default build-fuzz/) with
# clang, AddressSanitizer, UndefinedBehaviorSanitizer and libFuzzer's coverage (CUDA, tests off),
# then runs each for a bounded time over its seed corpus (fuzz/corpus/<harness>/, read-only; new
# inputs go to $FUZZ_BUILD_DIR/corpus/<harness>/), FUZZ_PARALLEL harnesses at a time (default one
# per core: on CI's 2 cores, nine 30 s runs take five rounds, ~150 s, instead of 270 s). Any crash,
# leak, timeout, out-of-memory or broken invariant fails the run (the reproducer's path and its
# replay command are printed); a summary line per harness gives executions, execs/s, cov and ft.
#   scripts/fuzz.sh [--seconds N] [--build-only] [harness...]   (default: 60 s each, all)
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=60
build_only=0
harnesses=()
while [ $# -gt 0 ]; do
  case "$1" in
    --seconds) seconds=$2; shift 2 ;;
    --seconds=*) seconds=${1#*=}; shift ;;
    --build-only) build_only=1; shift ;;
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    -*) echo "fuzz.sh: unknown option $1" >&2; exit 2 ;;
    *) harnesses+=("$1"); shift ;;
  esac
done
BUILD=${FUZZ_BUILD_DIR:-build-fuzz}
JOBS=${JOBS:-$(nproc)}
all=$(sed -n 's/^lorc_fuzzer(\([a-z_]*\) .*/\1/p' fuzz/CMakeLists.txt)
[ ${#harnesses[@]} -gt 0 ] || read -r -a harnesses <<<"$(echo $all)"

command -v clang++ >/dev/null || { echo "fuzz.sh: clang++ not found (apt-get install clang)" >&2; exit 1; }
launcher=()
if command -v ccache >/dev/null; then launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache); fi
flags="-fsanitize=fuzzer-no-link,address,undefined -fno-sanitize-recover=undefined"
flags+=" -fno-omit-frame-pointer -g -O1"
cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Fuzz \
  -DCMAKE_CXX_COMPILER=clang++ "-DCMAKE_CXX_FLAGS=$flags" -DLORC_CUDA=OFF -DLORC_BUILD_TESTS=OFF \
  -DLORC_FUZZ=ON "${launcher[@]}" >/dev/null
cmake --build "$BUILD" -j "$JOBS" --target "${harnesses[@]}"
[ "$build_only" = 1 ] && exit 0

export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1:symbolize=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-halt_on_error=1:print_stacktrace=1}
# One harness: its run, its summary line (and on failure the log's tail and the reproducer) in
# $BUILD/logs/<harness>.out, its exit code in <harness>.rc.
run_one() {
  local h=$1 seeds=fuzz/corpus/$1 work=$BUILD/corpus/$1 artifacts=$BUILD/artifacts/$1
  local log=$BUILD/logs/$1.log out=$BUILD/logs/$1.out dict=() rc=0
  mkdir -p "$work" "$artifacts" "$(dirname "$log")"
  case "$h" in
    *json_fuzz|safetensors_fuzz) dict=(-dict=fuzz/dict/json.dict) ;;
    tokenizer_encode_decode_fuzz|tokenize_request_fuzz|generate_request_fuzz) dict=(-dict=fuzz/dict/tokens.dict) ;;
  esac
  "$BUILD/bin/$h" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -max_len=65536 \
    -print_final_stats=1 -artifact_prefix="$artifacts/" "${dict[@]}" "$work" "$seeds" \
    >"$log" 2>&1 || rc=$?
  local execs speed last cov ft repro
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  speed=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
  last=$(grep -E '^#[0-9]+' "$log" | tail -1 || true)
  cov=$(sed -n 's/.* cov: \([0-9]*\).*/\1/p' <<<"$last")
  ft=$(sed -n 's/.* ft: \([0-9]*\).*/\1/p' <<<"$last")
  {
    echo "$h: rc=$rc execs=${execs:-?} execs/s=${speed:-?} cov=${cov:-?} ft=${ft:-?} corpus=$(ls "$work" | wc -l)"
    if [ "$rc" != 0 ]; then
      tail -60 "$log"
      repro=$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | tail -1)
      echo "fuzz.sh: $h FAILED (rc $rc); log $log; reproducer: ${repro:-none written}"
      if [ -n "$repro" ]; then echo "  replay: $BUILD/bin/$h $repro"; fi
    fi
  } >"$out"
  echo "$rc" >"$BUILD/logs/$h.rc"
}

# FUZZ_PARALLEL harnesses at a time (default: one per core), each a single libFuzzer process.
parallel=${FUZZ_PARALLEL:-$(nproc)}
for h in "${harnesses[@]}"; do
  while [ "$(jobs -rp | wc -l)" -ge "$parallel" ]; do wait -n || true; done
  echo "== $h: ${seconds}s over $(ls "fuzz/corpus/$h" | wc -l) seeds"
  rm -f "$BUILD/logs/$h.rc" "$BUILD/logs/$h.out"
  run_one "$h" &
done
wait
failed=()
for h in "${harnesses[@]}"; do
  cat "$BUILD/logs/$h.out" 2>/dev/null || echo "$h: no result (its run ended before writing one)"
  [ "$(cat "$BUILD/logs/$h.rc" 2>/dev/null)" = 0 ] || failed+=("$h")
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz.sh: failed: ${failed[*]}" >&2
  exit 1
fi
echo "fuzz.sh: ${#harnesses[@]} harnesses ran ${seconds}s each without a finding"
