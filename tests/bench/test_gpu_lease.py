"""benchmarks/gpu_lease.sh (benchmarks/lease.py), checked as far as a machine without a GPU can:
the dry run (plan, deadlines, skips, a packed result folder within the device tool's limits), the
deadline logic on stand-in steps, the summary from real junit XML and benchmark CSVs, the limits
check, the reuse of a build, and that its test selections and contenders name what exists."""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time

import pytest

import cdcl_ops
from benchmarks import contenders as bench_contenders
from benchmarks import lease
from paths import ROOT

SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_lease.sh")
STEPS = ["env", "build", "triton", "cuda-core", "tensor-cores", "sanitizer", "compile", "bench-paper",
         "bench-large", "bench-grad", "train", "bench-supcon"]


def _args(tmp_path, **kw):
    base = dict(budget=lease.BUDGET_S, reserve=lease.RESERVE_S, out=str(tmp_path / "out"),
                work=str(tmp_path / "work"), reuse=None, only=[], skip=[], dry_run=False, probe=False)
    base.update(kw)
    return argparse.Namespace(**base)


def test_script_parses():
    subprocess.run(["bash", "-n", SCRIPT], check=True)


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_script_is_shellcheck_clean():
    subprocess.run(["shellcheck", SCRIPT], check=True)


def test_dry_run_prints_the_plan_and_packs_a_result_folder_within_the_limits(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable)
    r = subprocess.run(["bash", SCRIPT, "--dry-run", "--work", str(tmp_path / "work")], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    plan = [line.split()[0] for line in r.stdout.splitlines()[2:2 + len(STEPS)]]
    assert plan == STEPS  # in order of value
    assert "within the limits" in r.stdout
    assert sorted(os.listdir(out)) == ["logs.tar.gz", "summary.txt"]
    assert lease.check_result_folder(out) == []
    summary = (out / "summary.txt").read_text()
    assert r.stdout.rstrip().endswith(summary.rstrip().splitlines()[-1])  # the summary is printed last
    assert lease.parse_summary(summary) == {
        name: dict(status="skipped", seconds=None, limit=None, detail="dry run") for name in STEPS}
    with tarfile.open(out / "logs.tar.gz") as tar:
        assert "logs/plan.log" in tar.getnames()


def test_the_expected_schedule_fits_the_budget_and_the_worst_case_skips_from_the_end():
    expected = lease.plan_schedule(lease.PLAN, lease.BUDGET_S, expected=True)
    assert all(limit is not None for name, _, limit in expected if name not in lease.IF_TIME), expected
    worst = lease.plan_schedule(lease.PLAN, lease.BUDGET_S)
    skipped = [name for name, _, limit in worst if limit is None]
    assert skipped and skipped == STEPS[-len(skipped):]  # the least valuable go first
    starts = dict((name, t) for name, t, _ in expected)
    assert starts["build"] == starts["triton"]  # the build runs beside the Triton tests
    for name, t, limit in worst:
        if limit is not None:
            assert t + limit <= lease.BUDGET_S - lease.RESERVE_S + 1e-9, name


def test_bad_arguments_exit_2_with_one_line(tmp_path):
    for argv in (["--only", "tests"], ["--skip", "benchmark"], ["--budget", "10"],
                 ["--reuse", str(tmp_path / "missing")]):
        r = subprocess.run(["bash", SCRIPT, "--dry-run", *argv], env=dict(os.environ, PYTHON=sys.executable,
                                                                         OUT=str(tmp_path / "o")),
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 2, argv
        assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("gpu_lease: --"), r.stderr
    full = tmp_path / "full"
    full.mkdir()
    (full / "old.txt").write_text("x")
    assert lease.main(["--out", str(full), "--dry-run"]) == 2


class SleepLease(lease.Lease):
    """The lease's scheduling with every step a `sleep` of a given length."""

    def __init__(self, args, plan, sleeps):
        super().__init__(args, plan)
        self.sleeps = sleeps

    def execute(self, step, limit):
        rc, secs = lease.run(["sleep", str(self.sleeps[step.name])], self.path("logs", step.name + ".log"),
                             limit)
        return ("timeout" if rc is None else "ok"), secs, ""


def test_steps_get_the_smaller_of_their_timeout_and_the_time_left_and_are_skipped_past_it(tmp_path):
    plan = [lease.Step("a", "quick", 3, 1, 1), lease.Step("b", "hangs", 2, 1, 1),
            lease.Step("c", "cut to what is left", 10, 1, 1), lease.Step("d", "no time left", 5, 2, 1)]
    run = SleepLease(_args(tmp_path, budget=9, reserve=2), plan, dict(a=0.5, b=30, c=30, d=1))
    t0 = time.monotonic()
    run.run_all()
    took = time.monotonic() - t0
    recs = {r.name: r for r in run.records}
    assert recs["a"].status == "ok" and recs["a"].seconds < 2
    assert recs["b"].status == "timeout" and 1.5 < recs["b"].seconds < 4  # killed at its own 2 s
    assert recs["c"].status == "timeout" and recs["c"].limit < 10  # the budget's rest, not its own 10 s
    assert recs["d"].status == "skipped" and "needs 2 s" in recs["d"].note
    assert took < 9, took  # the internal deadline held, with the reserve left for packing
    text = run.package()
    steps = lease.parse_summary(text)
    assert [steps[n]["status"] for n in "abcd"] == ["ok", "timeout", "timeout", "skipped"]
    assert steps["b"]["limit"] == 2 and steps["d"]["seconds"] is None


def _junit(tmp_path):
    tests = tmp_path / "tests"
    tests.mkdir()
    (tests / "test_sample.py").write_text(
        "import pytest\n\ndef test_ok():\n    pass\n\ndef test_bad():\n    assert 1 == 2, 'one is not two'\n\n"
        "@pytest.mark.skip(reason='no')\ndef test_skipped():\n    pass\n")
    xml = tmp_path / "work" / "junit" / "triton.xml"
    xml.parent.mkdir(parents=True)
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_sample.py",
                    f"--junitxml={xml}"], cwd=tmp_path, capture_output=True, timeout=120)
    return xml


