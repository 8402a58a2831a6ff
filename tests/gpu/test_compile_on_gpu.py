"""GPU tests (marker `gpu`) that tell apart the causes a compiled-vs-eager difference on CUDA can
have, each on the shape and seed of the 2026-11-27 H200 failure (N 300, M 900, D 32, fp32):

- `chunked` on CUDA runs the same custom op and autograd formula as `cuda` with PyTorch kernels
  only: if it fails too, the fault is in the op layer or in torch, not in csrc/cuda;
- `aot_eager` runs the traced graphs without Inductor's code: passing there and failing under
  Inductor puts the fault in the generated kernels or their buffer reuse;
- the bank detached leaves the bank-gradient op out of the backward graph, the query alone leaves
  only its own formula, and strided weights hand the op a non-contiguous upstream gradient.

That failure is explained (torch 2.11 with the row normalisation of that time, docs/native.md);
these run on every lease so that a new one is placed at once. Run by benchmarks/gpu_lease.sh,
with tests/gpu/test_cuda_on_gpu.py's compile tests, under TORCH_LOGS for graphs and recompiles."""
import pytest
import torch

import cdcl_ops
from cdcl_ops.backends import native
from helpers import assert_compiled_matches_eager, make_inputs, strided_weights

pytestmark = pytest.mark.gpu
CUDA = "cuda"
COMPILERS = ["aot_eager", "inductor"]
needs_cuda_backend = pytest.mark.skipif(not native.HAS_CUDA,
                                        reason=f"cdcl_ops._C has no CUDA kernels here ({native.LOAD_ERROR})")


def _h200_case():
    return make_inputs(300, 900, 32, device=CUDA, dtype=torch.float32, seed=2)


@pytest.mark.parametrize("compiler", COMPILERS)
def test_compile_chunked_on_cuda(compiler):
    assert_compiled_matches_eager(_h200_case(), "chunked", compiler=compiler)


@needs_cuda_backend
@pytest.mark.parametrize("compiler", COMPILERS)
@pytest.mark.parametrize("case", ["bank-detached", "query-only", "strided-upstream"])
def test_compile_cuda_backend_cases(compiler, case):
    kw = {"bank-detached": dict(requires_grad=("query", "positive")),
          "query-only": dict(requires_grad=("query",)),
          "strided-upstream": dict(weights=strided_weights(300, CUDA))}[case]
    assert_compiled_matches_eager(_h200_case(), "cuda", compiler=compiler, **kw)


@pytest.mark.parametrize("compiler", COMPILERS)
def test_compile_triton_strided_upstream(compiler):
    assert_compiled_matches_eager(_h200_case(), "triton", rtol=1e-4, atol=1e-5, compiler=compiler,
                                  precision="tf32x3", weights=strided_weights(300, CUDA))


@needs_cuda_backend
def test_compile_cuda_tensor_cores_bf16():
    inputs = make_inputs(300, 900, 64, device=CUDA, dtype=torch.bfloat16, seed=2)
    assert_compiled_matches_eager(inputs, "cuda", rtol=2e-2, atol=2e-2, precision="tf32")


def test_compile_default_backend_on_cuda():
    # what a training step compiles: backend=None (triton on CUDA), bf16 features
    assert cdcl_ops.default_backend(CUDA) == "triton"
    inputs = make_inputs(300, 900, 64, device=CUDA, dtype=torch.bfloat16, seed=5)
    assert_compiled_matches_eager(inputs, None, rtol=2e-2, atol=2e-2)
