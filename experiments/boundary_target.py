"""Which target for the demo: --target binary against --target boundary, on the VALIDATION split only.

    bash experiments/boundary_target.sh     # trains the runs (resumable), then runs this script
    python experiments/boundary_target.py [--runs runs/boundary_target] [--out experiments/results/boundary_target]

Every finished run <target>-seed<seed> of --runs (boundary_target.sh: the demo's recipe with --no-test) is
scored with its best.pt (the epoch of best validation Dice) on the validation images of its own split;
the test images are never read. The model's probabilities are computed once per image (the
foreground's, and the interior's for a boundary model) and decoded
  * as the commands decode that model (`instances.for_target("watershed", target)`: instances.DEFAULT
    for binary, instances.BOUNDARY for boundary): the comparison;
  * into 4-connected components;
  * for boundary runs, also with a small grid of interior decodings (relief, marker threshold, smallest
    marker, blobs without a marker kept or dropped), to show how far BOUNDARY is from the best of the
    grid. The grid stays beside the comparison: choosing from it on these images flatters the boundary
    target (DEFAULT was chosen on the seed-0 demo model's validation images, by tune_instances.py).
The classical pipeline (Otsu + the untuned watershed, Otsu + components) is scored on the same images.
Metrics: Dice of the decoded nuclei' foreground, AJI, AJI+, PQ, F1 at IoU 0.5 and the DSB score, over the
set and per image, and their goal mean (AJI, PQ, F1, DSB; tune_instances.py). Writes OUT/validation.md
and OUT/validation.json: every run, the mean over seeds of each target, boundary - binary paired by seed.
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import re
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from cdcl_nuclei import data, instances  # noqa: E402
from cdcl_nuclei.baseline import classical_instances  # noqa: E402
from cdcl_nuclei.evaluate import inference_config, predict_maps  # noqa: E402
from cdcl_nuclei.instances import COMPONENTS, Decoding, decode  # noqa: E402
from cdcl_nuclei.targets import TARGETS  # noqa: E402
from experiments import run_folders  # noqa: E402
from experiments.tune_instances import GOAL, goal_score, load_model, machine, score  # noqa: E402

METRICS = ("DC", "AJI", "AJI+", "PQ", "F1", "DSB")
PARTS = (("over_set", "over the set"), ("per_image_mean", "mean per image"))
RUN_NAME = re.compile(rf"({'|'.join(TARGETS)})-seed(\d+)")


def interior_grid() -> list[Decoding]:
    return [Decoding(surface=surface, markers="interior", sigma=1.0, marker_threshold=t, min_marker=m, unmarked=u)
            for surface, t, m, u in itertools.product(("probability", "distance"), (0.3, 0.5, 0.7, 0.9), (1, 3, 8),
                                                      ("keep", "drop"))]


def finished_runs(folder) -> dict:
    """{(target, seed): run folder} of the runs that finished (boundary_target.sh's `done`) with a best.pt."""
    runs = run_folders.finished_runs(folder, RUN_NAME, ("best.pt",))
    return {(target, int(seed)): path for (target, seed), path in runs.items()}


def validation_samples(cfg, data_root, cache):
    """The validation images of a run's own split (read once per split)."""
    root = data_root or cfg["data"]
    key = (root, cfg["dataset"], cfg["split_seed"], cfg["format"], cfg["max_images"], cfg.get("channel"))
    if key not in cache:
        splits = data.dataset_splits(cfg["dataset"], root, seed=cfg["split_seed"], fmt=cfg["format"],
                                     max_images=cfg["max_images"], channel=cfg.get("channel"))
        cache[key] = data.load_full(splits["val"], 250 if cfg["dataset"] == "monuseg" else None)
    return key, cache[key]


def score_run(path, data_root, cache):
    model, cfg, which = load_model(os.path.join(path, "best.pt"))
    target = cfg.get("target", "binary")
    key, samples = validation_samples(cfg, data_root, cache)
    icfg = inference_config(cfg["inference"])
    chosen = instances.for_target("watershed", target)
    maps = [predict_maps(model, s.image, icfg, interior=chosen.needs_interior) for s in samples]
    masks = [fg > icfg.threshold for fg, _ in maps]

    def decoded(d):
        return score([decode(m, fg, d, interior=inner) for m, (fg, inner) in zip(masks, maps)], samples)

    out = {"run": path, "checkpoint": which, "target": target, "seed": cfg["seed"], "split": key[1:3],
           "otsu_side": cfg.get("otsu_side", "minority"), "images": [s.id for s in samples],
           "decoding": chosen.describe(), "model": decoded(chosen), "components": decoded(COMPONENTS)}
    if chosen.needs_interior:
        out["grid"] = []
        for d in interior_grid():
            summary = decoded(d)
            out["grid"].append({"decoding": d.describe(), "summary": summary, "goal": goal_score(summary)})
    return out, samples


def mean(summaries):
    return {part: {k: sum(s[part][k] for s in summaries) / len(summaries) for k in METRICS} for part, _ in PARTS}


def difference(a, b):
    return {part: {k: a[part][k] - b[part][k] for k in METRICS} for part, _ in PARTS}


def table(rows, part, points=False):
    fmt = "{:+.2f}" if points else "{:.2f}"
    lines = ["| | " + " | ".join(METRICS) + " | goal mean |", "|---" * (len(METRICS) + 2) + "|"]
    for label, s in rows:
        goal = sum(s[p][k] for p, _ in PARTS for k in GOAL) / (2 * len(GOAL))
        lines.append(f"| {label} | " + " | ".join(fmt.format(100 * s[part][k]) for k in METRICS)
                     + f" | {fmt.format(100 * goal)} |")
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", default="runs/boundary_target")
    p.add_argument("--out", default="experiments/results/boundary_target")
    p.add_argument("--data", default=None, help="the runs' data folder, if it moved (default: each run's own)")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    if not os.path.isdir(a.runs):
        print(f"error: --runs: no folder {a.runs}", file=sys.stderr)
        return 2
    runs = finished_runs(a.runs)
    if not runs:
        print(f"error: --runs: no finished run (<target>-seed<N>/ with done and best.pt) in {a.runs}", file=sys.stderr)
        return 2
    torch.set_num_threads(a.threads)
    cache, classical, results = {}, {}, []
    for (target, seed), path in sorted(runs.items(), key=lambda kv: (kv[0][1], TARGETS.index(kv[0][0]))):
        r, samples = score_run(path, a.data, cache)
        results.append(r)
        key = (*r["split"], r["otsu_side"])
        if key not in classical:  # one classical pipeline per split: it does not learn
            classical[key] = {m: score([classical_instances(s.image, m, r["otsu_side"]) for s in samples], samples)
                              for m in ("watershed", "components")}
        print(f"{target} seed {seed}: AJI {100 * r['model']['over_set']['AJI']:.2f} over the set, "
              f"{100 * r['model']['per_image_mean']['AJI']:.2f} per image", flush=True)
    by = {(r["target"], r["seed"]): r for r in results}
    means = {t: mean([r["model"] for r in results if r["target"] == t]) for t in TARGETS
             if any(r["target"] == t for r in results)}
    seeds = sorted(s for t, s in by if t == "boundary" and ("binary", s) in by)
    paired = {s: difference(by["boundary", s]["model"], by["binary", s]["model"]) for s in seeds}

    stamp = {"machine": machine(), "date": datetime.date.today().isoformat(), "runs_folder": a.runs}
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "validation.json"), "w") as f:
        json.dump({**stamp, "runs": results, "mean": means,
                   "classical": {f"{k[0]} split seed {k[1]}, {k[2]} side": v for k, v in classical.items()},
                   "boundary_minus_binary": {str(s): d for s, d in paired.items()},
                   "boundary_minus_binary_mean": mean(list(paired.values())) if paired else None}, f, indent=1)

    n_images = sorted({len(r["images"]) for r in results})
    lines = ["# --target binary against --target boundary, validation split", "",
             f"{stamp['machine']}; {stamp['date']}. Runs: `{a.runs}` (experiments/boundary_target.sh: the demo's "
             "recipe, `--no-test`), each scored with its best.pt on the validation images of its split "
             f"({'/'.join(map(str, n_images))} images); the test split is not read. "
             "`python experiments/boundary_target.py`.", "",
             f"Nuclei: binary runs `{instances.DEFAULT}`; boundary runs `{instances.BOUNDARY}`. Classical: Otsu's "
             f"threshold, `{instances.CLASSICAL}` (untuned). Values in %; goal mean = mean of "
             f"{', '.join(GOAL)} over the set and per image.", ""]
    for part, label in PARTS:
        rows = [(f"{r['target']}, seed {r['seed']}", r["model"]) for r in results]
        rows += [(f"**{t}, mean of {sum(r['target'] == t for r in results)} seeds**", m) for t, m in means.items()]
        for k, v in classical.items():
            rows += [(f"Otsu + {m} ({k[0]} split seed {k[1]})", v[m]) for m in ("watershed", "components")]
        lines += [f"## {label.capitalize()}", ""] + table(rows, part) + [""]
        if paired:
            diff = [(f"boundary - binary, seed {s}", d) for s, d in paired.items()]
            diff.append(("**boundary - binary, mean**", mean(list(paired.values()))))
            lines += [f"Paired by seed ({label}, points of %):", ""] + table(diff, part, points=True) + [""]
    lines += ["## The same models as 4-connected components", "",
              "(What the split adds: these rows have no split at all.)", ""]
    rows = [(f"{r['target']}, seed {r['seed']}", r["components"]) for r in results]
    for part, label in PARTS:
        lines += [f"{label.capitalize()}:", ""] + table(rows, part) + [""]
    grids = [r for r in results if "grid" in r]
    if grids:
        names = [json.dumps(g["decoding"]) for g in grids[0]["grid"]]
        goal = {n: sum(r["grid"][i]["goal"] for r in grids) / len(grids) for i, n in enumerate(names)}
        ranked = sorted(names, key=lambda n: -goal[n])
        mine = json.dumps(instances.BOUNDARY.describe())
        lines += ["## Interior decodings of the boundary runs (beside the comparison, not chosen from)", "",
                  f"Goal mean over the {len(grids)} boundary run(s), the best 10 of {len(names)} decodings and "
                  f"instances.BOUNDARY (rank {ranked.index(mine) + 1 if mine in goal else '-'}):", "",
                  "| decoding | goal mean |", "|---|---|"]
        for n in ranked[:10] + ([mine] if mine in goal and mine not in ranked[:10] else []):
            lines.append(f"| `{n}` | {100 * goal[n]:.2f} |")
        lines.append("")
    with open(os.path.join(a.out, "validation.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"-> {os.path.join(a.out, 'validation.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