@pytest.fixture
def quick_rates(monkeypatch):
    """benchmarks.run without measuring this machine's rates (seconds each call; the rows' floor
    columns are not what these tests check)."""
    from benchmarks import run
    monkeypatch.setattr(run, "_rates", lambda device, *size: ({"fp32": 1.0, "exp": 1.0}, "rates: not measured"))


def test_summary_from_junit_benchmark_csv_and_training_log(tmp_path, quick_rates):
    xml = _junit(tmp_path)
    passed, failed, errors, skipped, failures = lease.junit_counts(str(xml))
    assert (passed, failed, errors, skipped) == (1, 1, 0, 1)
    assert failures[0][0] == "tests/test_sample.py::test_bad" and "one is not two" in failures[0][1]
    from benchmarks import run
    bench = tmp_path / "work" / "bench"
    for grad in ("no", "yes"):  # one CSV each: the detached and bank-gradient rows kept apart
        run.main(["--device", "cpu", "--sizes", "N40xM60", "--contenders", "reference,chunked",
                  "--bank-grad", grad, "--repeats", "1", "--out", str(bench)])
    assert len(list(bench.glob("*.csv"))) == 2
    logs = tmp_path / "work" / "logs"
    logs.mkdir()
    (logs / "train-suponly.log").write_text("epoch 1\nmodel: Dice over the set 80.00\nOtsu:  Dice over the set 70.00\n")
    (logs / "bench-large.log").write_text("rates\nAssertionError: Torch not compiled with CUDA enabled\n\n")
    records = [lease.Record("triton", "failed", 12.0, 150.0, "exit 1"), lease.Record("train", "ok", 50.0, 60.0),
               lease.Record("bench-large", "failed", 3.0, 100.0, "exit 1")]
    text = lease.summary_text("GPU lease summary: test", records, str(tmp_path / "work"), ["note"])
    steps = lease.parse_summary(text)
    assert steps["triton"] == dict(status="failed", seconds=12, limit=150,
                                   detail="1 passed, 1 failed, 0 errors, 1 skipped; exit 1")
    assert steps["train"]["status"] == "ok"
    # a failure without test results says why: the last line of its log
    assert steps["bench-large"]["detail"] == \
        "exit 1; bench-large.log: AssertionError: Torch not compiled with CUDA enabled"
    assert "tests/test_sample.py::test_bad" in text
    assert "| N40xM60 | no | chunked |" in text and "| N40xM60 | yes | chunked |" in text
    assert "suponly  model: Dice over the set 80.00" in text


def _row(contender, ms, mb, size="paper", grad="0", pct=""):
    return dict(size=size, bank_grad=grad, contender=contender, status="ok", time_ms=str(ms),
                peak_extra_mb=str(mb), pct_matrix_rate=str(pct))


