"""`supervised_contrast`: the supervised (multi-positive) pixel contrast of SupCon and
ContrastiveSeg over every positive, on the streaming backends (docs/design.md §7)."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from . import supcon_ops
from ._validate import canonical_masks, check_contrast_arguments, check_temperature, check_values
from .backends import reference, registry
from .backends.interface import DENOMINATORS, SUPERVISED_CONTRAST, Options
from .infonce import PRECISIONS

# pytorch-metric-learning's SupConLoss default (Khosla et al. used 0.07, ContrastiveSeg 0.1)
DEFAULT_TEMPERATURE = 0.1


def supervised_contrast(query: Tensor, query_labels: Tensor, bank: Tensor | None = None,
                        bank_labels: Tensor | None = None, *, denominator: str = "all",
                        positive: Tensor | None = None, query_groups: Tensor | None = None,
                        bank_groups: Tensor | None = None, group_table: Tensor | None = None,
                        temperature: float | Tensor = DEFAULT_TEMPERATURE, reduction: str = "mean",
                        backend: str | None = None, chunk_size: int = 0, precision: str = "auto",
                        check_inputs: bool = True, check_finite: bool = False) -> Tensor:
    """Supervised contrastive loss of each query against every bank row of its label
    (docs/design.md §7), without the N x M matrix on the streaming backends.

    With unit rows and s_ij = cos(q_i, k_j) / tau, the positives P_i of query i are the active
    bank rows with its label, its negatives N_i the active bank rows with another (both within the
    group rule when groups are given), and

        denominator="all"        l_i = LSE_{a in P_i u N_i} s_ia - mean_{p in P_i} s_ip
                                 (SupCon's L_out; pytorch-metric-learning's SupConLoss)
        denominator="negatives"  l_i = mean_{p in P_i} -log(e^s_ip / (e^s_ip + sum_{n in N_i} e^s_in))
                                 (ContrastiveSeg's pixel contrast, Eq. 3)

    Args:
        query: (N, D) features (float16/bfloat16/float32/float64).
        query_labels: (N,) integer labels (int8..int64, uint8..uint32); < 0 marks a row inactive.
        bank, bank_labels: (M, D) rows of the query's dtype and (M,) labels, or both None: the
            queries are then their own bank, and row i is neither a positive nor a negative of
            query i (SupConLoss's in-batch form); their gradient then flows into `query`.
        denominator: "all" or "negatives", as above.
        positive: optional (N, D) rows; positive[i] joins P_i (a second view of the same pixel).
        query_groups, bank_groups, group_table: optional group ids and a (G, G) bool table, as in
            masked_infonce: bank row j is a positive or negative of query i only if
            group_table[query_groups[i], bank_groups[j]]; group < 0 marks a row inactive. With
            bank=None give query_groups and group_table only.
        temperature: tau, finite and >= MIN_TEMPERATURE.
        reduction: "mean" over the queries with at least one positive (0 when there is none),
            "sum", or "none" (N,).
        backend: None (the fastest for the device among those that take this loss), "reference",
            "chunked", "cpu" or "triton" ("cuda" does not take it and says so).
        chunk_size, precision, check_inputs, check_finite: as in masked_infonce.

    Returns:
        The loss in float32 (float64 for float64 inputs). A query without a positive (inactive,
        or no active bank row of its label) contributes exactly 0 and gets zero gradients; so
        does, under "negatives", a query without a negative.
    """
    check_contrast_arguments(query, query_labels, bank, bank_labels, positive, query_groups,
                             bank_groups, group_table, denominator, reduction)
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {PRECISIONS}, got {precision!r}")
    if not isinstance(chunk_size, int) or chunk_size < 0:
        raise ValueError(f"chunk_size: expected an int >= 0, got {chunk_size!r}")
    temperature = check_temperature(temperature)
    named = backend is not None
    backend = registry.resolve(backend, query, SUPERVISED_CONTRAST)
    options = registry.get(backend).own_options(
        Options(1.0 / temperature, chunk_size, precision), named)
    self_bank = bank is None
    if self_bank:
        bank_labels, bank_groups = query_labels, query_groups
    if not torch.compiler.is_compiling() and (check_inputs or check_finite):
        check_values(query, positive, bank, query_groups, None if self_bank else bank_groups,
                     group_table, check_finite)
    masks = canonical_masks(query_labels, bank_labels, query_groups, bank_groups, group_table)
    if registry.get(backend).contrast_forward is None:  # the reference: plain autograd
        per_query, n_pos = reference.contrast_per_query(query, positive, bank, masks, temperature,
                                                        denominator)
    else:
        need_u = torch.is_grad_enabled() and query.requires_grad
        out = supcon_ops.supcon_fwd(
            query.contiguous(), None if positive is None else positive.contiguous(),
            None if self_bank else bank.contiguous(), *masks, options.inv_tau, denominator,
            backend, options.chunk_size, options.precision, need_u)
        per_query, n_pos = out[0], out[2]
    if reduction == "none":
        return per_query
    if reduction == "sum":
        return per_query.sum()
    contributing = (n_pos > 0).sum().clamp(min=1).to(per_query.dtype)
    return per_query.sum() / contributing


class SupervisedContrast(torch.nn.Module):
    """Module form of `supervised_contrast`; the keyword options are fixed at construction."""

    def __init__(self, denominator: str = "all", temperature: float | Tensor = DEFAULT_TEMPERATURE,
                 reduction: str = "mean", backend: str | None = None, **options: Any) -> None:
        super().__init__()
        check_temperature(temperature)
        if denominator not in DENOMINATORS:
            raise ValueError(f"denominator: expected one of {DENOMINATORS}, got {denominator!r}")
        self.denominator = denominator
        self.temperature = temperature
        self.reduction = reduction
        self.backend = backend
        self.options = options

    def forward(self, query: Tensor, query_labels: Tensor, bank: Tensor | None = None,
                bank_labels: Tensor | None = None, **tensors: Tensor | None) -> Tensor:
        """tensors: positive, query_groups, bank_groups, group_table (keywords)."""
        return supervised_contrast(query, query_labels, bank, bank_labels,
                                   denominator=self.denominator, temperature=self.temperature,
                                   reduction=self.reduction, backend=self.backend, **tensors,
                                   **self.options)

    def extra_repr(self) -> str:
        return (f"denominator={self.denominator!r}, temperature={self.temperature}, "
                f"reduction={self.reduction!r}, backend={self.backend!r}")
