#!/usr/bin/env bash
# Serving overhead of two lorcserve binaries side by side (e.g. before and after a change to the
# step protocol), on loopback with local CPU workers: for each binary, TP degree and concurrency
# it starts a coordinator, runs `lorcserve bench` (with that binary's client), and prints one
# JSON line per run and a table of medians over REPEATS runs.
#
#   bench/compare_serving.sh NAME_A BIN_A NAME_B BIN_B [MODEL_DIR]
#   env: TPS="1 2", CONCURRENCIES="1 8", REPEATS=3, REQUESTS=8, PROMPT_LEN=64, MAX_TOKENS=64,
#        COORD_FLAGS (e.g. "--random-weights" with bench/configs/overhead-tiny)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/coordinator.sh
name_a=$1 bin_a=$2 name_b=$3 bin_b=$4
MODEL=${5:-models/tiny-llama-a}
TPS=${TPS:-"1 2"}
CONCURRENCIES=${CONCURRENCIES:-"1 8"}
REPEATS=${REPEATS:-3}
REQUESTS=${REQUESTS:-8}
PROMPT_LEN=${PROMPT_LEN:-64}
MAX_TOKENS=${MAX_TOKENS:-64}

lines=()
for tp in $TPS; do
  for c in $CONCURRENCIES; do
    for rep in $(seq 1 "$REPEATS"); do
      for which in a b; do
        if [ $which = a ]; then name=$name_a bin=$bin_a; else name=$name_b bin=$bin_b; fi
        log=$(mktemp)
        "$bin" coordinator --model "$MODEL" --listen 127.0.0.1:0 --local-workers "$tp" \
          ${COORD_FLAGS:-} >"$log.out" 2>"$log" &
        pid=$!
        addr=$(lorc_wait_listening "$log.out" "$pid" || true)
        if [ -z "$addr" ]; then cat "$log" >&2; kill "$pid" 2>/dev/null; exit 1; fi
        json=$("$bin" bench --server "$addr" --requests "$REQUESTS" --concurrency "$c" \
                 --prompt-len "$PROMPT_LEN" --max-tokens "$MAX_TOKENS" --json | tail -1)
        kill "$pid"; wait "$pid" 2>/dev/null || true
        rm -f "$log" "$log.out"
        line="{\"name\":\"$name\",\"tp\":$tp,\"concurrency\":$c,\"bench\":$json}"
        echo "$line"
        lines+=("$line")
      done
    done
  done
done

python3 - "${lines[@]}" <<'PY'
import json, statistics, sys
rows = [json.loads(a) for a in sys.argv[1:]]
groups = {}
for r in rows:
    groups.setdefault((r["tp"], r["concurrency"], r["name"]), []).append(r["bench"])
def med(bs, f):
    vals = [f(b) for b in bs]
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else float("nan")
print(f"{'TP':>3} {'conc':>4} {'binary':>10} {'out tok/s':>10} {'ITL p50 ms':>10} {'sched us':>9} "
      f"{'rpc us':>8} {'apply us':>9} {'compute us':>11} {'idle us':>8} {'idle %':>7}")
for (tp, c, name), bs in sorted(groups.items()):
    s = lambda k: (lambda b: b["steps"].get(k))
    idle = med(bs, s("worker_idle_us"))
    comp = med(bs, s("worker_compute_us"))
    pct = 100 * idle / (idle + comp) if idle == idle else float("nan")
    print(f"{tp:>3} {c:>4} {name:>10} {med(bs, lambda b: b['output_tokens_per_s']):>10.1f} "
          f"{med(bs, lambda b: b['itl_ms']['p50']):>10.2f} {med(bs, s('schedule_us')):>9.1f} "
          f"{med(bs, s('rpc_us')):>8.1f} {med(bs, s('apply_us')):>9.1f} {comp:>11.1f} "
          f"{idle:>8.1f} {pct:>7.1f}")
PY
