"""The demo's training budgets side by side, on the VALIDATION split (experiments/demo_budget.sh runs it).

    python experiments/demo_budget.py [--runs runs/demo_budget] [--out experiments/results/demo_budget]

Reads every budget's runs (RUNS/e<epochs>-seed<seed>/log.csv: the best validation Dice, the training
seconds) and its tune_instances.py choice (OUT/e<epochs>/validation-seed<seeds>.json), and writes
OUT/results.md and OUT/results.json: per budget the mean over seeds of the best validation Dice and of
the training time, the goal mean (AJI, PQ, F1, DSB; over the set and per image) of the decoding
chosen for it, of each decoding chosen for any budget and of instances.DEFAULT, so that the budgets
are compared with one decoding as well as each with its own.
"""
from __future__ import annotations

import argparse
import csv
import glob
import json
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from cdcl_nuclei.instances import DEFAULT  # noqa: E402
from experiments.choose_decoding import key  # noqa: E402
from experiments.run_folders import finished_runs  # noqa: E402

RUN_NAME = re.compile(r"e(\d+)-seed(\d+)")


def run_log(path):
    rows = list(csv.DictReader(open(os.path.join(path, "log.csv"))))
    best = max(rows, key=lambda r: float(r["val_dice"]))
    return {"best_val_dice": float(best["val_dice"]), "best_epoch": int(best["epoch"]),
            "seconds": sum(float(r["seconds"]) for r in rows), "epochs": len(rows)}


def tuned(out, epochs):
    files = [f for f in glob.glob(os.path.join(out, f"e{epochs}", "validation-seed*.json"))
             if not f.endswith("-teacher.json")]
    if len(files) != 1:
        raise SystemExit(f"error: --out: expected one validation-seed*.json in {out}/e{epochs}, found {len(files)}")
    return json.load(open(files[0]))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", default="runs/demo_budget")
    p.add_argument("--out", default="experiments/results/demo_budget")
    a = p.parse_args(argv)
    if not os.path.isdir(a.runs):
        print(f"error: --runs: no folder {a.runs}", file=sys.stderr)
        return 2
    runs = {}
    for (epochs, seed), path in finished_runs(a.runs, RUN_NAME).items():
        runs.setdefault(int(epochs), {})[int(seed)] = run_log(path)
    if not runs:
        print(f"error: --runs: no finished run (e<epochs>-seed<N>/ with done) in {a.runs}", file=sys.stderr)
        return 2
    budgets = sorted(runs)
    tunes = {b: tuned(a.out, b) for b in budgets}
    rows = {b: {key(r["decoding"]): r for r in tunes[b]["rows"]} for b in budgets}
    chosen = {b: tunes[b]["chosen"] for b in budgets}
    results = {}
    for b in budgets:
        seeds = runs[b]
        results[b] = {
            "seeds": sorted(seeds), "runs": seeds,
            "best_val_dice": sum(r["best_val_dice"] for r in seeds.values()) / len(seeds),
            "seconds": sum(r["seconds"] for r in seeds.values()) / len(seeds),
            "chosen": chosen[b],
            "goal": {key(d): rows[b][key(d)]["goal"] for d in chosen.values()},
            "default_goal": rows[b][key(DEFAULT.describe())]["goal"],
            "classical_goal": sum(tunes[b]["classical"]["watershed"][part][k] for part in ("over_set", "per_image_mean")
                                  for k in ("AJI", "PQ", "F1", "DSB")) / 8,
        }
    lines = ["# The demo's training budget, on the validation split", "",
             f"Runs: `{a.runs}` (experiments/demo_budget.sh: the demo's recipe, `--no-test`); decodings: "
             "experiments/tune_instances.py on the 12 validation images, each metric the mean over the seeds. "
             f"Machine and date: those of `{a.out}/e<epochs>/validation-seed*.md`. Values in %; goal mean = mean "
             "of AJI, PQ, F1 at IoU 0.5 and the DSB score, over the set and per image; training seconds as "
             "logged (runs that shared the CPU with other jobs ran slower).", "",
             "| epochs (x 10 steps) | seeds | best validation Dice, each seed | mean | training s (mean) | "
             + " | ".join(f"goal mean, decoding chosen at {b}" for b in budgets)
             + " | goal mean, instances.DEFAULT | Otsu + watershed |",
             "|---" * (7 + len(budgets)) + "|"]
    for b in budgets:
        r = results[b]
        each = " / ".join(f"{100 * r['runs'][s]['best_val_dice']:.2f}" for s in r["seeds"])
        goals = " | ".join(f"{100 * g:.2f}" for g in [r["goal"][key(chosen[c])] for c in budgets]
                           + [r["default_goal"], r["classical_goal"]])
        lines.append(f"| {b} | {', '.join(map(str, r['seeds']))} | {each} | {100 * r['best_val_dice']:.2f} | "
                     f"{r['seconds']:.0f} | {goals} |")
    lines += ["", "Decodings chosen (the best goal mean among those that keep every component):", ""]
    lines += [f"- at {b} epochs: `{json.dumps(chosen[b])}`" for b in budgets]
    lines += [f"- instances.DEFAULT (the commands' decoding, chosen on more than this split: "
              f"experiments/choose_decoding.py): `{json.dumps(DEFAULT.describe())}`"]
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(a.out, "results.json"), "w") as f:
        json.dump({str(b): r for b, r in results.items()}, f, indent=1, default=str)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
