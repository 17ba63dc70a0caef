#!/usr/bin/env python3
"""Where a CUDA-graph decode step's time goes, from a kernel timeline (bench/src/kernel_trace.cc).

    python3 bench/kernel_trace.py trace.csv[.gz] [--skip 5] [--json out.json] [--top 30]

Input: the CSV that libkernel_trace.so writes for one process (one row per kernel execution: GPU
start / end in ns, the launching call's correlation id, graph id, device, ...). Every
cudaGraphLaunch is one "launch" (its kernels share a correlation id); launches are grouped by
device and graph id (one graph per padded batch size), the first --skip launches of each graph
dropped (warm-up, timing runs).

For each graph, per launch (means over the launches kept), all times in microseconds:
- span: the first kernel's start to the last kernel's end;
- between: the previous launch's last end to this launch's first start (the GPU runs only the
  kernels launched outside graphs then, e.g. sampling, listed under "outside graphs");
- per kernel name (demangled, arguments dropped; one row for all the layers' instances):
  n (instances per launch), dur (end - start, which under programmatic dependent launch includes
  the time a kernel's CTAs wait for the previous kernel), adv (the kernel's advance of the step:
  its end minus the latest end before it, or its whole duration for the first; the advances add up
  to the span, so adv is the kernel's share of the critical path), and adv per instance.

Stdlib only; demangles with c++filt when it is on the PATH.
"""
import argparse
import bisect
import collections
import gzip
import json
import shutil
import subprocess
import sys


def demangle(names):
    names = sorted(set(names))
    if not shutil.which("c++filt"):
        return {n: n for n in names}
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=False).stdout
    lines = out.split("\n")
    return {n: (lines[i] if i < len(lines) and lines[i] else n) for i, n in enumerate(names)}


def short_name(name):
    """Drops a leading return type, namespaces and the argument list, keeps template arguments."""
    s = name.rstrip()
    depth = 0
    for i in range(len(s) - 1 if s.endswith(")") else -1, -1, -1):  # the argument list: a trailing "(...)"
        c = s[i]
        if c == ")":
            depth += 1
        elif c == "(":
            depth -= 1
            if depth == 0:
                s = s[:i]
                break
    if s.startswith("void "):
        s = s[5:]
    # namespaces before the function name (not inside template arguments)
    depth = 0
    cut = 0
    i = 0
    while i < len(s):
        c = s[i]
        if c in "<(":
            depth += 1
        elif c in ">)":
            depth -= 1
        elif c == ":" and depth == 0 and s[i:i + 2] == "::":
            cut = i + 2
            i += 1
        i += 1
    return s[cut:]


def load(path):
    """The CSV's rows (gzipped when the name ends in .gz). The name is the last column and is
    taken whole, commas included; a trace of an older layout without device_id reads as device 0."""
    rows = []
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", newline="") as f:
        header = f.readline().rstrip("\n").split(",")
        missing = [c for c in ("start_ns", "end_ns", "correlation_id", "graph_id", "name") if c not in header]
        if missing or header[-1] != "name":
            raise ValueError(f"{path}: not a kernel_trace CSV (header {header}; needs {missing or 'name last'})")
        for n, line in enumerate(f, start=2):
            line = line.rstrip("\n")
            if not line:
                continue
            r = dict(zip(header, line.split(",", len(header) - 1)))
            try:
                rows.append({
                    "start": int(r["start_ns"]), "end": int(r["end_ns"]), "corr": int(r["correlation_id"]),
                    "graph": int(r["graph_id"]), "device": int(r.get("device_id") or 0), "name": r["name"],
                })
            except (KeyError, ValueError) as e:
                raise ValueError(f"{path}: line {n}: {line[:120]!r}: {e!r}") from None
    return rows


