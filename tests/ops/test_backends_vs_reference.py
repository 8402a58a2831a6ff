"""Each streaming backend against the float64 reference on fresh random inputs."""
import pytest
import torch

import cdcl_ops
from helpers import SHAPES, assert_close_to_reference, loss_and_grads, make_inputs, strided_copy


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("groups", [True, False])
@pytest.mark.parametrize("bank_grad", [True, False])
def test_chunked_float64(shape, groups, bank_grad):
    inputs = make_inputs(*shape, groups=groups)
    assert_close_to_reference(inputs, "chunked", torch.float64, bank_grad, chunk_size=16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_chunked_low_precision(dtype):
    assert_close_to_reference(make_inputs(31, 47, 24), "chunked", dtype, True, chunk_size=10)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("groups", [True, False])
def test_triton_float32(shape, groups):
    inputs = make_inputs(*shape, groups=groups)
    assert_close_to_reference(inputs, "triton", torch.float32, True, precision="ieee")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_low_precision(dtype):
    assert_close_to_reference(make_inputs(35, 50, 40), "triton", dtype, True)


def test_triton_bank_detached():
    assert_close_to_reference(make_inputs(35, 50, 12), "triton", torch.float32, False, precision="ieee")


def _exact(backend):
    """The most exact dtype of each backend and the options that make it so."""
    if backend == "chunked":
        return torch.float64, {}
    return torch.float32, {"precision": "ieee"}


@pytest.mark.parametrize("backend", ["chunked", "triton"])
def test_many_groups_table(backend):
    # G > 32 takes the kernels' table-gather path instead of the per-query bit set
    inputs = make_inputs(40, 61, 8, n_groups=45)
    dtype, options = _exact(backend)
    assert_close_to_reference(inputs, backend, dtype, True, **options)


@pytest.mark.parametrize("backend", ["chunked", "triton"])
def test_group_31_sets_sign_bit(backend):
    # a query allowed to see group 31 has the int32 sign bit set in its bit set
    table = torch.zeros(32, 32, dtype=torch.bool)
    table[:, 31] = True
    inputs = make_inputs(20, 30, 5, n_groups=32, table=table)
    inputs["bank_groups"][::2] = 31
    dtype, options = _exact(backend)
    assert_close_to_reference(inputs, backend, dtype, True, **options)


@pytest.mark.parametrize("backend", ["reference", "chunked", "triton"])
def test_reductions_agree(backend):
    inputs = make_inputs(26, 33, 7, dtype=torch.float32)
    per_q = cdcl_ops.masked_infonce(**inputs, backend=backend, reduction="none")
    active = (inputs["query_labels"] >= 0) & (inputs["query_groups"] >= 0)
    assert torch.all(per_q[~active] == 0)
    total = cdcl_ops.masked_infonce(**inputs, backend=backend, reduction="sum")
    mean = cdcl_ops.masked_infonce(**inputs, backend=backend, reduction="mean")
    torch.testing.assert_close(total, per_q.sum())
    torch.testing.assert_close(mean, per_q.sum() / active.sum())


@pytest.mark.parametrize("backend", ["chunked", "triton"])
def test_non_contiguous_and_label_dtypes(backend):
    base = make_inputs(18, 27, 10, dtype=torch.float32, seed=3)
    strided = strided_copy(base)
    strided["group_table"] = base["group_table"].to(torch.uint8)
    expect = cdcl_ops.masked_infonce(**base, backend="reference", reduction="none")
    got = cdcl_ops.masked_infonce(**strided, backend=backend, reduction="none")
    torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["chunked", "triton"])
def test_bank_gradient_deterministic(backend):
    inputs = make_inputs(40, 50, 16, dtype=torch.float32)
    _, g1 = loss_and_grads(inputs, backend)
    _, g2 = loss_and_grads(inputs, backend)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)
