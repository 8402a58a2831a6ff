"""Timing and peak-memory measurement of one contender on one input set."""
import ctypes
import gc
import os
import statistics
import time

import psutil
import torch

from .contenders import contenders, flops, make_inputs


def _leaves(inp, bank_grad):
    leaves = []
    for name in ("query", "positive", "bank"):
        t = inp[name].detach().requires_grad_(name != "bank" or bank_grad)
        inp[name] = t
        leaves.append(t)
    return leaves


def _step(fn, inp, leaves):
    for t in leaves:
        t.grad = None
    loss = fn(inp)
    loss.backward()
    return loss


def _outputs(loss, leaves):
    return [loss.detach().float().cpu()] + [
        (t.grad.float().cpu() if t.grad is not None else None) for t in leaves]


def _reset_peak_rss():
    """Return freed heap pages to the OS and restart the kernel's peak-RSS counter (Linux)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    return psutil.Process(os.getpid()).memory_info().rss


def _peak_rss():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def measure(name, size, bank_grad, device, repeats, time_limit, seed=0):
    """Run one contender: warm-up, then `repeats` timed forward+backward passes.

    Returns a dict (time_ms, peak_extra_mb, status) and the outputs (loss, grads) on the CPU.
    """
    n, m, d, patch = size
    factory, dtype = contenders(device.type)[name]
    fn = factory()
    inp = make_inputs(n, m, d, patch, device, dtype=dtype, seed=seed)
    leaves = _leaves(inp, bank_grad)
    cuda = device.type == "cuda"
    try:
        t0 = time.perf_counter()
        loss = _step(fn, inp, leaves)  # warm-up: compilation and autotuning stay out of the numbers
        if cuda:
            torch.cuda.synchronize()
        first = time.perf_counter() - t0
        outputs = _outputs(loss, leaves)
        if first * repeats > time_limit:
            repeats = max(1, int(time_limit // max(first, 1e-9)))
        if cuda:
            torch.cuda.synchronize()
            for t in leaves:
                t.grad = None
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            times = []
            for _ in range(repeats):
                start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                _step(fn, inp, leaves)
                stop.record()
                stop.synchronize()
                times.append(start.elapsed_time(stop))
            peak = torch.cuda.max_memory_allocated() - base
        else:
            for t in leaves:
                t.grad = None
            base = _reset_peak_rss()
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                _step(fn, inp, leaves)
                times.append((time.perf_counter() - t0) * 1e3)
            peak = _peak_rss() - base
    except torch.OutOfMemoryError:
        return dict(status="oom"), None
    finally:
        if cuda:
            torch.cuda.empty_cache()
    ms = statistics.median(times)
    return dict(status="ok", time_ms=ms, peak_extra_mb=peak / 2**20, repeats=len(times),
                tflops=flops(n, m, d, bank_grad) / (ms * 1e-3) / 1e12,
                dtype=str(dtype).replace("torch.", "")), outputs


def matrix_rates(device):
    """Measured dense matrix-product rates (TFLOP/s) of this GPU: bf16, tf32, fp32 (ieee)."""
    rates = {}
    n = 8192
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    for label, dtype, tf32 in (("bf16", torch.bfloat16, False), ("tf32", torch.float32, True),
                               ("fp32", torch.float32, False)):
        torch.backends.cuda.matmul.allow_tf32 = tf32
        x, y = a.to(dtype), b.to(dtype)
        for _ in range(3):
            x @ y
        torch.cuda.synchronize()
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(10):
            x @ y
        stop.record()
        stop.synchronize()
        rates[label] = 2 * n**3 * 10 / (start.elapsed_time(stop) * 1e-3) / 1e12
    torch.backends.cuda.matmul.allow_tf32 = False
    return rates


def max_rel_error(outputs, ref):
    """Largest of max|x - r| / max|r| over the loss and each gradient."""
    if outputs is None or ref is None:
        return float("nan")
    worst = 0.0
    for x, r in zip(outputs, ref):
        if x is None or r is None:
            continue
        if r.numel() == 0:
            continue
        worst = max(worst, ((x - r).abs().max() / r.abs().max().clamp(min=1e-12)).item())
    return worst
