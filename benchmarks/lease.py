"""One prepared command for a lent GPU machine (`bash benchmarks/gpu_lease.sh` runs this module).

A lease is short (docs/native.md, "A lent GPU"): this runs the checks in order of value under one
internal deadline, each step with the smaller of its own timeout and what is left of the budget
once a reserve for packing the results is kept, and skips (and says so) a step that cannot get its
least useful time. Steps: the environment; the extension built for the GPU at hand only, in the
background, while the Triton GPU tests run; the CUDA-core tests; the tensor-core tests and opcheck
in their own process (the first failure again under compute-sanitizer); the compile tests under
TORCH_LOGS; the benchmark with the bank detached (paper, then large), its bank-gradient rows at
paper; a paper-preset training smoke run on the bundled sample.

It writes at most 8 files into the result folder ($OUT, else --out): summary.txt (also printed
last), logs.tar.gz (every log, junit XML, benchmark CSV/Markdown, compile and training logs, no
checkpoints), carry-ext.tar.gz (the built extension) and carry-cache.tar.gz (Triton and Inductor
caches). A rerun given those (--reuse DIR, or LEASE_REUSE) skips the build when they match.

    bash benchmarks/gpu_lease.sh                         # the whole lease, 480 s
    bash benchmarks/gpu_lease.sh --dry-run               # the plan, deadlines and skips; no GPU
    LEASE_REUSE=.lease bash benchmarks/gpu_lease.sh --only compile,bench-grad --budget 240
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import glob
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import xml.etree.ElementTree as ET

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(ROOT, "runs", "lease", "out")
BUDGET_S = 480   # one command of a lease: at most 8 minutes
RESERVE_S = 25   # kept back from every step: packing the results and the summary
# what comes back from a lease's result folder (the device tool's limits)
LIMITS = dict(files=8, depth=2, file_bytes=16 * 2**20, total_bytes=64 * 2**20)
NAME_OK = re.compile(r"^[A-Za-z0-9._-]+$")
# the benchmark rows the GPU goals need (RESULTS.md), the most needed first in each invocation
PAPER_CONTENDERS = "reference,triton-bf16,flex-bf16,triton,cuda-bf16-tc,cuda-bf16"
LARGE_CONTENDERS = "reference,triton-bf16,flex-bf16,cuda-bf16-tc"
# supervised_contrast at ContrastiveSeg's size, the queue detached as there: its goal is triton bf16
# against the materialising reference; SupConLoss is what its users run today
SUPCON_CONTENDERS = "reference,triton-bf16,triton,supconloss"
IF_TIME = ("bench-supcon",)  # steps the expected schedule need not reach
# the GPU test files (tests/gpu/): Triton's and FlexAttention's need no build; the cuda backend's
# are split over three steps by -k; the compile step adds its own file
GPU_TRITON = ["tests/gpu/test_triton_on_gpu.py", "tests/gpu/test_flex_on_gpu.py"]
GPU_NATIVE = "tests/gpu/test_cuda_on_gpu.py"
GPU_COMPILE = "tests/gpu/test_compile_on_gpu.py"
TENSOR_CORE_TESTS = "tensor_cores or opcheck or tf32"  # -k: the tensor-core kernels and opcheck
TORCH_LOGS = "graph_breaks,recompiles,aot_graphs"


@dataclasses.dataclass
class Step:
    name: str
    title: str
    own_s: int        # its own timeout
    min_s: int        # the least time worth starting it with
    expect_s: int     # what it is expected to take (a guess until a lease has measured it)
    background: bool = False


# Own timeouts bound a step that hangs; the expected times are guesses from the H200 runs of
# 2026-11-27 (the build of three .cu files for two architectures, 84 GPU tests and two benchmark
# sizes took 10-14 minutes together) and sum to about the budget, so a slow step costs the last
# ones (the training smoke run first), never the tests.
PLAN = [
    Step("env", "nvidia-smi -q, versions, device properties, torch probes", 45, 5, 15),
    Step("build", "the extension for this GPU only (background, beside the Triton tests)", 240, 60, 100,
         background=True),
    Step("triton", "Triton, chunked and FlexAttention GPU tests", 150, 30, 110),
    Step("cuda-core", "the cuda backend's CUDA-core tests", 90, 20, 35),
    Step("tensor-cores", "tensor-core tests and opcheck, in their own process", 60, 20, 20),
    Step("sanitizer", "the first failing tensor-core test under compute-sanitizer", 90, 30, 0),
    Step("compile", "compile tests (chunked/cuda/triton on CUDA) under TORCH_LOGS", 120, 30, 60),
    Step("bench-paper", f"benchmark, bank detached, paper: {PAPER_CONTENDERS}", 100, 40, 55),
    Step("bench-large", f"benchmark, bank detached, large: {LARGE_CONTENDERS}", 100, 40, 55),
    Step("bench-grad", f"benchmark, bank gradient, paper: {PAPER_CONTENDERS}", 90, 30, 40),
    Step("train", "paper preset on the bundled sample, bf16, channels_last: SupOnly then CDCL", 150, 60, 90),
    # after the eight minutes' plan: runs when earlier steps finish early, or alone in a rerun
    # (--only bench-supcon)
    Step("bench-supcon", f"supervised_contrast ('all'), contrastiveseg, queue detached: {SUPCON_CONTENDERS}",
         80, 30, 30),
]


@dataclasses.dataclass
class Record:
    name: str
    status: str = "skipped"   # ok, failed, timeout, skipped
    seconds: float = 0.0
    limit: float = 0.0
    note: str = ""


# -- time ------------------------------------------------------------------------------------------

class Clock:
    """The lease's deadline: `left()` seconds until it, `limit(step)` the step's timeout."""

    def __init__(self, budget_s, reserve_s=RESERVE_S, now=time.monotonic):
        self.now = now
        self.start = now()
        self.budget = budget_s
        self.reserve = reserve_s

    def elapsed(self):
        return self.now() - self.start

    def left(self):
        return self.budget - self.elapsed()

    def limit(self, step: Step) -> float:
        return min(step.own_s, self.left() - self.reserve)


def plan_schedule(plan, budget_s, reserve_s=RESERVE_S, expected=False):
    """When each step starts and the timeout it gets, the background build beside the Triton
    tests: in the worst case (every step runs to its timeout) or with the expected times.
    Returns (name, start, limit or None when skipped)."""
    t, rows, background_end = 0.0, [], None
    for step in plan:
        if background_end is not None and not step.background and step.name != "triton":
            t, background_end = max(t, background_end), None  # what follows the Triton tests waits
        limit = min(step.own_s, budget_s - t - reserve_s)
        if limit < step.min_s:
            rows.append((step.name, t, None))
            continue
        took = min(limit, step.expect_s) if expected else limit
        rows.append((step.name, t, limit))
        if step.background:
            background_end = t + took
            continue
        t += took
    return rows


# -- processes -------------------------------------------------------------------------------------

def start(cmd, log_path, env=None, cwd=ROOT):
    """Start `cmd` in a process group of its own, output into log_path."""
    log = open(log_path, "ab")
    log.write(f"$ {' '.join(cmd)}\n".encode())
    log.flush()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=cwd, env=env,
                            start_new_session=True)
    proc._lease_log = log
    proc._lease_start = time.monotonic()
    return proc


def finish(proc, timeout):
    """Wait up to `timeout` seconds; past it the whole process group (pytest's compile workers
    too) is ended. Returns (returncode or None when it timed out, seconds)."""
    try:
        rc = proc.wait(timeout=max(timeout, 0))
    except subprocess.TimeoutExpired:
        rc = None
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=5)
                break
            except subprocess.TimeoutExpired:
                continue
    proc._lease_log.close()
    return rc, time.monotonic() - proc._lease_start


def run(cmd, log_path, timeout, env=None):
    return finish(start(cmd, log_path, env), timeout)


# -- results: junit, benchmark rows, training lines ------------------------------------------------

def junit_counts(path):
    """(passed, failed, errors, skipped, [failing test ids with their first message line])."""
    if not os.path.exists(path):
        return None
    root = ET.parse(path).getroot()
    passed = failed = errors = skipped = 0
    failures = []
    for case in root.iter("testcase"):
        outcome = [c for c in case if c.tag in ("failure", "error", "skipped")]
        if not outcome:
            passed += 1
            continue
        tag = outcome[0].tag
        if tag == "skipped":
            skipped += 1
            continue
        failed += tag == "failure"
        errors += tag == "error"
        module = case.get("classname", "").replace(".", "/")
        message = (outcome[0].get("message") or "").strip().splitlines()
        failures.append((f"{module}.py::{case.get('name')}", message[0][:160] if message else ""))
    return passed, failed, errors, skipped, failures


def first_failure(junit_path, log_path):
    """The first failing test's id: from the junit XML, else (a run cut short) from pytest -v's log."""
    counts = junit_counts(junit_path)
    if counts and counts[4]:
        return counts[4][0][0]
    if os.path.exists(log_path):
        with open(log_path, errors="replace") as f:
            for line in f:
                m = re.match(r"^(tests/\S+::\S+) (FAILED|ERROR)", line)
                if m:
                    return m.group(1)
    return None


def bench_rows(folder):
    paths = sorted(glob.glob(os.path.join(folder, "*.csv")), key=os.path.getmtime)
    rows = []
    for path in paths:
        with open(path) as f:
            rows += list(csv.DictReader(f))
    return rows


def _num(row, key):
    try:
        return float(row.get(key) or "nan")
    except ValueError:
        return float("nan")


def goals(rows):
    """The GPU goals of issue 24 (RESULTS.md) read off the benchmark rows, one line each."""
    out = []
    by = {(r["size"], r["bank_grad"], r["contender"]): r for r in rows if r.get("status") == "ok"}
    for size, grad in (("paper", "0"), ("large", "0"), ("paper", "1")):
        where = f"{size}, bank {'with gradient' if grad == '1' else 'detached'}"
        ref, tb, fb = (by.get((size, grad, c)) for c in ("reference", "triton-bf16", "flex-bf16"))
        if ref and tb:
            x = _num(ref, "time_ms") / _num(tb, "time_ms")
            out.append(f"{where}: triton-bf16 {x:.1f}x faster than reference (goal >= 10x): "
                       f"{'met' if x >= 10 else 'not met'}")
        if tb and fb:
            faster = _num(tb, "time_ms") < _num(fb, "time_ms")
            lighter = _num(tb, "peak_extra_mb") <= _num(fb, "peak_extra_mb")
            out.append(f"{where}: triton-bf16 {_num(tb, 'time_ms'):.1f} ms / {_num(tb, 'peak_extra_mb'):.0f} MB "
                       f"against flex-bf16 {_num(fb, 'time_ms'):.1f} ms / {_num(fb, 'peak_extra_mb'):.0f} MB "
                       f"(goal: faster, no more memory): {'met' if faster and lighter else 'not met'}")
        if tb and size == "large":
            pct = _num(tb, "pct_matrix_rate")
            out.append(f"{where}: triton-bf16 at {pct:.1f}% of the measured bf16 matrix rate "
                       f"(goal >= 45%, aim 50%): {'met' if pct >= 45 else 'not met'}")
        tc, cc = by.get((size, grad, "cuda-bf16-tc")), by.get((size, grad, "cuda-bf16"))
        if tc and cc:
            x = _num(cc, "time_ms") / _num(tc, "time_ms")
            out.append(f"{where}: cuda-bf16-tc {x:.2f}x the speed of cuda-bf16 (tensor cores "
                       f"{'beat' if x > 1 else 'do not beat'} CUDA cores)")
    return out


def last_lines(work, step):
    """The last non-empty line of each log of `step` (the why of a failure without test results)."""
    out = []
    for path in sorted(glob.glob(os.path.join(work, "logs", f"{step}*.log"))):
        with open(path, errors="replace") as f:
            lines = [line.strip() for line in f if line.strip()]
        if lines:
            out.append(f"{os.path.basename(path)}: {lines[-1][:160]}")
    return out


def training_lines(log_path):
    """The test report's two lines (model, Otsu) that train.py prints last."""
    if not os.path.exists(log_path):
        return []
    with open(log_path, errors="replace") as f:
        lines = [line.rstrip() for line in f]
    return [line for line in lines if line.startswith(("model:", "Otsu:"))][-2:]


