#!/usr/bin/env bash
# On a GPU host, from the repository root: unpacks .gpu/bundle.tar.xz (made by scripts/gpu/pack.sh
# on a build machine) and runs the GPU checks and benchmarks of one machine kind, one phase after
# the other, logging each to $OUT/<phase>*.txt and printing a summary line per check.
#
#   scripts/gpu/check.sh                       # every phase, on every visible GPU
#   PHASES="parity serve" scripts/gpu/check.sh # some phases
#
# Phases:
#   ceilings  `gemm_bench ceilings` on each GPU: the copy and weight-read bandwidths and the GEMM
#           peak every floor is taken against; compare with the device's row in
#           common/device_ceilings.h (a device
#           without one gets no floor from `lorcserve bench`: add its row from this)
#   parity  every CUDA/NCCL test binary (parity with the CPU reference, TP = 2 in one process)
#   serve   the fixture served by `coordinator --backend cuda --local-workers N` for N = 1 and the
#           number of GPUs: the golden prompts' greedy tokens against the CPU reference (first 32),
#           64 concurrent streaming clients, 32 cancelled (deadline) requests, every KV block free
#   bench   kernel benchmarks; `lorcserve bench` on the 8B shape (one GPU) and, with 2+ GPUs, the
#           70B shape at TP = 2 (random weights; skipped when the GPUs are too small; also with
#           --disable-custom-all-reduce), the all-reduce benchmark and one TP = 2 rank alone on
#           one GPU (bench/configs/llama3-70b-tp2-rank: the all-reduces' share is the difference)
#   peer    bench/hf_peer.py (transformers + PyTorch) on the same shapes (8B one GPU; 70B over 2)
#   prefix  not in the default phases: prefix-caching TTFT and chat benchmarks on one GPU (issue #10)
#   lorcserve  not in the default phases: phase serve on a LoRC-compressed fixture (see below)
#   kvpolicy  not in the default phases: token-level KV policies on one GPU (issue #17):
#           attention_bench --kv-policy (the policy decode per layer, tensor-core and CUDA-core
#           kernels, over bf16 and fp8 caches) and scripts/kvpolicy/capacity.sh on the 8B shape at
#           16k and 32k tokens (full KV, CORM 30 %, MiKV int4 30 % at a fixed KV pool; and over an
#           fp8 cache at 16k; docs/KV_POLICIES.md "On the GPU"), CORM over LoRC latents
#           (attention_bench --kv-policy --lorc, bf16 and fp8, and capacity.sh on
#           bench/configs/llama3.1-8b-lorc50 at the same memory; "Over LoRC latents on the GPU");
#           about 20 minutes on an H200
#   lorc    not in the default phases: the LoRC quality sweep of scripts/lorc/configs.txt on the
#           fixture (issue #9), every config on the GPU (`eval --backend cuda`, quantized KV dtypes
#           fp8/int8/int4 included: the CUDA kernels read them); results packed into
#           $OUT/lorc-sweep.tar.gz with the report's table in $OUT/lorc-table.md. LORC_JOBS_GPU
#           (default 4), LORC_THREADS_GPU (1), LORC_ONLY (regex), LORC_EXCLUDE (regex of names to
#           leave out), LORC_TIMEOUT (s, default 540); results carried in .gpu/lorc-sweep/ are kept
#           (the sweep resumes).
#   ab      not in the default phases: an A/B of decode settings (environment assignments in
#           AB_SETTINGS, ';'-separated): the golden-prompt runner test under each, then the 8B bench
#           (and with 2+ GPUs the 70B TP = 2 bench) under each in turn, AB_RUNS rounds. E.g. the
#           norms fused into the decode GEMVs (off: 1.8 ms slower on the 8B shape, 2026-12-05):
#           AB_SETTINGS="LORC_FUSED_NORM_ROWS=0;LORC_FUSED_NORM_ROWS=8" (about 2 minutes a round
#           on one H200; the kernel has changed since, kernels/README.md), or the decode
#           attention's early K/V loads (kernels/README.md):
#           AB_SETTINGS="LORC_DECODE_EARLY_KV=0;LORC_DECODE_EARLY_KV=1" (default: on below 32 decodes), or the folded norms (off by
#           default; docs/PERFORMANCE.md 2026-12-06): AB_SETTINGS="LORC_FOLDED_NORMS=0;LORC_FOLDED_NORMS=1".
#           Each round's summary line gives every decode figure (batch, context, ms a step).
#   versus  not in the default phases: before / after on one machine: `lorcserve-old` (a binary of
#           an earlier commit, packed with PACK_OLD=path/to/lorcserve scripts/gpu/pack.sh) against
#           `lorcserve`, rounds interleaved (VERSUS_RUNS, default 3), the 8B bench at VERSUS_BATCHES
#           (1,8,64) x VERSUS_CONTEXTS (128,4096); one summary line per binary and round
#   bigtp   not in the default phases: issues #12 / #13 on a machine of 4 or 8 GPUs: the 70B shape
#           (random weights; BIGTP_MODEL) benched at TP = BIGTP_REF (2; 4 where 70B/2 does not fit,
#           as on H100s) and TP = GPUS (decode 1/8/64/256 x
#           128/4096, prefill 512/4096; BIGTP_BENCH_ARGS adds flags), at TP = GPUS with NCCL only,
#           one rank's share alone on one GPU (bench/configs/llama3-70b-tp<GPUS>-rank: the
#           all-reduces' share is the difference), then served at both TP sizes: four prompts'
#           greedy tokens equal and log-probabilities within 0.05, 64 concurrent clients at TP = GPUS
#   servebench  not in the default phases: the 8B shape (random weights) served by `coordinator
#           --local-workers 1` (one worker process, the step stream) and measured by `lorcserve bench
#           --server` at SERVEBENCH_CONCURRENCY clients (default 1,8; prompt 128, 160 tokens): ITL
#           and the step's coordinator / worker times (schedule, rpc, apply, worker compute and idle),
#           beside the in-process bench at the same batch sizes (ms a step); SERVEBENCH_RUNS rounds,
#           SERVEBENCH_ARGS extra coordinator flags, SERVEBENCH_MODEL another config (BACKEND=cpu
#           with a small one checks the phase on a machine without a GPU)
#   trace   not in the default phases: a kernel timeline of the 8B decode (libkernel_trace.so over
#           CUPTI, bench/src/kernel_trace.cc; pack it with PACK_BINS="lorcserve libkernel_trace.so")
#           at TRACE_BATCHES (default 1) x TRACE_CONTEXTS (128), under each setting of TRACE_SETTINGS
#           (';'-separated as AB_SETTINGS; default the defaults): the bench with and without the
#           tracer (what tracing costs), the trace gzipped and bench/kernel_trace.py's table of
#           each kernel's share of a step in $OUT/trace-s<i>-b<batch>x<context>.*
# Environment: OUT (default /tmp/lorc-gpu), GPUS (default: all visible), STEPS (decode steps, 32),
# BIN_DIR (binaries from a local build instead of the bundle), BACKEND (serve phase; default cuda).
set -uo pipefail
cd "$(dirname "$0")/../.."
. scripts/lib/coordinator.sh
OUT=${OUT:-/tmp/lorc-gpu}
PHASES=${PHASES:-"ceilings parity serve bench peer"}
STEPS=${STEPS:-32}
SERVE_MODEL=${SERVE_MODEL:-models/tiny-llama-a}  # serve phase: the model served (and its tag in logs)
SERVE_TAG=${SERVE_TAG:-}
mkdir -p "$OUT"
B=${BIN_DIR:-/tmp/lorc-gpu-bin}  # BIN_DIR: run binaries from there instead of the bundle
if [ ! -x "$B/lorcserve" ]; then
  mkdir -p "$B"
  python3 -c "import tarfile,sys; tarfile.open('.gpu/bundle.tar.xz').extractall(sys.argv[1])" "$B"
