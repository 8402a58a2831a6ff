"""Segment images with a trained checkpoint.

    cdcl-predict --checkpoint runs/demo/best.pt --out runs/pred some/folder more/*.tif one.png
    python predict.py --checkpoint runs/demo/best.pt --images data/dsb2018_sample --out runs/pred

The images (positional arguments or --images): folders of images (.png/.tif/.jpg/.bmp), dataset
folders (images/ + labels/, DSB2018 <id>/images + masks, MoNuSeg .tif + .xml), image files or glob
patterns (quote them so the program expands them). Each image's nuclei, decoded from the foreground
probability as --instances says (watershed: touching nuclei separated, from the interiors a
--target boundary model predicts, the checkpoint's target read from it; components), go to
OUT/masks/<id>.png as a uint16 label image (or .tif with --label-format tif, uint32 above 65,535
nuclei); --save-probabilities adds the foreground probability (1 - P(background)) as
OUT/probabilities/<id>.tif (float16, or uint8 with --probability-dtype uint8). OUT/overlays/<id>.png
show the nuclei in green; with ground truth (found in a dataset folder or given by --labels, a folder
of <id>.png / .tif instance maps) also the truth in red and their overlap in yellow (the paper's
Figure 3), and metrics.json / metrics.md are written, the classical pipeline (Otsu's threshold,
--otsu-side, split by an untuned watershed) beside the model. Images of any size are predicted at
native resolution over overlapping, blended windows (the window and overlap of the checkpoint's run
unless given here); a checkpoint of a --resize run resizes as it was trained. Exit status 2: a bad
setting, file or checkpoint (one line naming it).
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
