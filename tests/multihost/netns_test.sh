#!/usr/bin/env bash
# The multi-host test (issue #11): three network namespaces ("hosts") joined by a bridge, the
# coordinator in one and a CPU worker in each of the others, the workers started with the
# LeaderWorkerSet environment only (LWS_LEADER_ADDRESS, LWS_GROUP_SIZE, LWS_WORKER_INDEX; no
# --join, no --rank). Checks, in order:
#   1. golden greedy tokens (the first 32 of models/tiny-llama-a/golden_fp32.json) at TP = 2;
#   2. a worker's link taken down mid-generation: the request ends UNAVAILABLE, health NOT_SERVING;
#   3. the link back up: the group re-forms, health SERVING, golden tokens again;
#   4. added latency on a worker's link (tc netem delay 20ms; where the kernel has no netem, a
#      tbf rate limit of 1 mbit/s, said so in the output) shows in the decode step time (the
#      client's (total - first token) / (tokens - 1), on 32 greedy tokens) and changes no token;
#   5. the coordinator restarted: the same workers join the new one, golden tokens again.
# Every wait is bounded; a failure names the check. Needs root and `ip netns`; otherwise exits 77
# (ctest's SKIP_RETURN_CODE) with the reason.
#
# Usage: netns_test.sh LORCSERVE_BINARY MODEL_DIR     (from ctest: MultiHostNetnsTest)
#        NETNS_LINK_DOWN_S=S keeps the link down S seconds longer in check 2/3 (default 0).
set -uo pipefail

BIN=${1:?usage: netns_test.sh LORCSERVE_BINARY MODEL_DIR}
MODEL=${2:?usage: netns_test.sh LORCSERVE_BINARY MODEL_DIR}
SKIP=77
T0=$(date +%s)

log() { echo "[netns +$(( $(date +%s) - T0 ))s] $*"; }
skip() { echo "SKIP: $*"; exit $SKIP; }

if [ "$(id -u)" -ne 0 ]; then skip "needs root (network namespaces, veth, bridge)"; fi
command -v ip >/dev/null || skip "no 'ip' command (apt-get install iproute2)"
command -v tc >/dev/null || skip "no 'tc' command (apt-get install iproute2)"
[ -x "$BIN" ] || { echo "FAIL: $BIN is not an executable"; exit 1; }
[ -f "$MODEL/golden_fp32.json" ] || { echo "FAIL: no $MODEL/golden_fp32.json"; exit 1; }

# Unique names: a parallel run (another build tree) cannot collide. Interface names <= 15 chars.
ID=$(printf '%05d' $(( $$ % 100000 )))
P="lsd${ID}"
NS_SW="${P}sw"; NS_C="${P}c"; NS_A="${P}a"; NS_B="${P}b"
SUBNET=10.77.0
IP_C=$SUBNET.1; IP_A=$SUBNET.2; IP_B=$SUBNET.3
WORK=$(mktemp -d "/tmp/lorc_netns_${ID}_XXXXXX")
PIDS=()

