"""Compile-only check of csrc/cuda on machines without a GPU, with the flags the extension's build
uses: every .cu file with this machine's nvcc for sm_80 and sm_90 (setup.py's default
architectures), and the torch glue (cuda_glue.cpp) with the C++ compiler against the installed
torch headers. The flags are the ones torch.utils.cpp_extension's CUDAExtension adds
(COMMON_NVCC_FLAGS: -D__CUDA_NO_HALF_OPERATORS__ and the others, --expt-relaxed-constexpr; the
extension defines; its C++ standard; -gencode flags from TORCH_CUDA_ARCH_LIST) plus setup.py's
NVCC_FLAGS, so code that only a real build would reject (an implicit half conversion, say) fails
here. Skipped, with the reason, where nvcc or the CUDA headers are absent."""
import glob
import inspect
import os
import re
import shutil
import subprocess

import pytest
import torch
import torch.utils.cpp_extension as cpp_ext

from benchmarks.lease import setup_constants
from paths import ROOT

CU_FILES = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
GLUE = os.path.join(ROOT, "csrc", "cuda", "cuda_glue.cpp")
NVCC_FLAGS, DEFAULT_CUDA_ARCHS = (setup_constants()[k] for k in ("NVCC_FLAGS", "DEFAULT_CUDA_ARCHS"))
# what BuildExtension adds to every compile of the extension "cdcl_ops._C", and its C++ standard
# (the newest -std= that torch.utils.cpp_extension passes)
EXTENSION_DEFINES = ["-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C",
                     f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]
STD = "-std=c++" + max(re.findall(r"-std=c\+\+(\d+)", inspect.getsource(cpp_ext)), key=int)


def _arch_flags():
    old = os.environ.get("TORCH_CUDA_ARCH_LIST")
    os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS
    try:
        return cpp_ext._get_cuda_arch_flags()
    finally:
        if old is None:
            del os.environ["TORCH_CUDA_ARCH_LIST"]
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = old


ARCHS = _arch_flags()


def _nvcc():
    home = os.environ.get("CUDA_HOME") or cpp_ext.CUDA_HOME
    for cand in ([os.path.join(home, "bin", "nvcc")] if home else []) + \
            [shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"]:
        if cand and os.path.exists(cand):
            return cand
    return None


def _cuda_include(nvcc):
    # nvcc may be a wrapper script (/usr/local/bin/nvcc -> /usr/local/cuda-13.0/bin/nvcc): ask it
    out = subprocess.run([nvcc, "--dryrun", "-E", "-x", "cu", os.devnull], capture_output=True,
                         text=True).stderr
    for token in out.replace('"', " ").split():
        if token.startswith("-I") and os.path.exists(os.path.join(token[2:], "cuda_runtime_api.h")):
            return token[2:]
    for cand in ("/usr/local/cuda/include", os.path.join(os.path.dirname(os.path.dirname(nvcc)), "include")):
        if os.path.exists(os.path.join(cand, "cuda_runtime_api.h")):
            return cand
    return None


NVCC = _nvcc()
CUDA_INCLUDE = _cuda_include(NVCC) if NVCC else None
if NVCC is None:
    print("test_cuda_compile: skipped, no nvcc on PATH, in CUDA_HOME or /usr/local/cuda")
elif CUDA_INCLUDE is None:
    print(f"test_cuda_compile: skipped, nvcc at {NVCC} but no cuda_runtime_api.h found")
needs_nvcc = pytest.mark.skipif(NVCC is None or CUDA_INCLUDE is None,
                                reason="nvcc or the CUDA headers are absent on this machine")


def test_there_are_cuda_sources():
    assert CU_FILES and os.path.exists(GLUE)


def test_the_flags_are_those_of_a_cuda_extension_build():
    assert {"-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
            "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
            "--expt-relaxed-constexpr"} <= set(cpp_ext.COMMON_NVCC_FLAGS)
    assert any("code=sm_80" in f for f in ARCHS) and any("code=sm_90" in f for f in ARCHS)


@needs_nvcc
@pytest.mark.parametrize("source", CU_FILES, ids=os.path.basename)
def test_cu_file_compiles_as_the_extension_build_does(source, tmp_path):
    includes = [f"-I{p}" for p in cpp_ext.include_paths()]
    cmd = [NVCC, "-c", source, "-o", str(tmp_path / "out.o"), *cpp_ext.COMMON_NVCC_FLAGS,
           "--compiler-options", "-fPIC", *NVCC_FLAGS, *EXTENSION_DEFINES, STD, *ARCHS, *includes]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, " ".join(cmd) + "\n" + proc.stdout + proc.stderr
    assert (tmp_path / "out.o").stat().st_size > 0


@needs_nvcc
def test_glue_compiles_against_torch_headers(tmp_path):
    # The CPU wheel of torch ships the c10/cuda headers but not the one CMake generates for CUDA
    # builds (c10/cuda/impl/cuda_cmake_macros.h, which only defines C10_CUDA_BUILD_SHARED_LIBS);
    # supply it so the glue is checked against the real c10/cuda API.
    torch_include = cpp_ext.include_paths()[0]
    shim = []
    if not os.path.exists(os.path.join(torch_include, "c10", "cuda", "impl", "cuda_cmake_macros.h")):
        (tmp_path / "c10" / "cuda" / "impl").mkdir(parents=True)
        (tmp_path / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").write_text(
            "#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        shim = [f"-I{tmp_path}"]
    cxx = os.environ.get("CXX", "c++")
    cmd = [cxx, STD, "-fsyntax-only", GLUE, *EXTENSION_DEFINES, *[f"-I{p}" for p in cpp_ext.include_paths()],
           *shim, f"-I{CUDA_INCLUDE}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, " ".join(cmd) + "\n" + proc.stdout + proc.stderr
