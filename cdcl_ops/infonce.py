"""`masked_infonce`: the public functional API of the pseudo-label-masked InfoNCE (docs/design.md §2)."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from . import ops
from ._validate import canonical_masks, check_arguments, check_temperature, check_values
from .backends import reference, registry
from .backends.interface import LOSSES, Options
from .options import CrossPatchOptions

PRECISIONS = ("auto", "tf32x3", "tf32", "ieee")


def __getattr__(name: str) -> tuple[str, ...]:
    # BACKENDS follows the registry, so a backend registered after import is listed too
    if name == "BACKENDS":
        return registry.names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def available_backends(device: torch.device | str = "cpu", loss: str | None = None) -> list[str]:
    """Backends that can run on `device` in this process; with `loss` ("masked_infonce" or
    "supervised_contrast"), only those that take it."""
    if loss is not None and loss not in LOSSES:
        raise ValueError(f"loss: expected None or one of {LOSSES}, got {loss!r}")
    return registry.available(device, loss)


def default_backend(device: torch.device | str) -> str:
    """What `backend=None` picks: the fastest backend measured on that device type."""
    name = registry.default(device)
    if name is None:  # only when a test or plug-in has taken the fallbacks out of the registry
        raise ValueError(f"device: no registered backend may be the default on {device}")
    return name


def masked_infonce(query: Tensor, positive: Tensor, bank: Tensor, query_labels: Tensor,
                   bank_labels: Tensor, query_groups: Tensor | None = None, bank_groups: Tensor | None = None,
                   group_table: Tensor | None = None,
                   temperature: float | Tensor = CrossPatchOptions.temperature, reduction: str = "mean",
                   backend: str | None = None, *, chunk_size: int = 0, precision: str = "auto",
                   check_inputs: bool = True, check_finite: bool = False) -> Tensor:
    """Pseudo-label-masked InfoNCE of each query against its positive and a bank (docs/design.md §2).

    Args:
        query, positive: (N, D) features; row i of `positive` is query i's positive.
        bank: (M, D) negatives candidates. Gradients flow to each of the three that requires grad.
        query_labels, bank_labels: (N,), (M,) integer pseudo labels (int8..int64, uint8..uint32).
            A bank row is a negative of query i only where the labels differ. A label < 0 marks the
            row inactive.
        query_groups, bank_groups, group_table: optional (N,), (M,) integer group ids and a (G, G)
            bool table: bank row j may be a negative of query i only if
            group_table[query_groups[i], bank_groups[j]]. Group < 0 marks the row inactive.
        temperature: tau of s = cos / tau, finite and >= MIN_TEMPERATURE = 1e-4 (docs/loss.md);
            the default is the paper's (CrossPatchOptions.temperature).
        reduction: "mean" over active queries (0 when there is none), "sum", or "none" (N,).
        backend: None (fastest for the device), "reference", "chunked", "triton", "cpu" or "cuda".
        chunk_size: bank rows per chunk for the "chunked" backend (0: its default).
            chunk_size and precision are refused by a named backend that does not read them, and
            dropped when backend=None picks such a backend (so one call runs on every device).
        precision: how "triton" multiplies fp32 features: "auto" (TF32 where
            torch.backends.cuda.matmul.allow_tf32 allows it, else "tf32x3"), "tf32x3" (three TF32
            products, fp32 accuracy on tensor cores), "tf32", or "ieee" (FMA units, slow).
            For "cuda" with 16-bit features, "tf32" selects the tensor-core kernels (D <= 256;
            the softmax weights of the second product are rounded to 16 bits, as in "triton");
            anything else the CUDA-core kernels.
        check_inputs: check group ids against the table (one host sync; skipped under
            torch.compile). check_finite: also reject NaN/Inf features.

    Returns:
        The loss in float32 (float64 for float64 inputs): a scalar, or (N,) for reduction="none".
        Inactive queries and queries without any negative contribute exactly 0.
    """
    check_arguments(query, positive, bank, query_labels, bank_labels, query_groups, bank_groups,
                    group_table, reduction)
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {PRECISIONS}, got {precision!r}")
    if not isinstance(chunk_size, int) or chunk_size < 0:
        raise ValueError(f"chunk_size: expected an int >= 0, got {chunk_size!r}")
    temperature = check_temperature(temperature)
    named = backend is not None
    backend = registry.resolve(backend, query)
    options = registry.get(backend).own_options(
        Options(1.0 / temperature, chunk_size, precision), named)
    if not torch.compiler.is_compiling() and (check_inputs or check_finite):
        check_values(query, positive, bank, query_groups, bank_groups, group_table, check_finite)
    masks = canonical_masks(query_labels, bank_labels, query_groups, bank_groups, group_table)
    if registry.get(backend).forward is None:  # the reference: plain autograd
        per_query = reference.per_query_loss(query, positive, bank, masks, temperature)
    else:
        need_o = torch.is_grad_enabled() and query.requires_grad
        per_query = ops.masked_infonce_fwd(
            query.contiguous(), positive.contiguous(), bank.contiguous(), *masks, options.inv_tau,
            backend, options.chunk_size, options.precision, need_o)[0]
    if reduction == "none":
        return per_query
    if reduction == "sum":
        return per_query.sum()
    n_active = (masks.q_grp >= 0).sum().clamp(min=1).to(per_query.dtype)
    return per_query.sum() / n_active


class MaskedInfoNCE(torch.nn.Module):
    """Module form of `masked_infonce`; keyword options are fixed at construction."""

    def __init__(self, temperature: float | Tensor = CrossPatchOptions.temperature, reduction: str = "mean",
                 backend: str | None = None, **options: Any) -> None:
        super().__init__()
        check_temperature(temperature)
        self.temperature = temperature
        self.reduction = reduction
        self.backend = backend
        self.options = options

    def forward(self, query: Tensor, positive: Tensor, bank: Tensor, query_labels: Tensor,
                bank_labels: Tensor, query_groups: Tensor | None = None, bank_groups: Tensor | None = None,
                group_table: Tensor | None = None) -> Tensor:
        return masked_infonce(query, positive, bank, query_labels, bank_labels, query_groups,
                              bank_groups, group_table, temperature=self.temperature,
                              reduction=self.reduction, backend=self.backend, **self.options)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, reduction={self.reduction!r}, backend={self.backend!r}"
