# Shell helpers for the scripts that start a coordinator and talk to it (scripts/demo.sh,
# scripts/gpu/check.sh, bench/serve_loopback.sh, bench/compare_serving.sh, ...; the Python twin
# is lorc_process.py beside it). Source it:
#   . "<repo>/scripts/lib/coordinator.sh"

# lorc_wait_for WORD OUT_FILE PID [TIMEOUT_S]
# Waits for the line "WORD <host:port>" that a lorcserve process (PID, stdout in OUT_FILE) prints
# once its port is bound (`lorcserve coordinator`: LISTENING; the gateway: GATEWAY_LISTENING) and
# prints the address. Returns 1, printing nothing, when PID exits first or TIMEOUT_S seconds
# (default 120) pass.
lorc_wait_for() {
  local word=$1 out=$2 pid=$3 deadline=$((SECONDS + ${4:-120}))
  while [ "$SECONDS" -lt "$deadline" ]; do
    if grep -q "^$word " "$out" 2>/dev/null; then
      awk -v w="$word" '$1 == w {print $2; exit}' "$out"
      return 0
    fi
    kill -0 "$pid" 2>/dev/null || return 1
    sleep 0.25
  done
  return 1
}

# lorc_wait_listening OUT_FILE PID [TIMEOUT_S]: lorc_wait_for LISTENING (the coordinator).
lorc_wait_listening() { lorc_wait_for LISTENING "$@"; }
