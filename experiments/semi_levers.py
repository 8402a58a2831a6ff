"""Tabulate experiments/semi_levers.sh: per variant and seed, the validation curve of the student and
the teacher and what the teacher's pseudo labels were worth against the hidden labels.

    python experiments/semi_levers.py [--runs runs/semi_levers] [--out experiments/results/semi_levers]
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from experiments.run_folders import finished_runs  # noqa: E402


def read_log(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def num(row, key):
    v = row.get(key, "")
    return float(v) if v not in ("", None) else math.nan


def run_summary(rows):
    val = [num(r, "val_dice") for r in rows]
    teacher = [num(r, "teacher_val_dice") for r in rows]
    finite = [(v, i) for i, v in enumerate(val) if not math.isnan(v)]
    best, best_i = max(finite) if finite else (math.nan, -1)
    branch = [r for r in rows if num(r, "w_cons") > 0]

    def mean_of(key):
        vals = [num(r, key) for r in branch if not math.isnan(num(r, key))]
        return sum(vals) / len(vals) if vals else math.nan

    out = {"epochs": len(rows), "best": best, "best_epoch": best_i + 1, "first": val[0] if val else math.nan,
           "last": val[-1] if val else math.nan, "curve": val, "teacher_curve": teacher,
           "teacher_best": max((t for t in teacher if not math.isnan(t)), default=math.nan),
           "seconds": sum(num(r, "seconds") for r in rows)}
    for key in ("pl_acc", "pl_conf_share", "pl_conf_acc", "pl_dice", "cons_kept", "pl_dice_fluorescence",
                "pl_dice_brightfield", "pl_dice_stained"):
        out[key] = mean_of(key)
    return out


def _nan(x):
    if isinstance(x, list):
        return [_nan(v) for v in x]
    return math.nan if x is None else x


def keep_earlier(runs, path):
    """Add to `runs` the (variant, seed) summaries of an earlier table at `path` whose run folders are
    gone (runs are not kept between sessions; their summaries are); a run present now wins. Returns
    how many were kept."""
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        earlier = json.load(f)
    n = 0
    for v, by_seed in earlier.items():
        for seed, summary in by_seed.items():
            if int(seed) not in runs.get(v, {}):
                runs.setdefault(v, {})[int(seed)] = {k: _nan(x) for k, x in summary.items()}
                n += 1
    return n


def mean_over_seeds(by_seed, seeds, key):
    vals = [by_seed[s][key] for s in seeds if not math.isnan(by_seed[s][key])]
    return sum(vals) / len(vals) if vals else math.nan


def pct(v):
    return "-" if math.isnan(v) else f"{100 * v:.2f}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", default="runs/semi_levers")
    p.add_argument("--out", default="experiments/results/semi_levers")
    p.add_argument("--baseline", default="suponly")
    a = p.parse_args(argv)
    if not os.path.isdir(a.runs):
        print(f"error: --runs: no folder {a.runs}", file=sys.stderr)
        return 2
    runs = {}
    for (lever, seed), path in finished_runs(a.runs, r"(.+)-seed(\d+)", ("log.csv",)).items():
        runs.setdefault(lever, {})[int(seed)] = run_summary(read_log(os.path.join(path, "log.csv")))
    kept = keep_earlier(runs, os.path.join(a.out, "results.json"))
    if not runs:
        print(f"error: --runs: no finished run in {a.runs}", file=sys.stderr)
        return 2
    seeds = sorted({s for v in runs.values() for s in v})
    base = runs.get(a.baseline, {})
    lines = ["# Unlabeled-branch levers on the validation split (DSB 1/32, CPU Table 1 budget)", "",
             "Best validation Dice (%) over the set of the 66 validation images (split seed 0), the epoch it was "
             "reached and the last epoch's; differences pair runs of the same seed (same labeled subset). "
             "Pseudo-label columns: the teacher's argmax on the unlabeled training crops against their hidden "
             "labels, means over the epochs of the unlabeled branch (confident: teacher probability >= 0.95). "
             "Runs of `experiments/semi_levers.sh`; s/run is wall time on a machine that ran other jobs too"
             + (f" ({kept} runs of an earlier session kept from this folder's results.json)" if kept else "")
             + ".", "",
             "| variant | " + " | ".join(f"seed {s}: best (epoch) / last" for s in seeds)
             + f" | mean best | - {a.baseline} | teacher best (mean) | PL acc | PL Dice | PL Dice fluo / bright "
             "/ stained | confident share / acc | s/run |",
             "|---" * (len(seeds) + 9) + "|"]
    for v, by_seed in sorted(runs.items(), key=lambda kv: (kv[0] != a.baseline, kv[0])):
        cells = [f"{pct(r['best'])} ({r['best_epoch']}) / {pct(r['last'])}" if (r := by_seed.get(s)) else "-"
                 for s in seeds]
        common = [s for s in seeds if s in by_seed]
        mean_best = sum(by_seed[s]["best"] for s in common) / len(common)
        paired = [by_seed[s]["best"] - base[s]["best"] for s in common if s in base]
        diff = f"{100 * sum(paired) / len(paired):+.2f}" if paired else "-"

        avg = lambda key, by_seed=by_seed, common=common: mean_over_seeds(by_seed, common, key)
        kinds = " / ".join(pct(avg(f"pl_dice_{k}")) for k in ("fluorescence", "brightfield", "stained"))
        lines.append(f"| {v} | " + " | ".join(cells) + f" | {pct(mean_best)} | {diff} | {pct(avg('teacher_best'))} | "
                     f"{pct(avg('pl_acc'))} | {pct(avg('pl_dice'))} | {kinds} | "
                     f"{pct(avg('pl_conf_share'))} / {pct(avg('pl_conf_acc'))} | {avg('seconds'):.0f} |")
    lines += ["", "Validation curves (Dice %, epochs 1..10; student, then teacher):", ""]
    for v, by_seed in sorted(runs.items()):
        for s, r in sorted(by_seed.items()):
            lines.append(f"- {v} seed {s}: " + " ".join(pct(x) for x in r["curve"])
                         + ("; teacher " + " ".join(pct(x) for x in r["teacher_curve"])
                            if not all(math.isnan(x) for x in r["teacher_curve"]) else ""))
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(a.out, "results.json"), "w") as f:
        json.dump(runs, f, indent=1, default=lambda x: None)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