fi
export LD_LIBRARY_PATH="$B:$(cat "$B/cuda-lib-path" 2>/dev/null || true):${LD_LIBRARY_PATH:-}"
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}  # NVLink multicast off (the lent machines' rule)
export LORC_MODELS_DIR=$PWD/models
L="$B/lorcserve"
if [ ! -f models/tiny-llama-a/model.safetensors ]; then
  (cd models/tiny-llama-a && { cmake -E tar xf model.safetensors.tar.zst 2>/dev/null ||
     python3 -c "import tarfile; tarfile.open('model.safetensors.tar.zst').extractall()"; })
fi
GPUS=${GPUS:-$(nvidia-smi -L 2>/dev/null | wc -l)}
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/device.txt" 2>&1
date -u +%FT%TZ >> "$OUT/device.txt"
echo "== $(head -1 "$OUT/device.txt") x $GPUS, $(date -u +%FT%TZ)"
fails=0
note() { echo "$1"; echo "$1" >> "$OUT/summary.txt"; }
# The 8B shape's bench as phases ab, versus and trace run it (they add batches and contexts), and a
# bench log's decode figures on one line (batch, context, ms a step).
BENCH_8B=(bench --model bench/configs/llama3-8b --backend cuda --random-weights --prefill 512 --prefill-reps 1
          --steps 64)
decode_figures() { grep -E '^decode ' "$1" | awk '{printf "%s %s %s  ", $2, $3, $4}'; }

