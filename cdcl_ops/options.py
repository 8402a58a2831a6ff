"""`CrossPatchOptions`: the settings of the cross-patch loss, their defaults (the paper's) and
their checks, in one place. `cross_patch_infonce` and `CrossPatchInfoNCE` both take one."""
from __future__ import annotations

from dataclasses import dataclass

from ._validate import check_grid, check_temperature, check_thresholds
from .sampling import MODES, SAMPLINGS, SEMANTICS


@dataclass(frozen=True, kw_only=True)
class CrossPatchOptions:
    """What `cross_patch_infonce` / `CrossPatchInfoNCE` compute (docs/design.md §1), checked once,
    here: a bad value is a ValueError naming its field. The field defaults are the method's.

    Attributes:
        grid: patches per side (at each call it must divide the features' H and W).
        fdp, bdp: the foreground score from which a patch is foreground-dominant (FDP), and up to
            which it is background-dominant (BDP); numbers in [0, 1], bdp < fdp.
        temperature: tau, finite and >= MIN_TEMPERATURE (kept as a float).
        fg_class: the foreground label.
        memory: previous batches the bank of `CrossPatchInfoNCE` keeps besides the current one
            (the paper: 1). `cross_patch_infonce` uses the bank it is given instead.
        semantics: "paper" (docs/design.md §1) or "official" (the released code's rule,
            docs/design.md §2).
        sampling: "pixel-patch" (the paper's), "pixel" (Table 2 Scheme 2: every student pixel
            against one merged bank, negatives = different pseudo label) or "random" (Scheme 1:
            every other bank pixel is a negative, no pseudo labels); "official" semantics has
            "pixel-patch" only (the modes: `cdcl_ops.sampling.MODES`).
        backend: masked_infonce backend, None for the fastest on the features' device; a name is
            looked up at each call (backends may be registered later).
        compact: gather the active queries and bank rows before the op. Same result with less
            work when many pixels are MP or the bank has empty slots, at the price of one host
            synchronisation and data-dependent shapes (eager mode only: not under torch.compile).
    """
    grid: int = 8
    fdp: float = 0.7
    bdp: float = 0.3
    temperature: float = 0.1
    fg_class: int = 1
    memory: int = 1
    semantics: str = "paper"
    sampling: str = "pixel-patch"
    backend: str | None = None
    compact: bool = False

    def __post_init__(self) -> None:
        check_grid(self.grid)
        check_thresholds(self.fdp, self.bdp)
        # frozen: the checked float goes in place of what was given (a numpy or 0-d tensor tau)
        object.__setattr__(self, "temperature", check_temperature(self.temperature))
        if isinstance(self.fg_class, bool) or not isinstance(self.fg_class, int):
            raise ValueError(f"fg_class: expected an int, got {self.fg_class!r}")
        if isinstance(self.memory, bool) or not isinstance(self.memory, int) or self.memory < 0:
            raise ValueError(f"memory: expected an int >= 0, got {self.memory!r}")
        if self.semantics not in SEMANTICS:
            raise ValueError(f"semantics: expected one of {SEMANTICS}, got {self.semantics!r}")
        if self.sampling not in SAMPLINGS:
            raise ValueError(f"sampling: expected one of {SAMPLINGS}, got {self.sampling!r}")
        if (self.semantics, self.sampling) not in MODES:
            allowed = " / ".join(repr(b) for a, b in MODES if a == self.semantics)
            raise ValueError(f"sampling: semantics={self.semantics!r} has only {allowed} sampling, "
                             f"got {self.sampling!r}")
        if self.backend is not None and not isinstance(self.backend, str):
            raise ValueError(f"backend: expected None or a backend's name, got {self.backend!r}")
        if not isinstance(self.compact, bool):
            raise ValueError(f"compact: expected a bool, got {self.compact!r}")
