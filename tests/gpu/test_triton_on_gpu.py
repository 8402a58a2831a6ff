"""GPU tests (marker `gpu`): the Triton kernels compiled for the device, against the float64
reference computed on the same device. Run by benchmarks/gpu_lease.sh on a lent GPU."""
import pytest
import torch

import cdcl_ops
from cdcl_ops._validate import canonical_masks
from cdcl_ops.normalize import inverse_norms, project_
from helpers import (
    assert_bank_grad_of_mean_close,
    assert_close_to_reference,
    assert_compiled_matches_eager,
    loss_and_grads,
    make_inputs,
)

pytestmark = pytest.mark.gpu
CUDA = "cuda"


def _compare(inputs, dtype, bank_grad=True, **kw):
    assert_close_to_reference(inputs, "triton", dtype, bank_grad, **kw)


@pytest.mark.parametrize("d", [1, 3, 96, 128, 200, 512])
def test_triton_fp32_ieee(d):
    _compare(make_inputs(1000, 3001, d, device=CUDA), torch.float32, precision="ieee")


@pytest.mark.parametrize("d", [3, 128, 200])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_16bit(d, dtype):
    _compare(make_inputs(777, 2049, d, device=CUDA), dtype)


def test_triton_fp32_default_is_tf32x3():
    from cdcl_ops.backends.tl_utils import dot_precision
    assert not torch.backends.cuda.matmul.allow_tf32
    assert dot_precision(torch.float32, "auto") == "tf32x3"
    _compare(make_inputs(1000, 3001, 128, device=CUDA), torch.float32, precision="tf32x3")


def test_triton_tf32():
    _compare(make_inputs(1000, 3001, 128, device=CUDA), torch.float32, precision="tf32")


def test_triton_bank_detached_and_many_groups():
    _compare(make_inputs(513, 1025, 64, device=CUDA, n_groups=40), torch.float32, bank_grad=False,
             precision="ieee")


@pytest.mark.parametrize("n,m", [(0, 100), (100, 0)])
def test_triton_empty(n, m):
    loss, grads = loss_and_grads(make_inputs(n, m, 16, device=CUDA, dtype=torch.float32), "triton")
    assert torch.all(loss == 0) and all(torch.all(g == 0) for g in grads)


def test_chunked_on_cuda():
    inputs = make_inputs(600, 1500, 32, device=CUDA)
    ref, _ = loss_and_grads(inputs, "reference")
    got, _ = loss_and_grads(inputs, "chunked", chunk_size=256)
    torch.testing.assert_close(got, ref)


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compile_fullgraph_triton_cuda(compiler):
    inputs = make_inputs(300, 500, 64, dtype=torch.bfloat16, device=CUDA, seed=1)
    assert_compiled_matches_eager(inputs, "triton", rtol=2e-2, atol=2e-2, compiler=compiler)


def test_compile_fullgraph_triton_cuda_fp32():
    # the shape and dtype of the cuda backend's compile test, on the triton backend
    inputs = make_inputs(300, 900, 32, device=CUDA, dtype=torch.float32, seed=2)
    assert_compiled_matches_eager(inputs, "triton", rtol=1e-4, atol=1e-5, precision="tf32x3")


def test_deterministic_bank_grad_cuda():
    inputs = make_inputs(3000, 5000, 128, device=CUDA, dtype=torch.bfloat16)
    _, g1 = loss_and_grads(inputs, "triton")
    _, g2 = loss_and_grads(inputs, "triton")
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))


def test_64bit_offsets_queries():
    # N * D > 2**31 elements: row offsets must be 64-bit in the forward kernel
    n, m, d = 2**24 + 5, 40, 128
    inputs = make_inputs(m, m, d, device=CUDA, dtype=torch.bfloat16, seed=3)
    gen = torch.Generator(device=CUDA).manual_seed(0)
    q = torch.randn(n, d, device=CUDA, dtype=torch.bfloat16, generator=gen)
    p = torch.randn(n, d, device=CUDA, dtype=torch.bfloat16, generator=gen)
    q_lab = torch.randint(0, 2, (n,), device=CUDA, generator=gen)
    q_grp = torch.randint(0, 2, (n,), device=CUDA, generator=gen)
    args = dict(bank=inputs["bank"], bank_labels=inputs["bank_labels"],
                bank_groups=inputs["bank_groups"], group_table=inputs["group_table"])
    with torch.no_grad():
        got = cdcl_ops.masked_infonce(q, p, query_labels=q_lab, query_groups=q_grp, backend="triton",
                                      reduction="none", **args)
        tail = slice(n - 300, n)
        want = cdcl_ops.masked_infonce(q[tail].double(), p[tail].double(), query_labels=q_lab[tail],
                                       query_groups=q_grp[tail], backend="reference",
                                       reduction="none", **{k: (v.double() if v.is_floating_point() else v)
                                                            for k, v in args.items()})
    torch.testing.assert_close(got[tail].double(), want, rtol=2e-2, atol=2e-2)


def test_64bit_offsets_bank_grad():
    # M * D > 2**31 elements: the bank-gradient kernel's row offsets must be 64-bit
    n, m, d = 64, 2**24 + 5, 128
    gen = torch.Generator(device=CUDA).manual_seed(0)
    k = torch.randn(m, d, device=CUDA, generator=gen).bfloat16()
    q = torch.randn(n, d, device=CUDA, generator=gen).bfloat16()
    inv_q, inv_k = inverse_norms(q), inverse_norms(k)
    q_lab = torch.randint(0, 2, (n,), device=CUDA, generator=gen)
    k_lab = torch.randint(0, 2, (m,), device=CUDA, generator=gen)
    ql, qg, kl, kg, table = canonical_masks(q_lab, k_lab, None, None, None)
    lse = torch.full((n,), 12.0, device=CUDA)
    gs = torch.rand(n, device=CUDA, generator=gen)
    dk = torch.ops.cdcl_ops.masked_infonce_bank_grad(q, k, inv_q, inv_k, ql, qg, kl, kg, table, lse,
                                                     gs, 10.0, "triton", 0, "auto")
    tail = slice(m - 256, m)
    qh = q.double() * inv_q.double()[:, None]
    kh = k[tail].double() * inv_k[tail].double()[:, None]
    w = torch.exp(qh @ kh.T * 10.0 - lse.double()[:, None]) * gs.double()[:, None]
    w = w * (ql[:, None] != kl[tail][None, :])
    want = project_(k[tail].double(), inv_k[tail].double(), w.T @ qh)
    torch.testing.assert_close(dk[tail].double(), want, rtol=2e-2,
                               atol=2e-2 * want.abs().max().item())

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_16bit_bank_grad_of_mean(dtype):
    assert_bank_grad_of_mean_close("triton", dtype)
