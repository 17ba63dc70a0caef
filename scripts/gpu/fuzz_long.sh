#!/usr/bin/env bash
# A long fuzz run on the GPU machine's CPUs (no GPU used; docs/FUZZING.md): every harness of fuzz/
# for SECS seconds in libFuzzer's fork mode with WORKERS processes, over the repository's seed
# corpora, the same options as scripts/fuzz.sh. The harnesses come as FUZZ_BUNDLE (default
# .gpu-fuzz/fuzz.tar.xz, an ignored carry folder): `scripts/fuzz.sh --build-only`, then
# /work/shared/device/bundle-libs.sh over build-fuzz/bin/*_fuzz, stripped, xz (libopenblas left
# out: the GPU host has its own). SKIP: a grep pattern of harnesses to leave out. CORPUS_IN: a
# corpus.tar.xz from an earlier run (fz/<harness>/corpus/...), to continue that campaign instead of
# starting from the seeds alone. $OUT gets host.txt, rc.txt, summary.txt (with each harness's CPU
# time: user + sys of it and its fork workers), fuzz-logs.tgz (each harness's log and any crash
# input) and corpus.tar.xz (the grown corpora, the next run's CORPUS_IN).
set -uo pipefail
cd "$(dirname "$0")/../.."; R=$PWD
B=/tmp/lorc-fuzz-bin
mkdir -p $B && python3 -c "import tarfile,sys; tarfile.open(sys.argv[2]).extractall(sys.argv[1])" $B "${FUZZ_BUNDLE:-.gpu-fuzz/fuzz.tar.xz}"
export LD_LIBRARY_PATH=$B:$(cat $B/cuda-lib-path) LORC_MODELS_DIR=$PWD/models
export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1:symbolize=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
SECS=${SECS:-480}; WORKERS=${WORKERS:-2}; L=/tmp/fzlogs; mkdir -p $L
(nproc; lscpu | grep -E "Model name|^CPU\(s\)"; date -u) > $OUT/host.txt
harnesses=$(ls $B | grep "_fuzz$" | grep -v "${SKIP:-^$}")
if [ -n "${CORPUS_IN:-}" ]; then
  python3 -c "import tarfile,sys; tarfile.open(sys.argv[2]).extractall(sys.argv[1])" /tmp "$CORPUS_IN"
  echo "continued from $CORPUS_IN: $(find /tmp/fz -type f | wc -l) inputs" >> $OUT/summary.txt
fi
# step_plan_fuzz needs OpenBLAS, left out of the carry for size: run it only if the host has it.
if ldd $B/step_plan_fuzz | grep -q 'not found'; then
  echo "step_plan_fuzz: skipped ($(ldd $B/step_plan_fuzz | grep 'not found' | tr -s ' ' | tr '\n' ';'))" >> $OUT/summary.txt
  harnesses=$(echo "$harnesses" | grep -v step_plan_fuzz)
fi
for h in $harnesses; do
  case "$h" in
    *json_fuzz|safetensors_fuzz) dict=(-dict=$R/fuzz/dict/json.dict) ;;
    tokenizer_encode_decode_fuzz|tokenize_request_fuzz|generate_request_fuzz) dict=(-dict=$R/fuzz/dict/tokens.dict) ;;
    *) dict=() ;;
  esac
  mkdir -p /tmp/fz/$h/corpus $L/artifacts-$h
  ( cd /tmp/fz/$h && timeout $((SECS + 60)) $B/$h -fork=$WORKERS -max_total_time=$SECS -timeout=10 \
      -rss_limit_mb=2048 -max_len=65536 -print_final_stats=1 -artifact_prefix=$L/artifacts-$h/ \
      "${dict[@]}" /tmp/fz/$h/corpus $OLDPWD/fuzz/corpus/$h > $L/$h.log 2>&1; echo "$h rc=$?" >> $OUT/rc.txt
    # CPU seconds of the harness and its fork workers (reaped, so counted in this subshell's
    # children). `times` must not run in a pipeline: a forked pipeline stage starts with no children.
    times > $L/$h.times; tail -1 $L/$h.times | awk '{ t = 0; for (i = 1; i <= 2; ++i) { split($i, a, /[ms]/); t += a[1] * 60 + a[2] } printf "%.0f\n", t }' > $L/$h.cpu ) &
done
wait
for h in $harnesses; do
  last=$(grep -E '^#[0-9]+' $L/$h.log | tail -1)
  echo "$h: $(grep "rc=" $OUT/rc.txt | grep "^$h " | cut -d' ' -f2) cpu_s=$(cat $L/$h.cpu) corpus=$(ls /tmp/fz/$h/corpus | wc -l) last: $last" >> $OUT/summary.txt
done
tar czf $OUT/fuzz-logs.tgz -C /tmp fzlogs
tar cJf $OUT/corpus.tar.xz -C /tmp fz
