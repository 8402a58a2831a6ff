"""Segment a folder of images with a trained checkpoint, from a checkout; the same program as the
installed `cdcl-predict` (cdcl_nuclei/cli_predict.py; `python predict.py --help`, docs/training.md).

    python predict.py --checkpoint runs/demo/best.pt --images some/folder --out runs/pred
"""
import sys

from cdcl_nuclei.cli_predict import main

if __name__ == "__main__":
    sys.exit(main())