def analyze(rows, skip):
    names = demangle(r["name"] for r in rows)
    for r in rows:
        r["short"] = short_name(names[r["name"]])
    rows.sort(key=lambda r: r["start"])
    launches = collections.OrderedDict()  # (device, corr) -> kernels (graph launches only)
    outside = collections.defaultdict(list)  # device -> kernels launched outside graphs, by start
    for r in rows:
        if r["graph"] != 0:
            launches.setdefault((r["device"], r["corr"]), []).append(r)
        else:
            outside[r["device"]].append(r)
    outside_starts = {dev: [o["start"] for o in ks] for dev, ks in outside.items()}
    by_graph = collections.OrderedDict()  # (device, graph) -> launches
    for ks in launches.values():
        by_graph.setdefault((ks[0]["device"], ks[0]["graph"]), []).append(ks)
    # Each device's launches in time order (first start, last end), for "between".
    order = collections.defaultdict(list)
    for key, ks in launches.items():
        order[key[0]].append((min(k["start"] for k in ks), max(k["end"] for k in ks), key))
    prev_end = {}
    for dev, spans in order.items():
        spans.sort()
        for i, (_, _, key) in enumerate(spans):
            prev_end[key] = spans[i - 1][1] if i > 0 else None
    result = []
    for (device, graph), ls in by_graph.items():
        kept = ls[skip:] if len(ls) > skip else []
        if not kept:
            continue
        spans, betweens = [], []
        per = collections.OrderedDict()  # short name -> [instances, dur sum, adv sum]
        outside_per = collections.defaultdict(lambda: [0, 0.0])
        for ks in kept:
            ks = sorted(ks, key=lambda k: k["start"])
            first, last = ks[0]["start"], max(k["end"] for k in ks)
            spans.append((last - first) / 1e3)
            latest = None
            for k in ks:
                adv = (k["end"] - k["start"]) if latest is None else max(0, k["end"] - latest)
                latest = k["end"] if latest is None else max(latest, k["end"])
                e = per.setdefault(k["short"], [0, 0.0, 0.0])
                e[0] += 1
                e[1] += (k["end"] - k["start"]) / 1e3
                e[2] += adv / 1e3
            # the device's launch before this one (any graph) and the kernels outside graphs between
            before = prev_end[(device, ks[0]["corr"])]
            if before is not None:
                betweens.append((first - before) / 1e3)
                starts = outside_starts.get(device, [])
                for o in outside[device][bisect.bisect_left(starts, before):bisect.bisect_left(starts, first)]:
                    d = outside_per[o["short"]]
                    d[0] += 1
                    d[1] += (o["end"] - o["start"]) / 1e3
        n = len(kept)
        kernels = [{"name": name, "n": e[0] / n, "dur_us": e[1] / n, "adv_us": e[2] / n,
                    "adv_us_each": e[2] / e[0]} for name, e in per.items()]
        kernels.sort(key=lambda k: -k["adv_us"])
        result.append({
            "device": device, "graph_id": graph, "launches": len(ls), "kept": n,
            "kernels_per_launch": sum(len(k) for k in kept) / n,
            "span_us": sum(spans) / n, "between_us": (sum(betweens) / len(betweens)) if betweens else None,
            "kernels": kernels,
            "outside_between": [{"name": name, "n": d[0] / max(1, len(betweens)), "dur_us": d[1] / max(1, len(betweens))}
                                for name, d in sorted(outside_per.items(), key=lambda x: -x[1][1])],
        })
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("trace")
    ap.add_argument("--skip", type=int, default=5, help="launches of each graph to drop first (default 5)")
    ap.add_argument("--top", type=int, default=40, help="kernel rows to print per graph (default 40)")
    ap.add_argument("--json", help="also write the result here")
    ap.add_argument("--min-kernels", type=int, default=1, help="ignore graphs with fewer kernels per launch")
    args = ap.parse_args()
    try:
        rows = load(args.trace)
    except (OSError, ValueError, EOFError) as e:
        sys.exit(f"kernel_trace.py: {e}")
    if not rows:
        sys.exit(f"{args.trace}: no kernel records")
    result = [g for g in analyze(rows, args.skip) if g["kernels_per_launch"] >= args.min_kernels]
    for g in result:
        between = f"{g['between_us']:.1f}" if g["between_us"] is not None else "-"
        print(f"device {g['device']} graph {g['graph_id']}: {g['launches']} launches ({g['kept']} kept), "
              f"{g['kernels_per_launch']:.0f} kernels, span {g['span_us']:.1f} us, between launches {between} us")
        print(f"  {'adv us':>9} {'adv %':>6} {'n':>5} {'adv/each':>9} {'dur/each':>9}  kernel")
        for k in g["kernels"][:args.top]:
            print(f"  {k['adv_us']:9.1f} {100 * k['adv_us'] / g['span_us']:6.1f} {k['n']:5.0f} "
                  f"{k['adv_us_each']:9.2f} {k['dur_us'] / k['n']:9.2f}  {k['name'][:110]}")
        for o in g["outside_between"][:10]:
            print(f"  outside graphs, between launches: {o['n']:.1f} x {o['name'][:90]} ({o['dur_us']:.1f} us)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
