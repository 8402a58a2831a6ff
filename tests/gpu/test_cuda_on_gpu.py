"""GPU tests (marker `gpu`) of the `cuda` backend (csrc/cuda through cdcl_ops._C) against the
float64 reference on the same device. Run by benchmarks/gpu_lease.sh on a lent GPU, in three
processes: the CUDA-core tests, then those with `tensor_cores` or `opcheck` in their names (the
tensor-core kernels have never run on a GPU: a fault there must not spoil the others' CUDA
context), then those with `compile` in their names (with tests/gpu/test_compile_on_gpu.py)."""
import pytest
import torch

import cdcl_ops
from cdcl_ops.backends import native
from helpers import (
    assert_bank_grad_of_mean_close,
    assert_close_to_reference,
    assert_compiled_matches_eager,
    loss_and_grads,
    make_inputs,
)

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not native.HAS_CUDA,
                                 reason=f"cdcl_ops._C has no CUDA kernels here ({native.LOAD_ERROR})")]
CUDA = "cuda"


def _compare(inputs, dtype, bank_grad=True, **kw):
    assert_close_to_reference(inputs, "cuda", dtype, bank_grad, **kw)


def test_cuda_listed():
    assert "cuda" in cdcl_ops.available_backends("cuda")


@pytest.mark.parametrize("d", [1, 3, 33, 96, 128, 200, 512])
def test_cuda_fp32(d):
    _compare(make_inputs(1000, 3001, d, device=CUDA), torch.float32)


@pytest.mark.parametrize("d", [3, 128, 200])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_16bit(d, dtype):
    _compare(make_inputs(777, 2049, d, device=CUDA), dtype)


# The tensor-core kernels (16-bit features, D <= 256, on request): D = 3 and 200 pad to 16 and
# 208 columns, 256 is the largest; 300 falls back to the CUDA-core kernels.
@pytest.mark.parametrize("d", [3, 16, 128, 200, 256, 300])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_tensor_cores_16bit(d, dtype):
    _compare(make_inputs(777, 2049, d, device=CUDA), dtype, precision="tf32")


def test_cuda_tensor_cores_bank_detached_many_groups_and_deterministic():
    _compare(make_inputs(513, 1025, 64, device=CUDA, n_groups=70), torch.bfloat16, bank_grad=False,
             precision="tf32")
    inputs = make_inputs(1500, 2500, 128, device=CUDA, dtype=torch.bfloat16)
    (l1, g1), (l2, g2) = (loss_and_grads(inputs, "cuda", precision="tf32") for _ in range(2))
    assert torch.equal(l1, l2) and all(torch.equal(a, b) for a, b in zip(g1, g2))


def test_cuda_tensor_cores_rows_without_negatives_are_zero():
    inputs = make_inputs(200, 300, 40, device=CUDA, groups=False)
    inputs["query_labels"] = torch.ones(200, dtype=torch.long, device=CUDA)
    inputs["bank_labels"] = torch.ones(300, dtype=torch.long, device=CUDA)
    inputs["query_labels"][:50] = 0
    loss, grads = loss_and_grads(inputs, "cuda", dtype=torch.bfloat16, precision="tf32")
    assert torch.all(loss[50:] == 0) and torch.all(loss[:50] > 0)
    assert torch.all(grads[0][50:] == 0) and torch.isfinite(grads[2]).all()


@pytest.mark.parametrize("precision", ["auto", "tf32"])
def test_cuda_fp16_bank_grad_of_mean(precision):
    assert_bank_grad_of_mean_close("cuda", torch.float16, precision=precision)


def test_cuda_bank_detached_many_groups_no_groups():
    _compare(make_inputs(513, 1025, 64, device=CUDA, n_groups=70), torch.float32, bank_grad=False)
    _compare(make_inputs(300, 700, 64, device=CUDA, groups=False), torch.float32)


@pytest.mark.parametrize("n,m", [(0, 100), (100, 0), (0, 0)])
def test_cuda_empty(n, m):
    loss, grads = loss_and_grads(make_inputs(n, m, 16, device=CUDA, dtype=torch.float32), "cuda")
    assert loss.shape == (n,) and torch.all(loss == 0)
    for g, rows in zip(grads, (n, n, m)):
        assert g.shape[0] == rows and torch.all(g == 0)


def test_cuda_rows_without_negatives_are_zero():
    inputs = make_inputs(200, 300, 5, device=CUDA, groups=False)
    inputs["query_labels"] = torch.ones(200, dtype=torch.long, device=CUDA)
    inputs["bank_labels"] = torch.ones(300, dtype=torch.long, device=CUDA)
    inputs["query_labels"][:50] = 0
    loss, grads = loss_and_grads(inputs, "cuda", dtype=torch.float32)
    assert torch.all(loss[50:] == 0) and torch.all(loss[:50] > 0)
    assert torch.all(grads[0][50:] == 0) and torch.isfinite(grads[2]).all()


def test_cuda_deterministic():
    inputs = make_inputs(1500, 2500, 64, device=CUDA, dtype=torch.float32)
    (l1, g1), (l2, g2) = loss_and_grads(inputs, "cuda"), loss_and_grads(inputs, "cuda")
    assert torch.equal(l1, l2) and all(torch.equal(a, b) for a, b in zip(g1, g2))


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_cuda_compile_fullgraph(compiler):
    assert_compiled_matches_eager(make_inputs(300, 900, 32, device=CUDA, dtype=torch.float32, seed=2),
                                  "cuda", compiler=compiler)


@pytest.mark.parametrize("dtype,tensor_cores", [(torch.float32, False), (torch.bfloat16, True)])
def test_cuda_opcheck(dtype, tensor_cores):
    from cdcl_ops._validate import canonical_masks
    from cdcl_ops.normalize import inverse_norms
    inp = make_inputs(70, 130, 24, device=CUDA, dtype=dtype, seed=4)
    masks = canonical_masks(inp["query_labels"], inp["bank_labels"], inp["query_groups"],
                            inp["bank_groups"], inp["group_table"])
    q, p, k = (inp[n] for n in ("query", "positive", "bank"))
    iq, ip, ik = (inverse_norms(x) for x in (q, p, k))
    fwd, grad = torch.ops.cdcl_ops_C.infonce_fwd, torch.ops.cdcl_ops_C.infonce_bank_grad
    torch.library.opcheck(fwd, (q, p, k, iq, ip, ik, *masks, 10.0, True, tensor_cores))
    _, lse, _ = fwd(q, p, k, iq, ip, ik, *masks, 10.0, False, tensor_cores)
    gs = torch.rand(70, device=CUDA)
    torch.library.opcheck(grad, (q, k, iq, ik, *masks, lse, gs, 10.0, tensor_cores))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64, torch.uint8])
def test_cuda_patch_counts_match_cpu(dtype):
    if dtype.is_floating_point:
        x = torch.randint(0, 3, (3, 4, 40, 40)).to(dtype)  # ties: first maximum wins
    else:
        x = torch.randint(0, 3, (3, 40, 40)).to(dtype)
    expect = torch.ops.cdcl_ops_C.patch_fg_counts(x, 8, 1)
    got = torch.ops.cdcl_ops_C.patch_fg_counts(x.to(CUDA), 8, 1)
    assert torch.equal(got.cpu(), expect)


def test_cuda_float64_rejected():
    inputs = make_inputs(10, 20, 4, device=CUDA)
    with pytest.raises(ValueError, match="query"):
        cdcl_ops.masked_infonce(**inputs, backend="cuda")
