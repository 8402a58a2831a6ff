"""The cpu backend's two ways to multiply fp32 and bf16 rows: our AVX-512 register blocks
(csrc/cpu/products_avx512.cpp, where the CPU has the instructions) and BLAS
(CDCL_OPS_CPU_PRODUCTS=blas, and every CPU without them). Both against the float64 reference on
awkward shapes, and against each other."""
import pytest
import torch

from cdcl_ops.backends import native
from helpers import assert_close_to_reference, loss_and_grads, make_inputs, with_nan_rows

pytestmark = pytest.mark.skipif(not native.HAS_CPU, reason="cdcl_ops._C not built")
OWN = {torch.float32: "avx512", torch.bfloat16: "avx512-bf16"}
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


@pytest.fixture(params=[torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def dtype(request):
    return request.param


@pytest.fixture(params=["own", "blas"])
def path(request, dtype, monkeypatch):
    """Select one way for the test; skip ours where the CPU lacks the instructions."""
    monkeypatch.setenv("CDCL_OPS_CPU_PRODUCTS", "auto" if request.param == "own" else "blas")
    got = native.cpu_products(dtype)
    if request.param == "own" and got == "blas":
        pytest.skip(f"this CPU has no {OWN[dtype]}")
    assert got == (OWN[dtype] if request.param == "own" else "blas")
    return request.param


# N, M not multiples of the register block (6 x 64), of the 16-row packing or of the tiles
# (64 queries x 256 bank rows); D odd, 1, below and above one 64-column block
SHAPES = [(1, 1, 1), (5, 7, 3), (17, 33, 2), (70, 300, 96), (130, 517, 200), (65, 257, 128),
          (300, 40, 17)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("groups", [True, False])
def test_matches_reference(path, dtype, shape, groups):
    assert_close_to_reference(make_inputs(*shape, groups=groups), "cpu", dtype, True)


def test_bank_detached_and_many_groups(path, dtype):
    assert_close_to_reference(make_inputs(90, 310, 24, n_groups=70), "cpu", dtype, False)


@pytest.mark.parametrize("exponent", [-60, 60])
def test_rows_far_from_unit_norm(path, dtype, exponent):
    # rows scaled by 2^e are packed with an exact power-of-two factor (RowScales): the raw products
    # of rows near the float32 range would overflow, those of tiny rows underflow
    inputs = make_inputs(40, 300, 32, seed=5)
    for name in ("query", "bank"):
        inputs[name][::3] *= 2.0 ** exponent
    assert_close_to_reference(inputs, "cpu", dtype, True)


@pytest.mark.parametrize("tau", [1e-2, 1e-4])
def test_bank_gradient_at_small_temperatures(path, dtype, tau):
    """The bank gradient recomputes exp(s - lse) with s ~ 1 / tau: the scores it forms must be the
    forward's bit for bit (one rounding more is ~1e-3 at tau = 1e-4)."""
    inputs = make_inputs(70, 300, 8, seed=1)
    _, want = loss_and_grads(inputs, "reference", temperature=tau)
    _, got = loss_and_grads(inputs, "cpu", dtype=dtype, temperature=tau)
    scale = want[2].abs().max()
    torch.testing.assert_close(got[2].double() / scale, want[2] / scale, rtol=TOL[dtype],
                               atol=TOL[dtype])


def test_rows_without_negatives_have_zero_loss(path, dtype):
    inputs = make_inputs(70, 290, 16, groups=False, seed=2)
    inputs["query_labels"][:] = 1
    inputs["bank_labels"][:] = 1  # nothing differs: no row has a negative
    loss, grads = loss_and_grads(inputs, "cpu", dtype=dtype)
    assert torch.all(loss == 0)
    assert torch.all(grads[2] == 0)


@pytest.mark.parametrize("n,m", [(0, 9), (7, 0)])
def test_empty(path, dtype, n, m):
    loss, grads = loss_and_grads(make_inputs(n, m, 6), "cpu", dtype=dtype)
    assert loss.shape == (n,) and torch.all(loss == 0)
    assert grads[2].shape == (m, 6) and torch.all(grads[2] == 0)


@pytest.mark.parametrize("where", ["some_bank_rows", "all_bank_rows", "a_query_row"])
def test_nan_rows_give_nan_where_the_reference_does(path, dtype, where):
    inputs = with_nan_rows(make_inputs(70, 300, 6, seed=6), where, [2, 7, 19, 280])
    want = loss_and_grads(inputs, "reference")
    got = loss_and_grads(inputs, "cpu", dtype=dtype)
    assert torch.isnan(want[0]).any()
    assert torch.equal(torch.isnan(got[0]), torch.isnan(want[0]))
    for g, r in zip(got[1], want[1]):
        assert torch.equal(torch.isnan(g), torch.isnan(r))


def test_bank_gradient_does_not_depend_on_threads(path, dtype):
    inputs = make_inputs(300, 700, 40, seed=8)
    saved = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(loss_and_grads(inputs, "cpu", dtype=dtype)[1])
    finally:
        torch.set_num_threads(saved)
    for one, two in zip(*results):
        assert torch.equal(one, two)


def test_paths_agree(dtype, monkeypatch):
    """Both ways form the scores as fp32 sums of exact products, so the per-query losses agree to
    fp32 rounding; in bf16, O and the bank gradient differ by the rounding of the weights."""
    monkeypatch.setenv("CDCL_OPS_CPU_PRODUCTS", "auto")
    if native.cpu_products(dtype) == "blas":
        pytest.skip(f"this CPU has no {OWN[dtype]}")
    inputs = make_inputs(200, 700, 96, seed=7)
    own_loss, own_grads = loss_and_grads(inputs, "cpu", dtype=dtype)
    monkeypatch.setenv("CDCL_OPS_CPU_PRODUCTS", "blas")
    blas_loss, blas_grads = loss_and_grads(inputs, "cpu", dtype=dtype)
    torch.testing.assert_close(own_loss, blas_loss, rtol=1e-5, atol=1e-5)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for own, blas in zip(own_grads, blas_grads):
        scale = blas.double().abs().max()
        torch.testing.assert_close(own.double() / scale, blas.double() / scale, rtol=tol, atol=tol)


def test_other_dtypes_use_blas(monkeypatch):
    monkeypatch.delenv("CDCL_OPS_CPU_PRODUCTS", raising=False)
    assert native.cpu_products(torch.float64) == "blas"
    assert native.cpu_products(torch.float16) == "blas"


def test_a_bad_setting_is_named(monkeypatch):
    monkeypatch.setenv("CDCL_OPS_CPU_PRODUCTS", "fast")
    with pytest.raises(RuntimeError, match="CDCL_OPS_CPU_PRODUCTS: expected 'auto' or 'blas', got 'fast'"):
        native.cpu_products(torch.float32)
