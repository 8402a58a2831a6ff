"""The cpu backend's two paths for bf16 rows: the AVX512-BF16 products (csrc/cpu/bf16_dot.cpp,
where the CPU has them) and fp32 BLAS on rows upcast per tile (CDCL_OPS_CPU_BF16_DOT=0, and every
CPU without them). Both against the float64 reference on awkward shapes, and against each other."""
import pytest
import torch

from cdcl_ops.backends import native
from helpers import assert_close_to_reference, loss_and_grads, make_inputs, with_nan_rows

needs_ext = pytest.mark.skipif(not native.HAS_CPU, reason="cdcl_ops._C not built")
PATHS = ["bf16-dot", "blas"]


@pytest.fixture(params=PATHS)
def path(request, monkeypatch):
    """Select one path for the test; skip the AVX512-BF16 one where the CPU lacks it."""
    monkeypatch.setenv("CDCL_OPS_CPU_BF16_DOT", "1" if request.param == "bf16-dot" else "0")
    if request.param == "bf16-dot" and not native.cpu_bf16_dot():
        pytest.skip("this CPU has no AVX512-BF16")
    assert native.cpu_bf16_dot() == (request.param == "bf16-dot")
    return request.param


# N, M not multiples of the register block (6 x 64), of the 16-row packing or of the tiles
# (64 queries x 256 bank rows); D odd, 1, below and above one 64-column block
SHAPES = [(1, 1, 1), (5, 7, 3), (17, 33, 2), (70, 300, 96), (130, 517, 200), (65, 257, 128),
          (300, 40, 17)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("groups", [True, False])
@needs_ext
def test_matches_reference(path, shape, groups):
    assert_close_to_reference(make_inputs(*shape, groups=groups), "cpu", torch.bfloat16, True)


@needs_ext
def test_bank_detached_and_many_groups(path):
    inputs = make_inputs(90, 310, 24, n_groups=70)
    assert_close_to_reference(inputs, "cpu", torch.bfloat16, False)


@pytest.mark.parametrize("exponent", [-60, 60])
@needs_ext
def test_rows_far_from_unit_norm(path, exponent):
    # rows scaled by 2^e are packed with an exact power-of-two factor (RowScales): the raw products
    # of rows near the float32 range would overflow, those of tiny rows underflow
    inputs = make_inputs(40, 300, 32, seed=5)
    for name in ("query", "bank"):
        inputs[name][::3] *= 2.0 ** exponent
    assert_close_to_reference(inputs, "cpu", torch.bfloat16, True)


@needs_ext
def test_rows_without_negatives_have_zero_loss(path):
    inputs = make_inputs(70, 290, 16, groups=False, seed=2)
    inputs["query_labels"][:] = 1
    inputs["bank_labels"][:] = 1  # nothing differs: every row has no negative
    loss, grads = loss_and_grads(inputs, "cpu", dtype=torch.bfloat16)
    assert torch.all(loss == 0)
    assert torch.all(grads[2] == 0)


@pytest.mark.parametrize("n,m", [(0, 9), (7, 0)])
@needs_ext
def test_empty(path, n, m):
    loss, grads = loss_and_grads(make_inputs(n, m, 6), "cpu", dtype=torch.bfloat16)
    assert loss.shape == (n,) and torch.all(loss == 0)
    assert grads[2].shape == (m, 6) and torch.all(grads[2] == 0)


@pytest.mark.parametrize("where", ["some_bank_rows", "all_bank_rows", "a_query_row"])
@needs_ext
def test_nan_rows_give_nan_where_the_reference_does(path, where):
    inputs = with_nan_rows(make_inputs(70, 300, 6, seed=6), where, [2, 7, 19, 280])
    want = loss_and_grads(inputs, "reference")
    got = loss_and_grads(inputs, "cpu", dtype=torch.bfloat16)
    assert torch.isnan(want[0]).any()
    assert torch.equal(torch.isnan(got[0]), torch.isnan(want[0]))
    for g, r in zip(got[1], want[1]):
        assert torch.equal(torch.isnan(g), torch.isnan(r))


@needs_ext
def test_paths_agree(monkeypatch):
    """The scores are sums of exact products in fp32 on both paths, so the per-query losses agree
    to fp32 rounding; O and the bank gradient differ by the bf16 rounding of the weights."""
    monkeypatch.setenv("CDCL_OPS_CPU_BF16_DOT", "1")
    if not native.cpu_bf16_dot():
        pytest.skip("this CPU has no AVX512-BF16")
    inputs = make_inputs(200, 700, 96, seed=7)
    fast_loss, fast_grads = loss_and_grads(inputs, "cpu", dtype=torch.bfloat16)
    monkeypatch.setenv("CDCL_OPS_CPU_BF16_DOT", "0")
    blas_loss, blas_grads = loss_and_grads(inputs, "cpu", dtype=torch.bfloat16)
    torch.testing.assert_close(fast_loss, blas_loss, rtol=1e-5, atol=1e-5)
    for fast, blas in zip(fast_grads, blas_grads):
        scale = blas.double().abs().max()
        torch.testing.assert_close(fast.double() / scale, blas.double() / scale, rtol=1e-2, atol=1e-2)


@needs_ext
def test_bank_gradient_does_not_depend_on_threads(path):
    inputs = make_inputs(300, 700, 40, seed=8)
    saved = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(loss_and_grads(inputs, "cpu", dtype=torch.bfloat16)[1])
    finally:
        torch.set_num_threads(saved)
    for one, two in zip(*results):
        assert torch.equal(one, two)
