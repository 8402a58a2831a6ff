"""The backend interface: the three bundles the kernels take and their three entry points, the
Python copy of csrc/cuda/launch.h (struct `Masks`, struct `InverseNorms`, the scalar launch
parameters, and `launch_infonce_fwd`, `launch_infonce_bank_grad`, `launch_patch_fg_counts`).

`reference` is plain autograd and has no entry points; the streaming backends (`chunked`,
`triton`, and the native `cpu` / `cuda` ones) each supply a `Forward` and a `BankGrad`, which the
custom ops of `cdcl_ops.ops` call, so one autograd formula (docs/design.md §3) serves them all:

    forward(q, p, k, inv, masks, options, need_o)
        -> loss (N,), lse (N,), o (N, D) or (0, D)      (accumulation dtype: fp32, fp64 for fp64)
    bank_grad(q, k, inv, masks, lse, gs, options)
        -> (M, D) gradient with respect to the unit bank rows, where gs = upstream gradient / tau

q, p, k are the raw contiguous rows and `inv` their inverse L2 norms (inv.p is None in bank_grad):
every similarity is computed between the unit rows x * inv, and O_i is a weighted sum of unit bank
rows. `masks` comes from `_validate.canonical_masks`; `options` holds 1/tau and the knobs the
backend reads (the others at their defaults). The bundles are flattened (`*masks`) only at the
torch.library schemas, which take tensors and scalars one by one.
"""
from __future__ import annotations

from typing import NamedTuple, Protocol

from torch import Tensor

from ..normalize import inverse_norms


class Masks(NamedTuple):
    """The mask J's five tensors (docs/design.md §2), in the encoding of `_validate`:
    q_lab (N,) int32, q_grp (N,) int32 (< 0: inactive query), k_lab (M,) int32, k_grp (M,) int32
    (< 0: unusable bank row), table (G, G) bool. The C++ struct adds G itself."""
    q_lab: Tensor
    q_grp: Tensor
    k_lab: Tensor
    k_grp: Tensor
    table: Tensor

    def tile(self, a: int, b: int, c0: int, c1: int) -> Masks:
        """The masks of query rows [a, b) against bank rows [c0, c1)."""
        return Masks(self.q_lab[a:b], self.q_grp[a:b], self.k_lab[c0:c1], self.k_grp[c0:c1], self.table)


class InverseNorms(NamedTuple):
    """The inverse row norms of the query, positive and bank rows (fp32; fp64 for fp64 rows).
    `p` is None where only the queries and the bank are read (the bank gradient), as the struct's
    null pointer there."""
    q: Tensor
    p: Tensor | None
    k: Tensor

    @classmethod
    def of(cls, q: Tensor, p: Tensor | None, k: Tensor) -> InverseNorms:
        return cls(inverse_norms(q), None if p is None else inverse_norms(p), inverse_norms(k))


class Options(NamedTuple):
    """How the kernels are asked to compute, beyond their inputs (the launch functions' scalar
    parameters). Every streaming backend reads `inv_tau`; the other fields only the backends whose
    record lists them (`registry.Backend.options`): the others are handed these defaults."""
    inv_tau: float
    chunk_size: int = 0       # bank rows per chunk ("chunked"; 0: its default)
    precision: str = "auto"   # how fp32 / 16-bit products run ("triton", "cuda")


TUNABLE: tuple[str, ...] = tuple(f for f in Options._fields if f != "inv_tau")


# The entry points. Their arguments are positional only: the backends name them as they like.

class Forward(Protocol):
    """launch_infonce_fwd: (loss (N,), lse (N,), o (N, D), or (0, D) when need_o is False)."""

    def __call__(self, q: Tensor, p: Tensor, k: Tensor, inv: InverseNorms, masks: Masks,
                 options: Options, need_o: bool, /) -> tuple[Tensor, Tensor, Tensor]: ...


class BankGrad(Protocol):
    """launch_infonce_bank_grad: the (M, D) gradient with respect to the unit bank rows."""

    def __call__(self, q: Tensor, k: Tensor, inv: InverseNorms, masks: Masks, lse: Tensor, gs: Tensor,
                 options: Options, /) -> Tensor: ...


class PatchCounts(Protocol):
    """launch_patch_fg_counts: (B, grid, grid) int32 counts of `fg_class` pixels per patch, of
    integer labels (B, H, W) or of the argmax over C of logits (B, C, H, W)."""

    def __call__(self, labels_or_logits: Tensor, grid: int, fg_class: int, /) -> Tensor: ...


__all__ = ["Masks", "InverseNorms", "Options", "TUNABLE", "Forward", "BankGrad", "PatchCounts"]
