"""The one table of backends: what each record holds, and the table itself.

`masked_infonce`, the custom ops (cdcl_ops.ops), `patch_foreground_scores`, the tests and the
benchmarks all look backends up here. The table imports no backend: each backend module declares
its own record(s) (`RECORDS`), and `backends.builtin` registers the built-in ones when cdcl_ops is
imported, so adding one (or the tests' CUDA emulator) is one `register(Backend(...))` call.
Availability is decided from facts fixed at import (is Triton installed, which kernels the
extension has) plus the device type and TRITON_INTERPRET, so the checks stay cheap and
torch.compile traces them.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import interface
from .interface import MASKED_INFONCE, SUPERVISED_CONTRAST, TUNABLE, Options
from .platform import ALL_DTYPES


def anywhere(device: torch.device) -> tuple[bool, str]:
    """The availability check of a backend that runs wherever PyTorch does."""
    return True, ""


@dataclass(frozen=True)
class Backend:
    """One backend of `masked_infonce` (and, where it has one, of the patch foreground counts).

    available(device) -> (ok, why not). forward / bank_grad / patch_counts: the entry points of
    `backends.interface` (forward and bank_grad None for `reference`, which autograd differentiates
    directly; patch_counts None without a patch-count kernel). device_types: None for any device.
    dtypes, max_d: the features it takes. default_on / patch_default_on: device types where
    `backend=None` may pick it for the loss / for the patch counts (default_on=None: any device);
    among those available there, the highest `priority` wins. options: the fields of
    `interface.Options` besides inv_tau that the backend reads. losses: the losses it takes
    (`interface.LOSSES`); contrast_forward / contrast_bank_grad: its entry points for the
    supervised contrastive loss (None for `reference`, as forward / bank_grad).
    """
    name: str
    available: Callable[[torch.device], tuple[bool, str]] = anywhere
    device_types: tuple[str, ...] | None = None
    dtypes: tuple[torch.dtype, ...] = ALL_DTYPES
    max_d: int | None = None
    forward: interface.Forward | None = None
    bank_grad: interface.BankGrad | None = None
    patch_counts: interface.PatchCounts | None = None
    default_on: tuple[str, ...] | None = ()
    patch_default_on: tuple[str, ...] = ()
    priority: int = 0
    options: tuple[str, ...] = ()
    losses: tuple[str, ...] = (MASKED_INFONCE,)
    contrast_forward: interface.ContrastForward | None = None
    contrast_bank_grad: interface.ContrastBankGrad | None = None

    def __post_init__(self) -> None:
        unknown = set(self.losses) - set(interface.LOSSES)
        if unknown or not self.losses:
            raise ValueError(f"losses: expected a non-empty tuple of {interface.LOSSES}, got {self.losses!r}")
        # a streaming backend (one with kernels) brings the kernels of every loss it claims
        kernels = {MASKED_INFONCE: (self.forward, self.bank_grad),
                   SUPERVISED_CONTRAST: (self.contrast_forward, self.contrast_bank_grad)}
        streaming = self.forward is not None or self.contrast_forward is not None
        for loss in self.losses:
            if streaming and None in kernels[loss]:
                raise ValueError(f"losses: the {self.name} backend takes {loss} but lacks its "
                                 "forward or bank-gradient entry point")

    def takes(self, loss: str) -> bool:
        return loss in self.losses

    def check_loss(self, loss: str) -> None:
        """A ValueError naming the backend and the loss when it does not take that loss."""
        if not self.takes(loss):
            takers = [b.name for b in _REGISTRY.values() if b.takes(loss)]
            raise ValueError(f"backend: the {self.name} backend does not take the {loss} loss "
                             f"(backends that do: {', '.join(takers)})")

    def runs_on(self, device: torch.device | str) -> tuple[bool, str]:
        """(available, reason when not) for tensors on `device` in this process."""
        device = torch.device(device)
        if self.device_types is not None and device.type not in self.device_types:
            return False, f"runs on {'/'.join(self.device_types)} tensors, not {device.type}"
        return self.available(device)

    def check_input(self, query: torch.Tensor) -> None:
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


def get(name: str) -> Backend:
    if name not in _REGISTRY:
        raise ValueError(f"backend: expected None or one of {names()}, got {name!r}")
    return _REGISTRY[name]


def available(device: torch.device | str = "cpu", loss: str | None = None) -> list[str]:
    """The registered backends that can run on `device` in this process (and take `loss`, when
    one is named)."""
    return [b.name for b in _REGISTRY.values()
            if b.runs_on(device)[0] and (loss is None or b.takes(loss))]


def default(device: torch.device | str, patches: bool = False,
            loss: str = MASKED_INFONCE) -> str | None:
    """What `backend=None` picks on `device` for `loss` (or, patches=True, the patch counts):
    None if nothing registered may be the default there."""
    device = torch.device(device)
    best = None
    for b in _REGISTRY.values():
        on = b.patch_default_on if patches else b.default_on
        if not patches and not b.takes(loss):
            continue
        if (on is None or device.type in on) and b.runs_on(device)[0]:
            if best is None or b.priority > best.priority:
                best = b
    return None if best is None else best.name


def resolve(backend: str | None, query: torch.Tensor, loss: str = MASKED_INFONCE) -> str:
    """The backend that runs `loss` on `query`: the default for its device when None, else the
    named one, checked (it takes the loss, runs on the device, takes the dtype and D)."""
    if backend is None:
        name = default(query.device, loss=loss)
        if name is None:  # only when a test or plug-in has taken the fallbacks out of the registry
            raise ValueError(f"device: no registered backend may be the default on {query.device}")
        return name
    spec = get(backend)
    spec.check_loss(loss)
    ok, why = spec.runs_on(query.device)
    if not ok:
        raise ValueError(f"backend: {backend!r} cannot run on {query.device} here ({why}; "
                         f"available: {available(query.device, loss)})")
    spec.check_input(query)
    return backend
