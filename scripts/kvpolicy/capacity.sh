#!/usr/bin/env bash
# Concurrent sequences at a fixed KV memory with and without a token-level KV policy (issue #17;
# kvpolicy/README.md "Compaction"): for each policy a `lorcserve coordinator` with a small cache
# (--num-blocks), driven by `lorcserve bench --server` (random prompts, EOS ignored); its
# Prometheus endpoint is sampled every 0.2 s for the running sequences and KV blocks in use, and
# read at the end for preemptions and compactions. One JSON line per policy on stdout:
#   {"policy", "bench": {...lorcserve bench --json...}, "max_running", "max_blocks_used",
#    "max_policy_positions", "policy_positions_capacity" (device-resident policy states),
#    "preemptions", "kv_compactions", "kv_compaction_freed_blocks"}
#   scripts/kvpolicy/capacity.sh --lorcserve build/bin/lorcserve --model models/tiny-llama-a \
#       [--num-blocks 64] [--requests 32] [--concurrency 16] [--prompt-len 64] [--max-tokens 192]
#       [--workers 1] [--extra "ARGS"] [--policies "full corm-30 mikv-int4-30 corm-free"]
#       [--start-wait SECONDS (30)]
# On the GPU (docs/KV_POLICIES.md "On the GPU"): --model bench/configs/llama3.1-8b --extra
# "--backend cuda --random-weights" --policies "full corm-30" --start-wait 300.
set -uo pipefail
bin="" model="" blocks=64 requests=32 conc=16 plen=64 mtok=192 workers=1 extra="" start_wait=30
policies="full corm-30 mikv-int4-30 corm-free"
usage() { echo "capacity.sh: $1 (see the header for the options)" >&2; exit 2; }
need() { [[ $# -ge 2 && ( -n "$2" || "$1" == --extra ) ]] || usage "$1 needs a value"; }
while (($#)); do
  [[ "$1" == --* ]] && need "$@"
  case "$1" in
    --lorcserve) bin="${2:?}"; shift 2 ;;
    --model) model="${2:?}"; shift 2 ;;
    --num-blocks) blocks="${2:?}"; shift 2 ;;
    --requests) requests="${2:?}"; shift 2 ;;
    --concurrency) conc="${2:?}"; shift 2 ;;
    --prompt-len) plen="${2:?}"; shift 2 ;;
    --max-tokens) mtok="${2:?}"; shift 2 ;;
    --workers) workers="${2:?}"; shift 2 ;;
    --extra) extra="${2?}"; shift 2 ;;
    --policies) policies="${2:?}"; shift 2 ;;
    --start-wait) start_wait="${2:?}"; shift 2 ;;
    *) echo "capacity.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
[[ -n "$bin" && -n "$model" ]] || usage "needs --lorcserve and --model"
[[ "$start_wait" =~ ^[1-9][0-9]*$ ]] || usage "--start-wait: '$start_wait' is not a whole number of seconds >= 1"
for p in $policies; do
  case "$p" in full|corm-30|mikv-int4-30|corm-free) ;; *) usage "unknown policy $p (full, corm-30, mikv-int4-30, corm-free)" ;; esac
done
tmp="$(mktemp -d)"
trap 'kill $(jobs -p) 2>/dev/null; rm -rf "$tmp"' EXIT

metric() {  # metric NAME FILE: the sample's value (0 when absent)
  awk -v n="$1" '$1 == n { v = $2 } END { print (v == "" ? 0 : v) }' "$2"
}

run() {  # run NAME FLAGS...
  local name="$1"; shift
  local log="$tmp/$name.log"
  # shellcheck disable=SC2086
  "$bin" coordinator --model "$model" --listen 127.0.0.1:0 --local-workers "$workers" \
    --num-blocks "$blocks" --metrics-port 0 --threads 1 $extra "$@" >"$tmp/$name.out" 2>"$log" &
  local pid=$!
  local addr="" mport=""
  for _ in $(seq 1 $((start_wait * 10))); do
    addr="$(sed -n 's/^LISTENING //p' "$tmp/$name.out" | head -1)"
    mport="$(sed -n 's/^METRICS_LISTENING .*:\([0-9]*\)$/\1/p' "$tmp/$name.out" | head -1)"
    [[ -n "$addr" && -n "$mport" ]] && break
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  if [[ -z "$addr" || -z "$mport" ]]; then
    echo "capacity.sh: $name: the coordinator did not start:" >&2; cat "$log" >&2; kill "$pid" 2>/dev/null; return 1
  fi
  local max_running=0 max_used=0 max_positions=0
  ( while kill -0 "$pid" 2>/dev/null; do
      curl -s "http://127.0.0.1:$mport/metrics" >"$tmp/$name.sample" 2>/dev/null &&
        echo "$(metric lorcserve_num_sequences_running "$tmp/$name.sample") $(metric lorcserve_kv_blocks_used "$tmp/$name.sample") $(metric lorcserve_kv_policy_positions_used "$tmp/$name.sample")"
      sleep 0.2
    done ) >"$tmp/$name.samples" &
  local sampler=$!
  "$bin" bench --server "$addr" --requests "$requests" --concurrency "$conc" --prompt-len "$plen" \
    --max-tokens "$mtok" --json >"$tmp/$name.bench" 2>>"$log"
  local rc=$?
  sleep 0.5
  curl -s "http://127.0.0.1:$mport/metrics" >"$tmp/$name.final"
  kill "$sampler" 2>/dev/null
  kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null
  if [[ $rc -ne 0 ]]; then echo "capacity.sh: $name: bench failed:" >&2; tail -20 "$log" >&2; return 1; fi
  read -r max_running max_used max_positions < <(awk '{ if ($1 > r) r = $1; if ($2 > u) u = $2; if ($3 > p) p = $3 } END { print r + 0, u + 0, p + 0 }' "$tmp/$name.samples")
  printf '{"policy": "%s", "num_blocks": %s, "max_running": %s, "max_blocks_used": %s, "max_policy_positions": %s, "policy_positions_capacity": %s, "preemptions": %s, "kv_compactions": %s, "kv_compaction_freed_blocks": %s, "bench": %s}\n' \
    "$name" "$blocks" "$max_running" "$max_used" "$max_positions" \
    "$(metric lorcserve_kv_policy_positions_capacity "$tmp/$name.final")" \
    "$(metric lorcserve_preemptions_total "$tmp/$name.final")" \
    "$(metric lorcserve_kv_compactions_total "$tmp/$name.final")" \
    "$(metric lorcserve_kv_compaction_freed_blocks_total "$tmp/$name.final")" \
    "$(tr -d '\n' <"$tmp/$name.bench")"
}

status=0
for p in $policies; do
  case "$p" in
    full) run full || status=1 ;;
    corm-30) run corm-30 --kv-policy corm --kv-token-budget 30% || status=1 ;;
    mikv-int4-30) run mikv-int4-30 --kv-policy mikv --kv-token-budget 30% || status=1 ;;
    corm-free) run corm-free --kv-policy corm || status=1 ;;
    *) echo "capacity.sh: unknown policy $p (full, corm-30, mikv-int4-30, corm-free)" >&2; status=1 ;;
  esac
done
exit $status
