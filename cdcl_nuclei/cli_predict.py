"""Segment a folder of images with a trained checkpoint.

    cdcl-predict --checkpoint runs/demo/best.pt --images some/folder --out runs/pred
    python predict.py --checkpoint runs/demo/best.pt --images data/dsb2018_sample --out runs/pred

--images is either a plain folder of images (.png/.tif/.jpg) or a dataset folder (images/ + labels/,
DSB2018 <id>/images + masks, MoNuSeg .tif + .xml); with ground truth (found there or given by --labels,
a folder of <id>.png instance maps) the overlays show prediction green, ground truth red and their
overlap yellow (the paper's Figure 3), and metrics.json / metrics.md are written, with Otsu's
threshold on the same images beside the model. Without ground truth
the overlays show the prediction in green. Label masks (uint16 instance maps, one id per 4-connected
component of the predicted foreground) go to OUT/masks/<id>.png (or .tif with --mask-format tif).
Images of any size are predicted at native resolution over overlapping, blended windows (the window
and overlap of the checkpoint's run unless given here); a checkpoint of a --resize run resizes as
it was trained. Exit status 2: a bad setting, file or checkpoint (one line naming it).
"""
from __future__ import annotations

import sys

from . import config, predictor
from .checkpoint import CheckpointError
from .data import DataError


def main(argv=None) -> int:
    try:
        predictor.predict_folder(*config.parse(config.PredictConfig, argv, __doc__))
    except (CheckpointError, DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
