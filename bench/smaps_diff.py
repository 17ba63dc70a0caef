#!/usr/bin/env python3
"""Compares two /proc/PID/smaps snapshots of one process (soak_faults --smaps-dir writes them).

usage: smaps_diff.py BEFORE AFTER [--top N]

Prints the Rss change per mapping (matched by start address; new and gone mappings included),
largest first, and the totals by kind: [heap] (the main malloc arena), anonymous mappings of
64 MiB or less aligned to 64 MiB (glibc's per-thread malloc arenas), writable anonymous mappings
right above an inaccessible one (thread stacks above their guard page; a heuristic), other
anonymous mappings, and files. Units: kB, as in smaps.
"""
import argparse
import re
import sys

HEADER = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (\S+) \S+ \S+ \d+\s*(.*)$")


def parse(path):
    maps = []
    with open(path) as f:
        for line in f:
            m = HEADER.match(line)
            if m:
                maps.append({"start": int(m.group(1), 16), "end": int(m.group(2), 16),
                             "perms": m.group(3), "name": m.group(4).strip(), "rss": 0})
            elif line.startswith("Rss:") and maps:
                maps[-1]["rss"] = int(line.split()[1])
    return maps


def kinds(maps):
    """Labels each mapping; a thread stack is an rw anonymous mapping right above a ---p guard."""
    by_end = {m["end"]: m for m in maps}
    out = {}
    arena = 64 << 20
    for m in maps:
        name = m["name"]
        if name == "[heap]":
            k = "heap (main arena)"
        elif name.startswith("["):
            k = name
        elif name:
            k = "file"
        elif m["start"] % arena == 0 and (m["end"] - m["start"]) <= arena:
            k = "arena"
        else:
            below = by_end.get(m["start"])
            guarded = below is not None and below["perms"].startswith("---") and not below["name"]
            k = "thread stack" if guarded and m["perms"].startswith("rw") else "anonymous"
        out[m["start"]] = k
    return out


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("before")
    ap.add_argument("after")
    ap.add_argument("--top", type=int, default=20, help="mappings listed (default 20)")
    args = ap.parse_args(argv[1:])
    top = args.top
    a, b = parse(args.before), parse(args.after)
    ka, kb = kinds(a), kinds(b)
    am = {m["start"]: m for m in a}
    bm = {m["start"]: m for m in b}
    rows = []
    for start in set(am) | set(bm):
        before = am.get(start, {}).get("rss", 0)
        after = bm.get(start, {}).get("rss", 0)
        m = bm.get(start) or am[start]
        kind = kb.get(start) or ka.get(start)
        state = "new" if start not in am else "gone" if start not in bm else ""
        rows.append((after - before, before, after, kind, state, m))
    total_a = sum(m["rss"] for m in a)
    total_b = sum(m["rss"] for m in b)
    print(f"Rss {total_a} kB -> {total_b} kB ({total_b - total_a:+d} kB); mappings {len(a)} -> {len(b)}")
    by_kind = {}
    for d, before, after, kind, _, _ in rows:
        s = by_kind.setdefault(kind, [0, 0, 0])
        s[0] += before
        s[1] += after
        s[2] += 1
    print("\nby kind (kB):")
    for kind, (before, after, n) in sorted(by_kind.items(), key=lambda kv: -(kv[1][1] - kv[1][0])):
        print(f"  {kind:20s} {before:8d} -> {after:8d} ({after - before:+6d})  {n} mappings")
    print(f"\nlargest changes (kB), top {top}:")
    for d, before, after, kind, state, m in sorted(rows, key=lambda r: -abs(r[0]))[:top]:
        if d == 0:
            break
        size = (m["end"] - m["start"]) >> 10
        print(f"  {d:+7d}  {before:7d} -> {after:7d}  {m['start']:012x} {size:8d} kB {m['perms']} "
              f"{kind} {state} {m['name']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
