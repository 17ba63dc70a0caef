"""The Python twin of scripts/lib/coordinator.sh, for the tests and benchmarks that start lorcserve
processes (tests/gateway/gateway_e2e_test.py, bench/gateway_overhead.py)."""

import time


def wait_for(proc, out_path, word, timeout=120):
    """The address in the line "WORD <host:port>" that `proc` (stdout in `out_path`) prints once
    its port is bound (`lorcserve coordinator`: LISTENING; the gateway: GATEWAY_LISTENING).
    Raises RuntimeError when `proc` exits first or `timeout` seconds pass."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        with open(out_path) as f:
            for line in f:
                if line.startswith(word + " "):
                    return line.split()[1]
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[:2]} exited {proc.returncode} before {word}")
        time.sleep(0.1)
    raise RuntimeError(f"no {word} in {out_path} after {timeout}s")