# -- the summary -----------------------------------------------------------------------------------

def summary_text(header, records, work, result_notes=()):
    lines = [header, "", "steps:"]
    failures = []
    for r in records:
        counts = junit_counts(os.path.join(work, "junit", f"{r.name}.xml"))
        detail = r.note
        if counts:
            passed, failed, errors, skipped, fails = counts
            detail = f"{passed} passed, {failed} failed, {errors} errors, {skipped} skipped" + \
                     (f"; {r.note}" if r.note else "")
            failures += fails
        if r.status in ("failed", "timeout") and not (counts and counts[4]):
            detail = "; ".join([detail] + last_lines(work, r.name)).strip("; ")
        used = f"{r.seconds:.0f} s (limit {r.limit:.0f} s)" if r.status != "skipped" else "-"
        lines.append(f"  {r.name:<13} {r.status:<8} {used:<20}  {detail}".rstrip())
    if failures:
        lines += ["", f"failures ({len(failures)}, first 15):"]
        lines += [f"  {test}: {msg}" for test, msg in failures[:15]]
    rows = bench_rows(os.path.join(work, "bench"))
    if rows:
        # imported here: they import torch, which the dry run and the probes' parent need not
        from .run import markdown_table
        from .summary import read_rows
        parsed = read_rows(sorted(glob.glob(os.path.join(work, "bench", "*.csv")), key=os.path.getmtime))
        lines += ["", "benchmark:", markdown_table(parsed), "", "goals:"]
        lines += [f"  {g}" for g in goals(rows)] or ["  (no rows to judge them by)"]
    train = [(m, training_lines(os.path.join(work, "logs", f"train-{m}.log"))) for m in ("suponly", "cdcl")]
    if any(t for _, t in train):
        lines += ["", "training smoke run (test split, native resolution):"]
        for m, t in train:
            lines += [f"  {m:<8} {line}" for line in t] or [f"  {m:<8} (no test report)"]
    if result_notes:
        lines += ["", "results:"] + [f"  {n}" for n in result_notes]
    return "\n".join(lines) + "\n"


