"""The losses the benchmark measures, one suite each: its sizes, inputs, contenders and the work
its floor counts (benchmarks/run.py --loss; docs/design.md §6)."""
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from . import contenders as masked
from . import supcon_contenders as supcon


@dataclass(frozen=True)
class Suite:
    """size(name) -> (N, M, D, extra) or None (extra: pixels per patch, or classes);
    make_inputs(n, m, d, extra, device, dtype, seed); contenders(device_type) -> name ->
    (factory, dtype); flops / exponentials(n, m, d | -, bank_grad, backward)."""
    sizes: tuple[str, ...]
    size: Callable[[str], tuple[int, int, int, int] | None]
    make_inputs: Callable[..., dict]
    contenders: Callable[[str], dict]
    flops: Callable[..., int]
    exponentials: Callable[..., int]


def _masked_size(name):
    if name in masked.SIZES:
        return masked.SIZES[name]
    try:
        n, m = name[1:].split("xM")
        return int(n), int(m), 128, 25  # D 128, patches of 25 pixels
    except ValueError:
        return None


def _supcon(denominator):
    return Suite(tuple(supcon.SIZES), supcon.size, supcon.make_inputs,
                 partial(supcon.contenders, denominator=denominator),
                 partial(supcon.flops, denominator=denominator),
                 partial(supcon.exponentials, denominator=denominator))


SUITES = {
    "masked_infonce": Suite(tuple(masked.SIZES), _masked_size, masked.make_inputs, masked.contenders,
                            masked.flops, masked.exponentials),
    "supcon-all": _supcon("all"),
    "supcon-negatives": _supcon("negatives"),
}
