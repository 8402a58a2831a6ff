"""benchmarks/gpu_check.sh, checked as far as a machine without a GPU can: it parses, its default
contenders are names the benchmark knows on a GPU (a typo would cost a lent machine's run), and it
benchmarks what the GPU goals compare (RESULTS.md) at both sizes."""
import os
import shutil
import subprocess

import pytest

import cdcl_ops
from benchmarks import contenders as bench_contenders

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.sh")


def test_script_parses():
    subprocess.run(["bash", "-n", SCRIPT], check=True)


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_script_is_shellcheck_clean():
    subprocess.run(["shellcheck", SCRIPT], check=True)


def _default_contenders(size):
    """The script's own default_contenders function, run by bash."""
    with open(SCRIPT) as f:
        lines = f.read().splitlines()
    start = lines.index("default_contenders() {")
    body = "\n".join(lines[start:lines.index("}", start) + 1])
    out = subprocess.run(["bash", "-c", f"{body}\ndefault_contenders {size}"], check=True,
                         capture_output=True, text=True).stdout
    return out.strip().split(",")


def _gpu_contenders(monkeypatch):
    """The contenders benchmarks.run offers on a GPU where every backend was built."""
    monkeypatch.setattr(cdcl_ops, "available_backends", lambda device_type=None: ["reference", "chunked",
                                                                                  "triton", "cuda"])
    return set(bench_contenders.contenders("cuda"))


@pytest.mark.parametrize("size", ["paper", "large"])
def test_default_contenders_are_known_on_a_gpu(size, monkeypatch):
    names = _default_contenders(size)
    assert set(names) <= _gpu_contenders(monkeypatch)
    assert names[0] == "reference"  # every other row is compared with it
    need = {"reference", "compile(reference)", "triton", "triton-tf32", "triton-bf16", "flex-bf16",
            "cuda", "cuda-bf16", "cuda-bf16-tc"}
    assert need <= set(names)
    assert ("flex" in names) == (size == "paper")  # IEEE fp32 flex: slow, paper only
    assert names[-1] == "cuda-bf16-tc"  # never run on a GPU yet: last, where a fault costs nothing


def test_benchmark_records_missing_contenders_instead_of_stopping(tmp_path, capsys):
    from benchmarks import run
    run.main(["--device", "cpu", "--sizes", "N40xM60", "--contenders", "reference,cuda-bf16-tc",
              "--bank-grad", "no", "--repeats", "1", "--allow-missing", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "| N40xM60 | no | cuda-bf16-tc | - | unavailable |" in out
    assert "| N40xM60 | no | reference | float32 |" in out