STEP_LINE = re.compile(r"^  (\S+)\s+(ok|failed|timeout|skipped)\s+(?:(\d+) s \(limit (\d+) s\)|-)\s*(.*)$")


def parse_summary(text):
    """{step: dict(status, seconds, limit, detail)} from a summary.txt (seconds and limit None for
    a skipped step): for a session reading a lease's results back, and the tests."""
    steps, inside = {}, False
    for line in text.splitlines():
        if line == "steps:":
            inside = True
            continue
        if inside:
            m = STEP_LINE.match(line)
            if not m:
                break
            name, status, secs, limit, detail = m.groups()
            steps[name] = dict(status=status, seconds=None if secs is None else int(secs),
                               limit=None if limit is None else int(limit), detail=detail)
    return steps


# -- the result folder -----------------------------------------------------------------------------

def check_result_folder(folder, limits=LIMITS):
    """What the device tool would not bring back from `folder`: a list of problems (empty: fine)."""
    problems, files, total = [], 0, 0
    for dirpath, dirnames, filenames in os.walk(folder):
        rel = os.path.relpath(dirpath, folder)
        depth = 0 if rel == "." else rel.count(os.sep) + 1
        for name in dirnames + filenames:
            if not NAME_OK.match(name):
                problems.append(f"{os.path.join(rel, name)}: a name with characters other than "
                                "letters, digits, '.', '_' and '-'")
        for name in filenames:
            path = os.path.join(dirpath, name)
            files += 1
            size = os.path.getsize(path)
            total += size
            if depth > limits["depth"]:
                problems.append(f"{os.path.join(rel, name)}: more than {limits['depth']} folders deep")
            if size > limits["file_bytes"]:
                problems.append(f"{os.path.join(rel, name)}: {size / 2**20:.1f} MiB, over "
                                f"{limits['file_bytes'] / 2**20:.0f} MiB")
    if files > limits["files"]:
        problems.append(f"{files} files, over {limits['files']}")
    if total > limits["total_bytes"]:
        problems.append(f"{total / 2**20:.1f} MiB in all, over {limits['total_bytes'] / 2**20:.0f} MiB")
    return problems


