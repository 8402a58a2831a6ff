"""The `cpu` backend (C++ kernels of csrc/cpu, through cdcl_ops._C) against the float64 reference,
plus the raw `cdcl_ops_C::` ops: opcheck, torch.compile, determinism, patch foreground counts."""
import subprocess
import sys

import pytest
import torch

import cdcl_ops
from cdcl_ops._validate import canonical_masks
from cdcl_ops.backends import chunked, native
from cdcl_ops.backends.interface import InverseNorms, Options
from cdcl_ops.normalize import inverse_norms
from helpers import (
    SHAPES,
    assert_close_to_reference,
    assert_compiled_matches_eager,
    loss_and_grads,
    make_inputs,
    strided_copy,
)
from paths import ROOT

needs_ext = pytest.mark.skipif(not native.HAS_CPU,
                               reason=f"cdcl_ops._C not built: {native.LOAD_ERROR}")

# the C++ kernels work on query blocks of 64 and bank tiles of 256 (forward), bank blocks of 64
# and query tiles of 256 (bank gradient): these cross every boundary with ragged last tiles
BLOCK_SHAPES = [(130, 600, 16), (300, 70, 33), (65, 257, 128)]


@needs_ext
def test_registered_as_default_for_cpu():
    assert "cpu" in cdcl_ops.available_backends("cpu")
    assert cdcl_ops.default_backend("cpu") == "cpu"
    assert "cpu" not in cdcl_ops.available_backends("meta")


@pytest.mark.parametrize("shape", SHAPES + BLOCK_SHAPES)
@pytest.mark.parametrize("groups", [True, False])
@pytest.mark.parametrize("bank_grad", [True, False])
@needs_ext
def test_cpu_float64(shape, groups, bank_grad):
    assert_close_to_reference(make_inputs(*shape, groups=groups), "cpu", torch.float64, bank_grad)


