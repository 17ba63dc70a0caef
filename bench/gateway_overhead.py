"""Gateway overhead: time to first token (TTFT) and tokens/s of N concurrent streaming requests
through the OpenAI-compatible gateway (HTTP + SSE) against the same requests sent straight to
the coordinator's gRPC Generate. Results: docs/PERFORMANCE.md.

  /usr/bin/python3 bench/gateway_overhead.py --lorcserve build/bin/lorcserve \
      --model models/tiny-llama-a [--backend cpu] [--streams 32] [--max-tokens 64] [--rounds 3]

Starts one coordinator (--local-workers 1) and one gateway (scripts/gateway.sh), then per round
runs both modes (alternating which goes first). Each request: a distinct prompt (no prefix-cache
hits), greedy, `ignore_eos`, exactly --max-tokens tokens. The clients are threads of this
process (http.client / grpc sync stubs): on a small machine they share the cores with the
servers, which the numbers include. Prints one JSON line per mode and round, then the medians.
TTFT: request sent -> first chunk with text (HTTP) or tokens (gRPC). tokens/s: all completion
tokens / wall time of the round (first send -> last stream end). Gateway CPU ms/token: the
gateway process's CPU time (/proc utime + stime) over the round / tokens streamed (about 0 in
the gRPC rounds): its cost independent of how loaded the machine is; client CPU ms/token the
same for this process (the 32 client threads: SSE + JSON parsing, or gRPC stream reading), which
shares the cores with the servers.
"""

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "scripts", "lib"))
from lorc_process import wait_for  # noqa: E402


def start(argv, out_path, prefix, timeout=180):
    out = open(out_path, "w")
    err = open(out_path + ".err", "w")
    proc = subprocess.Popen(argv, stdout=out, stderr=err, start_new_session=True)
    err.close()
    out.close()
    try:
        return proc, wait_for(proc, out_path, prefix, timeout)
    except RuntimeError as e:
        sys.exit(str(e))


def prompt(i, r):
    return f"Request {r}-{i}: the meaning of the word number {i * 7919 % 1000}"


def http_stream(addr, model, text, max_tokens, result):
    host, port = addr.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=600)
    body = json.dumps({"model": model, "prompt": text, "max_tokens": max_tokens,
                       "temperature": 0, "ignore_eos": True, "stream": True,
                       "stream_options": {"include_usage": True}})
    t0 = time.perf_counter()
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:300]}")
    ttft = None
    tokens = 0
    for line in resp:
        line = line.strip()
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        if ttft is None and chunk["choices"] and chunk["choices"][0]["text"]:
            ttft = time.perf_counter() - t0
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
    result.update(ttft=ttft, tokens=tokens, end=time.perf_counter())
    conn.close()


def grpc_stream(stub, pb2, text, max_tokens, result):
    req = pb2.GenerateRequest(text=text)
    req.sampling.temperature = 0
    req.sampling.max_tokens = max_tokens
    req.sampling.ignore_eos = True
    t0 = time.perf_counter()
    ttft = None
    tokens = 0
    for msg in stub.Generate(req):
        if ttft is None and msg.token_ids:
            ttft = time.perf_counter() - t0
        if msg.final:
            tokens += msg.usage.completion_tokens
    result.update(ttft=ttft, tokens=tokens, end=time.perf_counter())


