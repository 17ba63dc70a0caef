#!/usr/bin/env bash
# Serving benchmark on loopback: for each (TP, step transport) it starts a coordinator with
# local CPU workers on the small model, runs `lorcserve bench`, and prints one JSON line per
# configuration plus a table. The "step us" columns are the coordinator's per-step overhead:
# plan (schedule), RPC round trip minus the worker's compute, and applying the results.
#
#   bench/serve_loopback.sh [MODEL_DIR]     (env: TPS="1 2", TRANSPORTS="stream unary",
#                                             REQUESTS, CONCURRENCY, PROMPT_LEN, MAX_TOKENS,
#                                             COORD_FLAGS: extra coordinator flags, e.g.
#                                             "--random-weights" with a tiny config.json to
#                                             isolate the per-step overhead)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/coordinator.sh
MODEL=${1:-models/tiny-llama-a}
BIN=${BIN:-build/bin/lorcserve}
TPS=${TPS:-"1 2"}
TRANSPORTS=${TRANSPORTS:-"stream unary"}
REQUESTS=${REQUESTS:-32}
CONCURRENCY=${CONCURRENCY:-8}
PROMPT_LEN=${PROMPT_LEN:-64}
MAX_TOKENS=${MAX_TOKENS:-32}
OUT=${OUT_FILE:-/dev/null}

results=()
for tp in $TPS; do
  for transport in $TRANSPORTS; do
    log=$(mktemp)
    "$BIN" coordinator --model "$MODEL" --listen 127.0.0.1:0 --local-workers "$tp" ${COORD_FLAGS:-} \
      --step-transport "$transport" >"$log.out" 2>"$log" &
    pid=$!
    addr=$(lorc_wait_listening "$log.out" "$pid" || true)
    if [ -z "$addr" ]; then cat "$log" >&2; kill "$pid" 2>/dev/null; exit 1; fi
    json=$("$BIN" bench --server "$addr" --requests "$REQUESTS" --concurrency "$CONCURRENCY" \
             --prompt-len "$PROMPT_LEN" --max-tokens "$MAX_TOKENS" --json)
    kill "$pid"; wait "$pid" 2>/dev/null || true
    echo "$json" | tee -a "$OUT"
    results+=("$json")
    rm -f "$log" "$log.out"
  done
done

python3 - "${results[@]}" <<'PY'
import json, sys
rows = [json.loads(a) for a in sys.argv[1:]]
print(f"{'TP':>3} {'transport':>9} {'out tok/s':>10} {'TTFT p50':>9} {'ITL p50':>8} {'steps':>6} "
      f"{'sched us':>9} {'rpc us':>8} {'apply us':>9} {'compute us':>11} {'idle us':>8} {'idle %':>7}")
for r in rows:
    c, s = r["config"], r["steps"]
    print(f"{c['tp']:>3} {c['transport']:>9} {r['output_tokens_per_s']:>10.1f} {r['ttft_ms']['p50']:>9.1f} "
          f"{r['itl_ms']['p50']:>8.2f} {s['count']:>6} {s['schedule_us']:>9.1f} {s['rpc_us']:>8.1f} "
          f"{s['apply_us']:>9.1f} {s['worker_compute_us']:>11.1f} {s['worker_idle_us']:>8.1f} "
          f"{100 * s['worker_idle_us'] / max(1e-9, s['worker_idle_us'] + s['worker_compute_us']):>7.1f}")
PY