def _add_tree(tar, folder, arcname, skip=(".pt", ".pth")):
    for dirpath, _, filenames in os.walk(folder):
        for name in sorted(filenames):
            if name.endswith(skip):
                continue
            path = os.path.join(dirpath, name)
            tar.add(path, arcname=os.path.join(arcname, os.path.relpath(path, folder)))


def tree_bytes(folder):
    return sum(os.path.getsize(os.path.join(d, n)) for d, _, names in os.walk(folder) for n in names)


def pack(archive, members, limit_bytes=LIMITS["file_bytes"], raw_factor=4):
    """tar.gz of (folder, arcname) pairs; None (and no file) when it would exceed the limit. Trees
    over raw_factor times the limit are not even compressed (a large Inductor cache would cost
    the reserve's seconds for nothing)."""
    if sum(tree_bytes(f) if os.path.isdir(f) else os.path.getsize(f) if os.path.isfile(f) else 0
           for f, _ in members) > raw_factor * limit_bytes:
        return None
    with tarfile.open(archive, "w:gz") as tar:
        for folder, arcname in members:
            if os.path.isdir(folder):
                _add_tree(tar, folder, arcname)
            elif os.path.isfile(folder):
                tar.add(folder, arcname=arcname)
    if os.path.getsize(archive) > limit_bytes:
        os.remove(archive)
        return None
    return os.path.getsize(archive)


def truncate_logs(folder, keep=256 * 1024):
    """Each log over 2 * keep bytes cut to its first and last `keep` bytes (a logs archive over
    the limit is packed again after this)."""
    for path in glob.glob(os.path.join(folder, "*.log")):
        size = os.path.getsize(path)
        if size > 2 * keep:
            with open(path, "rb") as f:
                head = f.read(keep)
                f.seek(size - keep)
                tail = f.read()
            with open(path, "wb") as f:
                f.write(head + f"\n[... {size - 2 * keep} bytes cut to fit the result limits ...]\n".encode()
                        + tail)


# -- the extension: build, stamp, reuse ------------------------------------------------------------

def setup_constants(names=("CXX_FLAGS", "NVCC_FLAGS", "DEFAULT_CUDA_ARCHS")):
    """Module-level constants of setup.py, read without running it."""
    import ast
    with open(os.path.join(ROOT, "setup.py")) as f:
        tree = ast.parse(f.read())
    found = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name) \
                and node.targets[0].id in names:
            found[node.targets[0].id] = ast.literal_eval(node.value)
    missing = set(names) - set(found)
    if missing:
        raise RuntimeError(f"setup.py: no module-level {sorted(missing)}")
    return found


def jit_build(ext_dir):
    """The extension through torch.utils.cpp_extension.load, with setup.py's flags: the fallback
    when `setup.py build_ext` fails on a machine's own setuptools (pyproject.toml's metadata
    needs a recent one). The library lands where the setup.py build puts it."""
    import torch
    from torch.utils.cpp_extension import load
    flags = setup_constants()
    cuda = torch.version.cuda is not None  # a CPU torch (the tests) builds the C++ kernels alone
    patterns = ("csrc/*.cpp", "csrc/cpu/*.cpp") + (("csrc/cuda/*.cpp", "csrc/cuda/*.cu") if cuda else ())
    sources = [p for pattern in patterns for p in sorted(glob.glob(os.path.join(ROOT, pattern)))]
    build = os.path.join(ext_dir, "jit")
    os.makedirs(build, exist_ok=True)
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", flags["DEFAULT_CUDA_ARCHS"])
    load("_C", sources, extra_cflags=flags["CXX_FLAGS"], extra_cuda_cflags=flags["NVCC_FLAGS"],
         extra_ldflags=["-fopenmp"], build_directory=build, with_cuda=cuda, is_python_module=False,
         verbose=True)
    os.makedirs(os.path.join(ext_dir, "cdcl_ops"), exist_ok=True)
    shutil.copy2(os.path.join(build, "_C.so"), os.path.join(ext_dir, "cdcl_ops", "_C.so"))


def sources_digest():
    h = hashlib.sha256()
    for path in sorted(glob.glob(os.path.join(ROOT, "csrc", "**", "*"), recursive=True)) + \
            [os.path.join(ROOT, "setup.py")]:
        if os.path.isfile(path):
            h.update(os.path.relpath(path, ROOT).encode())
            with open(path, "rb") as f:
                h.update(f.read())
    return h.hexdigest()[:16]


def ext_stamp(torch_version, arch):
    return dict(torch=torch_version, arch=arch, sources=sources_digest())


def reusable_ext(ext_dir, stamp):
    """The built library in ext_dir when its stamp matches (same torch, GPU arch and sources)."""
    try:
        with open(os.path.join(ext_dir, "STAMP.json")) as f:
            ok = json.load(f) == stamp
    except (OSError, ValueError):
        return None
    libs = glob.glob(os.path.join(ext_dir, "cdcl_ops", "_C*.so"))
    return libs[0] if ok and libs else None