cleanup() {
  local rc=$?
  local pid deadline=$(( $(date +%s) + 5 ))
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null; done
  for pid in "${PIDS[@]}"; do
    while kill -0 "$pid" 2>/dev/null && [ "$(date +%s)" -lt "$deadline" ]; do sleep 0.1; done
    kill -9 "$pid" 2>/dev/null
  done
  wait 2>/dev/null
  for ns in "$NS_C" "$NS_A" "$NS_B" "$NS_SW"; do ip netns del "$ns" 2>/dev/null; done
  if [ "$rc" -ne 0 ] && [ "$rc" -ne $SKIP ]; then
    for f in "$WORK"/*.log; do
      [ -f "$f" ] || continue
      echo "---- $(basename "$f") (last 40 lines) ----"; tail -n 40 "$f"
    done
  fi
  rm -rf "$WORK"
  log "cleaned up (exit $rc)"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

fail() { echo "FAIL [$CHECK]: $*"; exit 1; }

# ---- the network -------------------------------------------------------------------------------
CHECK="network setup"
ip netns add "$NS_SW" 2>/dev/null || skip "cannot create network namespaces ('ip netns add' failed)"
for ns in "$NS_C" "$NS_A" "$NS_B"; do ip netns add "$ns" || fail "ip netns add $ns"; done
ip -n "$NS_SW" link add br0 type bridge || fail "bridge"
ip -n "$NS_SW" link set br0 up || fail "bridge up"
ip -n "$NS_SW" link set lo up
# host X: eth0 in its namespace, port pX on the bridge in the switch namespace.
for x in c a b; do
  ns_var="NS_${x^^}"; ns=${!ns_var}; ip_var="IP_${x^^}"; addr=${!ip_var}
  ip link add "${P}$x" type veth peer name "${P}${x}p" || fail "veth for $x"
  ip link set "${P}$x" netns "$ns" name eth0 || fail "move veth into $ns"
  ip link set "${P}${x}p" netns "$NS_SW" name "p$x" || fail "move veth port into the switch"
  ip -n "$NS_SW" link set "p$x" master br0 up || fail "attach p$x"
  ip -n "$ns" link set lo up || fail "lo up in $ns"
  ip -n "$ns" addr add "$addr/24" dev eth0 || fail "address $addr"
  ip -n "$ns" link set eth0 up || fail "eth0 up in $ns"
done
log "network up: coordinator $IP_C, workers $IP_A, $IP_B (namespaces $NS_C $NS_A $NS_B, bridge in $NS_SW)"

# ---- processes ---------------------------------------------------------------------------------
in_c() { ip netns exec "$NS_C" "$@"; }
client() { in_c "$BIN" client --server "$IP_C:50051" "$@"; }

start_coordinator() {
  ip netns exec "$NS_C" "$BIN" coordinator --model "$MODEL" --listen "$IP_C:50051" \
    --tensor-parallel-size 2 --join-timeout-s 20 --max-restarts 10 \
    >>"$WORK/coordinator.out" 2>>"$WORK/coordinator.log" &
  COORD_PID=$!
  PIDS+=("$COORD_PID")
}
# Worker pod $1 (LWS index) in namespace $2: the LeaderWorkerSet environment only.
start_worker() {
  ip netns exec "$2" env -i PATH="$PATH" LWS_LEADER_ADDRESS="$IP_C" LWS_GROUP_SIZE=3 LWS_WORKER_INDEX="$1" \
    "$BIN" worker --threads 1 >"$WORK/worker$1.out" 2>"$WORK/worker$1.log" &
  PIDS+=("$!")
}

# Waits up to $2 seconds for health $1 (SERVING or NOT_SERVING).
wait_health() {
  local want=$1 deadline=$(( $(date +%s) + $2 )) got=""
  while [ "$(date +%s)" -lt "$deadline" ]; do
    got=$(client --health --timeout-s 3 2>/dev/null | tr -d '\r')
    [ "$got" = "$want" ] && return 0
    sleep 0.3
  done
  fail "health did not turn $want within $2 s (last: '${got:-no answer}')"
}

# Golden prompt $1 (0-based): prompt ids and the first $2 greedy ids, comma-separated.
GOLDEN=$(tr -d ' \n' <"$MODEL/golden_fp32.json")
golden_field() { grep -o "\"$2\":\[[0-9,]*\]" <<<"$GOLDEN" | sed -n "$(( $1 + 1 ))p" | sed 's/.*\[//; s/\]//'; }
prompt_ids() { golden_field "$1" prompt_ids; }
golden_ids() { golden_field "$1" greedy_48_ids | cut -d, -f1-"$2"; }

# Generates 32 greedy tokens of golden prompt $1; sets OUT_IDS and STEP_MS (decode step time).
generate32() {
  local json
  json=$(client --prompt-ids "$(prompt_ids "$1")" --max-tokens 32 --json --timeout-s 120 2>"$WORK/client.err") ||
    fail "golden prompt $1: the request failed: $(cat "$WORK/client.err")"
  OUT_IDS=$(grep -o '"output_ids":\[[0-9,]*\]' <<<"$json" | head -1 | sed 's/.*\[//; s/\]//')
  local total ttft
  total=$(grep -o '"total_time_ms":[0-9.]*' <<<"$json" | head -1 | cut -d: -f2)
  ttft=$(grep -o '"time_to_first_token_ms":[0-9.]*' <<<"$json" | head -1 | cut -d: -f2)
  STEP_MS=$(awk -v t="$total" -v f="$ttft" 'BEGIN { printf "%.1f", (t - f) / 31 }')
}
expect_golden() {
  local i
  for i in 0 1 2 3; do
    generate32 "$i"
    [ "$OUT_IDS" = "$(golden_ids "$i" 32)" ] ||
      fail "golden prompt $i: got $OUT_IDS, want $(golden_ids "$i" 32)"
  done
  log "$CHECK: the 4 golden prompts give their 32 golden greedy tokens"
}

# ---- 1. golden tokens at TP = 2 across the hosts -----------------------------------------------
CHECK="1 golden at TP=2"
start_coordinator
start_worker 1 "$NS_A"
start_worker 2 "$NS_B"
wait_health SERVING 180
info=$(client --info)
grep -q '"tensor_parallel_size": 2' <<<"$info" || fail "ModelInfo does not say tensor_parallel_size 2: $info"
for a in $IP_A $IP_B; do grep -q "\"$a:" <<<"$info" || fail "ModelInfo lists no worker at $a: $info"; done
expect_golden

# ---- 2. a worker's link down mid-generation ----------------------------------------------------
CHECK="2 link down mid-generation"
client --prompt-ids "$(prompt_ids 0)" --max-tokens 3000 --ignore-eos --timeout-s 120 \
  >"$WORK/long.out" 2>"$WORK/long.err" &
LONG=$!
PIDS+=("$LONG")
# Down once tokens are flowing (the prompt's first output arrived).
deadline=$(( $(date +%s) + 30 ))
until [ -s "$WORK/long.out" ]; do
  [ "$(date +%s)" -lt "$deadline" ] || fail "the long request produced no output within 30 s"
  sleep 0.1
done
sleep 1
ip -n "$NS_SW" link set pb down || fail "ip link set pb down"
log "worker 2's link (pb) down"
deadline=$(( $(date +%s) + 60 ))
while kill -0 "$LONG" 2>/dev/null; do
  [ "$(date +%s)" -lt "$deadline" ] || fail "the in-flight request did not end within 60 s of the link going down"
  sleep 0.2
done
wait "$LONG"; long_rc=$?
[ "$long_rc" -ne 0 ] || fail "the in-flight request finished OK across a dead link"
grep -q "UNAVAILABLE" "$WORK/long.err" || fail "the in-flight request did not end UNAVAILABLE: $(cat "$WORK/long.err")"
log "in-flight request ended: $(head -c 300 "$WORK/long.err")"
wait_health NOT_SERVING 20
new_rc=0
client --prompt "hello" --max-tokens 4 --timeout-s 20 >/dev/null 2>"$WORK/new.err" || new_rc=$?
[ "$new_rc" -ne 0 ] && grep -q UNAVAILABLE "$WORK/new.err" ||
  fail "a new request while the link is down was not refused UNAVAILABLE: $(cat "$WORK/new.err")"
log "health NOT_SERVING, new requests UNAVAILABLE"

# ---- 3. link back up: the group re-forms --------------------------------------------------------
# NETNS_LINK_DOWN_S: keep the link down this many seconds longer (default 0).
sleep "${NETNS_LINK_DOWN_S:-0}"
CHECK="3 link up, re-join"
ip -n "$NS_SW" link set pb up || fail "ip link set pb up"
log "worker 2's link up"
wait_health SERVING 240
log "health SERVING again"
expect_golden

# ---- 4. latency on a link: slower steps, the same tokens ----------------------------------------
CHECK="4 latency on a link"
generate32 1; base_ms=$STEP_MS; base_ids=$OUT_IDS
generate32 1; [ "$(awk -v a="$STEP_MS" -v b="$base_ms" 'BEGIN { print (a < b) }')" = 1 ] && base_ms=$STEP_MS
if ip netns exec "$NS_B" tc qdisc add dev eth0 root netem delay 20ms 2>"$WORK/tc.err"; then
  shaping="netem delay 20ms on worker 2's eth0 (egress)"; min_extra=20
else
  log "tc netem unavailable ($(tr -d '\n' <"$WORK/tc.err")); using a tbf rate limit instead"
  ip netns exec "$NS_B" tc qdisc add dev eth0 root tbf rate 1mbit burst 1600 latency 2s ||
    fail "neither netem nor tbf could be added to worker 2's eth0"
  shaping="tbf rate 1mbit on worker 2's eth0 (egress; this kernel has no netem)"; min_extra=5
fi
generate32 1; slow_ms=$STEP_MS; slow_ids=$OUT_IDS
ip netns exec "$NS_B" tc qdisc del dev eth0 root || fail "removing the qdisc"
[ "$slow_ids" = "$base_ids" ] || fail "$shaping changed the tokens: $slow_ids vs $base_ids"
[ "$slow_ids" = "$(golden_ids 1 32)" ] || fail "tokens under $shaping are not golden"
[ "$(awk -v s="$slow_ms" -v b="$base_ms" -v m="$min_extra" 'BEGIN { print (s >= b + m) }')" = 1 ] ||
  fail "$shaping: decode step ${slow_ms} ms, without ${base_ms} ms: less than $min_extra ms slower"
log "$shaping: decode step $base_ms -> $slow_ms ms (client: (total - first token) / 31), tokens unchanged"

# ---- 5. a restarted coordinator: the workers join the new one -----------------------------------
CHECK="5 coordinator restart"
kill -9 "$COORD_PID"; wait "$COORD_PID" 2>/dev/null
log "coordinator killed (SIGKILL); starting a new one"
start_coordinator
wait_health SERVING 180
expect_golden

CHECK="workers alive"
for f in "$WORK"/worker1.log "$WORK"/worker2.log; do
  grep -q "joined the coordinator" "$f" || fail "$(basename "$f") never joined"
done
log "PASS in $(( $(date +%s) - T0 )) s"
