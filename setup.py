"""The native extension `cdcl_ops._C` from csrc/ (the metadata is in pyproject.toml).

The C++ (CPU) kernels are built on every machine. The CUDA kernels in csrc/cuda are added when
PyTorch is a CUDA build and nvcc is found, and either a GPU is visible or FORCE_CUDA=1 is set.
Install with `pip install --no-build-isolation -e .` (the extension compiles against the
installed torch), or build in place with `python setup.py build_ext --inplace`.
"""
import glob
import os
import shutil

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
# nvcc flags beyond those torch.utils.cpp_extension adds itself. benchmarks/lease.py reads these
# constants (setup_constants) for its fallback build, and tests/native/test_cuda_compile.py so that
# the compile-only check on CPU machines compiles as this build does
NVCC_FLAGS = ["-O3", "--use_fast_math", "-lineinfo"]
# GPUs built for unless TORCH_CUDA_ARCH_LIST names others (benchmarks/lease.py: the one at hand)
DEFAULT_CUDA_ARCHS = "8.0;9.0"
# no trapping math / errno (as torch itself is built): lets the masked row loops of
# csrc/cpu/row_kernels.h if-convert and vectorise
CXX_FLAGS = ["-O3", "-fopenmp", "-fvisibility=hidden", "-fno-trapping-math", "-fno-math-errno"]


def _sources(*patterns):
    out = []
    for pattern in patterns:
        out += sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))
    return out


def _find_nvcc():
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    candidates = [os.path.join(cuda_home, "bin", "nvcc")] if cuda_home else []
    candidates += [shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"]
    return next((c for c in candidates if c and os.path.exists(c)), None)


def _extensions():
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError:  # metadata-only runs (e.g. an sdist without torch): pure Python
        return [], {}
    cxx = list(CXX_FLAGS)
    link = ["-fopenmp"]
    if os.environ.get("CDCL_ASAN") == "1":  # a checking build of the CPU kernels (docs/native.md)
        cxx = ["-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address"] + cxx[1:]
        link.append("-fsanitize=address")
    sources = _sources("csrc/*.cpp", "csrc/cpu/*.cpp")
    want_cuda = torch.cuda.is_available() or os.environ.get("FORCE_CUDA") == "1"
    use_cuda = want_cuda and torch.version.cuda is not None and _find_nvcc() is not None
    if want_cuda and not use_cuda:
        print("cdcl_ops: building without the CUDA kernels (needs a CUDA build of torch and nvcc)")
    if use_cuda:
        # cpp_extension turns the list into -gencode flags for each architecture
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
        ext = CUDAExtension("cdcl_ops._C", sources + _sources("csrc/cuda/*.cpp", "csrc/cuda/*.cu"),
                            extra_compile_args={"cxx": cxx, "nvcc": list(NVCC_FLAGS)},
                            extra_link_args=link)
    else:
        ext = CppExtension("cdcl_ops._C", sources, extra_compile_args={"cxx": cxx},
                           extra_link_args=link)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(ext_modules=ext_modules, cmdclass=cmdclass)
