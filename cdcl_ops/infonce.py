"""`masked_infonce`: the public functional API of the pseudo-label-masked InfoNCE (docs/design.md §2)."""
from __future__ import annotations

import importlib.util
import os

import torch

from . import ops
from ._validate import canonical_masks, check_arguments, check_values
from .backends import native, reference

BACKENDS = ("reference", "chunked", "triton", "cpu", "cuda")
TRITON_MAX_D = 512
PRECISIONS = ("auto", "tf32x3", "tf32", "ieee")


# decided once at import: torch.compile cannot trace importlib
TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def available_backends(device="cpu") -> list[str]:
    """Backends that can run on `device` in this process."""
    device = torch.device(device)
    names = ["reference", "chunked"]
    if TRITON_INSTALLED and (device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"):
        names.append("triton")
    if native.HAS_CPU and device.type == "cpu":
        names.append("cpu")
    if native.HAS_CUDA and device.type == "cuda":
        names.append("cuda")
    return names


def default_backend(device) -> str:
    """What `backend=None` picks: the fastest backend measured on that device type."""
    device = torch.device(device)
    if device.type == "cuda" and "triton" in available_backends(device):
        return "triton"
    if device.type == "cpu" and native.HAS_CPU:
        return "cpu"
    return "chunked"


def _resolve_backend(backend, query):
    if backend is None:
        return default_backend(query.device)
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected None or one of {BACKENDS}, got {backend!r}")
    if backend not in available_backends(query.device):
        raise ValueError(f"backend: {backend!r} cannot run on {query.device} here "
                         f"(available: {available_backends(query.device)}; triton needs CUDA "
                         "tensors, or TRITON_INTERPRET=1 set before importing cdcl_ops; cpu/cuda "
                         "need the compiled extension cdcl_ops._C"
                         f"{'' if native.LOADED else ', not loaded here: ' + str(native.LOAD_ERROR)})")
    if backend == "triton":
        if query.dtype == torch.float64:
            raise ValueError("query: the triton backend takes float16/bfloat16/float32 features, "
                             "got torch.float64 (use backend='chunked' or 'reference')")
        if query.shape[1] > TRITON_MAX_D:
            raise ValueError(f"query: the triton backend takes D <= {TRITON_MAX_D}, got D={query.shape[1]}")
    if backend == "cuda":
        if query.dtype == torch.float64:
            raise ValueError("query: the cuda backend takes float16/bfloat16/float32 features, "
                             "got torch.float64 (use backend='chunked' or 'reference')")
        if query.shape[1] > native.CUDA_MAX_D:
            raise ValueError(f"query: the cuda backend takes D <= {native.CUDA_MAX_D}, "
                             f"got D={query.shape[1]}")
    return backend


def masked_infonce(query, positive, bank, query_labels, bank_labels, query_groups=None,
                   bank_groups=None, group_table=None, temperature=0.1, reduction="mean",
                   backend=None, *, chunk_size=0, precision="auto", check_inputs=True,
                   check_finite=False):
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
        temperature: tau of s = cos / tau, finite and >= MIN_TEMPERATURE = 1e-4 (docs/loss.md).
        reduction: "mean" over active queries (0 when there is none), "sum", or "none" (N,).
        backend: None (fastest for the device), "reference", "chunked", "triton", "cpu" or "cuda".
        chunk_size: bank rows per chunk for the "chunked" backend (0: its default).
        precision: how "triton" multiplies fp32 features: "auto" (TF32 where
            torch.backends.cuda.matmul.allow_tf32 allows it, else "tf32x3"), "tf32x3" (three TF32
            products, fp32 accuracy on tensor cores), "tf32", or "ieee" (FMA units, slow).
            For "cuda" with 16-bit features, "tf32" selects the tensor-core kernels (D <= 256;
            the softmax weights of the second product are rounded to 16 bits, as in "triton");
            anything else the CUDA-core kernels. Ignored by "chunked" and "cpu".
        check_inputs: check group ids against the table (one host sync; skipped under
            torch.compile). check_finite: also reject NaN/Inf features.

    Returns:
        The loss in float32 (float64 for float64 inputs): a scalar, or (N,) for reduction="none".
        Inactive queries and queries without any negative contribute exactly 0.
    """
    check_arguments(query, positive, bank, query_labels, bank_labels, query_groups, bank_groups,
                    group_table, temperature, reduction)
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {PRECISIONS}, got {precision!r}")
    if not isinstance(chunk_size, int) or chunk_size < 0:
        raise ValueError(f"chunk_size: expected an int >= 0, got {chunk_size!r}")
    backend = _resolve_backend(backend, query)
    if not torch.compiler.is_compiling() and (check_inputs or check_finite):
        check_values(query, positive, bank, query_groups, bank_groups, group_table, check_finite)
    q_lab, q_grp, k_lab, k_grp, table = canonical_masks(query_labels, bank_labels, query_groups,
                                                        bank_groups, group_table)
    if backend == "reference":
        per_query = reference.per_query_loss(query, positive, bank, q_lab, q_grp, k_lab, k_grp,
                                             table, temperature)
    else:
        need_o = torch.is_grad_enabled() and query.requires_grad
        per_query = ops.masked_infonce_fwd(
            query.contiguous(), positive.contiguous(), bank.contiguous(), q_lab, q_grp, k_lab, k_grp,
            table, 1.0 / temperature, backend, chunk_size, precision, need_o)[0]
    if reduction == "none":
        return per_query
    if reduction == "sum":
        return per_query.sum()
    n_active = (q_grp >= 0).sum().clamp(min=1).to(per_query.dtype)
    return per_query.sum() / n_active


class MaskedInfoNCE(torch.nn.Module):
    """Module form of `masked_infonce`; keyword options are fixed at construction."""

    def __init__(self, temperature=0.1, reduction="mean", backend=None, **options):
        super().__init__()
        self.temperature = temperature
        self.reduction = reduction
        self.backend = backend
        self.options = options

    def forward(self, query, positive, bank, query_labels, bank_labels, query_groups=None,
                bank_groups=None, group_table=None):
        return masked_infonce(query, positive, bank, query_labels, bank_labels, query_groups,
                              bank_groups, group_table, temperature=self.temperature,
                              reduction=self.reduction, backend=self.backend, **self.options)

    def extra_repr(self):
        return f"temperature={self.temperature}, reduction={self.reduction!r}, backend={self.backend!r}"
