"""Choose the model's instance decoding on the validation split only, then report the test split once.

    # 1. the grid on the validation images of the run's own split (the demo's: dsb, split seed 0)
    python experiments/tune_instances.py --checkpoint runs/demo/best.pt --out experiments/results/instances
    # 2. after `instances.DEFAULT` holds the chosen decoding: the test images, once (a --target boundary
    #    checkpoint: with the decoding of its target, instances.BOUNDARY)
    python experiments/tune_instances.py --checkpoint runs/demo/best.pt --out experiments/results/instances --test

Step 1 computes the model's foreground probability on every validation image once, decodes it with
every decoding of the grid (the watershed on the distance or the probability, markers from h-maxima
or a probability threshold, a few Gaussian sigmas, components without a marker kept or dropped) and
with the 4-connected components, and writes
OUT/validation-seed<seed>.md / .json with every row and the chosen decoding: the best mean of the
issue's goal metrics (AJI, PQ, F1 at IoU 0.5 and the DSB score, over the set and per image). The
classical pipeline (Otsu + the untuned watershed of `instances.CLASSICAL`) is scored beside it and is
not tuned. Step 2 evaluates `instances.DEFAULT` on the test split with the report of every run
(`evaluate.write_report`: model watershed / components, Otsu + watershed / components) and writes
OUT/test-seed<seed>.md / .json.
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import platform
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from cdcl_nuclei import data, models  # noqa: E402
from cdcl_nuclei.baseline import classical_instances  # noqa: E402
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
    return [COMPONENTS] + [Decoding(unmarked=u, **w) for w in ways for u in ("keep", "drop")]


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


def load_model(path):
    st = load_checkpoint(path)
    model = models.build_model(models.config_from_dict(st["config"]["model"]))
    load_into(model, st["student"], path, "student")
    return model.eval(), st["config"], f"epoch {st['epoch']}, sha256 {st['sha256'][:16]}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", default=os.path.join(ROOT, "data", "dsb2018_sample"),
                   help="the run's data folder (default: the bundled sample, the demo's)")
    p.add_argument("--out", required=True)
    p.add_argument("--test", action="store_true",
                   help="evaluate the watershed of the checkpoint's target (binary: instances.DEFAULT) on the test")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, cfg, which = load_model(args.checkpoint)
    icfg = inference_config(cfg["inference"])
    splits = data.dataset_splits(cfg["dataset"], args.data, seed=cfg["split_seed"], fmt=cfg["format"],
                                 max_images=cfg["max_images"])
    tile = 250 if cfg["dataset"] == "monuseg" else None
    seed = cfg["seed"]
    os.makedirs(args.out, exist_ok=True)
    stamp = {"checkpoint": f"{args.checkpoint} ({which})", "machine": machine(),
             "date": datetime.date.today().isoformat()}

    if args.test:
        samples = data.load_full(splits["test"], tile)
        decoding = for_target("watershed", cfg.get("target", "binary"))
        comp = evaluate_samples(model, samples, icfg, progress=False, decoding=decoding)
        report = write_report(comp, args.out, f"test-seed{seed}",
                              f"Demo test split, seed {seed}, decoding chosen on validation", extra=stamp)
        print("\n".join(summary_lines(report)))
        return

    samples = data.load_full(splits["val"], tile)
    probs = [predict_probability(model, s.image, icfg) for s in samples]
    masks = [pr > icfg.threshold for pr in probs]
    results = []
    for d in grid():
        summary = score([decode(m, pr, d) for m, pr in zip(masks, probs)], samples)
        results.append({"decoding": d.describe(), "summary": summary, "goal": goal_score(summary)})
    best = max(results, key=lambda r: r["goal"])  # the first of equals: grid order
    classical = {m: score([classical_instances(s.image, m) for s in samples], samples)
                 for m in ("watershed", "components")}
    header = ("| decoding | " + " | ".join(f"{k} (set)" for k in GOAL) + " | "
              + " | ".join(f"{k} (image)" for k in GOAL) + " | mean |")
    lines = [f"# Instance decoding chosen on the validation split ({len(samples)} images, seed {seed})", "",
             f"Model: `{stamp['checkpoint']}` (its own split: {cfg['dataset']}, split seed {cfg['split_seed']}). "
             f"{stamp['machine']}; {stamp['date']}. `python experiments/tune_instances.py`.", "",
             "Chosen by the mean of the goal metrics (AJI, PQ, F1 at IoU 0.5, DSB score; over the set and "
             f"per image): **{best['decoding']}**. Values in %.", "",
             header, "|---" * (2 * len(GOAL) + 2) + "|"]
    for r in sorted(results, key=lambda r: -r["goal"]):
        lines.append(row(", ".join(f"{k}={v}" for k, v in r["decoding"].items()), r["summary"]))
    lines += ["", "The classical pipeline on the same images (untuned, not part of the choice):", "",
              header, "|---" * (2 * len(GOAL) + 2) + "|"]
    lines += [row(f"Otsu + {m}", s) for m, s in classical.items()]
    with open(os.path.join(args.out, f"validation-seed{seed}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(args.out, f"validation-seed{seed}.json"), "w") as f:
        json.dump({**stamp, "images": [s.id for s in samples], "chosen": best["decoding"], "rows": results,
                   "classical": classical}, f, indent=1)
    print(f"chosen on validation: {best['decoding']} (goal mean {100 * best['goal']:.2f})")


if __name__ == "__main__":
    main()
