"""torch.library integration: opcheck, torch.compile(fullgraph=True), the no-N x M memory bound."""

import pytest
import torch

import cdcl_ops
from cdcl_ops._validate import canonical_masks
from helpers import assert_compiled_matches_eager, make_inputs
from memory import LiveTensorBytes


def _op_args(backend, dtype, need_o=True, bank_grad=True):
    inp = make_inputs(23, 37, 6, dtype=dtype, seed=11)
    masks = canonical_masks(inp["query_labels"], inp["bank_labels"], inp["query_groups"],
                            inp["bank_groups"], inp["group_table"])
    feats = [inp[n].requires_grad_(n != "bank" or bank_grad) for n in ("query", "positive", "bank")]
    return (*feats, *masks, 10.0, backend, 8, "ieee", need_o)


@pytest.mark.parametrize("backend,dtype", [("chunked", torch.float64), ("chunked", torch.float32),
                                           ("triton", torch.float32)])
def test_opcheck_forward(backend, dtype):
    torch.library.opcheck(torch.ops.cdcl_ops.masked_infonce_fwd, _op_args(backend, dtype))


@pytest.mark.parametrize("backend", ["chunked", "triton"])
def test_opcheck_bank_grad(backend):
    q, p, k, ql, qg, kl, kg, table, inv_tau, _, chunk, prec, _ = _op_args(backend, torch.float32)
    _, lse, _, inv_q, _, inv_k = torch.ops.cdcl_ops.masked_infonce_fwd(
        q, p, k, ql, qg, kl, kg, table, inv_tau, backend, chunk, prec, False)
    gs = torch.rand(q.shape[0]) * inv_tau
    torch.library.opcheck(torch.ops.cdcl_ops.masked_infonce_bank_grad,
                          (q.detach(), k.detach(), inv_q, inv_k, ql, qg, kl, kg, table, lse, gs,
                           inv_tau, backend, chunk, prec))


def _op_loss(q, p, k, rest):
    return torch.ops.cdcl_ops.masked_infonce_fwd(q, p, k, *rest)[0].sum()


def test_op_gradcheck_raw_rows():
    # the op normalises its inputs itself: its gradients are those of the raw (not unit) rows
    args = _op_args("chunked", torch.float64)
    assert torch.autograd.gradcheck(lambda q, p, k: _op_loss(q, p, k, args[3:]), args[:3])


def test_op_triton_gradients_match_float64():
    args = _op_args("triton", torch.float32)
    got = torch.autograd.grad(_op_loss(*args[:3], args[3:]), args[:3])
    ref = [t.detach().double().requires_grad_() for t in args[:3]]
    rest = (*args[3:9], "chunked", *args[10:])
    want = torch.autograd.grad(_op_loss(*ref, rest), ref)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ["chunked", "triton"])
def test_compile_fullgraph_matches_eager(backend):
    assert_compiled_matches_eager(make_inputs(20, 33, 8, dtype=torch.float32, seed=2), backend,
                                  temperature=0.2)


def test_chunked_keeps_no_n_by_m_buffer():
    n, m, d = 4096, 65536, 16
    inputs = make_inputs(n, m, d, dtype=torch.float32, seed=4)
    feats = {k: inputs[k].requires_grad_() for k in ("query", "positive", "bank")}
    saved = []

    def pack(t):
        saved.append(t.untyped_storage().nbytes())
        return t

    tracker = LiveTensorBytes()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), tracker:
        loss = cdcl_ops.masked_infonce(**inputs, backend="chunked")
        loss.backward()
    n_by_m = n * m * 4
    rows_by_d = (n + m) * d * 4
    # everything kept for backward is O((N + M) D); the largest transient is a tile x chunk buffer
    assert sum(saved) < 8 * rows_by_d, (sum(saved), rows_by_d)
    assert tracker.peak < n_by_m / 8, (tracker.peak, n_by_m)
    assert all(f.grad is not None for f in feats.values())


@pytest.mark.parametrize("backend", ["chunked", "cpu", "triton"])
def test_no_normalised_copies_kept(backend):
    # Kept for backward beyond the inputs: O (N x D) and per-row vectors. Alive at the peak: the
    # three gradients, O, and per-row vectors; no normalised copy of any input, no N x M buffer.
    if backend not in cdcl_ops.available_backends("cpu"):
        pytest.skip(f"{backend} is not available here")
    n, m, d = (96, 160, 8) if backend == "triton" else (1024, 4096, 32)
    inputs = make_inputs(n, m, d, dtype=torch.float32, seed=5)
    feats = [inputs[k].requires_grad_() for k in ("query", "positive", "bank")]
    input_ptrs = {f.untyped_storage().data_ptr() for f in feats}
    saved = []

    def pack(t):
        if t.untyped_storage().data_ptr() not in input_ptrs:
            saved.append(t.untyped_storage().nbytes())
        return t

    tracker = LiveTensorBytes(exclude=feats)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), tracker:
        cdcl_ops.masked_infonce(**inputs, backend=backend).backward()
    # a few per-row vectors: labels and groups, loss, LSE, inverse norms (measured: 4 (N + M)
    # floats); zero gradients materialised for the non-differentiable O would add N x D
    row_vectors = 6 * (n + m) * 4
    assert sum(saved) <= n * d * 4 + row_vectors, sum(saved)
    assert tracker.peak <= (3 * n + m) * d * 4 + row_vectors, (tracker.peak, (3 * n + m) * d * 4)
    assert all(f.grad is not None for f in feats)


@pytest.mark.parametrize("backend", ["chunked", "cpu", "triton"])
def test_zero_upstream_gradient_gives_zero_bank_gradient(backend):
    # the bank-gradient op divides gs by its largest magnitude: an all-zero gs must stay finite
    if backend not in cdcl_ops.available_backends("cpu"):
        pytest.skip(f"{backend} is not available here")
    inputs = make_inputs(40, 70, 8, dtype=torch.float32, seed=6)
    feats = [inputs[k].requires_grad_() for k in ("query", "positive", "bank")]
    (cdcl_ops.masked_infonce(**inputs, backend=backend, reduction="sum") * 0.0).backward()
    assert all(torch.equal(f.grad, torch.zeros_like(f)) for f in feats)
