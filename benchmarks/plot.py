"""Plots of benchmark CSVs (benchmarks/run.py output).

    python -m benchmarks.plot benchmarks/results/h200-2026-11-27.csv --out benchmarks/results
    python -m benchmarks.plot benchmarks/results/cpu-sweepM.csv --out benchmarks/results

A CSV of named sizes gives bar charts of time and peak extra memory per contender; a sweep CSV
(sizes N<n>xM<m>) gives lines of time and memory against the swept dimension, with runs that
ran out of memory marked.
"""
import argparse
import csv
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def _tick(rows, name):
    """A contender's label; one whose rows timed the forward alone (flex on a CPU) says so."""
    fwd_only = any(r["contender"] == name and r.get("timed") == "fwd" for r in rows)
    return f"{name} (fwd only)" if fwd_only else name


def _bars(rows, title, out):
    sizes = list(dict.fromkeys(r["size"] for r in rows))
    names = list(dict.fromkeys(r["contender"] for r in rows))
    fig, axes = plt.subplots(2, 2 * len(sizes) // 2 or 1, figsize=(6 * len(sizes), 8), squeeze=False)
    for col, size in enumerate(sizes):
        for row, (field, label) in enumerate((("time_ms", "forward+backward (ms)"),
                                              ("peak_extra_mb", "peak memory above inputs (MB)"))):
            ax = axes[row][col]
            for g, (bank_grad, hatch) in enumerate((("0", ""), ("1", "//"))):
                vals = []
                for name in names:
                    r = next((r for r in rows if r["size"] == size and r["contender"] == name
                              and r["bank_grad"] == bank_grad), None)
                    vals.append(float(r[field]) if r and r["status"] == "ok" and r[field] else 0.0)
                xs = [i + (g - 0.5) * 0.4 for i in range(len(names))]
                ax.bar(xs, vals, width=0.4, hatch=hatch, edgecolor="black",
                       label="bank with grad" if bank_grad == "1" else "bank detached")
                for x, v in zip(xs, vals):
                    if v == 0.0:
                        ax.text(x, 1, "oom/-", rotation=90, ha="center", va="bottom", fontsize=7)
            ax.set_yscale("log")
            ax.set_xticks(range(len(names)))
            ax.set_xticklabels([_tick(rows, name) for name in names], rotation=35, ha="right", fontsize=8)
            ax.set_ylabel(label)
            ax.set_title(f"{size}: N={rows[0]['N'] if False else next(r['N'] for r in rows if r['size'] == size)}, "
                         f"M={next(r['M'] for r in rows if r['size'] == size)}, D=128")
            ax.grid(axis="y", which="both", alpha=0.3)
            if row == 0 and col == 0:
                ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _sweep(rows, title, out):
    swept = "M" if len({r["N"] for r in rows}) == 1 else "N"
    names = list(dict.fromkeys(r["contender"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, (field, label) in zip(axes, (("time_ms", "forward+backward (ms)"),
                                         ("peak_extra_mb", "peak memory above inputs (MB)"))):
        for name in names:
            for bank_grad, style in (("0", "-"), ("1", "--")):
                pts = [(int(r[swept]), r) for r in rows if r["contender"] == name and r["bank_grad"] == bank_grad]
                if not pts:
                    continue
                ok = [(x, float(r[field])) for x, r in pts if r["status"] == "ok"]
                line, = ax.plot([x for x, _ in ok], [y for _, y in ok], style, marker="o",
                                label=f"{_tick(rows, name)}{' (bank grad)' if bank_grad == '1' else ''}")
                failed = [x for x, r in pts if r["status"] != "ok"]
                if failed and ok:
                    ax.scatter(failed, [ok[-1][1]] * len(failed), marker="x", s=80, color=line.get_color())
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(f"{swept} ({'bank rows' if swept == 'M' else 'queries'}); x = out of memory/time")
        ax.set_ylabel(label)
        ax.grid(which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("csv", nargs="+")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    for path in args.csv:
        rows = _rows(path)
        if not rows:
            continue
        title = f"{rows[0]['device']} ({rows[0]['date']}, torch {rows[0]['torch']})"
        base = os.path.join(args.out, os.path.splitext(os.path.basename(path))[0] + ".png")
        if all(r["size"].startswith("N") and "xM" in r["size"] for r in rows):
            _sweep(rows, title, base)
        else:
            _bars(rows, title, base)
        print(base)


if __name__ == "__main__":
    main()
