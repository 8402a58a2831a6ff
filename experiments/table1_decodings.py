"""The CPU Table 1's instance metrics under two decodings of the same models, side by side.

    python experiments/table1_decodings.py --out experiments/results/table1-recipe/dsb-1_32/decodings.md \\
        --old experiments/results/table1-recipe/dsb-1_32/results-decoding-2026-12-04.json \\
        --new experiments/results/table1-recipe/dsb-1_32/results.json

Each input is a table1.py results.json of the same runs, tested with a different `instances.DEFAULT`
(the runs re-tested from their best.pt after the default changed). Writes one Markdown table: per
method the mean ± sd over seeds of AJI (over the set and per image), PQ, F1 at IoU 0.5 and the DSB
score over the set, under each decoding, with the classical pipeline (Otsu + the untuned watershed,
unchanged) and the models' components beside.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys

COLUMNS = (("aji_set", "AJI over the set"), ("aji_image", "AJI per image"), ("pq_set", "PQ over the set"),
           ("f1_set", "F1@0.5 over the set"), ("dsb_set", "DSB score over the set"))


def ms(values):
    values = [v for v in values if v is not None]
    if len(values) > 1:
        return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"
    return f"{values[0]:.2f}" if values else "-"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--old", required=True)
    p.add_argument("--new", required=True)
    p.add_argument("--old-name", default="decoding of 2026-12-04")
    p.add_argument("--new-name", default="decoding of 2026-12-05")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    tables = {}
    for name, path in ((a.old_name, a.old), (a.new_name, a.new)):
        try:
            with open(path) as f:
                tables[name] = json.load(f)["runs"]
        except (OSError, ValueError, KeyError) as e:
            print(f"error: cannot read table1.py results from {path}: {e}", file=sys.stderr)
            return 2
    old, new = tables[a.old_name], tables[a.new_name]
    if sorted((r["method"], r["seed"]) for r in old) != sorted((r["method"], r["seed"]) for r in new):
        print(f"error: --old and --new hold different runs ({a.old}, {a.new})", file=sys.stderr)
        return 2
    methods = list(dict.fromkeys(r["method"] for r in new))
    lines = ["| method | " + " | ".join(h for _, h in COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for name, runs in tables.items():
        for m in methods:
            mine = [r for r in runs if r["method"] == m]
            lines.append(f"| {m}, {name} | " + " | ".join(ms([r[c] for r in mine]) for c, _ in COLUMNS) + " |")
    for m in methods:
        mine = [r for r in new if r["method"] == m]
        lines.append(f"| {m}, components | " + " | ".join(ms([r.get("components_" + c) for r in mine])
                                                           for c, _ in COLUMNS) + " |")
    lines.append("| Otsu + watershed (no learning) | " + " | ".join(ms([new[0]["otsu_" + c]]) for c, _ in COLUMNS)
                 + " |")
    with open(a.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