def unpack_reuse(reuse_dir, work):
    """Extract an earlier lease's carry archives into this work folder."""
    found = []
    for name, dest in (("carry-ext.tar.gz", work), ("carry-cache.tar.gz", work)):
        path = os.path.join(reuse_dir, name)
        if os.path.isfile(path):
            with tarfile.open(path) as tar:
                tar.extractall(dest, filter="data")
            found.append(name)
    return found


# -- the probes run in the env step ----------------------------------------------------------------

def probe():
    """Print what the summary and the build need to know about this machine's torch and GPU."""
    import torch
    info = dict(torch=torch.__version__, cuda=torch.version.cuda,
                cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None)
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(device=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                    memory_gib=round(p.total_memory / 2**30, 1),
                    l2_mib=round(getattr(p, "L2_cache_size", 0) / 2**20, 1))
    info["autograd_function_alias_under_compile"] = _alias_probe(torch)
    print("PROBE " + json.dumps(info))


def _alias_probe(torch):
    """Whether this torch gets the gradient of a torch.autograd.Function whose forward returns one
    of its intermediates under torch.compile (torch 2.11 gives zeros: docs/native.md)."""
    class Scale(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            y = x * 2.0
            return y.contiguous()  # y itself

        @staticmethod
        def backward(ctx, g):
            return g * 2.0

    def f(x):
        return Scale.apply(x).sum()

    x = torch.ones(3, requires_grad=True)
    try:
        torch.compile(f, fullgraph=True, backend="aot_eager")(x).backward()
    except Exception as e:  # a probe: say what happened, never stop the lease
        return f"error: {type(e).__name__}"
    return "ok" if torch.equal(x.grad, torch.full((3,), 2.0)) else f"wrong gradient {x.grad.tolist()}"


# -- the lease -------------------------------------------------------------------------------------

class Lease:
    def __init__(self, args, plan=PLAN):
        self.args = args
        # --only keeps env and build: the probe says which build fits, and a carried or earlier
        # build is installed in no time (--skip drops them)
        self.plan = [s for s in plan if (not args.only or s.name in args.only or s.name in ("env", "build"))
                     and s.name not in args.skip]
        self.work = os.path.abspath(args.work)
        self.out = os.path.abspath(args.out)
        self.reserve = args.reserve
        self.clock = Clock(args.budget, args.reserve)
        self.records: list[Record] = []
        self.info = {}
        self.py = sys.executable
        self.build_proc = None
        self.build_limit = 0.0
        self.built = None   # path of the library in use, once there is one

    # paths and environment
    def path(self, *parts):
        """A file in the work folder (its folder made)."""
        p = os.path.join(self.work, *parts)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        return p

    def folder(self, *parts):
        p = os.path.join(self.work, *parts)
        os.makedirs(p, exist_ok=True)
        return p

    def env(self, **extra):
        path = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
        env = dict(os.environ, PYTHONPATH=path, PYTHONUNBUFFERED="1",
                   TRITON_CACHE_DIR=self.folder("cache", "triton"),
                   TORCHINDUCTOR_CACHE_DIR=self.folder("cache", "inductor"))
        env.update(extra)
        return env

    def fresh_work(self):
        """An earlier run's results leave the work folder (a warm machine keeps it); its build and
        caches stay for reuse."""
        for name in ("logs", "junit", "bench", "train"):
            shutil.rmtree(os.path.join(self.work, name), ignore_errors=True)

    def say(self, text):
        print(f"[lease +{self.clock.elapsed():4.0f}s] {text}", flush=True)

    # the steps
    def pytest(self, step, files, keyword=None, limit=None, extra_env=None):
        cmd = [self.py, "-m", "pytest", "-v", "-rfE", "-p", "no:cacheprovider", "-m", "gpu", *files,
               f"--junitxml={self.path('junit', step + '.xml')}"]
        if keyword:
            cmd += ["-k", keyword]
        if _has_module("pytest_timeout"):
            cmd += ["--timeout", "120"]
        return run(cmd, self.path("logs", step + ".log"), limit, self.env(**(extra_env or {})))

    def step_env(self, limit):
        log = self.path("logs", "env.log")
        deadline = time.monotonic() + limit
        rc = 0
        if shutil.which("nvidia-smi"):
            with open(self.path("logs", "nvidia-smi-q.txt"), "w") as f:
                rc |= subprocess.run(["nvidia-smi", "-q"], stdout=f, stderr=subprocess.STDOUT,
                                     timeout=limit).returncode
        for tool in (["nvcc", "--version"], ["compute-sanitizer", "--version"]):
            if shutil.which(tool[0]):
                run(tool, log, 20)
        rc2, _ = run([self.py, "-m", "benchmarks.lease", "--probe"], log, deadline - time.monotonic(), self.env())
        with open(log, errors="replace") as f:
            for line in f:
                if line.startswith("PROBE "):
                    self.info = json.loads(line[6:])
        seen = f"{self.info.get('device', 'no GPU seen')}, capability {self.info.get('capability', '-')}"
        return (rc or rc2 or 0), seen

    def arch(self):
        return self.info.get("capability") or os.environ.get("TORCH_CUDA_ARCH_LIST", "")

    def step_build(self, limit):
        stamp = ext_stamp(self.info.get("torch"), self.arch())
        ext_dir = os.path.join(self.work, "ext")
        lib = reusable_ext(ext_dir, stamp)
        if lib:
            self.install(lib)
            return "ok", f"reused the carried build for TORCH_CUDA_ARCH_LIST={stamp['arch']}"
        shutil.rmtree(ext_dir, ignore_errors=True)
        os.makedirs(ext_dir)
        with open(os.path.join(ext_dir, "STAMP.json"), "w") as f:
            json.dump(stamp, f)
        env = self.env(FORCE_CUDA="1", TORCH_CUDA_ARCH_LIST=stamp["arch"],
                       MAX_JOBS=str(os.cpu_count() or 4))
        # setup.py directly: pip would try to fetch build dependencies, and there is no network;
        # where it fails, cpp_extension.load with the same flags
        setup_py = [self.py, "setup.py", "-q", "build_ext", "-b", ext_dir, "-t", os.path.join(self.work, "ext-tmp")]
        fallback = [self.py, "-m", "benchmarks.lease", "--jit-build", ext_dir]
        cmd = ["sh", "-c", f"{shlex.join(setup_py)} || {{ echo 'setup.py failed: cpp_extension.load'; "
                           f"{shlex.join(fallback)}; }}"]
        self.build_proc = start(cmd, self.path("logs", "build.log"), env)
        self.build_limit = limit
        return "started", f"TORCH_CUDA_ARCH_LIST={stamp['arch']}"

    def wait_build(self):
        """Wait for the background build (within its own limit); the library goes into cdcl_ops/."""
        if self.build_proc is None:
            return
        rec = next(r for r in self.records if r.name == "build")
        remaining = self.build_limit - (time.monotonic() - self.build_proc._lease_start)
        self.say(f"waiting up to {max(remaining, 0):.0f} s for the build")
        rc, secs = finish(self.build_proc, remaining)
        self.build_proc = None
        rec.seconds, rec.limit = secs, self.build_limit
        libs = glob.glob(os.path.join(self.work, "ext", "cdcl_ops", "_C*.so"))
        if rc == 0 and libs:
            rec.status = "ok"
            self.install(libs[0])
        else:
            rec.status = "timeout" if rc is None else "failed"
            rec.note += "; the cuda backend's steps are skipped (see logs/build.log)"

    def install(self, lib):
        for old in glob.glob(os.path.join(ROOT, "cdcl_ops", "_C*.so")):
            os.remove(old)
        shutil.copy2(lib, os.path.join(ROOT, "cdcl_ops", os.path.basename(lib)))
        self.built = lib

    def step_sanitizer(self, limit):
        test = first_failure(self.path("junit", "tensor-cores.xml"), self.path("logs", "tensor-cores.log"))
        if test is None:
            return "skipped", "no tensor-core test failed"
        if not shutil.which("compute-sanitizer"):
            return "skipped", f"compute-sanitizer is not on PATH (first failure: {test})"
        cmd = ["compute-sanitizer", "--tool", "memcheck", "--error-exitcode", "3", self.py, "-m", "pytest",
               "-x", "-p", "no:cacheprovider", test]
        rc, secs = run(cmd, self.path("logs", "sanitizer.log"), limit, self.env(CUDA_LAUNCH_BLOCKING="1"))
        return (rc, secs), test

    def bench(self, name, sizes, contenders, bank_grad, limit, loss="masked_infonce"):
        cmd = [self.py, "-m", "benchmarks.run", "--loss", loss, "--device", "cuda", "--sizes", sizes,
               "--bank-grad", bank_grad,
               "--contenders", contenders, "--time-limit", "3", "--allow-missing",
               "--out", self.folder("bench")]
        return run(cmd, self.path("logs", name + ".log"), limit, self.env())

    def train(self, limit):
        """SupOnly then CDCL, each given half of what the step has (the second also what the first
        left), a few dozen steps each; checkpoints stay in the work folder."""
        deadline = time.monotonic() + limit
        results = []
        for i, method in enumerate(("suponly", "cdcl")):
            share = (deadline - time.monotonic()) / (2 - i)
            cmd = [self.py, "train.py", "--data", "data/dsb2018_sample", "--dataset", "dsb", "--preset", "paper",
                   "--method", method, "--labeled-fraction", "1/2", "--input-size", "256", "--epochs", "3",
                   "--iters-per-epoch", "10", "--unsup-start-epoch", "2", "--val-every", "3", "--lr", "1e-3",
                   "--ema-alpha", "0.99", "--device", "cuda", "--autocast", "bf16", "--channels-last",
                   "--no-progress", "--overlays", "0", "--seed", "0", "--out", self.folder("train", method)]
            results.append(run(cmd, self.path("logs", f"train-{method}.log"), share, self.env()))
        rcs = [rc for rc, _ in results]
        rc = None if None in rcs else max(rcs)
        return rc, sum(s for _, s in results)

    def execute(self, step: Step, limit: float):
        """Run one step: (status, seconds, note)."""
        needs_ext = step.name in ("cuda-core", "tensor-cores", "sanitizer")
        if needs_ext and self.built is None:
            return "skipped", 0.0, "no built extension (build failed, timed out or was skipped)"
        t0 = time.monotonic()
        note = ""
        if step.name == "env":
            rc, note = self.step_env(limit)
        elif step.name == "build":
            status, note = self.step_build(limit)
            return status, time.monotonic() - t0, note
        elif step.name == "triton":
            rc, _ = self.pytest("triton", GPU_TRITON, limit=limit)
        elif step.name == "cuda-core":
            rc, _ = self.pytest("cuda-core", [GPU_NATIVE], f"not ({TENSOR_CORE_TESTS} or compile)", limit)
        elif step.name == "tensor-cores":
            rc, _ = self.pytest("tensor-cores", [GPU_NATIVE], TENSOR_CORE_TESTS, limit)
        elif step.name == "sanitizer":
            result, note = self.step_sanitizer(limit)
            if result == "skipped":
                return "skipped", 0.0, note
            rc, _ = result
        elif step.name == "compile":
            rc, _ = self.pytest("compile", [GPU_COMPILE, GPU_NATIVE], "compile", limit,
                                dict(TORCH_LOGS=TORCH_LOGS))
            note = "graphs and recompiles in logs/compile.log"
        elif step.name == "bench-paper":
            rc, _ = self.bench(step.name, "paper", PAPER_CONTENDERS, "no", limit)
        elif step.name == "bench-large":
            rc, _ = self.bench(step.name, "large", LARGE_CONTENDERS, "no", limit)
        elif step.name == "bench-grad":
            rc, _ = self.bench(step.name, "paper", PAPER_CONTENDERS, "yes", limit)
        elif step.name == "bench-supcon":
            rc, _ = self.bench(step.name, "contrastiveseg", SUPCON_CONTENDERS, "no", limit, loss="supcon-all")
        elif step.name == "train":
            rc, _ = self.train(limit)
        else:
            raise ValueError(f"step: unknown step {step.name!r}")
        status = "timeout" if rc is None else "ok" if rc == 0 else "failed"
        if rc not in (None, 0):
            note = (note + f"; exit {rc}").lstrip("; ")
        return status, time.monotonic() - t0, note

    def run_all(self):
        os.makedirs(self.work, exist_ok=True)
        self.fresh_work()
        if self.args.reuse:
            found = unpack_reuse(self.args.reuse, self.work)
            self.say(f"reuse from {self.args.reuse}: {', '.join(found) or 'nothing found'}")
        for step in self.plan:
            if step.name not in ("env", "build", "triton"):  # the build ran beside the Triton tests
                self.wait_build()
            limit = self.clock.limit(step)
            rec = Record(step.name, limit=max(limit, 0))
            self.records.append(rec)
            if limit < step.min_s:
                rec.note = f"needs {step.min_s} s, {max(self.clock.left() - self.clock.reserve, 0):.0f} s left"
                self.say(f"{step.name}: skipped ({rec.note})")
                continue
            self.say(f"{step.name}: {step.title} (limit {limit:.0f} s)")
            rec.status, rec.seconds, note = self.execute(step, limit)
            rec.note = (rec.note + "; " + note).strip("; ") if note else rec.note
            self.say(f"{step.name}: {rec.status} in {rec.seconds:.0f} s")
        self.wait_build()

    def header(self):
        i = self.info
        return (f"GPU lease summary: {i.get('device', 'no GPU seen')}, capability {i.get('capability', '-')}, "
                f"torch {i.get('torch', '-')} (CUDA {i.get('cuda', '-')}), triton {i.get('triton', '-')}, "
                f"{datetime.date.today().isoformat()}, commit {_git_commit()}; budget {self.args.budget} s, "
                f"used {self.clock.elapsed():.0f} s\n"
                f"torch.compile of a torch.autograd.Function returning an intermediate: "
                f"{i.get('autograd_function_alias_under_compile', '-')}")

    def package(self, header=None):
        """The result folder: summary.txt, logs.tar.gz, carry-ext.tar.gz, carry-cache.tar.gz."""
        os.makedirs(self.out, exist_ok=True)
        notes = []
        logs = [(self.folder(name), name) for name in ("logs", "junit", "bench", "train")]
        archive = os.path.join(self.out, "logs.tar.gz")
        if pack(archive, logs) is None:
            truncate_logs(self.folder("logs"))
            notes.append("logs were cut to their first and last 256 KiB to fit 16 MiB")
            if pack(archive, logs) is None:
                notes.append("logs.tar.gz is over 16 MiB even so: not written")
        if self.built:
            ext = os.path.join(self.work, "ext")
            size = pack(os.path.join(self.out, "carry-ext.tar.gz"),
                        [(os.path.join(ext, "STAMP.json"), "ext/STAMP.json"),
                         (self.built, os.path.join("ext", "cdcl_ops", os.path.basename(self.built)))])
            notes.append("carry-ext.tar.gz: the built extension" if size else
                         "the built extension is over 16 MiB packed: not written")
        caches = [(self.folder("cache", "triton"), "cache/triton"),
                  (self.folder("cache", "inductor"), "cache/inductor")]
        if any(os.path.isdir(c) and os.listdir(c) for c, _ in caches):
            cache = os.path.join(self.out, "carry-cache.tar.gz")
            if pack(cache, caches):
                notes.append("carry-cache.tar.gz: Triton and Inductor caches")
            elif pack(cache, caches[:1]):
                notes.append("carry-cache.tar.gz: the Triton cache (with Inductor's it was over 16 MiB)")
            else:
                notes.append("the caches are over 16 MiB packed: not written")
        summary = os.path.join(self.out, "summary.txt")
        text = summary_text(header or self.header(), self.records, self.work, notes)
        with open(summary, "w") as f:
            f.write(text)
        problems = check_result_folder(self.out)
        if problems:
            with open(summary, "a") as f:
                f.write("result folder problems:\n" + "".join(f"  {p}\n" for p in problems))
        listing = ", ".join(f"{n} ({os.path.getsize(os.path.join(self.out, n)) / 2**20:.1f} MiB)"
                            for n in sorted(os.listdir(self.out)))
        with open(summary, "a") as f:
            f.write(f"files in {self.out}: {listing}\n")
        with open(summary) as f:
            return f.read()


def _has_module(name):
    import importlib.util
    return importlib.util.find_spec(name) is not None


def _git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, timeout=10).stdout.strip() or "-"
    except (OSError, subprocess.SubprocessError):
        return "-"


