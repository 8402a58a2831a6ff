"""The backend interface: the bundles the kernels take and their entry points, the Python copy of
csrc/cuda/launch.h (struct `Masks`, struct `InverseNorms`, the scalar launch parameters, and
`launch_infonce_fwd`, `launch_infonce_bank_grad`, `launch_patch_fg_counts`), plus the entry points
of the supervised contrastive loss (docs/design.md §7), which the CUDA C++ kernels do not have.

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

The supervised contrastive loss (`cdcl_ops.supervised_contrast`) has two entry points of its own,
called by the custom ops of `cdcl_ops.supcon_ops`; `Contrast` says which denominator and whether
the bank is the queries themselves (k is q, and row i is left out of query i's sets):

    contrast_forward(q, p or None, k, inv, masks, options, contrast, need_u)
        -> ContrastRows: loss, lse, n_pos, lse_weight, pos_coef (N,), u (N, D) or (0, D)
    contrast_bank_grad(q, k, inv, masks, lse, gs_lse, gs_pos, options, contrast)
        -> (M, D) gradient with respect to the unit bank rows
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

# The losses a backend may take (registry.Backend.losses)
MASKED_INFONCE = "masked_infonce"
SUPERVISED_CONTRAST = "supervised_contrast"
LOSSES: tuple[str, ...] = (MASKED_INFONCE, SUPERVISED_CONTRAST)
DENOMINATORS: tuple[str, ...] = ("all", "negatives")


class Contrast(NamedTuple):
    """What the supervised contrastive kernels compute (docs/design.md §7). denominator: "all"
    (the log-sum-exp over positives and negatives, SupCon's L_out) or "negatives" (each positive
    against the negatives alone, ContrastiveSeg's Eq. 3). exclude_self: the bank is the queries
    themselves (k is q, masks' bank side the queries'), and bank row i is not a candidate of
    query i."""
    denominator: str
    exclude_self: bool


class ContrastRows(NamedTuple):
    """The supervised contrastive forward's per-query results (accumulation dtype but n_pos):
    loss (N,): l_i, 0 for a query without a positive.
    lse (N,): the log-sum-exp the bank gradient recomputes weights from: over the candidates (and
        the paired positive) for "all", over the negatives for "negatives" (-inf where the set is
        empty).
    n_pos (N,) int32: |P_i|, the paired positive included; 0 for an inactive query.
    lse_weight (N,): a_i with dl_i/ds_ij = a_i exp(s_ij - lse_i) for j in lse's set, before the
        positives' own term: 1 ("all") or sum_p sigmoid(lse_i - s_ip) / |P_i| ("negatives"); 0
        for a query without a positive.
    pos_coef (N,): dl_i/ds+_i, the derivative by the paired positive's score (0 without one).
    u (N, D) or (0, D): dl_i/dqh_i * tau less the paired positive's term: the sum over bank rows
        of dl_i/ds_ij kh_j, which the query gradient needs and nothing else keeps."""
    loss: Tensor
    lse: Tensor
    n_pos: Tensor
    lse_weight: Tensor
    pos_coef: Tensor
    u: Tensor


# The entry points. Their arguments are positional only: the backends name them as they like.

class Forward(Protocol):
    """launch_infonce_fwd: (loss (N,), lse (N,), o (N, D), or (0, D) when need_o is False)."""

    def __call__(self, q: Tensor, p: Tensor, k: Tensor, inv: InverseNorms, masks: Masks,
                 options: Options, need_o: bool, /) -> tuple[Tensor, Tensor, Tensor]: ...


class BankGrad(Protocol):
    """launch_infonce_bank_grad: the (M, D) gradient with respect to the unit bank rows."""

    def __call__(self, q: Tensor, k: Tensor, inv: InverseNorms, masks: Masks, lse: Tensor, gs: Tensor,
                 options: Options, /) -> Tensor: ...


class ContrastForward(Protocol):
    """The supervised contrastive forward: `ContrastRows` (u is (0, D) when need_u is False).
    p is None without a paired positive (inv.p is None then); k is q when contrast.exclude_self."""

    def __call__(self, q: Tensor, p: Tensor | None, k: Tensor, inv: InverseNorms, masks: Masks,
                 options: Options, contrast: Contrast, need_u: bool, /) -> ContrastRows: ...


class ContrastBankGrad(Protocol):
    """The supervised contrastive bank gradient, (M, D), with respect to the unit bank rows:
    sum_i (gs_lse_i [j in lse_i's set] exp(s_ij - lse_i) - gs_pos_i [j in P_i] sigma_ij) qh_i,
    sigma_ij = 1 ("all") or sigmoid(lse_i - s_ij) ("negatives")."""

    def __call__(self, q: Tensor, k: Tensor, inv: InverseNorms, masks: Masks, lse: Tensor,
                 gs_lse: Tensor, gs_pos: Tensor, options: Options, contrast: Contrast, /) -> Tensor: ...


class PatchCounts(Protocol):
    """launch_patch_fg_counts: (B, grid, grid) int32 counts of `fg_class` pixels per patch, of
    integer labels (B, H, W) or of the argmax over C of logits (B, C, H, W)."""

    def __call__(self, labels_or_logits: Tensor, grid: int, fg_class: int, /) -> Tensor: ...


__all__ = ["Masks", "InverseNorms", "Options", "TUNABLE", "Forward", "BankGrad", "PatchCounts",
           "MASKED_INFONCE", "SUPERVISED_CONTRAST", "LOSSES", "DENOMINATORS", "Contrast",
           "ContrastRows", "ContrastForward", "ContrastBankGrad"]