def cpu_seconds(pid):
    """utime + stime of a process (/proc/PID/stat), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_round(mode, fn, streams, r, gateway_pid):
    results = [{} for _ in range(streams)]
    cpu0 = cpu_seconds(gateway_pid)
    client0 = sum(os.times()[:2])
    threads = [threading.Thread(target=fn, args=(prompt(i, r), results[i]))
               for i in range(streams)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = max(x["end"] for x in results) - t0
    gateway_cpu = cpu_seconds(gateway_pid) - cpu0
    client_cpu = sum(os.times()[:2]) - client0
    ttfts = sorted(x["ttft"] * 1e3 for x in results)
    tokens = sum(x["tokens"] for x in results)
    return {"mode": mode, "round": r, "streams": streams, "tokens": tokens,
            "wall_s": round(wall, 3), "tokens_per_s": round(tokens / wall, 1),
            "ttft_ms_median": round(statistics.median(ttfts), 1),
            "ttft_ms_p90": round(ttfts[int(0.9 * (len(ttfts) - 1))], 1),
            "ttft_ms_max": round(ttfts[-1], 1),
            "gateway_cpu_ms_per_token": round(gateway_cpu * 1e3 / max(tokens, 1), 3),
            "client_cpu_ms_per_token": round(client_cpu * 1e3 / max(tokens, 1), 3)}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lorcserve", default=os.path.join(REPO, "build", "bin", "lorcserve"))
    p.add_argument("--model", default=os.path.join(REPO, "models", "tiny-llama-a"))
    p.add_argument("--backend", default="cpu")
    p.add_argument("--build-dir", default=os.path.join(REPO, "build"))
    p.add_argument("--streams", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()
    tmp = tempfile.mkdtemp(prefix="lorc-gateway-bench-")
    print(f"logs: {tmp}", file=sys.stderr)
    procs = []
    try:
        coord, caddr = start([a.lorcserve, "coordinator", "--model", a.model, "--listen",
                              "127.0.0.1:0", "--local-workers", "1", "--backend", a.backend],
                             os.path.join(tmp, "coord.out"), "LISTENING")
        procs.append(coord)
        gw, gaddr = start(["env", f"BUILD_DIR={a.build_dir}",
                           os.path.join(REPO, "scripts", "gateway.sh"), "--coordinator", caddr,
                           "--port", "0"], os.path.join(tmp, "gw.out"), "GATEWAY_LISTENING")
        procs.append(gw)
        sys.path.insert(0, os.path.join(REPO, "gateway"))
        import grpc
        from lorcserve_gateway import stubs
        pb2, pb2_grpc = stubs.load(os.path.join(a.build_dir, "gateway_stubs"))
        stub = pb2_grpc.LorcServeStub(grpc.insecure_channel(caddr))
        for _ in range(600):  # serving?
            try:
                if stub.ModelInfo(pb2.ModelInfoRequest()).serving:
                    break
            except grpc.RpcError:
                pass
            time.sleep(0.2)
        conn = http.client.HTTPConnection(*gaddr.rsplit(":", 1))
        conn.request("GET", "/v1/models")
        model = json.loads(conn.getresponse().read())["data"][0]["id"]
        modes = {
            "gateway": lambda text, res: http_stream(gaddr, model, text, a.max_tokens, res),
            "grpc": lambda text, res: grpc_stream(stub, pb2, text, a.max_tokens, res),
        }
        run_round("warmup", modes["gateway"], a.streams, -1, gw.pid)
        rows = []
        for r in range(a.rounds):
            order = ["gateway", "grpc"] if r % 2 == 0 else ["grpc", "gateway"]
            for mode in order:
                row = run_round(mode, modes[mode], a.streams, r, gw.pid)
                print(json.dumps(row), flush=True)
                rows.append(row)
        print(f"\nmedians over {a.rounds} rounds, {a.streams} concurrent streams x "
              f"{a.max_tokens} tokens ({a.backend}, {os.cpu_count()} cores):")
        print("| path | tokens/s | TTFT median ms | TTFT p90 ms | TTFT max ms | gateway CPU ms/token "
              "| client CPU ms/token |")
        print("|---|---|---|---|---|---|---|")
        for mode in ("grpc", "gateway"):
            mine = [x for x in rows if x["mode"] == mode]
            med = {k: statistics.median(x[k] for x in mine)
                   for k in ("tokens_per_s", "ttft_ms_median", "ttft_ms_p90", "ttft_ms_max",
                             "gateway_cpu_ms_per_token", "client_cpu_ms_per_token")}
            print(f"| {mode} | {med['tokens_per_s']:.1f} | {med['ttft_ms_median']:.1f} | "
                  f"{med['ttft_ms_p90']:.1f} | {med['ttft_ms_max']:.1f} | "
                  f"{med['gateway_cpu_ms_per_token']:.3f} | "
                  f"{med['client_cpu_ms_per_token']:.3f} |")
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    main()
