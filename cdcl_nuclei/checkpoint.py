"""Atomic checkpoints with clear errors.

A checkpoint is written to a temporary file in the destination folder, flushed to disk and renamed
over the destination, so a crash mid-write leaves the previous checkpoint intact. Loading checks the
file is a training checkpoint of this package with the expected fields; anything else raises
``CheckpointError`` naming the file and what is wrong.
"""
from __future__ import annotations

import os
import pickle
import tempfile
import zipfile

import torch

FORMAT = "cdcl_nuclei/1"
REQUIRED = ("format", "epoch", "config", "student")


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, foreign or does not fit the current run."""


def save_checkpoint(path, state: dict) -> None:
    state = {"format": FORMAT, **state}
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_checkpoint(path, map_location="cpu") -> dict:
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated or not written by "
                              f"train.py): {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        got = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{path}: not a {FORMAT} training checkpoint (format {got!r})")
    missing = [k for k in REQUIRED if k not in state]
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks the fields {missing}")
    return state


FLAG_OF = {"model": "--preset/--input-size", "inference": "--window/--overlap/--flips/--resize"}


def check_compatible(path, saved: dict, current: dict, keys) -> None:
    """Raise CheckpointError naming every setting in `keys` that differs between a checkpoint and
    now, as its command-line flag with both values."""
    diff = [f"{FLAG_OF.get(k, '--' + k.replace('_', '-'))}: checkpoint {saved.get(k)!r}, now {current.get(k)!r}"
            for k in keys if saved.get(k) != current.get(k)]
    if diff:
        raise CheckpointError(f"{path}: the checkpoint was written by a different run setting ("
                              + "; ".join(diff) + ")")


def load_into(module: torch.nn.Module, state_dict, path, what) -> None:
    try:
        module.load_state_dict(state_dict)
    except (RuntimeError, KeyError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: the {what} weights do not fit this model ({first})") from None
