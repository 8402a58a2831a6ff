"""Timing and peak-memory measurement of one contender on one input set."""
import ctypes
import gc
import multiprocessing
import os
import statistics
import time

import psutil
import torch

from .suites import SUITES

# The cpu kernels' tile (csrc/cpu/tiles.h): a thread's block of FWD_QUERY_BLOCK = 64 rows
# against a streamed tile of FWD_BANK_TILE = 256 rows (the bank gradient: GRAD_BANK_BLOCK x
# GRAD_QUERY_TILE, the same shape). tests/bench/test_benchmark_floor.py keeps the two in step.
CPU_BLOCK, CPU_TILE = 64, 256


def _leaves(inp, bank_grad):
    leaves = []
    for name in ("query", "positive", "bank"):
        if name not in inp:  # the supervised loss's inputs have no positives
            continue
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


def _forward(fn, inp, leaves):
    for t in leaves:
        t.grad = None
    with torch.no_grad():
        return fn(inp)


def first_line(e):
    """An exception as one short line for a row's note."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200] if text else ''}"


def _warm_up(fn, inp, leaves):
    """The first, untimed step: forward+backward, or the forward alone where the contender refuses
    a backward by raising NotImplementedError (FlexAttention on a CPU). Returns the step to time,
    what it times ("fwd+bwd" or "fwd"), a note and the loss; a refused forward propagates."""
    try:
        return _step, "fwd+bwd", "", _step(fn, inp, leaves)
    except NotImplementedError as e:
        note = f"forward only, backward refused ({first_line(e)})"
    return _forward, "fwd", note, _forward(fn, inp, leaves)


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


def measure(name, size, bank_grad, device, repeats, time_limit, seed=0, loss="masked_infonce"):
    """Run one contender of the `loss` suite (benchmarks/suites.py): warm-up, then `repeats`
    timed forward+backward passes (the forward alone where the contender refuses the backward:
    `timed` and `note` say so).

    Returns a dict (time_ms, peak_extra_mb, status, timed, note) and the outputs (loss, grads) on
    the CPU; a contender that refuses even the forward gives status "refused" and the reason.
    """
    suite = SUITES[loss]
    n, m, d, extra = size
    factory, dtype = suite.contenders(device.type)[name]
    fn = factory()
    inp = suite.make_inputs(n, m, d, extra, device, dtype=dtype, seed=seed)
    leaves = _leaves(inp, bank_grad)
    cuda = device.type == "cuda"
    try:
        t0 = time.perf_counter()
        # warm-up: compilation and autotuning stay out of the numbers
        step, timed, note, loss = _warm_up(fn, inp, leaves)
        if cuda:
            torch.cuda.synchronize()
        first = time.perf_counter() - t0
        outputs = _outputs(loss, leaves)
        if cuda:
            # a second untimed step on a GPU (cheap there): a compiled contender's first step is
            # mostly compilation and may leave a recompilation for the second; the number of
            # timed repeats then follows the step's own time
            t0 = time.perf_counter()
            step(fn, inp, leaves)
            torch.cuda.synchronize()
            first = time.perf_counter() - t0
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
                step(fn, inp, leaves)
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
                step(fn, inp, leaves)
                times.append((time.perf_counter() - t0) * 1e3)
            peak = _peak_rss() - base
    except torch.OutOfMemoryError:
        return dict(status="oom"), None
    except NotImplementedError as e:
        return dict(status="refused", note=first_line(e)), None
    finally:
        if cuda:
            torch.cuda.empty_cache()
    ms = statistics.median(times)
    backward = timed == "fwd+bwd"
    return dict(status="ok", time_ms=ms, peak_extra_mb=peak / 2**20, repeats=len(times),
                tflops=suite.flops(n, m, d, bank_grad, backward) / (ms * 1e-3) / 1e12, timed=timed,
                note=note, dtype=str(dtype).replace("torch.", "")), outputs


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


def _seconds_per_call(call, reps):
    t0 = time.perf_counter()
    for _ in range(reps):
        call()
    return (time.perf_counter() - t0) / reps


def _products(rows, cols, d, dtype, library):
    """One tile step of the cpu kernel's forward at (rows x d) @ (d x cols), then @ (cols x d):
    scores = block @ tile^T, then O += scores @ tile. `library` "blas" is torch.mm (MKL on x86
    builds), "onednn" torch's oneDNN matmul (torch._C._nn.mkldnn_linear, a private entry point:
    torch.mm does not reach oneDNN for fp32, and MKL takes its AVX2 kernels on AMD CPUs)."""
    def make():
        q = (torch.randn(rows, d) / d**0.5).to(dtype)
        k = (torch.randn(cols, d) / d**0.5).to(dtype)
        if library == "onednn":
            qm, km, kt = q.to_mkldnn(), k.to_mkldnn(), k.T.contiguous().to_mkldnn()
            linear = torch._C._nn.mkldnn_linear
            return lambda: linear(linear(qm, km), kt)
        s, o = torch.empty(rows, cols, dtype=dtype), torch.zeros(rows, d, dtype=dtype)
        return lambda: (torch.mm(q, k.T, out=s), o.addmm_(s, k))
    return make


def _tile_exp(rows, cols):
    def make():
        src = -20 * torch.rand(rows, cols)  # s - max <= 0, as in the online log-sum-exp
        dst = torch.empty_like(src)
        return lambda: torch.exp(src, out=dst)
    return make


# What cpu_rates measures: name -> (rate it counts toward, work per call, call, calls per round,
# the 1-element call whose time is taken off). The products at the kernel's own tile (CPU_BLOCK x
# CPU_TILE) and at 1024-row tiles, where a library's per-call cost no longer shows; nothing is
# taken off their time (a oneDNN call of 1 element costs more than the tile call's own overhead,
# and subtracting it gave rates above the CPU's peak). torch.exp on a tile, less its dispatch.
def _rate_kinds(d):
    kinds = {}
    for dtype, rate in ((torch.float32, "fp32"), (torch.bfloat16, "bf16_products")):
        for library in ("blas", "onednn"):
            for rows, cols, reps in ((CPU_BLOCK, CPU_TILE, 200), (1024, 1024, 10)):
                kinds[f"{rate}-{library}-{rows}x{cols}"] = (
                    rate, 4 * rows * cols * d, _products(rows, cols, d, dtype, library), reps, None)
    kinds["exp"] = ("exp", CPU_BLOCK * CPU_TILE, _tile_exp(CPU_BLOCK, CPU_TILE), 1000, _tile_exp(1, 1))
    return kinds


def _rate_worker(barrier, results, d, rounds):
    """One process per core (threads would take turns at the GIL between short calls): the best
    rate of each kind over `rounds`, every process running the same kind at the same time."""
    torch.set_num_threads(1)  # one product per core, as in the kernel's at::parallel_for
    out = {}
    for name, (_, work, make_call, reps, make_empty) in _rate_kinds(d).items():
        try:
            call = make_call()
            call()
        except (RuntimeError, AttributeError):  # this torch has no such library for the dtype
            call = None
        empty = make_empty() if make_empty else None
        best = 0.0
        for _ in range(rounds):
            barrier.wait()
            if call is not None:
                overhead = _seconds_per_call(empty, reps) if empty else 0.0
                best = max(best, work / max(_seconds_per_call(call, reps) - overhead, 1e-9))
        out[name] = best
    results.put(out)


def cpu_rates(threads, d=128, rounds=5):
    """This CPU's matrix rates (TFLOP/s) and exp rate (10^9 exp/s), `threads` cores at once with
    the tiles in cache, measured in the same run as the contenders: each the best over torch's
    BLAS and oneDNN products, at the cpu kernel's tile shapes and at 1024-row tiles (`detail`
    keeps every measurement). `bf16_products` is the best bf16 product and `bf16`, the rate the
    floor of bf16 rows uses, the larger of it and fp32 (bf16 rows can always be upcast)."""
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked OpenMP state
    barrier, results = ctx.Barrier(threads), ctx.Queue()
    workers = [ctx.Process(target=_rate_worker, args=(barrier, results, d, rounds))
               for _ in range(threads)]
    for w in workers:
        w.start()
    per_worker = [results.get(timeout=600) for _ in workers]
    for w in workers:
        w.join()
    detail = {name: sum(r[name] for r in per_worker) for name in per_worker[0]}
    kinds = _rate_kinds(d)
    best = {}
    for name, total in detail.items():
        rate = kinds[name][0]
        best[rate] = max(best.get(rate, 0.0), total)
    fp32, bf16 = best["fp32"] / 1e12, best["bf16_products"] / 1e12
    return dict(fp32=fp32, bf16=max(fp32, bf16), bf16_products=bf16, exp=best["exp"] / 1e9,
                detail=detail)


def floor_ms(n, m, d, bank_grad, backward, matrix_tflops, exp_g=None, loss="masked_infonce"):
    """The least time this machine needs for a row's work (the counts of design.md §3, or §7 for
    the supervised loss, in the `loss` suite): its matrix work
    at the measured matrix rate plus, given exp_g (a CPU), its exponentials at the measured exp
    rate. A sum on a CPU: the same vector units of the same cores do both, one after the other.
    On a GPU the matrix term alone: there the exponentials run on the special-function units
    beside the tensor cores and overlap with the products in a fused kernel (the floor would be
    the larger of the two), and torch.exp on a GPU measures memory bandwidth, not those units."""
    suite = SUITES[loss]
    seconds = suite.flops(n, m, d, bank_grad, backward) / (matrix_tflops * 1e12)
    if exp_g:
        seconds += suite.exponentials(n, m, bank_grad, backward) / (exp_g * 1e9)
    return seconds * 1e3


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
