"""Semi-supervised nuclei segmentation with mean teacher and the CDCL loss (docs/training.md).

    cdcl-train --data data/dsb2018_sample --preset small --method cdcl --out runs/demo
    python train.py ...                                 # the same, from a checkout
    torchrun --nproc_per_node 2 train.py ...            # DDP (gloo on CPU, nccl on CUDA)
    cdcl-train --config runs/demo/config.json --out runs/again   # repeat a run (flags override the file)
    cdcl-train --labeled mine --unlabeled scans/ 'more/*.tif' --out runs/mine   # your own images

Data: the benchmark protocol (--data, --dataset, --labeled-fraction: a labeled set, part of whose labels
are hidden), or your own images instead: --labeled (images with label maps in the labels folder beside
theirs, e.g. mine/images + mine/labels), --unlabeled (any images, no labels), --val (else a seeded 1/8
of the labeled ones) and --test (else the run ends after training).

Methods: suponly (labeled part only), fullsup (every training image labeled), meanteacher
(L_sup + w_cons L_cons + 0.01 L_ent: the paper's Scheme 6, CDCL without L_contr), cdcl
(L_sup + 0.1 L_contr + w_cons L_cons + 0.01 L_ent). --no-contr, --no-cons, --no-ent, --sampling
give the ablations. --target boundary trains three classes (background, nucleus interior, nucleus
boundary) instead of two, and decodes nuclei from the predicted interiors. One epoch is
ceil(training images / batch) iterations for every method (--iters-per-epoch overrides), so budgets
compare across methods.
Training sees random --input-size crops of each image at its own pixel scale; validation, the test
and predict.py run the model over overlapping, blended windows at native resolution. --resize gives
the paper's protocol instead (every image resized to --input-size squared, for Table-1-style runs).
Outputs in --out: config.json, splits.json, log.csv, last.pt, best.pt, metrics.json/.md (the test
images at native resolution: the model's nuclei, decoded as --instances says, beside the classical
pipeline, Otsu's threshold on its --otsu-side split by an untuned watershed), overlays/.
--channel N reads plane N of multi-channel or multi-page TIFFs as a grey image.
Exit status: 2 a bad setting, file or checkpoint (one line naming it); 3 a loss term became non-finite.
"""
from __future__ import annotations

import sys

import torch

from . import config, distributed
from .checkpoint import CheckpointError
from .data import DataError
from .trainer import NonFiniteLoss, run_training


def main(argv=None) -> int:
    try:
        run = config.resolve_training(*config.parse(config.TrainConfig, argv, __doc__))
    except ValueError as e:  # checked before anything is read or written
        print(f"error: {e}", file=sys.stderr)
        return 2
    if run.settings.threads:
        torch.set_num_threads(run.settings.threads)
    world, rank, device = distributed.setup(run.settings.device)
    try:
        run_training(run, world, rank, device)
    except (CheckpointError, DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLoss as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    finally:
        distributed.teardown(world)
    return 0


if __name__ == "__main__":
    sys.exit(main())
