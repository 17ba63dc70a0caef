#!/usr/bin/env python3
"""The token-level KV policy report (issue #17) from sweep.sh's result JSONs: a markdown table
(KV bytes per token kept by the policy vs perplexity and pass-key accuracy, against the `full`
row) and, with gnuplot installed, a PNG of both against the bytes. Standard library only.

Usage: report.py RESULTS_DIR [--md FILE] [--png FILE] [--baseline NAME]
"""

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile


def load(results):
    rows = []
    for path in sorted(glob.glob(os.path.join(results, "*.json"))):
        with open(path) as f:
            r = json.load(f)
        r["name"] = r.get("name") or os.path.splitext(os.path.basename(path))[0]
        rows.append(r)
    return rows


def kv_bytes(r):
    # What the policy kept at the end of the sequences; without a policy the cache's bytes.
    return r.get("kv_policy_bytes_per_token", r.get("kv_bytes_per_token"))


def passkey_mean(r):
    acc = r.get("passkey_acc") or {}
    return sum(acc.values()) / len(acc) if acc else None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("results")
    ap.add_argument("--md")
    ap.add_argument("--png")
    ap.add_argument("--baseline", default="full")
    a = ap.parse_args()
    rows = load(a.results)
    base = next((r for r in rows if r["name"] == a.baseline), None)
    if base is None:
        sys.exit(f"report.py: no '{a.baseline}' result in {a.results}")
    b_bytes, b_ppl, b_pk = kv_bytes(base), base.get("ppl"), passkey_mean(base)
    lengths = sorted((base.get("passkey_acc") or {}).keys(), key=int)
    head = ("| config | LoRC | policy | KV bytes/token | of full | perplexity | vs full | "
            + " | ".join(f"pass-key {n}" for n in lengths) + " | mean | vs full | meets 30 % target |")
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    rows.sort(key=lambda r: (r["name"] != a.baseline, -kv_bytes(r)))
    for r in rows:
        kb, ppl, pk = kv_bytes(r), r.get("ppl"), passkey_mean(r)
        lorc = "whitened 0.5" if r.get("compress_args") else "-"
        frac = kb / b_bytes
        dppl = 100 * (ppl / b_ppl - 1) if ppl and b_ppl else None
        dpk = 100 * (pk - b_pk) if pk is not None and b_pk is not None else None
        meets = (frac <= 0.30 + 1e-9 and dppl is not None and dppl <= 5 and dpk is not None and dpk >= -5)
        cells = [r["name"], lorc, r.get("kv_policy", "none"), f"{kb:,.0f}", f"{100 * frac:.1f} %",
                 f"{ppl:.4f}" if ppl else "-", f"{dppl:+.2f} %" if dppl is not None else "-"]
        cells += [f"{r['passkey_acc'][n]:.3f}" if n in (r.get("passkey_acc") or {}) else "-" for n in lengths]
        cells += [f"{pk:.3f}" if pk is not None else "-", f"{dpk:+.1f}" if dpk is not None else "-",
                  "**yes**" if meets else ("no" if frac <= 0.30 + 1e-9 else "")]
        out.append("| " + " | ".join(cells) + " |")
    text = "\n".join(out) + "\n"
    if a.md:
        with open(a.md, "w") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    if a.png and shutil.which("gnuplot"):
        with tempfile.TemporaryDirectory() as tmp:
            series = {}
            for r in rows:
                fam = ("lorc50 " if r.get("compress_args") else "") + (
                    "corm" if "corm" in r["name"] else "mikv" if "mikv" in r["name"] else "no policy")
                series.setdefault(fam, []).append((kv_bytes(r), r.get("ppl"), passkey_mean(r), r["name"]))
            plots_ppl, plots_pk = [], []
            for i, (fam, pts) in enumerate(sorted(series.items())):
                path = os.path.join(tmp, f"s{i}.dat")
                with open(path, "w") as f:
                    for kb, ppl, pk, name in sorted(pts):
                        f.write(f"{kb} {ppl or 'NaN'} {pk if pk is not None else 'NaN'} {name}\n")
                plots_ppl.append(f"'{path}' using 1:2 with points pt 7 ps 1.2 title '{fam}'")
                plots_pk.append(f"'{path}' using 1:3 with points pt 7 ps 1.2 title '{fam}'")
            script = f"""
set terminal pngcairo size 1200,500 font ',10'
set output '{a.png}'
set multiplot layout 1,2
set xlabel 'KV bytes per token kept (full fp32 = {b_bytes:,.0f})'
set grid
set key top right
set ylabel 'perplexity'
set arrow 1 from graph 0, first {b_ppl * 1.05} to graph 1, first {b_ppl * 1.05} nohead dt 2
plot {', '.join(plots_ppl)}
unset arrow 1
set ylabel 'mean pass-key accuracy'
set key bottom right
set arrow 2 from graph 0, first {b_pk - 0.05} to graph 1, first {b_pk - 0.05} nohead dt 2
plot {', '.join(plots_pk)}
unset multiplot
"""
            subprocess.run(["gnuplot"], input=script, text=True, check=True)


if __name__ == "__main__":
    main()
