"""Mean-teacher EMA, the consistency ramp-up and the poly learning-rate decay."""
from __future__ import annotations

import math

import torch


def ema_alpha(step: int, alpha: float = 0.999) -> float:
    """The usual warm-up: early on the teacher follows the student closely, min(1 - 1/(t+1), alpha)."""
    if step < 0:
        raise ValueError(f"step: expected >= 0, got {step}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha: expected a value in [0, 1], got {alpha}")
    return min(1.0 - 1.0 / (step + 1), alpha)


@torch.no_grad()
def ema_update(teacher: torch.nn.Module, student: torch.nn.Module, alpha: float, buffers: str = "copy") -> None:
    """teacher <- alpha * teacher + (1 - alpha) * student for parameters. Buffers: "copy" takes the
    student's (BatchNorm running statistics of the student's current weights); "ema" averages the
    floating-point ones like the weights, so the statistics belong to the averaged weights they
    normalise (integer batch counters are copied either way)."""
    if buffers not in ("copy", "ema"):
        raise ValueError(f"buffers: expected 'copy' or 'ema', got {buffers!r}")
    t_params = dict(teacher.named_parameters())
    s_params = dict(student.named_parameters())
    if t_params.keys() != s_params.keys():
        raise ValueError("teacher: expected the same parameter names as the student")
    for name, s in s_params.items():
        t_params[name].mul_(alpha).add_(s.detach(), alpha=1.0 - alpha)
    t_bufs = dict(teacher.named_buffers())
    for name, s in student.named_buffers():
        if buffers == "ema" and s.is_floating_point():
            t_bufs[name].mul_(alpha).add_(s, alpha=1.0 - alpha)
        else:
            t_bufs[name].copy_(s)


def sigmoid_rampup(t: float, length: float) -> float:
    """exp(-5 (1 - t/T)^2), clipped to [0, 1] in t/T; a zero-length ramp is already at 1."""
    if length < 0:
        raise ValueError(f"length: expected >= 0, got {length}")
    if length == 0:
        return 1.0
    p = min(max(t / length, 0.0), 1.0)
    return math.exp(-5.0 * (1.0 - p) ** 2)


def poly_factor(step: int, total: int, power: float = 0.9) -> float:
    """Multiplier of the base learning rate: (1 - step/total)^power, 0 from `total` on."""
    if total <= 0:
        raise ValueError(f"total: expected > 0 steps, got {total}")
    return max(0.0, 1.0 - step / total) ** power


def poly_scheduler(optimizer, total_steps: int, power: float = 0.9):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: poly_factor(s, total_steps, power))
