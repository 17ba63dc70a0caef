# Shell helpers for the scripts that start a coordinator and talk to it (scripts/demo.sh,
# scripts/gpu/check.sh, bench/serve_loopback.sh, bench/compare_serving.sh, ...). Source it:
#   . "<repo>/scripts/lib/coordinator.sh"

# lorc_wait_listening OUT_FILE PID [TIMEOUT_S]
# Waits for the "LISTENING <host:port>" line that `lorcserve coordinator` prints on stdout once its
# public port is bound (OUT_FILE is that stdout) and prints the address. Returns 1, printing
# nothing, when process PID exits first or TIMEOUT_S seconds (default 120) pass.
lorc_wait_listening() {
  local out=$1 pid=$2 deadline=$((SECONDS + ${3:-120}))
  while [ "$SECONDS" -lt "$deadline" ]; do
    if grep -q '^LISTENING ' "$out" 2>/dev/null; then
      awk '/^LISTENING /{print $2; exit}' "$out"
      return 0
    fi
    kill -0 "$pid" 2>/dev/null || return 1
    sleep 0.25
  done
  return 1
}
