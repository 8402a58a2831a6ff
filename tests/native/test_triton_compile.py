"""The Triton kernels compile for sm_80 and sm_90 (the supervised contrastive ones for sm_90) on
this machine (no GPU needed): catches what the interpreter accepts but the compiler rejects
(non-constexpr globals, dot shapes, shared memory)."""
import os
import subprocess
import sys

import pytest

from paths import ROOT

pytest.importorskip("triton")


def test_kernels_compile_for_ampere_and_hopper():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    here = os.path.dirname(os.path.abspath(__file__))
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, os.path.join(here, "triton_compile_check.py")],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # 9 masked InfoNCE cases for sm_80 and sm_90, 4 supervised contrastive ones for sm_90
    assert proc.stdout.count("shared memory") == 18 + 4