def test_goals_read_off_the_rows():
    rows = [_row("reference", 20.0, 5000), _row("triton-bf16", 1.5, 30), _row("flex-bf16", 2.0, 40),
            _row("reference", 260, 85000, "large"), _row("triton-bf16", 30, 120, "large", pct=44.0),
            _row("flex-bf16", 25, 100, "large"), _row("cuda-bf16", 15.0, 30), _row("cuda-bf16-tc", 5.0, 30)]
    text = "\n".join(lease.goals(rows))
    assert "paper, bank detached: triton-bf16 13.3x faster than reference (goal >= 10x): met" in text
    assert "large, bank detached: triton-bf16 8.7x faster than reference (goal >= 10x): not met" in text
    assert "paper, bank detached: triton-bf16 1.5 ms / 30 MB against flex-bf16 2.0 ms / 40 MB" in text
    assert "large, bank detached: triton-bf16 30.0 ms / 120 MB against flex-bf16 25.0 ms / 100 MB " \
           "(goal: faster, no more memory): not met" in text
    assert "44.0% of the measured bf16 matrix rate (goal >= 45%, aim 50%): not met" in text
    assert "cuda-bf16-tc 3.00x the speed of cuda-bf16 (tensor cores beat CUDA cores)" in text


def test_result_folder_limits(tmp_path):
    ok = tmp_path / "ok"
    (ok / "a" / "b").mkdir(parents=True)
    (ok / "a" / "b" / "deep-enough.txt").write_text("x")
    assert lease.check_result_folder(ok) == []
    bad = tmp_path / "bad"
    (bad / "a" / "b" / "c").mkdir(parents=True)
    (bad / "a" / "b" / "c" / "too-deep.txt").write_text("x")
    for i in range(8):
        (bad / f"f{i}.txt").write_text("x")
    with open(bad / "big.bin", "wb") as f:
        f.truncate(16 * 2**20 + 1)
    (bad / "odd name.txt").write_text("x")
    problems = "\n".join(lease.check_result_folder(bad))
    assert "too-deep.txt: more than 2 folders deep" in problems
    assert "big.bin: 16.0 MiB, over 16 MiB" in problems
    assert "11 files, over 8" in problems
    assert "odd name.txt: a name with characters other than" in problems


def test_an_archive_over_the_limit_is_not_written(tmp_path):
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "big.log").write_bytes(os.urandom(300_000))
    assert lease.pack(str(tmp_path / "a.tar.gz"), [(str(tmp_path / "logs"), "logs")], limit_bytes=100_000) is None
    assert not (tmp_path / "a.tar.gz").exists()
    lease.truncate_logs(str(tmp_path / "logs"), keep=20_000)
    assert lease.pack(str(tmp_path / "a.tar.gz"), [(str(tmp_path / "logs"), "logs")], limit_bytes=100_000)


def test_first_failure_from_junit_else_from_the_log(tmp_path):
    xml = _junit(tmp_path)
    assert lease.first_failure(str(xml), "missing.log") == "tests/test_sample.py::test_bad"
    log = tmp_path / "cut.log"
    log.write_text("tests/gpu/test_cuda_on_gpu.py::test_a[x] PASSED\n"
                   "tests/gpu/test_cuda_on_gpu.py::test_cuda_tensor_cores_16bit[dtype0-3] FAILED\n")
    assert lease.first_failure(str(tmp_path / "none.xml"), str(log)) == \
        "tests/gpu/test_cuda_on_gpu.py::test_cuda_tensor_cores_16bit[dtype0-3]"


def test_a_carried_build_is_reused_only_for_the_same_torch_arch_and_sources(tmp_path):
    stamp = lease.ext_stamp("2.11.0+cu130", "9.0")
    ext = tmp_path / "work" / "ext"
    (ext / "cdcl_ops").mkdir(parents=True)
    (ext / "cdcl_ops" / "_C.cpython-312-x86_64-linux-gnu.so").write_bytes(b"lib")
    (ext / "STAMP.json").write_text(json.dumps(stamp))
    assert lease.reusable_ext(str(ext), stamp).endswith(".so")
    assert lease.reusable_ext(str(ext), lease.ext_stamp("2.11.0+cu130", "8.0")) is None
    assert lease.reusable_ext(str(ext), dict(stamp, sources="0" * 16)) is None
    # the round trip through a result folder: carry-ext.tar.gz unpacked by --reuse
    carried = tmp_path / "carried"
    carried.mkdir()
    lease.pack(str(carried / "carry-ext.tar.gz"), [(str(ext / "STAMP.json"), "ext/STAMP.json"),
                                                   (str(ext / "cdcl_ops"), "ext/cdcl_ops")])
    fresh = tmp_path / "fresh"
    assert lease.unpack_reuse(str(carried), str(fresh)) == ["carry-ext.tar.gz"]
    assert lease.reusable_ext(str(fresh / "ext"), stamp)


