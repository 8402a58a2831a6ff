"""Patch foreground scores (docs/design.md §3) and patch kinds.

The feature map is cut into a grid x grid array of equal patches; a patch's foreground score is the
fraction of its pixels whose label is `fg_class`. Everything stays on the device.
"""
from __future__ import annotations

import torch

from ._validate import check_grid, check_thresholds
from .backends import registry
from .options import CrossPatchOptions

BDP, FDP, MP = 0, 1, -1  # patch kinds, also the paper-mode group ids (MP pixels are inactive)
# plain PyTorch, always available: the fallback, and what torch.compile traces into the graph
TORCH = "torch"


def patch_backends() -> tuple[str, ...]:
    """The registered backends with a patch-count kernel, then "torch"."""
    return tuple(n for n in registry.names() if registry.get(n).patch_counts is not None) + (TORCH,)


# unsigned label images (instance maps are often uint16 / uint32) widened to a signed type that holds
# every value, which every kernel handles; uint64 may hold values no signed type does
_WIDER = {torch.uint16: torch.int32, torch.uint32: torch.int64}


def signed_labels(labels: torch.Tensor, name: str = "labels_or_logits") -> torch.Tensor:
    """Integer labels in a dtype every backend takes, with the same values."""
    if labels.dtype == torch.uint64:
        raise ValueError(f"{name}: expected integer labels of at most 32 bits if unsigned "
                         f"(uint8/uint16/uint32) or any signed dtype, got torch.uint64")
    return labels.to(_WIDER[labels.dtype]) if labels.dtype in _WIDER else labels


def _check_input(x):
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"labels_or_logits: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() == 4 and x.is_floating_point():
        if x.shape[1] < 1:
            raise ValueError(f"labels_or_logits: expected C >= 1 classes, got shape {tuple(x.shape)}")
        return
    if x.dim() == 3 and not x.is_floating_point() and not x.is_complex():
        return
    raise ValueError("labels_or_logits: expected integer labels (B, H, W) or floating logits "
                     f"(B, C, H, W), got a {x.dtype} tensor of shape {tuple(x.shape)}")


def _torch_counts(x, grid, fg_class):
    # int64 labels: `uint8_labels == 65535` would cast 65535 to uint8 (255) and match
    labels = x.argmax(dim=1) if x.dim() == 4 else x.long()
    b, h, w = labels.shape
    fg = (labels == fg_class).view(b, grid, h // grid, grid, w // grid)
    return fg.sum(dim=(2, 4), dtype=torch.int32)


def _pick_backend(backend, x):
    if backend is None:
        if torch.compiler.is_compiling():
            return TORCH  # plain ops trace into the graph; the other kernels are opaque launches
        return registry.default(x.device, patches=True) or TORCH
    if backend == TORCH:
        return backend
    if backend not in patch_backends():
        raise ValueError(f"backend: expected None or one of {patch_backends()}, got {backend!r}")
    ok, why = registry.get(backend).runs_on(x.device)
    if not ok:
        raise ValueError(f"backend: {backend!r} cannot count patches on {x.device} here ({why})")
    return backend


def patch_foreground_scores(labels_or_logits: torch.Tensor, grid: int, fg_class: int = CrossPatchOptions.fg_class,
                            backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Foreground fraction and count of each patch of a grid x grid split.

    Args:
        labels_or_logits: integer labels (B, H, W), or floating logits / probabilities (B, C, H, W)
            whose argmax over C (first maximum on ties, as torch.argmax) gives the labels.
        grid: patches per side; must divide H and W.
        fg_class: the foreground label.
        backend: None (triton on CUDA, else the compiled extension when loaded, else torch),
            "triton", "cpu" / "cuda" (the compiled extension), or "torch".

    Returns:
        (scores, counts): (B, grid, grid) float32 fractions and int32 foreground pixel counts.
    """
    _check_input(labels_or_logits)
    if not labels_or_logits.is_floating_point():
        labels_or_logits = signed_labels(labels_or_logits)
    h, w = labels_or_logits.shape[-2:]
    check_grid(grid, h, w)
    if isinstance(fg_class, bool) or not isinstance(fg_class, int):
        raise ValueError(f"fg_class: expected an int, got {fg_class!r}")
    backend = _pick_backend(backend, labels_or_logits)
    if not -2**63 <= fg_class < 2**63:  # no label or class index (int64 at most) equals it
        counts = torch.zeros(labels_or_logits.shape[0], grid, grid, dtype=torch.int32,
                             device=labels_or_logits.device)
    elif backend == TORCH:
        counts = _torch_counts(labels_or_logits, grid, fg_class)
    else:
        kernel = registry.get(backend).patch_counts
        assert kernel is not None  # _pick_backend returns "torch" or a backend with a kernel
        counts = kernel(labels_or_logits, grid, fg_class)
    pixels = (h // grid) * (w // grid)
    return counts.to(torch.float32) / max(pixels, 1), counts


def classify_patches(scores: torch.Tensor, fdp: float = CrossPatchOptions.fdp,
                     bdp: float = CrossPatchOptions.bdp) -> torch.Tensor:
    """Patch kinds from foreground scores: 1 = FDP (>= fdp), 0 = BDP (<= bdp), -1 = MP (between).

    Returns an int64 tensor of the shape of `scores` (the paper-mode group ids of docs/design.md §2).
    """
    check_thresholds(fdp, bdp)
    if not isinstance(scores, torch.Tensor) or not scores.is_floating_point():
        raise ValueError(f"scores: expected a floating tensor of foreground fractions, got "
                         f"{type(scores).__name__ if not isinstance(scores, torch.Tensor) else scores.dtype}")
    kinds = torch.full(scores.shape, MP, dtype=torch.int64, device=scores.device)
    kinds = torch.where(scores <= bdp, torch.full_like(kinds, BDP), kinds)
    return torch.where(scores >= fdp, torch.full_like(kinds, FDP), kinds)
