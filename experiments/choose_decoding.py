"""One decoding for every binary model, chosen on several validation splits at once.

    python experiments/choose_decoding.py --out experiments/results/instances \\
        experiments/results/demo_budget/e90/validation-seed0-1-2.json \\
        experiments/results/instances/dsb-1_32/validation-seed0-1-2-3-4.json

Each input is a tune_instances.py result (every decoding of its grid scored on one split's validation
images, the mean over that split's runs). A decoding's score here is the mean of its goal means (AJI,
PQ, F1 at IoU 0.5, DSB score; over the set and per image) over the inputs, so that a setting good for
strong models on the demo's sample and for weak ones trained on few labels both count. Unlike
tune_instances.py on one split, every decoding may be chosen, those that drop components too: with a
split of weak models among the inputs, what dropping costs a model unsure of its nuclei is measured
rather than ruled out. Writes
OUT/choice.md and OUT/choice.json: every decoding's goal mean on each input and their mean, the
choice, and the classical pipeline of each input.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from cdcl_nuclei.instances import Decoding  # noqa: E402
from experiments.tune_instances import goal_score  # noqa: E402


def key(decoding: dict) -> str:
    return json.dumps(decoding, sort_keys=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+", help="tune_instances.py validation-seed*.json files")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    tunes = []
    for path in a.results:
        try:
            with open(path) as f:
                tunes.append(json.load(f))
        except (OSError, ValueError) as e:
            print(f"error: results: cannot read {path}: {e}", file=sys.stderr)
            return 2
    grids = [{key(r["decoding"]): r for r in t["rows"]} for t in tunes]
    common = [k for k in grids[0] if all(k in g for g in grids[1:])]
    if not common:
        print("error: results: the inputs share no decoding", file=sys.stderr)
        return 2
    rows = []
    for k in common:
        goals = [g[k]["goal"] for g in grids]
        decoding = grids[0][k]["decoding"]
        rows.append({"decoding": decoding, "goals": goals, "mean": sum(goals) / len(goals),
                     "keeps_every_component": Decoding(**decoding).keeps_every_component})
    rows.sort(key=lambda r: -r["mean"])  # stable: equal means keep the grid's order
    chosen = rows[0]
    classical = [goal_score(t["classical"]["watershed"]) for t in tunes]
    names = [os.path.relpath(path, a.out) if os.path.isabs(path) else path for path in a.results]
    lines = ["# One decoding for every binary model, chosen on validation splits", "",
             "Inputs (experiments/tune_instances.py, each the mean over its runs):", ""]
    lines += [f"{i + 1}. `{n}`: {', '.join(t['checkpoint']) if isinstance(t['checkpoint'], list) else t['checkpoint']}"
              f" ({t['machine']}; {t['date']})" for i, (n, t) in enumerate(zip(names, tunes))]
    lines += ["", "Goal mean = mean of AJI, PQ, F1 at IoU 0.5 and the DSB score, over the set and per image, in %; "
              "(d): may drop components (without a marker, or never above min_peak). "
              f"**Chosen: `{json.dumps(chosen['decoding'])}`** (mean {100 * chosen['mean']:.2f}).", "",
              "| decoding | " + " | ".join(f"input {i + 1}" for i in range(len(tunes))) + " | mean |",
              "|---" * (len(tunes) + 2) + "|"]
    for r in rows:
        name = ", ".join(f"{k}={v}" for k, v in r["decoding"].items())
        lines.append(f"| {name if r['keeps_every_component'] else '(d) ' + name} | "
                     + " | ".join(f"{100 * g:.2f}" for g in r["goals"]) + f" | {100 * r['mean']:.2f} |")
    lines.append("| Otsu + watershed (classical, untuned) | " + " | ".join(f"{100 * g:.2f}" for g in classical)
                 + f" | {100 * sum(classical) / len(classical):.2f} |")
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "choice.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(a.out, "choice.json"), "w") as f:
        json.dump({"inputs": a.results, "chosen": chosen["decoding"], "rows": rows, "classical": classical}, f,
                  indent=1)
    print(f"chosen: {chosen['decoding']} (mean goal {100 * chosen['mean']:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
