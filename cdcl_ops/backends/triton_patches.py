"""Triton patch foreground counts: one program per (image, patch row, patch column).

For logits the argmax over classes is fused: each pixel's class is found in registers, so the
(B, H, W) label map is never written. Ties and NaN follow torch.argmax (the first maximum wins,
NaN counts as the maximum).
"""
import torch
import triton
import triton.language as tl

MAX_TILE = 1024  # pixels per tile: patches larger than that are swept in tiles


@triton.jit
def _patch_counts_kernel(X, COUNTS, C, G, PH, PW, stride_b, stride_c, stride_h, stride_w, fg,
                         IS_LOGITS: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // (G * G)
    rest = pid % (G * G)
    h0 = (rest // G) * PH
    w0 = (rest % G) * PW
    base = X + b.to(tl.int64) * stride_b
    total = tl.zeros([BLOCK_H, BLOCK_W], tl.int32)
    for r0 in range(0, PH, BLOCK_H):
        for c0 in range(0, PW, BLOCK_W):
            rh = r0 + tl.arange(0, BLOCK_H)
            rw = c0 + tl.arange(0, BLOCK_W)
            ok = (rh < PH)[:, None] & (rw < PW)[None, :]
            off = (h0 + rh).to(tl.int64)[:, None] * stride_h + (w0 + rw).to(tl.int64)[None, :] * stride_w
            if IS_LOGITS:
                ptr = base + off
                best = tl.load(ptr, mask=ok, other=0.0).to(tl.float32)
                label = tl.zeros([BLOCK_H, BLOCK_W], tl.int32)
                for c in range(1, C):
                    ptr += stride_c  # pointer steps: no 32-bit product c * stride_c to overflow
                    v = tl.load(ptr, mask=ok, other=0.0).to(tl.float32)
                    # strict '>' keeps the first maximum; a NaN beats any number, but not an earlier NaN
                    better = (v > best) | ((v != v) & (best == best))
                    best = tl.where(better, v, best)
                    label = tl.where(better, c, label)
            else:
                label = tl.load(base + off, mask=ok, other=0)
            total += (ok & (label == fg)).to(tl.int32)
    tl.store(COUNTS + pid, tl.sum(tl.sum(total, axis=1), axis=0))


def tile_shape(ph: int, pw: int) -> tuple[int, int]:
    block_w = min(max(2, triton.next_power_of_2(pw)), 64)
    block_h = min(max(2, triton.next_power_of_2(ph)), max(2, MAX_TILE // block_w))
    return block_h, block_w


def patch_fg_counts(x: torch.Tensor, grid: int, fg_class: int) -> torch.Tensor:
    """(B, grid, grid) int32 foreground counts of integer labels (B, H, W) or logits (B, C, H, W)."""
    is_logits = x.dim() == 4
    if x.dtype == torch.bool:
        x = x.to(torch.uint8)
    b, h, w = x.shape[0], x.shape[-2], x.shape[-1]
    c = x.shape[1] if is_logits else 1
    ph, pw = h // grid, w // grid
    counts = torch.empty(b, grid, grid, dtype=torch.int32, device=x.device)
    if counts.numel() == 0:
        return counts
    if ph * pw == 0 or not (0 <= fg_class < c or not is_logits):
        return counts.zero_()
    strides = (x.stride(0), x.stride(1) if is_logits else 0, x.stride(-2), x.stride(-1))
    block_h, block_w = tile_shape(ph, pw)
    _patch_counts_kernel[(counts.numel(),)](x, counts, c, grid, ph, pw, *strides, fg_class,
                                            IS_LOGITS=is_logits, BLOCK_H=block_h, BLOCK_W=block_w)
    return counts
