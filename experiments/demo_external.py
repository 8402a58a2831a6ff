"""The demo model on images it has never seen: the DSB2018 stage1_train images that are not in the
bundled sample, segmented at native resolution, with Otsu's threshold beside the model.

    python experiments/demo_external.py --checkpoint runs/demo/best.pt \\
        --data ../shared/nuclei/dsb2018/stage1_train --out runs/demo-external

Writes OUT/metrics.md and OUT/metrics.json (the report of predict.py) and prints its last lines.
`--exclude RUN/splits.json` also leaves out that run's validation images (those used to choose a
setting, such as the decoding, are then not scored as unseen).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from cdcl_nuclei import data, instances, models  # noqa: E402
from cdcl_nuclei.checkpoint import load_checkpoint  # noqa: E402
from cdcl_nuclei.evaluate import evaluate_samples, inference_config, summary_lines, write_report  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True, help="a DSB2018 folder (images/ + labels/ or the original layout)")
    p.add_argument("--sample", default=os.path.join(ROOT, "data", "dsb2018_sample"))
    p.add_argument("--out", required=True)
    p.add_argument("--exclude", nargs="*", default=[], metavar="SPLITS_JSON",
                   help="splits.json files of runs whose validation images are left out")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    excluded = set()
    for path in args.exclude:
        try:
            with open(path) as f:
                excluded |= set(json.load(f)["val"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise SystemExit(f"error: --exclude: {path} is not a run's splits.json with a 'val' list ({e})") from None
    torch.set_num_threads(args.threads)
    st = load_checkpoint(args.checkpoint)
    model = models.build_model(models.config_from_dict(st["config"]["model"]))
    model.load_state_dict(st["student"])
    bundled = {e.id for e in data.read_folder(args.sample)}
    outside = [e for e in data.read_folder(args.data) if e.id not in bundled]
    entries = [e for e in outside if e.id not in excluded]
    decoding = instances.for_target("watershed", st["config"].get("target", "binary"))  # the checkpoint's target's
    comp = evaluate_samples(model, data.load_full(entries), inference_config(st["config"]["inference"]),
                            progress=False, decoding=decoding)
    title = f"{len(entries)} DSB2018 images outside the bundled sample"
    if excluded:
        title += (f" (and outside the validation splits of {', '.join(args.exclude)}: "
                  f"{len(outside) - len(entries)} left out)")
    report = write_report(comp, args.out, "metrics", title,
                          extra={"checkpoint": args.checkpoint, "data": args.data, "excluded": sorted(excluded)})
    print("\n".join(summary_lines(report)))


if __name__ == "__main__":
    main()
