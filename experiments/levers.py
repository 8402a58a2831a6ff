"""Item by item, what changes CDCL's validation Dice at the CPU Table 1 budget (DSB 1/32): the patch
size the contrastive loss sees (--grid), its weight, its start epoch and the bank memory. Every run
is `train.py --no-test`: the levers are judged on the validation split only, the test split is not
touched. A variant's score is the best validation Dice of its run (the epoch best.pt keeps), and
its difference to plain CDCL and to SupOnly of the same seed (runs of experiments/table1_cpu.sh).

    python experiments/levers.py --runs runs/levers --base runs/table1/dsb-1_32 --out experiments/results/levers
"""
from __future__ import annotations

import argparse
import csv
import glob
import os
import re
import statistics

SHARES = ("fdp_share", "bdp_share", "with_negative_share", "negatives_per_query")


def best_val(folder):
    with open(os.path.join(folder, "log.csv")) as f:
        rows = list(csv.DictReader(f))
    vals = [float(r["val_dice"]) for r in rows if r["val_dice"] not in ("", "nan")]
    seen = {k: statistics.mean(float(r[k]) for r in rows if r.get(k)) if any(r.get(k) for r in rows) else None
            for k in SHARES}
    return 100 * max(vals), sum(float(r["seconds"]) for r in rows), seen


def runs(root):
    """{(variant, seed): folder} for root/<variant>-seed<k>."""
    out = {}
    for d in sorted(glob.glob(os.path.join(root, "*-seed*"))):
        m = re.fullmatch(r"(.+)-seed(\d+)", os.path.basename(d))
        if m and os.path.exists(os.path.join(d, "log.csv")):
            out[(m.group(1), int(m.group(2)))] = d
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", required=True, help="folder of <variant>-seed<k> runs")
    p.add_argument("--base", required=True, help="the Table 1 runs (cdcl-seed<k>, suponly-seed<k>, ...)")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    base, var = runs(args.base), runs(args.runs)
    seeds = sorted({s for _, s in var})
    variants = ["suponly", "meanteacher", "cdcl"] + sorted({v for v, _ in var})
    score = {}
    for (v, s), d in list(base.items()) + list(var.items()):
        if s in seeds:
            score[(v, s)] = best_val(d)
    lines = ["# CDCL levers on the validation split (DSB 1/32, CPU Table 1 budget)", "",
             "Best validation Dice (%) of each run (the 66 validation images of split seed 0, Dice over the set); the "
             "differences pair runs of the same seed (same labeled subset).", "",
             "| variant | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | - cdcl | - suponly | s/run "
             "| FDP | BDP | with negative | negatives/query |", "|---" * (len(seeds) + 9) + "|"]
    for v in variants:
        if not all((v, s) in score for s in seeds):
            continue
        vals = [score[(v, s)][0] for s in seeds]
        d_c = [score[(v, s)][0] - score[("cdcl", s)][0] for s in seeds if ("cdcl", s) in score]
        d_s = [score[(v, s)][0] - score[("suponly", s)][0] for s in seeds if ("suponly", s) in score]
        seen = score[(v, seeds[0])][2]
        fmt = [f"{100 * statistics.mean(score[(v, s)][2][k] for s in seeds):.1f}%" if seen[k] is not None else "-"
               for k in SHARES[:3]]
        npq = (f"{statistics.mean(score[(v, s)][2]['negatives_per_query'] for s in seeds):.0f}"
               if seen["negatives_per_query"] is not None else "-")
        lines.append(f"| {v} | " + " | ".join(f"{x:.2f}" for x in vals) + f" | {statistics.mean(vals):.2f} | "
                     f"{statistics.mean(d_c):+.2f} | {statistics.mean(d_s):+.2f} | "
                     f"{statistics.mean(score[(v, s)][1] for s in seeds):.0f} | " + " | ".join(fmt) + f" | {npq} |")
    os.makedirs(args.out, exist_ok=True)
    text = "\n".join(lines) + "\n"
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(text)
    print(text, end="")


if __name__ == "__main__":
    main()
