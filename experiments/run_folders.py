"""The finished runs of an experiment's folder, as the experiment scripts mark them."""
from __future__ import annotations

import os
import re


def finished_runs(folder, pattern, needs=()) -> dict:
    """{the groups of `pattern` in a run folder's name: its path} for every run folder of `folder` whose
    name matches `pattern` in full and that holds `done` (written by the experiment's shell script when
    the run ended) and every file of `needs`; in name order."""
    runs = {}
    for name in sorted(os.listdir(folder)):
        m = re.fullmatch(pattern, name)
        path = os.path.join(folder, name)
        if m and all(os.path.isfile(os.path.join(path, f)) for f in ("done", *needs)):
            runs[m.groups()] = path
    return runs
