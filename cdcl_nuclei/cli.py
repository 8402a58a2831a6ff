"""Checks of setting values shared by cdcl-train and cdcl-predict. Each raises ValueError whose
message starts with the setting's name (its flag, or `FILE: key` from --config), so a command
prints it as its one-line error and exits with status 2."""
from __future__ import annotations

import math
import os

import torch


def device(flag: str, name: str) -> torch.device:
    """'auto' (CUDA when present, else the CPU), 'cpu', 'cuda' or 'cuda:N' that exists here."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise ValueError(f"{flag}: expected auto, cpu, cuda or cuda:N, got {name!r}")
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0 or (dev.index is not None and dev.index >= n):
            raise ValueError(f"{flag}: {name} requested, but this machine has {n} CUDA device(s)")
    return dev


def regular_file(flag: str, path) -> None:
    """Only regular files are opened: a FIFO or device would block the reader or never end."""
    if not os.path.exists(path):
        raise ValueError(f"{flag}: {path}: file not found")
    if not os.path.isfile(path):
        raise ValueError(f"{flag}: {path}: not a regular file")


def output_folder(flag: str, path) -> None:
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{flag}: {path} exists and is not a folder")


def number(flag: str, value, lo=None, hi=None, lo_open=False, optional=False) -> None:
    """A finite number within [lo, hi] (lo excluded with lo_open); None passes when optional."""
    if value is None and optional:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (lo is None or (value > lo if lo_open else value >= lo)) and (hi is None or value <= hi)
    if not ok:
        want = " and ".join(filter(None, [lo is not None and f"{'>' if lo_open else '>='} {lo}",
                                          hi is not None and f"<= {hi}"]))
        raise ValueError(f"{flag}: expected a finite number {want}, got {value}")