@pytest.mark.parametrize("shape", SHAPES + BLOCK_SHAPES)
@pytest.mark.parametrize("groups", [True, False])
@needs_ext
def test_cpu_float32(shape, groups):
    assert_close_to_reference(make_inputs(*shape, groups=groups), "cpu", torch.float32, True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@needs_ext
def test_cpu_low_precision_upcast(dtype):
    assert_close_to_reference(make_inputs(97, 300, 40), "cpu", dtype, True)


@pytest.mark.parametrize("n_groups", [45, 64, 70])
@needs_ext
def test_many_groups(n_groups):
    # up to 64 groups a table row is a 64-bit set (group 63 sets the top bit); beyond, a lookup
    inputs = make_inputs(70, 290, 8, n_groups=n_groups)
    inputs["bank_groups"][::3] = n_groups - 1
    assert_close_to_reference(inputs, "cpu", torch.float64, True)


@pytest.mark.parametrize("n,m", [(0, 9), (7, 0), (0, 0)])
@needs_ext
def test_empty(n, m):
    inputs = make_inputs(n, m, 6)
    assert cdcl_ops.masked_infonce(**inputs, backend="cpu").item() == 0.0
    loss, grads = loss_and_grads(inputs, "cpu")
    assert loss.shape == (n,) and torch.all(loss == 0)
    for g, rows in zip(grads, (n, n, m)):
        assert g.shape[0] == rows and torch.all(g == 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@needs_ext
def test_rows_without_negatives_and_inactive_queries(dtype):
    inputs = make_inputs(150, 300, 5, groups=False)
    inputs["query_labels"] = torch.ones(150, dtype=torch.long)
    inputs["bank_labels"] = torch.ones(300, dtype=torch.long)  # same label: every key masked
    inputs["query_labels"][:40] = 0                          # these keep their negatives
    inputs["query_labels"][40:50] = -1                       # inactive
    loss, grads = loss_and_grads(inputs, "cpu", dtype=dtype)
    assert torch.all(loss[40:] == 0) and torch.all(loss[:40] > 0)
    assert torch.all(grads[0][40:] == 0) and torch.all(grads[1][40:] == 0)
    assert torch.isfinite(grads[2]).all()
    assert_close_to_reference(inputs, "cpu", dtype, True)


@needs_ext
def test_all_inactive_mean_is_zero_and_attached():
    inputs = make_inputs(20, 30, 4, groups=False)
    inputs["query_labels"] = torch.full((20,), -1)
    q = inputs["query"].requires_grad_()
    loss = cdcl_ops.masked_infonce(**inputs, backend="cpu")
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.all(q.grad == 0)


@needs_ext
def test_gradcheck_float64():
    inputs = make_inputs(9, 13, 4, seed=5)
    feats = [inputs[n].clone().requires_grad_() for n in ("query", "positive", "bank")]

    def fn(q, p, k):
        return cdcl_ops.masked_infonce(**dict(inputs, query=q, positive=p, bank=k), backend="cpu",
                                       reduction="none", temperature=0.3)

    assert torch.autograd.gradcheck(fn, feats)


@needs_ext
def test_non_contiguous_and_label_dtypes():
    base = make_inputs(70, 270, 10, dtype=torch.float32, seed=3)
    strided = strided_copy(base)
    strided["bank_labels"] = base["bank_labels"].to(torch.int16)
    strided["group_table"] = base["group_table"].to(torch.uint8)
    expect = cdcl_ops.masked_infonce(**base, backend="reference", reduction="none")
    got = cdcl_ops.masked_infonce(**strided, backend="cpu", reduction="none")
    torch.testing.assert_close(got, expect.float(), rtol=1e-5, atol=1e-6)


@needs_ext
def test_deterministic_and_independent_of_thread_count():
    inputs = make_inputs(200, 700, 24, dtype=torch.float32)
    threads = torch.get_num_threads()
    try:
        runs = []
        for n_threads in (threads, threads, 1):
            torch.set_num_threads(n_threads)
            runs.append(loss_and_grads(inputs, "cpu"))
    finally:
        torch.set_num_threads(threads)
    (l0, g0), *rest = runs
    for loss, grads in rest:
        assert torch.equal(loss, l0)
        for a, b in zip(grads, g0):
            assert torch.equal(a, b)


def _raw_args(dtype, n=70, m=270, d=6, seed=11):
    """Raw (not unit) rows, their inverse norms and canonical masks: the native ops' arguments."""
    inp = make_inputs(n, m, d, dtype=dtype, seed=seed)
    masks = canonical_masks(inp["query_labels"], inp["bank_labels"], inp["query_groups"],
                            inp["bank_groups"], inp["group_table"])
    feats = [inp[k] for k in ("query", "positive", "bank")]
    return feats, [inverse_norms(x) for x in feats], masks


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("need_o", [True, False])
@needs_ext
def test_opcheck_native_forward(dtype, need_o):
    feats, invs, masks = _raw_args(dtype)
    torch.library.opcheck(torch.ops.cdcl_ops_C.infonce_fwd,
                          (*feats, *invs, *masks, 10.0, need_o, False))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@needs_ext
def test_opcheck_native_bank_grad(dtype):
    (q, p, k), (iq, ip, ik), masks = _raw_args(dtype)
    _, lse, _ = torch.ops.cdcl_ops_C.infonce_fwd(q, p, k, iq, ip, ik, *masks, 10.0, False, False)
    gs = torch.rand(q.shape[0], dtype=lse.dtype) * 10
    torch.library.opcheck(torch.ops.cdcl_ops_C.infonce_bank_grad,
                          (q, k, iq, ik, *masks, lse, gs, 10.0, False))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@needs_ext
def test_native_ops_work_on_unit_rows(dtype):
    # scaling a raw row changes nothing: the kernels see x * inv, and O and the bank gradient are
    # those of the unit rows (checked against the chunked backend fed the unit rows themselves)
    (q, p, k), invs, masks = _raw_args(dtype, n=90, m=301, d=5)
    (q1, p1, k1) = (torch.nn.functional.normalize(x.double(), dim=1).to(dtype) for x in (q, p, k))
    options = Options(10.0, chunk_size=64)
    fwd = chunked.forward(q1, p1, k1, InverseNorms.of(q1, p1, k1), masks, options, True)
    got = torch.ops.cdcl_ops_C.infonce_fwd(q, p, k, *invs, *masks, 10.0, True, False)
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    for a, b in zip(got, fwd):
        torch.testing.assert_close(a, b, **tol)
    gs = torch.rand(q.shape[0], dtype=got[1].dtype)
    want = chunked.bank_grad(q1, k1, InverseNorms.of(q1, None, k1), masks, fwd[1], gs, options)
    dk = torch.ops.cdcl_ops_C.infonce_bank_grad(q, k, invs[0], invs[2], *masks, got[1], gs, 10.0,
                                                False)
    assert dk.dtype == got[1].dtype  # the accumulation dtype: ops.py projects it in place
    torch.testing.assert_close(dk, want, **tol)


@needs_ext
def test_opcheck_library_op_with_cpu_backend():
    (q, p, k), _, masks = _raw_args(torch.float32)
    q.requires_grad_()
    p.requires_grad_()
    k.requires_grad_()
    torch.library.opcheck(torch.ops.cdcl_ops.masked_infonce_fwd,
                          (q, p, k, *masks, 10.0, "cpu", 0, "auto", True))


@needs_ext
def test_compile_fullgraph_matches_eager():
    assert_compiled_matches_eager(make_inputs(80, 300, 8, dtype=torch.float32, seed=2), "cpu",
                                  temperature=0.2)


@needs_ext
def test_direct_call_rejects_bad_arguments():
    (q, p, k), (iq, ip, ik), masks = _raw_args(torch.float32)
    fwd = torch.ops.cdcl_ops_C.infonce_fwd
    with pytest.raises(RuntimeError, match="contiguous"):
        fwd(q.t().contiguous().t(), p, k, iq, ip, ik, *masks, 10.0, True, False)
    with pytest.raises(RuntimeError, match="q_lab"):
        fwd(q, p, k, iq, ip, ik, masks[0].long(), *masks[1:], 10.0, True, False)
    with pytest.raises(RuntimeError, match="k"):
        fwd(q, p, k[:, :3].contiguous(), iq, ip, ik, *masks, 10.0, True, False)
    with pytest.raises(RuntimeError, match="inv_p"):
        fwd(q, p, k, iq, ip.double(), ik, *masks, 10.0, True, False)
    with pytest.raises(RuntimeError, match="inv_k"):
        fwd(q, p, k, iq, ip, ik[1:], *masks, 10.0, True, False)
    ql, qg, kl, kg, table = masks
    bad = kg.clone()
    bad[3] = table.shape[0]  # one past the table: rejected instead of read out of bounds
    with pytest.raises(RuntimeError, match="k_grp"):
        fwd(q, p, k, iq, ip, ik, ql, qg, kl, bad, table, 10.0, True, False)
    lse = torch.zeros(q.shape[0])
    grad = torch.ops.cdcl_ops_C.infonce_bank_grad
    with pytest.raises(RuntimeError, match="q_grp"):
        grad(q, k, iq, ik, ql, qg.clone().fill_(table.shape[0]), kl, kg, table, lse, lse, 10.0,
             False)
    with pytest.raises(RuntimeError, match="inv_q"):
        grad(q, k, iq[:-1], ik, *masks, lse, lse, 10.0, False)


# ---- patch foreground counts (docs/design.md §3) ----

def _counts_reference(labels, grid, fg_class):
    b, h, w = labels.shape
    fg = (labels.long() == fg_class).long()
    return fg.reshape(b, grid, h // grid, grid, w // grid).sum(dim=(2, 4)).to(torch.int32)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8])
@pytest.mark.parametrize("grid,hw", [(8, (40, 40)), (3, (9, 15)), (1, (5, 7))])
@needs_ext
def test_patch_counts_labels(dtype, grid, hw):
    labels = torch.randint(0, 3, (3, *hw)).to(dtype)
    got = torch.ops.cdcl_ops_C.patch_fg_counts(labels, grid, 1)
    assert got.dtype == torch.int32 and got.shape == (3, grid, grid)
    assert torch.equal(got, _counts_reference(labels, grid, 1))
    assert torch.equal(torch.ops.cdcl_ops_C.patch_fg_counts(labels, grid, 2),
                       _counts_reference(labels, grid, 2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@needs_ext
def test_patch_counts_logits_with_ties(dtype):
    # integer-valued logits in a small range: many ties, where the first maximum must win
    logits = torch.randint(0, 3, (2, 4, 24, 16)).to(dtype)
    logits[0, :, :4, :4] = 1.0  # a block where all classes tie: argmax 0
    got = torch.ops.cdcl_ops_C.patch_fg_counts(logits, 4, 1)
    assert torch.equal(got, _counts_reference(logits.argmax(dim=1), 4, 1))
    assert torch.equal(torch.ops.cdcl_ops_C.patch_fg_counts(logits, 4, 0),
                       _counts_reference(logits.argmax(dim=1), 4, 0))


@needs_ext
def test_patch_counts_float64_logits_close_values():
    # differences below float32 resolution still decide the argmax of float64 logits
    logits = torch.ones(1, 2, 4, 4, dtype=torch.float64)
    logits[0, 1, :2] += 1e-12
    got = torch.ops.cdcl_ops_C.patch_fg_counts(logits, 2, 1)
    assert torch.equal(got, _counts_reference(logits.argmax(dim=1), 2, 1))
    assert got.sum().item() == 8


def test_patch_counts_non_contiguous_and_errors():
    logits = torch.randn(2, 16, 16, 3).permute(0, 3, 1, 2)
    assert torch.equal(torch.ops.cdcl_ops_C.patch_fg_counts(logits, 4, 2),
                       _counts_reference(logits.argmax(dim=1), 4, 2))
    with pytest.raises(RuntimeError, match="divisible"):
        torch.ops.cdcl_ops_C.patch_fg_counts(torch.zeros(1, 10, 12, dtype=torch.long), 4, 1)
    with pytest.raises(RuntimeError, match="labels_or_logits"):
        torch.ops.cdcl_ops_C.patch_fg_counts(torch.zeros(1, 8, 8), 4, 1)


@needs_ext
def test_opcheck_patch_counts():
    torch.library.opcheck(torch.ops.cdcl_ops_C.patch_fg_counts, (torch.randn(2, 3, 8, 8), 4, 1))
    torch.library.opcheck(torch.ops.cdcl_ops_C.patch_fg_counts,
                          (torch.randint(0, 2, (2, 8, 8)), 2, 1))


def test_import_without_the_extension():
    # a machine where the build failed: the package imports, lists no native backend, falls back
    # to chunked, and a request for "cpu" says why it cannot run
    code = """
import sys
sys.modules["cdcl_ops._C"] = None  # makes `from .. import _C` raise ImportError
import torch, cdcl_ops
from cdcl_ops.backends import chunked, native
from cdcl_ops.normalize import inverse_norms
assert not native.LOADED and native.LOAD_ERROR
assert "cpu" not in cdcl_ops.available_backends("cpu")
assert cdcl_ops.default_backend("cpu") == "chunked"
x = torch.randn(4, 3)
lab = torch.tensor([0, 1, 0, 1])
print(float(cdcl_ops.masked_infonce(x, x, x, lab, lab)))
try:
    cdcl_ops.masked_infonce(x, x, x, lab, lab, backend="cpu")
except ValueError as e:
    assert "cdcl_ops._C" in str(e), e
    print("refused")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip().endswith("refused")
