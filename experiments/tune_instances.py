"""Choose the model's instance decoding on the validation split only, then report the test split once.

    # 1. the grid on the validation images of the runs' own split (the demo's: dsb, split seed 0)
    python experiments/tune_instances.py --checkpoint runs/demo-seed{0,1,2}/best.pt \\
        --out experiments/results/instances
    # 2. after `instances.DEFAULT` holds the chosen decoding: the test images, once per run (a --target
    #    boundary checkpoint: with the decoding of its target, instances.BOUNDARY)
    python experiments/tune_instances.py --checkpoint runs/demo-seed{0,1,2}/best.pt \\
        --out experiments/results/instances --test

Step 1 computes each model's foreground probability on every validation image once, decodes it with
every decoding of the grid (the watershed on the distance or the probability, markers from h-maxima
or a probability threshold, a few Gaussian sigmas, components without a marker kept, dropped or kept
only above a peak probability) and with the 4-connected components, and writes
OUT/validation-seed<seeds>.md / .json with every row and the chosen decoding: the best mean of the
issue's goal metrics (AJI, PQ, F1 at IoU 0.5 and the DSB score, over the set and per image; with
several runs, each metric the mean over the runs first) among the decodings that keep every component
of the foreground (the best of all is reported beside it). The classical pipeline (Otsu + the untuned
watershed of `instances.CLASSICAL`) is scored beside it and is not tuned. Step 2 evaluates the
decoding of each run's target on the test split with the report of every run (`evaluate.write_report`:
model watershed / components, Otsu + watershed / components) and writes OUT/test-seed<seed>.md / .json,
and, as a control, Otsu's foreground split by the binary model's decoding (instances.DEFAULT) into
OUT/test-otsu-model-decoding.json: what the model gains beyond it is its foreground's.
`--net teacher` scores the runs' mean teachers instead of their students (files tagged -teacher).
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import platform
import sys

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from cdcl_nuclei import data, models  # noqa: E402
from cdcl_nuclei.baseline import classical_instances, otsu_mask  # noqa: E402
from cdcl_nuclei.checkpoint import load_checkpoint, load_into  # noqa: E402
from cdcl_nuclei.evaluate import (  # noqa: E402
    evaluate_samples,
    inference_config,
    predict_probability,
    summary_lines,
    write_report,
)
from cdcl_nuclei.instances import COMPONENTS, Decoding, decode, for_target  # noqa: E402
from cdcl_nuclei.metrics import SegmentationMeter  # noqa: E402

GOAL = ("AJI", "PQ", "F1", "DSB")  # the metrics the model must beat the classical pipeline on


def grid() -> list[Decoding]:
    ways = [dict(surface="distance", markers="h_maxima", sigma=s, h=h)
            for s, h in itertools.product((0.0, 0.5, 1.0, 2.0), (0.25, 0.5, 1.0, 1.5, 2.0, 3.0))]
    ways += [dict(surface="probability", markers="h_maxima", sigma=s, h=h)
             for s, h in itertools.product((0.0, 1.0, 2.0), (0.005, 0.01, 0.02, 0.05, 0.1, 0.2))]
    ways += [dict(surface=surf, markers="threshold", sigma=s, marker_threshold=t)
             for surf, s, t in itertools.product(("distance", "probability"), (0.0, 1.0),
                                                 (0.7, 0.8, 0.9, 0.95, 0.98))]
    unmarked = [dict(unmarked="keep"), dict(unmarked="drop")]
    # every blob kept, but those the model was never fairly sure of (specks on unfamiliar images)
    faint = [dict(unmarked="keep", min_peak=p) for p in (0.6, 0.7, 0.8, 0.9)]

    def filtered(w):
        return ((w["markers"] == "threshold" and w["marker_threshold"] > 0.9)
                or (w["surface"] == "distance" and w["markers"] == "h_maxima" and w["sigma"] >= 1 and w["h"] <= 1))
    return [COMPONENTS] + [Decoding(**w, **u) for w in ways for u in unmarked + (faint if filtered(w) else [])]


def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{os.cpu_count()}-core {model}, Python {platform.python_version()}, torch {torch.__version__}"


def goal_score(summary) -> float:
    return sum(summary[part][k] for part in ("over_set", "per_image_mean") for k in GOAL) / (2 * len(GOAL))


def score(maps, samples):
    meter = SegmentationMeter()
    for inst, s in zip(maps, samples):
        meter.update(inst, s.labels, s.id)
    return meter.summary()


def row(name, summary):
    cells = [f"{100 * summary[part][k]:.2f}" for part in ("over_set", "per_image_mean") for k in GOAL]
    return f"| {name} | " + " | ".join(cells) + f" | {100 * goal_score(summary):.2f} |"


def load_model(path, net="student"):
    """The checkpoint's student (what the commands predict with) or its mean teacher, in eval mode."""
    st = load_checkpoint(path)
    if st.get(net) is None:
        raise SystemExit(f"error: --net: {path} holds no {net} (a supervised run has no teacher)")
    model = models.build_model(models.config_from_dict(st["config"]["model"]))
    load_into(model, st[net], path, net)
    return model.eval(), st["config"], f"{net}, epoch {st['epoch']}, sha256 {st['sha256'][:16]}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, nargs="+",
                   help="one or more runs of the same split (the choice: the best goal mean over them)")
    p.add_argument("--net", choices=("student", "teacher"), default="student",
                   help="the network scored: the student (what train.py and predict.py use) or the mean teacher")
    p.add_argument("--data", default=os.path.join(ROOT, "data", "dsb2018_sample"),
                   help="the runs' data folder (default: the bundled sample, the demo's)")
    p.add_argument("--out", required=True)
    p.add_argument("--test", action="store_true",
                   help="evaluate the watershed of the checkpoint's target (binary: instances.DEFAULT) on the test")
    p.add_argument("--exclude", nargs="*", default=[], metavar="FOLDER",
                   help="leave out the validation images whose ids a dataset folder holds (for example the "
                        "bundled sample, so that a choice made on another split never sees the demo's test images)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    runs = [load_model(path, args.net) for path in args.checkpoint]
    cfg = runs[0][1]
    split = (cfg["dataset"], cfg["split_seed"], cfg["format"], cfg["max_images"])
    for path, (_, c, _) in zip(args.checkpoint, runs):
        if (c["dataset"], c["split_seed"], c["format"], c["max_images"]) != split:
            raise SystemExit(f"error: --checkpoint: {path} was trained on another split than {args.checkpoint[0]}")
    splits = data.dataset_splits(cfg["dataset"], args.data, seed=cfg["split_seed"], fmt=cfg["format"],
                                 max_images=cfg["max_images"])
    tile = 250 if cfg["dataset"] == "monuseg" else None
    seeds = [c["seed"] for _, c, _ in runs]
    tag = "-".join(str(s) for s in seeds) + ("-teacher" if args.net == "teacher" else "")
    os.makedirs(args.out, exist_ok=True)
    stamp = {"checkpoint": [f"{path} ({which})" for path, (_, _, which) in zip(args.checkpoint, runs)],
             "machine": machine(), "date": datetime.date.today().isoformat()}

    if args.test:
        samples = data.load_full(splits["test"], tile)
        for path, (model, c, which) in zip(args.checkpoint, runs):
            decoding = for_target("watershed", c.get("target", "binary"))
            comp = evaluate_samples(model, samples, inference_config(c["inference"]), progress=False,
                                    decoding=decoding)
            name = f"test-seed{c['seed']}" + ("-teacher" if args.net == "teacher" else "")
            report = write_report(comp, args.out, name,
                                  f"Demo test split, seed {c['seed']} ({args.net}), decoding chosen on validation",
                                  extra={**stamp, "checkpoint": f"{path} ({which})"})
            print(f"seed {c['seed']}:", *summary_lines(report), sep="\n")
        # a control for the choice of decoding: the classical pipeline's Otsu foreground, split as the
        # model's is (a threshold has no probability: the min_peak filter keeps all of Otsu's blobs).
        # What the model leads by beyond it comes from its foreground, not its decoding
        side = cfg.get("otsu_side", "minority")
        model_decoding = for_target("watershed", "binary")
        masks = [otsu_mask(s.image, side) for s in samples]  # as its probability: sure of every blob
        control = score([decode(m, m.astype(np.float32), model_decoding) for m in masks], samples)
        with open(os.path.join(args.out, "test-otsu-model-decoding.json"), "w") as f:
            json.dump({**stamp, "otsu_side": side, "decoding": model_decoding.describe(),
                       "images": [s.id for s in samples], "summary": control}, f, indent=1)
        print("Otsu, split as the model's foreground:", row("", control))
        return

    excluded = {e.id for folder in args.exclude for e in data.read_folder(folder)}
    samples = data.load_full([e for e in splits["val"] if e.id not in excluded], tile)
    if not samples:
        raise SystemExit("error: --exclude: no validation image is left")
    maps = []  # per run: (masks, probabilities) of every validation image
    for model, c, _ in runs:
        icfg = inference_config(c["inference"])
        probs = [predict_probability(model, s.image, icfg) for s in samples]
        maps.append(([pr > icfg.threshold for pr in probs], probs))
    results = []
    for d in grid():
        per_run = [score([decode(m, pr, d) for m, pr in zip(masks, probs)], samples) for masks, probs in maps]
        summary = mean_summary(per_run)
        results.append({"decoding": d.describe(), "keeps_every_component": d.keeps_every_component,
                        "summary": summary, "per_run": per_run, "goal": goal_score(summary)})
    # the first of equals: grid order. Only decodings that keep every component may be chosen: one
    # that drops the blobs a model is unsure of leaves a weak model (early in training, few labels,
    # unfamiliar images) with no nuclei at all, which a validation split of a strong model never shows
    best = max((r for r in results if r["keeps_every_component"]), key=lambda r: r["goal"])
    best_any = max(results, key=lambda r: r["goal"])
    classical = {m: score([classical_instances(s.image, m) for s in samples], samples)
                 for m in ("watershed", "components")}
    header = ("| decoding | " + " | ".join(f"{k} (set)" for k in GOAL) + " | "
              + " | ".join(f"{k} (image)" for k in GOAL) + " | mean |")
    models_line = "; ".join(f"`{c}`" for c in stamp["checkpoint"])
    which_seeds = ", ".join(map(str, seeds))
    lines = [f"# Instance decoding chosen on the validation split ({len(samples)} images, seed {which_seeds}, "
             f"{args.net})", "",
             f"Model{'s' if len(runs) > 1 else ''}: {models_line} (split: {cfg['dataset']}, split seed "
             f"{cfg['split_seed']}). {stamp['machine']}; {stamp['date']}. `python experiments/tune_instances.py`.", "",
             "Chosen by the mean of the goal metrics (AJI, PQ, F1 at IoU 0.5, DSB score; over the set and "
             f"per image{', each the mean over the runs' if len(runs) > 1 else ''}) among the decodings that "
             f"keep every component of the foreground: **{best['decoding']}** (goal mean "
             f"{100 * best['goal']:.2f}). The best of all, including those that drop components without a "
             f"marker: {best_any['decoding']} ({100 * best_any['goal']:.2f}). Values in %; (d): drops "
             "components.", "",
             header, "|---" * (2 * len(GOAL) + 2) + "|"]
    for r in sorted(results, key=lambda r: -r["goal"]):
        name = ", ".join(f"{k}={v}" for k, v in r["decoding"].items())
        lines.append(row(name if r["keeps_every_component"] else f"(d) {name}", r["summary"]))
    lines += ["", "The classical pipeline on the same images (untuned, not part of the choice):", "",
              header, "|---" * (2 * len(GOAL) + 2) + "|"]
    lines += [row(f"Otsu + {m}", s) for m, s in classical.items()]
    with open(os.path.join(args.out, f"validation-seed{tag}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(args.out, f"validation-seed{tag}.json"), "w") as f:
        json.dump({**stamp, "images": [s.id for s in samples], "chosen": best["decoding"],
                   "best_of_all": best_any["decoding"], "rows": results, "classical": classical}, f, indent=1)
    print(f"chosen on validation: {best['decoding']} (goal mean {100 * best['goal']:.2f})")


def mean_summary(summaries):
    """The mean over runs of each metric of each part (over_set, per_image_mean)."""
    return {part: {k: sum(s[part][k] for s in summaries) / len(summaries) for k in summaries[0][part]}
            for part in ("over_set", "per_image_mean")}


if __name__ == "__main__":
    main()