def dry_run(args, plan=PLAN):
    """The plan with its worst-case schedule (every step to its full timeout), then a result
    folder packed from it and checked against the limits: no GPU, no tests run."""
    lease = Lease(args, plan)
    lease.fresh_work()
    print(f"plan: budget {args.budget} s, reserve {lease.reserve} s, work {lease.work}, results {lease.out}")
    expected = plan_schedule(lease.plan, args.budget, lease.reserve, expected=True)
    worst = plan_schedule(lease.plan, args.budget, lease.reserve)
    by_name = {s.name: s for s in lease.plan}
    lines = [f"  {'step':<13} {'own':>5} {'min':>4} {'expect':>6}   expected: start, timeout   "
             "worst case: start, timeout"]

    def cell(t, limit):
        return f"+{t:3.0f} s, {limit:3.0f} s" if limit is not None else "skipped        "

    for (name, t_e, lim_e), (_, t_w, lim_w) in zip(expected, worst):
        step = by_name[name]
        lines.append(f"  {name:<13} {step.own_s:>4}s {step.min_s:>3}s {step.expect_s:>5}s   "
                     f"{cell(t_e, lim_e):<24}   {cell(t_w, lim_w):<17}  {step.title}")
    print("\n".join(lines))
    with open(lease.path("logs", "plan.log"), "w") as f:
        f.write("\n".join(lines) + "\n")
    lease.records = [Record(name, "skipped", 0.0, 0.0, "dry run") for name, _, _ in expected]
    text = lease.package(header=f"GPU lease summary: dry run, {datetime.date.today().isoformat()}, "
                                f"commit {_git_commit()}; budget {args.budget} s")
    problems = check_result_folder(lease.out)
    print(f"result folder {lease.out}: {len(os.listdir(lease.out))} files, "
          + ("within the limits" if not problems else "; ".join(problems)))
    print(text, end="")
    return 0 if not problems else 1


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", type=int, default=int(os.environ.get("LEASE_BUDGET", BUDGET_S)),
                    help="seconds for the whole command (LEASE_BUDGET; default %(default)s)")
    ap.add_argument("--out", default=os.environ.get("OUT") or DEFAULT_OUT,
                    help="result folder ($OUT when set)")
    ap.add_argument("--work", default=os.path.join(ROOT, "runs", "lease", "work"),
                    help="working folder (logs, builds, caches; not returned)")
    ap.add_argument("--reuse", default=os.environ.get("LEASE_REUSE") or None,
                    help="folder with an earlier lease's carry-*.tar.gz (LEASE_REUSE)")
    ap.add_argument("--only", default=os.environ.get("LEASE_ONLY", ""), help="comma list of steps to run")
    ap.add_argument("--skip", default=os.environ.get("LEASE_SKIP", ""), help="comma list of steps to leave out")
    ap.add_argument("--dry-run", action="store_true", help="print the plan and pack a result folder; no GPU")
    ap.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--reserve", type=int, default=RESERVE_S, help=argparse.SUPPRESS)
    ap.add_argument("--jit-build", metavar="EXT_DIR", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    names = {s.name for s in PLAN}
    for flag in ("only", "skip"):
        chosen = [n for n in getattr(args, flag).split(",") if n]
        unknown = sorted(set(chosen) - names)
        if unknown:
            print(f"gpu_lease: --{flag}: unknown steps {unknown}; steps: {', '.join(s.name for s in PLAN)}",
                  file=sys.stderr)
            return 2
        setattr(args, flag, chosen)
    if args.budget <= args.reserve:
        print(f"gpu_lease: --budget: expected more than the {args.reserve} s reserve, got {args.budget}",
              file=sys.stderr)
        return 2
    if args.reuse and not os.path.isdir(args.reuse):
        print(f"gpu_lease: --reuse: expected a folder with carry-*.tar.gz, got {args.reuse!r}", file=sys.stderr)
        return 2
    if args.probe:
        probe()
        return 0
    if args.jit_build:
        jit_build(args.jit_build)
        return 0
    if os.path.isdir(args.out) and os.listdir(args.out):
        if os.path.abspath(args.out) != DEFAULT_OUT:
            print(f"gpu_lease: --out: expected an empty folder (its files would not all come back), got "
                  f"{args.out} with {len(os.listdir(args.out))} entries", file=sys.stderr)
            return 2
        shutil.rmtree(args.out)  # our own default folder: the last run's results
    if args.dry_run:
        return dry_run(args)
    lease = Lease(args)
    try:
        lease.run_all()
    finally:
        text = lease.package()
        print("\n" + text, end="")
    failed = [r.name for r in lease.records if r.status in ("failed", "timeout")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
