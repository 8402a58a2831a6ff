"""examples/pixel_contrast.py runs as written: ContrastiveSeg's pixel contrast with its memory
queue and pytorch-metric-learning's SupConLoss written with supervised_contrast, each checked
against the loss written out with its N x M matrix, then run on every pixel of a batch."""
import os
import runpy

import paths

ROOT = str(paths.ROOT)


def test_pixel_contrast_example_runs(capsys):
    runpy.run_path(os.path.join(ROOT, "examples", "pixel_contrast.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "ContrastiveSeg pixel contrast over 16896 pixels" in out
    assert "SupCon over 8192 pixels" in out  # pytorch-metric-learning is a dev requirement
