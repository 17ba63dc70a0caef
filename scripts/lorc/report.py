#!/usr/bin/env python3
"""The LoRC quality/bytes report (issue #9) from sweep.sh's result JSONs: a markdown table and a
gnuplot script with its data files for the frontier plot (perplexity and mean pass-key accuracy
against KV bytes per token, one line per method family). Python standard library only.

Usage: report.py RESULTS_DIR [--md FILE] [--plot-dir DIR] [--png FILE] [--baseline NAME]
                 [--no-gnuplot]
Details: scripts/lorc/README.md.
"""

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys

# Method families, in table and legend order.
FAMILIES = [
    "dtype-only",
    "plain-uniform",
    "plain-progressive",
    "whitened-uniform",
    "whitened-progressive",
    "latents+dtype",
    "max-ppl",
]
LORC_ALONE = FAMILIES[1:5]
FULL_PRECISION = {"f32", "float32", "bf16", "bfloat16", "f16", "float16"}
DTYPE_BYTES = {"f32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "f16": 2, "float16": 2}
BASELINE_NAMES = ["full-bf16", "full"]
# Fixed per family, so that plots of different sweeps compare.
STYLE = {
    "dtype-only": "linespoints pt 9 ps 1.3 lw 2 lc rgb '#000000'",
    "plain-uniform": "linespoints pt 7 ps 0.9 lw 2 lc rgb '#1f77b4'",
    "plain-progressive": "linespoints pt 7 ps 0.9 lw 2 dt 2 lc rgb '#1f77b4'",
    "whitened-uniform": "linespoints pt 5 ps 0.9 lw 2 lc rgb '#d62728'",
    "whitened-progressive": "linespoints pt 5 ps 0.9 lw 2 dt 2 lc rgb '#d62728'",
    "latents+dtype": "points pt 13 ps 1.4 lc rgb '#2ca02c'",
    "max-ppl": "points pt 3 ps 2.0 lw 2 lc rgb '#9467bd'",
}


def arg_value(args, flag):
    """The value after `flag` in a whitespace-separated argument string, or None."""
    words = (args or "").split()
    for i, w in enumerate(words):
        if w == flag and i + 1 < len(words):
            return words[i + 1]
        if w.startswith(flag + "="):
            return w.split("=", 1)[1]
    return None


def ranks_text(ks, vs):
    """'64', '120..8' or 'k 120..8 / v 96..8' for per-layer rank lists; '-' when uncompressed."""
    if not ks:
        return "-"

    def span(r):
        if min(r) == max(r):
            return str(r[0])
        if all(a >= b for a, b in zip(r, r[1:])):
            return f"{r[0]}..{r[-1]}"  # non-increasing with depth (progressive)
        return f"{min(r)}-{max(r)}"  # any order (a searched schedule): the range

    return span(ks) if ks == vs else f"k {span(ks)} / v {span(vs)}"


class Row:
    def __init__(self, r, path):
        self.raw = r
        self.path = path
        self.name = r["name"]
        lorc = r.get("lorc") or None
        self.lorc = lorc
        dtype = arg_value(r.get("eval_args"), "--kv-cache-dtype") or str(r.get("kv_dtype", "?"))
        self.dtype = dtype.lower()
        self.low_precision = self.dtype not in FULL_PRECISION
        self.bytes = r.get("kv_bytes_per_token")
        if self.dtype == "f32" and self.bytes is not None:
            # The CPU backend's auto cache is F32: report the bf16 bytes of the same geometry, so
            # rows compare with the GPU's bf16 ones (the dtype column says "bf16 (f32 cpu)").
            self.bytes //= 2
            self.dtype = "bf16 (f32 cpu)"
        self.ppl = r.get("ppl")
        self.windows = r.get("ppl_windows")
        self.passkey = {int(k): v for k, v in (r.get("passkey_acc") or {}).items()}
        self.passkey_n = {int(k): v for k, v in (r.get("passkey_n") or {}).items()}
        self.passkey_mean = (sum(self.passkey.values()) / len(self.passkey)) if self.passkey else None
        self.k_ranks = r.get("k_ranks") or [l["k_rank"] for l in (lorc or {}).get("layers", [])]
        self.v_ranks = r.get("v_ranks") or [l["v_rank"] for l in (lorc or {}).get("layers", [])]
        if lorc is None:
            self.method, self.schedule = "none", "-"
        else:
            self.method = {"svd": "plain", "whitened-svd": "whitened"}.get(lorc.get("method"), lorc.get("method", "?"))
            self.schedule = lorc.get("schedule", "?")
        target = (lorc or {}).get("target") or {}
        self.max_ppl = target.get("max_ppl_increase_pct")
        if self.max_ppl is None:
            v = arg_value(r.get("compress_args"), "--max-ppl-increase")
            self.max_ppl = float(v) if v is not None else None
        self.lorc_ratio = (lorc or {}).get("kv_bytes_ratio")
        if lorc is None:
            self.family = "dtype-only"
        elif self.max_ppl is not None:
            self.family = "max-ppl"
        elif self.low_precision:
            self.family = "latents+dtype"
        else:
            self.family = f"{self.method}-{self.schedule}"
        # LoRC at full rank is the same model for every method and schedule: it starts each of
        # the four LoRC-alone lines of the plot.
        self.full_rank = (lorc is not None and not self.low_precision and self.max_ppl is None
                          and self.k_ranks and all(k == lorc.get("head_dim") for k in self.k_ranks + self.v_ranks))


def load(results_dir):
    rows, bad = [], []
    for path in sorted(glob.glob(os.path.join(results_dir, "*.json"))):
        try:
            with open(path) as f:
                r = json.load(f)
        except (OSError, ValueError) as e:
            bad.append((os.path.basename(path), f"unreadable: {e}"))
            continue
        if not isinstance(r, dict) or "name" not in r or "kv_bytes_per_token" not in r:
            bad.append((os.path.basename(path), "not a sweep.sh result (no name / kv_bytes_per_token)"))
            continue
        rows.append(Row(r, path))
    failed = []
    for path in sorted(glob.glob(os.path.join(results_dir, "*.failed"))):
        with open(path, errors="replace") as f:
            lines = f.read().splitlines()
        # The first line is the command; the last non-empty line of the log is usually the error.
        tail = [l for l in lines[1:] if l.strip() and not l.startswith("---- ")]
        failed.append((os.path.basename(path)[: -len(".failed")], tail[-1] if tail else (lines[0] if lines else "")))
    return rows, bad, failed


def pick_baseline(rows, name):
    by_name = {r.name: r for r in rows}
    if name:
        if name not in by_name:
            sys.exit(f"report.py: --baseline {name}: no result of that name")
        return by_name[name]
    for n in BASELINE_NAMES:
        if n in by_name and by_name[n].lorc is None:
            return by_name[n]
    full = [r for r in rows if r.lorc is None and not r.low_precision]
    return max(full, key=lambda r: r.bytes) if full else None


def fmt(x, spec, none="-"):
    return none if x is None else format(x, spec)


def markdown(rows, base, bf16_bytes, bad, failed, results_dir):
    lengths = sorted({k for r in rows for k in r.passkey})
    out = []
    if base is not None:
        out.append(f"Baseline: `{base.name}` (uncompressed, KV {base.dtype}: {base.bytes} bytes/token; "
                   f"perplexity {fmt(base.ppl, '.3f')}, mean pass-key {fmt(base.passkey_mean, '.3f')}). "
                   f"Ratio: KV bytes per token over the bf16 uncompressed cache ({bf16_bytes} bytes/token).")
    else:
        out.append("No uncompressed full-precision result: no ratios or deltas.")
    windows = sorted({r.windows for r in rows if r.windows is not None})
    ns = sorted({n for r in rows for n in r.passkey_n.values()})
    backends = sorted({str(r.raw.get("backend", "?")) for r in rows})
    out.append(f"Perplexity over {'/'.join(map(str, windows)) or '?'} windows; pass-key over "
               f"{'/'.join(map(str, ns)) or '?'} prompts per length; backend {', '.join(backends)}. "
               "Delta %: perplexity change; delta pts: mean pass-key change in points.")
    out.append("")
    head = ["name", "method", "schedule", "ranks (first..last)", "kv dtype", "backend", "KV bytes/token", "ratio",
            "ppl", "delta %"] + [f"pk {n}" for n in lengths] + ["pk mean", "delta pts"]
    out.append("| " + " | ".join(head) + " |")
    out.append("|" + "|".join(["---"] * 6 + ["---:"] * (len(head) - 6)) + "|")
    order = {f: i for i, f in enumerate(FAMILIES)}
    for r in sorted(rows, key=lambda r: (order.get(r.family, len(FAMILIES)), -(r.bytes or 0), r.name)):
        ratio = r.bytes / bf16_bytes if bf16_bytes and r.bytes is not None else None
        d_ppl = 100.0 * (r.ppl / base.ppl - 1.0) if base is not None and base.ppl and r.ppl is not None else None
        d_pk = (100.0 * (r.passkey_mean - base.passkey_mean)
                if base is not None and base.passkey_mean is not None and r.passkey_mean is not None else None)
        d_ppl = 0.0 if d_ppl is not None and abs(d_ppl) < 0.005 else d_ppl  # no "-0.00"
        d_pk = 0.0 if d_pk is not None and abs(d_pk) < 0.05 else d_pk
        method = r.family if r.family in ("dtype-only", "latents+dtype", "max-ppl") else r.method
        if r.family == "max-ppl":
            method = f"max-ppl {r.max_ppl:g}% ({r.method})"
        cells = [f"`{r.name}`", method, r.schedule, ranks_text(r.k_ranks, r.v_ranks), r.dtype,
                 str(r.raw.get("backend", "?")), fmt(r.bytes, "d"), fmt(ratio, ".3f"), fmt(r.ppl, ".3f"), fmt(d_ppl, "+.2f")]
        cells += [fmt(r.passkey.get(n), ".2f") for n in lengths]
        cells += [fmt(r.passkey_mean, ".3f"), fmt(d_pk, "+.1f")]
        out.append("| " + " | ".join(cells) + " |")
    if failed or bad:
        out.append("")
        out.append("Not measured:")
        for name, why in failed:
            out.append(f"- `{name}`: {why}")
        for name, why in bad:
            out.append(f"- `{name}`: {why}")
    return "\n".join(out) + "\n"


def gnuplot_terminal():
    """'pngcairo', 'png' or None (no gnuplot / no PNG terminal)."""
    if shutil.which("gnuplot") is None:
        return None
    try:
        p = subprocess.run(["gnuplot", "-e", "set terminal"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    words = {line.split()[0] for line in (p.stdout + p.stderr).splitlines() if line.strip()}
    return "pngcairo" if "pngcairo" in words else ("png" if "png" in words else None)


def write_plot(rows, base, plot_dir, png, terminal):
    os.makedirs(plot_dir, exist_ok=True)
    for stale in glob.glob(os.path.join(plot_dir, "frontier_*.dat")):
        os.remove(stale)
    windows = '/'.join(str(w) for w in sorted({r.windows for r in rows if r.windows is not None})) or '?'
    full_rank = [r for r in rows if r.full_rank]
    series = []
    for fam in FAMILIES:
        pts = [r for r in rows if r.family == fam]
        if fam in LORC_ALONE and pts:
            pts += [r for r in full_rank if r.family != fam]
        pts = [r for r in pts if r.bytes is not None and (r.ppl is not None or r.passkey_mean is not None)]
        if not pts:
            continue
        pts.sort(key=lambda r: r.bytes)
        data = f"frontier_{fam.replace('+', '_')}.dat"
        with open(os.path.join(plot_dir, data), "w") as f:
            f.write("# kv_bytes_per_token ppl passkey_mean name\n")
            for r in pts:
                f.write(f"{r.bytes} {fmt(r.ppl, '.6f', 'NaN')} {fmt(r.passkey_mean, '.6f', 'NaN')} {r.name}\n")
        series.append((fam, data))
    def plot_cmd(col):
        parts = [f"'{data}' using 1:{col} with {STYLE[fam]} title '{fam}'" for fam, data in series]
        return "plot " + ", \\\n     ".join(parts) if parts else "plot NaN notitle"

    ref_ppl = f"set arrow from graph 0, first {base.ppl} to graph 1, first {base.ppl} nohead dt 2 lc rgb 'gray40'\n" \
        if base is not None and base.ppl else ""
    ref_pk = (f"set arrow from graph 0, first {base.passkey_mean} to graph 1, first {base.passkey_mean} "
              "nohead dt 2 lc rgb 'gray40'\n") if base is not None and base.passkey_mean is not None else ""
    font = "font 'sans,11'" if terminal == "pngcairo" else ""
    ppls = [r.ppl for r in rows if r.ppl is not None]
    ppl_range = (f"set yrange [{0.95 * min(ppls):.3g}:{1.1 * max(ppls):.3g}]\n"
                 "set ytics (10, 10.5, 11, 12, 13, 15, 20, 25, 30, 40, 50, 70, 100)") if ppls else ""
    gp = f"""# Written by scripts/lorc/report.py: `gnuplot lorc_frontier.gp` in this directory.
set terminal {terminal or 'pngcairo'} size 1500,620 {font}
set output '{os.path.abspath(png)}'
set termoption noenhanced
set multiplot layout 1,2 title 'LoRC: quality against KV bytes per token (dashed: the uncompressed baseline)'
set logscale x 2
set offsets graph 0.04, graph 0.04, graph 0.05, graph 0.05
set xlabel 'KV bytes per token'
set grid
set key top right
set ylabel 'perplexity ({windows} windows, log scale)'
set logscale y
{ppl_range}
{ref_ppl}{plot_cmd(2)}
unset arrow
unset logscale y
set ytics autofreq
set ylabel 'mean pass-key accuracy'
set yrange [0:1.05]
set key bottom right
{ref_pk}{plot_cmd(3)}
unset multiplot
"""
    script = os.path.join(plot_dir, "lorc_frontier.gp")
    with open(script, "w") as f:
        f.write(gp)
    return script


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", help="sweep.sh's --out directory (NAME.json per config)")
    ap.add_argument("--md", help="markdown table output (default: RESULTS/lorc_sweep.md)")
    ap.add_argument("--plot-dir", help="gnuplot script and data files (default: RESULTS/plot)")
    ap.add_argument("--png", help="the PNG the script writes (default: PLOT_DIR/lorc_frontier.png; "
                                  "the committed one: docs/img/lorc_frontier.png)")
    ap.add_argument("--baseline", help="the uncompressed result deltas are taken against "
                                       f"(default: {' or '.join(BASELINE_NAMES)})")
    ap.add_argument("--no-gnuplot", action="store_true", help="write the script, do not run it")
    a = ap.parse_args()
    rows, bad, failed = load(a.results)
    if not rows:
        sys.exit(f"report.py: no sweep.sh results (*.json) in {a.results}")
    base = pick_baseline(rows, a.baseline)
    bf16_bytes = None
    if base is not None and base.dtype in DTYPE_BYTES:
        bf16_bytes = base.bytes * 2 // DTYPE_BYTES[base.dtype]
    md_path = a.md or os.path.join(a.results, "lorc_sweep.md")
    plot_dir = a.plot_dir or os.path.join(a.results, "plot")
    png = a.png or os.path.join(plot_dir, "lorc_frontier.png")
    with open(md_path, "w") as f:
        f.write(markdown(rows, base, bf16_bytes, bad, failed, a.results))
    print(f"report.py: {len(rows)} results, {len(failed)} failed configs -> {md_path}")
    terminal = None if a.no_gnuplot else gnuplot_terminal()
    script = write_plot(rows, base, plot_dir, png, terminal)
    if a.no_gnuplot or terminal is None:
        why = "--no-gnuplot" if a.no_gnuplot else "no gnuplot with a PNG terminal"
        print(f"report.py: {why}; run `gnuplot {os.path.basename(script)}` in {plot_dir} for {png}")
        return
    os.makedirs(os.path.dirname(os.path.abspath(png)), exist_ok=True)
    if os.path.exists(png):
        os.remove(png)
    p = subprocess.run(["gnuplot", os.path.basename(script)], cwd=plot_dir, capture_output=True, text=True)
    if p.returncode != 0 or not os.path.exists(png):
        sys.exit(f"report.py: gnuplot {script} failed ({p.returncode}):\n{p.stderr}")
    print(f"report.py: plot ({terminal}) -> {png}")


if __name__ == "__main__":
    main()
