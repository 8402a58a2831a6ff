"""The emulated CUDA kernels under AddressSanitizer: no read or write outside any buffer.

The emulator's guard bands (tests/native/cuda_emulator.py) catch what changes a result; an access
past an end whose value is then discarded (say a label read for a row past the last) does not, and
on a GPU it can still fault. This runs a part of tests/native/test_cuda_emulated.py in a child
process with the emulator built with -fsanitize=address and exact-size buffers. Skipped where the
compiler has no AddressSanitizer runtime.
"""
import os
import subprocess
import sys

import pytest

from cuda_emulator import ASAN, compiler
from paths import ROOT

HERE = os.path.dirname(os.path.abspath(__file__))


def _runtime(name):
    cxx = compiler()
    if cxx is None:
        return None
    path = subprocess.run([cxx, f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
    return path if os.path.isabs(path) and os.path.exists(path) else None


def _asan_env(log_dir):
    # libstdc++ preloaded too: the sanitizer's __cxa_throw interceptor needs it loaded first, or
    # the first C++ exception torch throws (and catches) aborts the process
    return dict(os.environ, CDCL_EMU_ASAN="1", LD_PRELOAD=f"{LIBASAN} {LIBSTDCXX}",
                ASAN_OPTIONS=f"detect_leaks=0:log_path={log_dir / 'asan'}")


def _asan_runs_python(tmp_path):
    """Whether python with torch starts under the preloaded runtime here (it does not on some
    kernels whose address-space randomisation collides with the sanitizer's shadow memory)."""
    try:
        return subprocess.run([sys.executable, "-c", "import torch"], env=_asan_env(tmp_path),
                              capture_output=True, timeout=300).returncode == 0
    except subprocess.TimeoutExpired:
        return False


LIBASAN, LIBSTDCXX = _runtime("libasan.so"), _runtime("libstdc++.so.6")


@pytest.mark.skipif(ASAN, reason="already inside the AddressSanitizer run")
@pytest.mark.skipif(LIBASAN is None or LIBSTDCXX is None,
                    reason="no AddressSanitizer runtime (or libstdc++) for the C++ compiler")
def test_kernels_stay_inside_their_buffers(tmp_path):
    if not _asan_runs_python(tmp_path / "probe"):
        pytest.skip("python does not start under AddressSanitizer on this machine")
    env = _asan_env(tmp_path)
    # CUDA-core and tensor-core kernels on shapes with ragged edges, the G > 64 table, empty inputs
    select = "cuda_core_fp32 or tensor_cores_16bit or many_groups or empty or no_negative or patch_fg"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           os.path.join(HERE, "test_cuda_emulated.py"), "-k", select],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=1200)
    reports = "".join(p.read_text() for p in tmp_path.glob("asan*"))
    assert "AddressSanitizer" not in reports, reports[:4000]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout, proc.stdout[-500:]