def test_probe_reports_this_torch(capsys):
    lease.probe()
    line = capsys.readouterr().out.strip().splitlines()[-1]
    info = json.loads(line.removeprefix("PROBE "))
    import torch
    assert info["torch"] == torch.__version__
    # the torch of this machine handles it (torch 2.11, on the lent GPUs, gives zeros)
    assert info["autograd_function_alias_under_compile"] in ("ok", "wrong gradient [0.0, 0.0, 0.0]")


def _gpu_contenders(monkeypatch):
    """The contenders benchmarks.run offers on a GPU where every backend was built."""
    monkeypatch.setattr(cdcl_ops, "available_backends", lambda device_type=None: ["reference", "chunked",
                                                                                  "triton", "cuda"])
    return set(bench_contenders.contenders("cuda"))


def test_benchmark_contenders_are_known_on_a_gpu(monkeypatch):
    known = _gpu_contenders(monkeypatch)
    paper, large = lease.PAPER_CONTENDERS.split(","), lease.LARGE_CONTENDERS.split(",")
    assert set(paper) <= known and set(large) <= known
    assert paper[0] == large[0] == "reference"  # every other row is compared with it
    assert {"triton-bf16", "flex-bf16", "cuda-bf16-tc"} <= set(large)
    assert {"triton", "cuda-bf16"} <= set(paper)


def _collect(*args):
    r = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    return {line for line in r.stdout.splitlines() if "::" in line}


def test_gpu_tests_are_collected_here_and_the_steps_split_test_gpu_native():
    everything = _collect("-m", "gpu", *lease.GPU_TRITON, lease.GPU_COMPILE, lease.GPU_NATIVE)
    compile_tests = {t for t in everything if t.startswith(lease.GPU_COMPILE + "::")}
    assert any("::test_compile_chunked_on_cuda[" in t for t in compile_tests)
    assert all("::test_compile_" in t for t in compile_tests)  # the compile step's -k selects them all
    native = {t for t in everything if t.startswith(lease.GPU_NATIVE + "::")}
    core = _collect(lease.GPU_NATIVE, "-k", f"not ({lease.TENSOR_CORE_TESTS} or compile)")
    tc = _collect(lease.GPU_NATIVE, "-k", lease.TENSOR_CORE_TESTS)
    comp = _collect(lease.GPU_NATIVE, "-k", "compile")
    assert core and tc and comp
    assert core | tc | comp == native and not (core & tc or core & comp or tc & comp)
    assert all("tensor_cores" in t or "opcheck" in t or "tf32" in t for t in tc)


def test_benchmark_records_missing_contenders_instead_of_stopping(tmp_path, capsys, quick_rates):
    from benchmarks import run
    run.main(["--device", "cpu", "--sizes", "N40xM60", "--contenders", "reference,cuda-bf16-tc",
              "--bank-grad", "no", "--repeats", "1", "--allow-missing", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "| N40xM60 | no | cuda-bf16-tc | - | unavailable |" in out
    assert "| N40xM60 | no | reference | float32 |" in out


def test_the_fallback_build_gives_a_library_that_loads_as_cdcl_ops_c(tmp_path):
    # where a machine's setuptools rejects pyproject.toml, the build step falls back to
    # cpp_extension.load with setup.py's flags (here without CUDA: this torch has none)
    ext = tmp_path / "ext"
    r = subprocess.run([sys.executable, "-m", "benchmarks.lease", "--jit-build", str(ext)], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    pkg = tmp_path / "pkg"
    shutil.copytree(os.path.join(ROOT, "cdcl_ops"), pkg / "cdcl_ops",
                    ignore=shutil.ignore_patterns("_C*.so", "__pycache__"))
    shutil.copy2(ext / "cdcl_ops" / "_C.so", pkg / "cdcl_ops" / "_C.so")
    probe = ("import cdcl_ops; from cdcl_ops.backends import native; "
             "print(cdcl_ops.__file__, native.LOADED, native.HAS_CPU)")
    out = subprocess.run([sys.executable, "-c", probe], cwd=pkg, capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == [str(pkg / "cdcl_ops" / "__init__.py"), "True", "True"], out.stdout + out.stderr
