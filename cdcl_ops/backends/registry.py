"""The one table of backends: what each takes, where it runs, and its entry points.

`masked_infonce`, the custom ops (cdcl_ops.ops), `patch_foreground_scores`, the tests and the
benchmarks all look backends up here, so adding one (or the tests' CUDA emulator) is one
`register(Backend(...))` call. Availability is decided from facts fixed at import (is Triton
installed, which kernels the extension has) plus the device type and TRITON_INTERPRET, so the
checks stay cheap and torch.compile traces them.
"""
from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

from . import chunked, native

# The largest feature dim of the fused kernels: Triton keeps a BLOCK_D-wide tile of a query's
# output in registers, and the CUDA kernels 16 values per lane (csrc/cuda/launch.h MAX_D is the
# kernels' own copy; tests/test_registry.py checks the two agree).
MAX_D = 512
FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
ALL_DTYPES = FUSED_DTYPES + (torch.float64,)

# decided once at import: torch.compile cannot trace importlib
TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def triton_interpreting() -> bool:
    """Whether Triton runs its kernels on the CPU (TRITON_INTERPRET=1, the tests' mode)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


class Options(NamedTuple):
    """How the kernels are asked to compute, beyond their inputs (one object, as the kernels'
    launch parameters). Every streaming backend reads `inv_tau`; the others only the backends
    whose record lists them in `Backend.options` (masked_infonce resets the rest to these
    defaults, so a backend never sees an option it would ignore)."""
    inv_tau: float
    chunk_size: int = 0       # bank rows per chunk ("chunked"; 0: its default)
    precision: str = "auto"   # how fp32 / 16-bit products run ("triton", "cuda")


TUNABLE = tuple(f for f in Options._fields if f != "inv_tau")


@dataclass(frozen=True)
class Backend:
    """One backend of `masked_infonce` (and, where it has one, of the patch foreground counts).

    forward / bank_grad: the streaming interface of cdcl_ops.backends (None for `reference`, which
    autograd differentiates directly). patch_counts(x, grid, fg_class) -> (B, grid, grid) counts.
    device_types: None for any device. default_on / patch_default_on: device types where
    `backend=None` may pick it for the loss / for the patch counts (default_on=None: any device);
    among those available there, the highest `priority` wins. options: the fields of `Options`
    besides inv_tau that the backend reads.
    """
    name: str
    available: Callable[[torch.device], tuple[bool, str]]
    device_types: tuple[str, ...] | None = None
    dtypes: tuple[torch.dtype, ...] = ALL_DTYPES
    max_d: int | None = None
    forward: Callable | None = None
    bank_grad: Callable | None = None
    patch_counts: Callable | None = None
    default_on: tuple[str, ...] | None = ()
    patch_default_on: tuple[str, ...] = ()
    priority: int = 0
    options: tuple[str, ...] = ()

    def runs_on(self, device) -> tuple[bool, str]:
        """(available, reason when not) for tensors on `device` in this process."""
        device = torch.device(device)
        if self.device_types is not None and device.type not in self.device_types:
            return False, f"runs on {'/'.join(self.device_types)} tensors, not {device.type}"
        return self.available(device)

    def check_input(self, query) -> None:
        """The backend's dtype and D limits, as a ValueError naming `query`."""
        if query.dtype not in self.dtypes:
            names = "/".join(str(t).removeprefix("torch.") for t in self.dtypes)
            raise ValueError(f"query: the {self.name} backend takes {names} features, got "
                             f"{query.dtype} (use backend='chunked' or 'reference')")
        if self.max_d is not None and query.shape[1] > self.max_d:
            raise ValueError(f"query: the {self.name} backend takes D <= {self.max_d}, "
                             f"got D={query.shape[1]}")

    def own_options(self, options: Options, named: bool) -> Options:
        """`options` with the fields this backend does not read back at their defaults. When the
        caller named the backend, a non-default value it would ignore is a ValueError instead
        (with backend=None the same call must run on every device, so it is dropped)."""
        for field in TUNABLE:
            default = Options._field_defaults[field]
            if field in self.options or getattr(options, field) == default:
                continue
            if named:
                takers = [b.name for b in _REGISTRY.values() if field in b.options]
                raise ValueError(f"{field}: the {self.name} backend does not take it (only "
                                 f"{', '.join(takers)}), got {field}={getattr(options, field)!r}")
            options = options._replace(**{field: default})
        return options