phase_parity() {
  for t in "$B"/*cuda*_test "$B"/*cublas*_test "$B"/*nccl*_test "$B"/*all_reduce_ranks_test; do
    [ -x "$t" ] || continue
    local name; name=$(basename "$t")
    if timeout 300 "$t" --gtest_brief=1 > "$OUT/parity-$name.txt" 2>&1; then
      note "parity $name: ok ($(grep -c '^\[  SKIPPED' "$OUT/parity-$name.txt") skipped lines)"
    else
      note "parity $name: FAILED (see parity-$name.txt)"; fails=$((fails + 1))
      grep -E "Failure|FAILED|error" "$OUT/parity-$name.txt" | head -5
    fi
  done
}

start_coordinator() {  # $1 = workers; sets ADDR and CPID
  local log="$OUT/serve$SERVE_TAG-tp$1"
  "$L" coordinator --model "$SERVE_MODEL" --backend "${BACKEND:-cuda}" --local-workers "$1" \
    --listen 127.0.0.1:0 ${SERVE_ARGS:-} > "$log.out" 2> "$log.err" &
  CPID=$!
  ADDR=$(lorc_wait_listening "$log.out" "$CPID") || return 1
  for _ in $(seq 1 240); do "$L" client --server "$ADDR" --health >/dev/null 2>&1 && return 0; sleep 0.5; done
  return 1
}

# Diagnostic, not in the default phases: the disabled in-process TP = 2 test (two GPUs from one
# process; it hangs, see tests/worker/cuda_model_runner_test.cc), under a short timeout.
phase_inprocess() {
  if timeout 120 "$B/worker_cuda_model_runner_test" --gtest_also_run_disabled_tests \
       --gtest_filter='*DISABLED_CudaTwoRanks*' > "$OUT/inprocess.txt" 2>&1; then
    note "inprocess tp=2: passed"
  else
    note "inprocess tp=2: failed or hung (rc $?, inprocess.txt)"
  fi
}

phase_serve() {
  # The fixture has 4 query heads: at most TP = 4 (bigtp serves the 70B shape at 8).
  local tps="1"; [ "$GPUS" -ge 2 ] && tps="1 $(( GPUS < 4 ? GPUS : 4 ))"
  for tp in $tps; do
    if ! start_coordinator "$tp"; then
      note "serve$SERVE_TAG tp=$tp: coordinator did not become healthy (serve$SERVE_TAG-tp$tp.err)"; fails=$((fails + 1))
      kill $CPID 2>/dev/null; continue
    fi
    # Golden greedy tokens: the first 32 of each prompt against the CPU reference (fp32).
    python3 - "$L" "$ADDR" "$tp" "$SERVE_MODEL" "$SERVE_TAG" ${SERVE_ARGS:-} > "$OUT/serve$SERVE_TAG-tp$tp-golden.txt" 2>&1 <<'PY'
import json, os, subprocess, sys
lorc, addr, tp, model, tag = sys.argv[1:6]
engine_args = sys.argv[6:]  # the coordinator's extra flags (e.g. --kv-cache-dtype int8), for the reference too
golden = json.load(open("models/tiny-llama-a/golden_fp32.json"))
fixture = os.path.realpath(model) == os.path.realpath("models/tiny-llama-a")
def run_json(cmd):
    out = subprocess.run(cmd, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["output_ids"] if out.returncode == 0 else []
equal = 0
for i, g in enumerate(golden):
    ids = ",".join(map(str, g["prompt_ids"]))
    got = run_json([lorc, "client", "--server", addr, "--prompt-ids", ids, "--max-tokens", "32", "--json"]
                   + ([] if fixture else ["--ignore-eos"]))
    # The fixture's reference is its fp32 golden file; any other model's (a LoRC-compressed copy)
    # is the CPU backend's fp32 greedy output for the same model, computed here.
    want = g["greedy_48_ids"][:32] if fixture else run_json(
        [lorc, "generate", "--model", model, "--backend", "cpu", "--prompt-ids", ids, "--max-tokens", "32",
         "--ignore-eos", "--json"] + engine_args)[:32]
    k = next((j for j in range(32) if j >= len(got) or got[j] != want[j]), 32)
    equal += k == 32
    print(f"prompt {i}: {'equal for 32 tokens' if k == 32 else f'departs at token {k}'}")
print(f"tp={tp}{tag}: {equal} of {len(golden)} golden prompts equal the CPU reference for 32 tokens")
PY
    note "serve$SERVE_TAG tp=$tp: $(tail -1 "$OUT/serve$SERVE_TAG-tp$tp-golden.txt")"
    # 64 concurrent streaming clients (128 requests: decode batches of every size as they come and go).
    if timeout 600 "$L" bench --server "$ADDR" --requests 128 --concurrency 64 --prompt-len 100 \
         --max-tokens 64 > "$OUT/serve$SERVE_TAG-tp$tp-load.txt" 2>&1; then
      note "serve$SERVE_TAG tp=$tp: 64 concurrent clients, $(head -1 "$OUT/serve$SERVE_TAG-tp$tp-load.txt")"
    else
      note "serve$SERVE_TAG tp=$tp: load FAILED ($(head -2 "$OUT/serve$SERVE_TAG-tp$tp-load.txt" | tr '\n' ' '))"; fails=$((fails + 1))
    fi
    # 32 requests cancelled by their deadline mid-generation; then every block must be free.
    local pids=()
    for i in $(seq 1 32); do
      "$L" client --server "$ADDR" --prompt-ids "$((i + 3)),17,99,250,1000" --max-tokens 3000 \
        --ignore-eos --timeout-s 0.5 --json > /dev/null 2>&1 &
      pids+=($!)
    done
    local cancelled=0
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || cancelled=$((cancelled + 1)); done
    local free cap
    for _ in $(seq 1 20); do
      read -r free cap < <("$L" client --server "$ADDR" --info | python3 -c \
        "import json,sys; d=json.load(sys.stdin); print(d['kv_free_blocks'], d['kv_capacity_blocks'])")
      [ "$free" = "$cap" ] && break
      sleep 0.5
    done
    if [ "$free" = "$cap" ]; then note "serve$SERVE_TAG tp=$tp: $cancelled of 32 requests cancelled by their deadline, all $cap KV blocks free"
    else note "serve$SERVE_TAG tp=$tp: KV blocks NOT free after cancellations ($free of $cap)"; fails=$((fails + 1)); fi
    "$L" client --server "$ADDR" --info > "$OUT/serve$SERVE_TAG-tp$tp-info.json" 2>&1
    kill -INT $CPID 2>/dev/null; wait $CPID 2>/dev/null
  done
}

phase_ceilings() {
  local g
  [ -x "$B/gemm_bench" ] || { note "ceilings: no gemm_bench in the bundle"; return; }
  for g in $(seq 0 $((GPUS - 1))); do
    if CUDA_VISIBLE_DEVICES=$g timeout 120 "$B/gemm_bench" ceilings > "$OUT/ceilings-gpu$g.txt" 2>&1; then
      note "ceilings gpu $g: $(grep -E 'TB/s' "$OUT/ceilings-gpu$g.txt" | head -1)"
    else
      note "ceilings gpu $g: FAILED (see ceilings-gpu$g.txt)"; fails=$((fails + 1))
    fi
  done
}

phase_bench() {
  for k in cuda_kernels_bench gemm_bench attention_bench sampling_bench gemv_bench host_kv_bench; do
    [ -x "$B/$k" ] && CUDA_VISIBLE_DEVICES=0 timeout 300 "$B/$k" > "$OUT/bench-$k.txt" 2>&1 &&
      note "bench $k: done"
  done
  CUDA_VISIBLE_DEVICES=0 timeout 600 "$L" bench --model bench/configs/llama3-8b --backend cuda \
    --random-weights --steps "$STEPS" > "$OUT/bench-8b-tp1.txt" 2>&1 &&
    note "bench 8B tp=1: done" || { note "bench 8B tp=1: FAILED"; fails=$((fails + 1)); }
  if [ "$GPUS" -ge 2 ]; then
    [ -x "$B/allreduce_bench" ] && timeout 300 "$B/allreduce_bench" > "$OUT/bench-allreduce.txt" 2>&1 &&
      note "bench allreduce: done"
    for head in split replicated; do
      timeout 900 "$L" bench --model bench/configs/llama3-70b --backend cuda --random-weights \
        --local-workers 2 --lm-head $head --steps "$STEPS" > "$OUT/bench-70b-tp2-lmhead-$head.txt" 2>&1 &&
        note "bench 70B tp=2, LM head $head: done" ||
        { note "bench 70B tp=2, LM head $head: FAILED"; fails=$((fails + 1)); }
    done
    # The same without the custom all-reduce (NCCL for every all-reduce): its gain, A/B.
    timeout 900 "$L" bench --model bench/configs/llama3-70b --backend cuda --random-weights \
      --local-workers 2 --disable-custom-all-reduce --steps "$STEPS" > "$OUT/bench-70b-tp2-nccl-only.txt" 2>&1 &&
      note "bench 70B tp=2, NCCL only: done" || { note "bench 70B tp=2, NCCL only: FAILED"; fails=$((fails + 1)); }
    # One rank's compute alone on one GPU (no all-reduce): the all-reduces' share is the difference.
    CUDA_VISIBLE_DEVICES=0 timeout 900 "$L" bench --model bench/configs/llama3-70b-tp2-rank --backend cuda \
      --random-weights --steps "$STEPS" > "$OUT/bench-70b-tp2-rank.txt" 2>&1 &&
      note "bench one rank of 70B tp=2 alone: $(decode_figures "$OUT/bench-70b-tp2-rank.txt")" ||
      { note "bench one rank of 70B tp=2 alone: FAILED"; fails=$((fails + 1)); }
  fi
}

phase_peer() {
  CUDA_VISIBLE_DEVICES=0 timeout 900 python3 bench/hf_peer.py --model bench/configs/llama3-8b \
    --ours "$OUT/bench-8b-tp1.txt" > "$OUT/peer-8b.txt" 2>&1 && note "peer 8B: done" || note "peer 8B: FAILED"
  if [ "$GPUS" -ge 2 ]; then
    timeout 1200 python3 bench/hf_peer.py --model bench/configs/llama3-70b --devices 2 \
      > "$OUT/peer-70b.txt" 2>&1 && note "peer 70B (2 GPUs): done" || note "peer 70B: FAILED"
  fi
}

# Not in the default phases: an A/B of decode settings given as environment assignments.
# AB_SETTINGS: ';'-separated settings, each a space-separated list of VAR=value (e.g.
# "LORC_DECODE_SPLIT=3,64;LORC_DECODE_SPLIT=3,64,128", or the LORC_FUSED_NORM_ROWS pair above).
# First the golden-prompt test of the model runner under each setting (greedy equal to the CPU
# reference), then, AB_RUNS rounds (default 2), every setting in turn: `lorcserve bench` on the 8B
# shape at AB_BATCHES (1,8,64) x AB_CONTEXTS (128,4096), prefill 512; with 2+ GPUs also the 70B
# shape at TP = 2 (batch 1 and 8 x 128).
phase_ab() {
  local settings s i r
  IFS=';' read -ra settings <<< "${AB_SETTINGS:?phase ab needs AB_SETTINGS}"
  i=0
  for s in "${settings[@]}"; do
    i=$((i + 1))
    if env $s timeout 300 "$B/worker_cuda_model_runner_test" --gtest_filter='*Greedy*' \
         > "$OUT/ab-s$i-runner.txt" 2>&1; then
      note "ab [$s] runner test: ok"
    else
      note "ab [$s] runner test: FAILED (see ab-s$i-runner.txt)"; fails=$((fails + 1))
    fi
  done
  for r in $(seq 1 "${AB_RUNS:-2}"); do
    i=0
    for s in "${settings[@]}"; do
      i=$((i + 1))
      env $s CUDA_VISIBLE_DEVICES=0 timeout 300 "$L" "${BENCH_8B[@]}" --decode-batches "${AB_BATCHES:-1,8,64}" \
        --contexts "${AB_CONTEXTS:-128,4096}" > "$OUT/ab-s$i-run$r.txt" 2>&1 &&
        note "ab [$s] run $r: $(decode_figures "$OUT/ab-s$i-run$r.txt")" ||
        { note "ab [$s] run $r: FAILED"; fails=$((fails + 1)); }
      [ "$GPUS" -ge 2 ] || continue
      env $s timeout 900 "$L" bench --model bench/configs/llama3-70b --backend cuda --random-weights \
        --local-workers 2 --decode-batches 1,8 --contexts 128 --prefill 512 --prefill-reps 1 --steps 32 \
        > "$OUT/ab-70b-s$i-run$r.txt" 2>&1 &&
        note "ab 70B tp=2 [$s] run $r: $(decode_figures "$OUT/ab-70b-s$i-run$r.txt")" ||
        { note "ab 70B tp=2 [$s] run $r: FAILED"; fails=$((fails + 1)); }
    done
  done
}

# Not in the default phases: issues #12 / #13 on a machine of 4 or 8 GPUs (see the header).
phase_bigtp() {
  local tp model=${BIGTP_MODEL:-bench/configs/llama3-70b} ref=${BIGTP_REF:-2} rank_model
  if [ "$GPUS" -lt 4 ]; then note "bigtp: needs 4 or more GPUs (found $GPUS)"; fails=$((fails + 1)); return; fi
  for tp in "$ref" "$GPUS"; do
    timeout 1500 "$L" bench --model "$model" --backend "${BACKEND:-cuda}" --random-weights --local-workers "$tp" \
      --steps "$STEPS" ${BIGTP_BENCH_ARGS:-} > "$OUT/bigtp-bench-tp$tp.txt" 2>&1 &&
      note "bigtp bench tp=$tp: $(decode_figures "$OUT/bigtp-bench-tp$tp.txt")" ||
      { note "bigtp bench tp=$tp: FAILED (bigtp-bench-tp$tp.txt)"; fails=$((fails + 1)); }
  done
  # NCCL for every all-reduce (the custom all-reduce's gain at this size), small batches.
  timeout 900 "$L" bench --model "$model" --backend "${BACKEND:-cuda}" --random-weights --local-workers "$GPUS" \
    --disable-custom-all-reduce --decode-batches 1,8 --contexts 128 --prefill 512 --prefill-reps 1 --steps "$STEPS" \
    > "$OUT/bigtp-bench-tp$GPUS-nccl-only.txt" 2>&1 &&
    note "bigtp bench tp=$GPUS, NCCL only: $(decode_figures "$OUT/bigtp-bench-tp$GPUS-nccl-only.txt")" ||
    { note "bigtp bench tp=$GPUS, NCCL only: FAILED"; fails=$((fails + 1)); }
  # One rank's compute alone on one GPU (no all-reduce): the all-reduces' share is the difference.
  rank_model="$model-tp$GPUS-rank"
  if [ -f "$rank_model/config.json" ]; then
    CUDA_VISIBLE_DEVICES=0 timeout 900 "$L" bench --model "$rank_model" --backend "${BACKEND:-cuda}" --random-weights \
      --steps "$STEPS" ${BIGTP_BENCH_ARGS:-} > "$OUT/bigtp-bench-rank$GPUS.txt" 2>&1 &&
      note "bigtp one rank of tp=$GPUS alone: $(decode_figures "$OUT/bigtp-bench-rank$GPUS.txt")" ||
      { note "bigtp one rank alone: FAILED"; fails=$((fails + 1)); }
  fi
  # Served at TP = ref and TP = GPUS: four prompts' greedy tokens and log-probabilities (compared
  # below), and at TP = GPUS 64 concurrent streaming clients.
  for tp in "$ref" "$GPUS"; do
    if ! SERVE_MODEL=$model SERVE_TAG=-bigtp SERVE_ARGS="--random-weights" start_coordinator "$tp"; then
      note "bigtp serve tp=$tp: coordinator did not become healthy (serve-bigtp-tp$tp.err)"; fails=$((fails + 1))
      kill $CPID 2>/dev/null; continue
    fi
    local i
    for i in 0 1 2 3; do
      "$L" client --server "$ADDR" --prompt-ids "$(python3 -c "import random; r = random.Random($i); print(','.join(str(r.randrange(3, 4000)) for _ in range(40 + 20 * $i)))")" \
        --max-tokens 16 --ignore-eos --logprobs 5 --json > "$OUT/bigtp-tp$tp-prompt$i.json" 2>&1
    done
    if [ "$tp" = "$GPUS" ]; then
      timeout 600 "$L" bench --server "$ADDR" --requests 128 --concurrency 64 --prompt-len 128 --max-tokens 64 \
        > "$OUT/bigtp-serve-tp$tp-load.txt" 2>&1 &&
        note "bigtp serve tp=$tp: 64 concurrent clients, $(head -1 "$OUT/bigtp-serve-tp$tp-load.txt")" ||
        { note "bigtp serve tp=$tp: load FAILED"; fails=$((fails + 1)); }
    fi
    kill -INT $CPID 2>/dev/null; wait $CPID 2>/dev/null
  done
  # Greedy tokens equal; log-probabilities within 0.05 (bf16 activations, sums in another order).
  if python3 - "$OUT" "$ref" "$GPUS" > "$OUT/bigtp-compare.txt" 2>&1 <<'PY'
import json, sys
out, ref, n = sys.argv[1], sys.argv[2], sys.argv[3]
bad = 0
for i in range(4):
    try:
        a = json.loads(open(f"{out}/bigtp-tp{ref}-prompt{i}.json").read().strip().splitlines()[-1])
        b = json.loads(open(f"{out}/bigtp-tp{n}-prompt{i}.json").read().strip().splitlines()[-1])
    except Exception as e:
        print(f"prompt {i}: no result ({e})"); bad += 1; continue
    same = a["output_ids"] == b["output_ids"]
    diff = max(abs(x["logprob"] - y["logprob"]) for x, y in zip(a["logprobs"], b["logprobs"]))
    print(f"prompt {i}: tokens {'equal' if same else 'DIFFER'}, max |logprob diff| {diff:.4f}")
    bad += (not same) or diff > 0.05
print(f"tp={ref} against tp={n}: {4 - bad} of 4 prompts agree")
sys.exit(1 if bad else 0)
PY
  then note "bigtp: $(tail -1 "$OUT/bigtp-compare.txt")"
  else note "bigtp: $(tail -1 "$OUT/bigtp-compare.txt") (bigtp-compare.txt)"; fails=$((fails + 1)); fi
}

# Not in the default phases: the 8B shape served through worker processes against the same shape
# in-process (see the header).
phase_servebench() {
  local c r cs=${SERVEBENCH_CONCURRENCY:-1,8} model=${SERVEBENCH_MODEL:-bench/configs/llama3-8b}
  for r in $(seq 1 "${SERVEBENCH_RUNS:-1}"); do
    CUDA_VISIBLE_DEVICES=0 timeout 300 "$L" bench --model "$model" --backend "${BACKEND:-cuda}" --random-weights \
      --prefill 512 --prefill-reps 1 --steps 64 --decode-batches "$cs" --contexts 128 \
      > "$OUT/servebench-inprocess-run$r.txt" 2>&1 &&
      note "servebench in-process run $r: $(decode_figures "$OUT/servebench-inprocess-run$r.txt")" ||
      { note "servebench in-process run $r: FAILED"; fails=$((fails + 1)); }
  done
  CUDA_VISIBLE_DEVICES=0 SERVE_MODEL=$model SERVE_TAG=-bench SERVE_ARGS="--random-weights ${SERVEBENCH_ARGS:-}" \
    start_coordinator 1 || { note "servebench: coordinator did not become healthy"; fails=$((fails + 1)); kill $CPID 2>/dev/null; return; }
  for r in $(seq 1 "${SERVEBENCH_RUNS:-1}"); do
    for c in ${cs//,/ }; do
      # c clients, 2c requests of a 128-token prompt and 160 tokens each (ITL over steady decoding).
      if timeout 300 "$L" bench --server "$ADDR" --requests $((2 * c)) --concurrency "$c" --prompt-len 128 \
           --max-tokens 160 > "$OUT/servebench-c$c-run$r.txt" 2>&1; then
        note "servebench c=$c run $r: $(sed -n 4p "$OUT/servebench-c$c-run$r.txt") | $(sed -n 5p "$OUT/servebench-c$c-run$r.txt")"
      else
        note "servebench c=$c run $r: FAILED ($(head -2 "$OUT/servebench-c$c-run$r.txt" | tr '\n' ' '))"; fails=$((fails + 1))
      fi
    done
  done
  kill -INT $CPID 2>/dev/null; wait $CPID 2>/dev/null
}

# Not in the default phases: an earlier binary against this one on the same GPU (see the header).
phase_versus() {
  local r v bin
  if [ ! -x "$B/lorcserve-old" ]; then note "versus: lorcserve-old not in the bundle (PACK_OLD)"; fails=$((fails + 1)); return; fi
  for r in $(seq 1 "${VERSUS_RUNS:-3}"); do
    for v in old new; do
      bin=$L; [ $v = old ] && bin=$B/lorcserve-old
      if CUDA_VISIBLE_DEVICES=0 timeout 300 "$bin" "${BENCH_8B[@]}" --decode-batches "${VERSUS_BATCHES:-1,8,64}" \
           --contexts "${VERSUS_CONTEXTS:-128,4096}" > "$OUT/versus-$v-run$r.txt" 2>&1; then
        note "versus $v run $r: $(decode_figures "$OUT/versus-$v-run$r.txt")"
      else
        note "versus $v run $r: FAILED (versus-$v-run$r.txt)"; fails=$((fails + 1))
      fi
    done
  done
}

# Not in the default phases: kernel timelines of the 8B decode (see the header).
phase_trace() {
  local settings s i b c tag
  if [ ! -f "$B/libkernel_trace.so" ]; then note "trace: libkernel_trace.so not in the bundle"; fails=$((fails + 1)); return; fi
  IFS=';' read -ra settings <<< "${TRACE_SETTINGS:-LORC_TRACE_SETTING=default}"
  i=0
  for s in "${settings[@]}"; do
    i=$((i + 1))
    for b in ${TRACE_BATCHES:-1}; do
      for c in ${TRACE_CONTEXTS:-128}; do
        tag="s$i-b${b}x$c"
        local args=("${BENCH_8B[@]}" --decode-batches "$b" --contexts "$c")
        rm -f "/tmp/trace-$tag.csv"
        if ! env $s CUDA_VISIBLE_DEVICES=0 timeout 300 "$L" "${args[@]}" > "$OUT/trace-$tag-plain.txt" 2>&1 ||
           ! env $s CUDA_VISIBLE_DEVICES=0 CUDA_INJECTION64_PATH="$B/libkernel_trace.so" \
               LORC_KERNEL_TRACE="/tmp/trace-$tag.csv" timeout 300 "$L" "${args[@]}" > "$OUT/trace-$tag-traced.txt" 2>&1 ||
           ! python3 bench/kernel_trace.py "/tmp/trace-$tag.csv" --json "$OUT/trace-$tag.json" \
               > "$OUT/trace-$tag.table.txt" 2>&1; then
          note "trace [$s] b=$b ctx=$c: FAILED (trace-$tag-*.txt)"; fails=$((fails + 1)); continue
        fi
        gzip -c "/tmp/trace-$tag.csv" > "$OUT/trace-$tag.csv.gz"
        note "trace [$s] b=$b ctx=$c: plain $(grep -E '^decode ' "$OUT/trace-$tag-plain.txt" | awk '{print $4}' | head -1) ms, traced $(grep -E '^decode ' "$OUT/trace-$tag-traced.txt" | awk '{print $4}' | head -1) ms, $(head -1 "$OUT/trace-$tag.table.txt")"
      done
    done
  done
}

phase_lorc() {
  local sw=/tmp/lorc-sweep cfg=scripts/lorc/configs.txt t=${LORC_TIMEOUT:-540}
  mkdir -p "$sw"
  # Results of an earlier (interrupted) run carried in .gpu/lorc-sweep are kept: the sweep resumes.
  [ -d .gpu/lorc-sweep ] && cp -n .gpu/lorc-sweep/*.json "$sw"/ 2>/dev/null
  grep -E '^[^#]' "$cfg" > /tmp/lorc-gpu.txt
  if [ -n "${LORC_EXCLUDE:-}" ]; then  # config names to leave out (e.g. ^maxppl, run elsewhere)
    grep -vE -- "$LORC_EXCLUDE" /tmp/lorc-gpu.txt > /tmp/lorc-gpu.txt.x; mv /tmp/lorc-gpu.txt.x /tmp/lorc-gpu.txt
  fi
  local only=()
  [ -n "${LORC_ONLY:-}" ] && only=(--only "$LORC_ONLY")
  timeout "$t" bash scripts/lorc/sweep.sh --lorcserve "$L" --model models/tiny-llama-a --out "$sw" \
    --configs /tmp/lorc-gpu.txt -j "${LORC_JOBS_GPU:-4}" --threads "${LORC_THREADS_GPU:-1}" --share-compressed --eval-args "--backend cuda --num-blocks 4096" \
    "${only[@]}" > "$OUT/lorc-gpu.txt" 2>&1
  local gpu_rc=$?
  tar czf "$OUT/lorc-sweep.tar.gz" -C "$sw" --exclude ./models .  # results and logs, not models
  python3 scripts/lorc/report.py "$sw" --md "$OUT/lorc-table.md" --no-gnuplot > /dev/null 2>&1
  note "lorc sweep: gpu rc $gpu_rc, $(ls "$sw"/*.json 2>/dev/null | wc -l) results, $(ls "$sw"/*.failed 2>/dev/null | wc -l) failed"
  [ "$gpu_rc" -eq 0 ] || fails=$((fails + 1))
}

# Not in the default phases: a LoRC-compressed copy of the fixture (whitened SVD, uniform rank, half
# the KV bytes; compressed here on the CPU) served like the fixture in phase serve at TP = 1 and 2,
# greedy tokens against the CPU backend's on the same compressed model; then once per KV dtype in
# LORC_SERVE_DTYPES (e.g. "int8 fp8").
phase_lorcserve() {
  local m=/tmp/lorc-serve-model
  if [ ! -f "$m/lorc.json" ] && ! timeout 400 "$L" compress --model models/tiny-llama-a --out "$m" \
       --kv-ratio 0.5 --schedule uniform --whiten --threads "$(nproc)" > "$OUT/lorcserve-compress.txt" 2>&1; then
    note "lorcserve: compress FAILED (lorcserve-compress.txt)"; fails=$((fails + 1)); return
  fi
  SERVE_MODEL=$m SERVE_TAG=-lorc phase_serve
  for dtype in ${LORC_SERVE_DTYPES:-}; do
    SERVE_MODEL=$m SERVE_TAG=-lorc-$dtype SERVE_ARGS="--kv-cache-dtype $dtype" phase_serve
  done
}

# Not in the default phases: prefix caching on one GPU (issue #10): time to first token of a
# 2,000-token shared prefix + 50-token question, the first request against later ones, on the
# fixture and on the Llama-3-8B shape (random weights), and the 10-turn chat's computed prompt tokens.
phase_prefix() {
  local m name
  for m in models/tiny-llama-a bench/configs/llama3-8b; do
    name=$(basename "$m")
    local rw=(); [ "$m" = bench/configs/llama3-8b ] && rw=(--random-weights)
    CUDA_VISIBLE_DEVICES=0 timeout 300 "$L" bench --model "$m" --backend cuda "${rw[@]}" --shared-prefix 2000 \
      --question 50 --prefix-reps 5 > "$OUT/prefix-ttft-$name.txt" 2>&1 &&
      note "prefix ttft $name: $(grep -o '"speedup[^,]*' "$OUT/prefix-ttft-$name.txt" | head -1)" ||
      { note "prefix ttft $name: FAILED"; fails=$((fails + 1)); }
  done
  CUDA_VISIBLE_DEVICES=0 timeout 300 "$L" bench --model models/tiny-llama-a --backend cuda --shared-prefix 500 \
    --question 50 --chat-turns 10 > "$OUT/prefix-chat.txt" 2>&1 && note "prefix chat: done" ||
    { note "prefix chat: FAILED"; fails=$((fails + 1)); }
}

# Not in the default phases: token-level KV policies on one GPU (issue #17), the measurements of
# docs/PERFORMANCE.md "Tensor-core policy decode" and docs/KV_POLICIES.md "On the GPU".
phase_kvpolicy() {
  CUDA_VISIBLE_DEVICES=0 timeout 400 "$B/attention_bench" --kv-policy > "$OUT/kvpolicy-attention.txt" 2>&1 &&
    note "kvpolicy attention_bench: done" || { note "kvpolicy attention_bench: FAILED"; fails=$((fails + 1)); }
  CUDA_VISIBLE_DEVICES=0 timeout 400 "$B/attention_bench" --kv-policy --kv-cache-dtype fp8 \
    > "$OUT/kvpolicy-attention-fp8.txt" 2>&1 &&
    note "kvpolicy attention_bench fp8: done" || { note "kvpolicy attention_bench fp8: FAILED"; fails=$((fails + 1)); }
  # Over an fp8 cache at the memory of 4,160 bf16 blocks (docs/KV_POLICIES.md "Over a quantized cache").
  CUDA_VISIBLE_DEVICES=0 timeout 900 bash scripts/kvpolicy/capacity.sh --lorcserve "$L" \
    --model bench/configs/llama3.1-8b --extra "--backend cuda --random-weights --kv-cache-dtype fp8" \
    --policies "full corm-30 mikv-int4-30" --start-wait 200 --num-blocks 8192 --requests 16 \
    --concurrency 16 --prompt-len 16384 --max-tokens 512 > "$OUT/kvpolicy-capacity-fp8-16384.jsonl" \
    2> "$OUT/kvpolicy-capacity-fp8-16384.err" && [ "$(wc -l < "$OUT/kvpolicy-capacity-fp8-16384.jsonl")" -eq 3 ] &&
    note "kvpolicy capacity fp8 16384: done" || { note "kvpolicy capacity fp8 16384: FAILED"; fails=$((fails + 1)); }
  # CORM over LoRC latents (ranks 64/64): per layer, then served at the memory of 4,160 bf16 blocks
  # (8,320 bf16 latent blocks, 16,136 fp8; docs/KV_POLICIES.md "Over LoRC latents on the GPU").
  local dt lblocks
  for dt in bf16 fp8; do
    CUDA_VISIBLE_DEVICES=0 timeout 400 "$B/attention_bench" --kv-policy --lorc --kv-cache-dtype "$dt" \
      > "$OUT/kvpolicy-attention-lorc-$dt.txt" 2>&1 &&
      note "kvpolicy attention_bench lorc $dt: done" || { note "kvpolicy attention_bench lorc $dt: FAILED"; fails=$((fails + 1)); }
    if [ "$dt" = bf16 ]; then lblocks=8320; else lblocks=16136; fi
    CUDA_VISIBLE_DEVICES=0 timeout 900 bash scripts/kvpolicy/capacity.sh --lorcserve "$L" \
      --model bench/configs/llama3.1-8b-lorc50 --extra "--backend cuda --random-weights --kv-cache-dtype $dt" \
      --policies "full corm-30" --start-wait 200 --num-blocks "$lblocks" --requests 16 \
      --concurrency 16 --prompt-len 16384 --max-tokens 512 > "$OUT/kvpolicy-capacity-lorc-$dt-16384.jsonl" \
      2> "$OUT/kvpolicy-capacity-lorc-$dt-16384.err" && [ "$(wc -l < "$OUT/kvpolicy-capacity-lorc-$dt-16384.jsonl")" -eq 2 ] &&
      note "kvpolicy capacity lorc $dt 16384: done" || { note "kvpolicy capacity lorc $dt 16384: FAILED"; fails=$((fails + 1)); }
  done
  local ctx blocks n
  for ctx in 16384 32768; do
    if [ "$ctx" = 16384 ]; then blocks=4160 n=12; else blocks=8448 n=8; fi
    CUDA_VISIBLE_DEVICES=0 timeout 900 bash scripts/kvpolicy/capacity.sh --lorcserve "$L" \
      --model bench/configs/llama3.1-8b --extra "--backend cuda --random-weights" \
      --policies "full corm-30 mikv-int4-30" --start-wait 200 --num-blocks "$blocks" --requests "$n" \
      --concurrency "$n" --prompt-len "$ctx" --max-tokens 1024 > "$OUT/kvpolicy-capacity-$ctx.jsonl" \
      2> "$OUT/kvpolicy-capacity-$ctx.err" && [ "$(wc -l < "$OUT/kvpolicy-capacity-$ctx.jsonl")" -eq 3 ] &&
      note "kvpolicy capacity $ctx: done" || { note "kvpolicy capacity $ctx: FAILED"; fails=$((fails + 1)); }
  done
}

for p in $PHASES; do "phase_$p"; done
note "== $fails failed checks"
[ "$fails" -eq 0 ]
