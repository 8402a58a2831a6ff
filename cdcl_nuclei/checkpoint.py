"""Atomic, self-verifying checkpoints with clear errors.

A checkpoint is written to a temporary file in the destination folder, flushed to disk and renamed
over the destination, so a crash mid-write leaves the previous checkpoint intact; the temporary
files a crash leaves behind are removed by ``remove_stale_temporaries`` at the next start. The
payload carries a SHA-256 digest of its own contents (every tensor's dtype, shape and bytes, every
other value's repr), checked at load: a flipped byte either breaks the file or is caught there.
Loading checks the file is a training checkpoint of this package with the expected fields;
anything else raises ``CheckpointError`` naming the file and what is wrong.
"""
from __future__ import annotations

import glob
import hashlib
import os
import tempfile

import torch

FORMAT = "cdcl_nuclei/2"  # 2: with the payload digest
REQUIRED = ("format", "epoch", "config", "student", "sha256")
TEMP_PREFIX = ".tmp-"


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, foreign, corrupt or does not fit the current run."""


def _feed(h, value) -> None:
    """Feed a nested state (dicts, lists, tensors, scalars) into a hash, in a canonical order."""
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous().reshape(-1)
        h.update(f"T{t.dtype}{tuple(value.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(value, dict):
        h.update(f"D{len(value)}".encode())
        for k in sorted(value, key=repr):
            h.update(repr(k).encode())
            _feed(h, value[k])
    elif isinstance(value, (list, tuple)):
        h.update(f"L{type(value).__name__}{len(value)}".encode())
        for v in value:
            _feed(h, v)
    else:
        h.update(f"V{value!r}".encode())


def digest(state: dict) -> str:
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in state.items() if k != "sha256"})
    return h.hexdigest()


def save_checkpoint(path, state: dict) -> None:
    state = {**{k: v for k, v in state.items() if k != "sha256"}, "format": FORMAT}
    state["sha256"] = digest(state)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=".pt", dir=folder)
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


def remove_stale_temporaries(folder) -> list[str]:
    """Delete what an interrupted save left in `folder` (one writer per folder: call at start)."""
    stale = glob.glob(os.path.join(glob.escape(str(folder)), TEMP_PREFIX + "*.pt"))
    for p in stale:
        os.remove(p)
    return stale


def load_checkpoint(path, map_location="cpu") -> dict:
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: checkpoint file not found")
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: not a regular file")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 -- torch.load raises a dozen types on corrupt or foreign bytes
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated or not written by "
                              f"cdcl-train / train.py): {type(e).__name__}: {first}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        got = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{path}: not a {FORMAT} training checkpoint (format {got!r})")
    missing = [k for k in REQUIRED if k not in state]
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks the fields {missing}")
    if state["sha256"] != digest(state):
        raise CheckpointError(f"{path}: checksum mismatch: the file is corrupt")
    if not isinstance(state["config"], dict):
        raise CheckpointError(f"{path}: the checkpoint's config is a {type(state['config']).__name__}, not a dict")
    return state


def check_finite(path, state_dict, what) -> None:
    """Refuse weights with NaN or infinity: training on would only produce NaN losses."""
    for k, v in state_dict.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise CheckpointError(f"{path}: the {what} weight {k} holds non-finite values")


def check_compatible(path, saved: dict, current: dict, labels: dict) -> None:
    """Raise CheckpointError naming every setting in `labels` (stored key: how to name it, e.g. its
    flag) that differs between a checkpoint and now, with both values."""
    diff = [f"{label}: checkpoint {saved.get(k)!r}, now {current.get(k)!r}"
            for k, label in labels.items() if saved.get(k) != current.get(k)]
    if diff:
        raise CheckpointError(f"{path}: the checkpoint was written by a different run setting ("
                              + "; ".join(diff) + ")")


def load_into(module: torch.nn.Module, state_dict, path, what) -> None:
    if not isinstance(state_dict, dict):
        raise CheckpointError(f"{path}: the {what} weights are a {type(state_dict).__name__}, not a state dict")
    check_finite(path, state_dict, what)
    try:
        module.load_state_dict(state_dict)
    except (RuntimeError, KeyError, ValueError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: the {what} weights do not fit this model ({first})") from None