_REGISTRY: dict[str, Backend] = {}


def register(backend: Backend, *, replace: bool = False) -> Backend | None:
    """Add `backend` (or, with replace=True, put it in place of the one of that name, e.g. the
    tests' CUDA emulator). Returns the record it replaced, to register back afterwards."""
    previous = _REGISTRY.get(backend.name)
    if previous is not None and not replace:
        raise ValueError(f"backend: {backend.name!r} is registered already (pass replace=True)")
    _REGISTRY[backend.name] = backend
    return previous


def unregister(name: str) -> Backend:
    """Remove the backend `name` (a test's or a plug-in's) and return its record."""
    get(name)  # the usual error for an unknown name
    return _REGISTRY.pop(name)


def names() -> tuple[str, ...]:
    """Every registered backend, in registration order."""
    return tuple(_REGISTRY)


def get(name) -> Backend:
    if name not in _REGISTRY:
        raise ValueError(f"backend: expected None or one of {names()}, got {name!r}")
    return _REGISTRY[name]


def available(device="cpu") -> list[str]:
    """The registered backends that can run on `device` in this process."""
    return [b.name for b in _REGISTRY.values() if b.runs_on(device)[0]]


def default(device, patches: bool = False) -> str | None:
    """What `backend=None` picks on `device` for the loss (or the patch counts): None if nothing
    registered may be the default there."""
    device = torch.device(device)
    best = None
    for b in _REGISTRY.values():
        on = b.patch_default_on if patches else b.default_on
        if (on is None or device.type in on) and b.runs_on(device)[0]:
            if best is None or b.priority > best.priority:
                best = b
    return None if best is None else best.name


# -- the built-in backends -------------------------------------------------------------------------

def _always(device):
    return True, ""


def _triton(device):
    if not TRITON_INSTALLED:
        return False, "triton is not installed"
    if device.type != "cuda" and not triton_interpreting():
        return False, "triton needs CUDA tensors, or TRITON_INTERPRET=1 set before importing cdcl_ops"
    return True, ""


def _native(device):
    # a CPU-only build registers the ops without CUDA kernels: ask per device type
    if not native.LOADED:
        return False, f"needs the compiled extension cdcl_ops._C, not loaded here: {native.LOAD_ERROR}"
    if not {"cpu": native.HAS_CPU, "cuda": native.HAS_CUDA}.get(device.type, False):
        return False, f"cdcl_ops._C was built without {device.type} kernels"
    return True, ""


# the Triton modules import triton: loaded on first use only, so cdcl_ops imports without it
def _triton_forward(*args, **kwargs):
    from . import triton_forward
    return triton_forward.forward(*args, **kwargs)


def _triton_bank_grad(*args, **kwargs):
    from . import triton_backward
    return triton_backward.bank_grad(*args, **kwargs)


def _triton_patch_counts(x, grid, fg_class):
    from . import triton_patches
    return triton_patches.patch_fg_counts(x, grid, fg_class)


def _native_patch_counts(x, grid, fg_class):
    return torch.ops.cdcl_ops_C.patch_fg_counts(x, grid, fg_class).to(torch.int32)


register(Backend("reference", _always))
register(Backend("chunked", _always, forward=chunked.forward, bank_grad=chunked.bank_grad,
                 default_on=None, priority=0, options=("chunk_size",)))
# defaults: the fastest measured per device type (benchmarks/RESULTS.md)
register(Backend("triton", _triton, dtypes=FUSED_DTYPES, max_d=MAX_D, forward=_triton_forward,
                 bank_grad=_triton_bank_grad, patch_counts=_triton_patch_counts,
                 default_on=("cuda",), patch_default_on=("cuda",), priority=2, options=("precision",)))
register(Backend("cpu", _native, device_types=("cpu",), forward=native.forward,
                 bank_grad=native.bank_grad, patch_counts=_native_patch_counts, default_on=("cpu",),
                 patch_default_on=("cpu",), priority=1))
# not the loss default on CUDA: triton measured faster, and chunked is the fallback there
register(Backend("cuda", _native, device_types=("cuda",), dtypes=FUSED_DTYPES, max_d=MAX_D,
                 forward=native.forward, bank_grad=native.bank_grad,
                 patch_counts=_native_patch_counts, patch_default_on=("cuda",), priority=1,
                 options=("precision",)))
