"""supervised_contrast against an implementation we did not write, pytorch-metric-learning's
SupConLoss, and hypothesis properties against the float64 reference.

How SupConLoss maps onto denominator="all": it takes embeddings and labels, builds the cosine
similarities divided by its temperature (as s = cos / tau here), and for each anchor takes
-mean_{p} log(e^s_p / sum_{a != anchor} e^s_a) over the other rows of its label: l_i of
docs/design.md §7 in the in-batch form (bank=None, row i left out of its own sets). Given
ref_emb / ref_labels it contrasts each anchor with those rows instead, none left out: our bank.
Its default reducer (AvgNonZeroReducer) averages over the anchors whose loss is not 0; ours
averages over the queries with a positive. The two agree wherever no anchor with positives has
a loss of exactly 0 (one positive and no negative, for instance), which the inputs here ensure.
It has no inactive rows: our inactive queries and bank rows are left out of its input instead.
Where a batch has no positive pair at all, or no negative pair at all, it returns 0 without
computing; we compute the loss of each query with a positive regardless (see the last test).
"""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cdcl_ops
from helpers import dense_labels
from strategies import LABEL_DTYPES, _extremes, features, ids
from supcon_helpers import BACKENDS, STREAMING, assert_matches, loss_and_grads

losses = pytest.importorskip("pytorch_metric_learning.losses")
TOL = {torch.float32: 2e-5, torch.float64: 1e-10}


def _dtypes(backend):
    return [torch.float32] if backend == "triton" else [torch.float32, torch.float64]


def _rows(n, d, dtype, gen):
    norms = torch.exp(torch.randn(n, 1, generator=gen, dtype=torch.float64))  # far from 1
    return (torch.randn(n, d, generator=gen, dtype=torch.float64) * norms).to(dtype)


def _batch(dtype, n=41, d=12, seed=0):
    """Labels 0..4 in turn (every class repeated, so every anchor has positives and negatives)
    but one singleton class (label 9: its anchor has no positive)."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 5
    labels[7] = 9
    return _rows(n, d, dtype, gen), labels[torch.randperm(n, generator=gen)]


def _theirs(x, labels, temperature, ref=None, ref_labels=None):
    leaves = [x.detach().clone().requires_grad_()]
    if ref is not None:
        leaves.append(ref.detach().clone().requires_grad_())
    loss = losses.SupConLoss(temperature=temperature)(leaves[0], labels,
                                                      ref_emb=leaves[1] if ref is not None else None,
                                                      ref_labels=ref_labels)
    loss.backward()
    return loss.detach(), [t.grad for t in leaves]


def _ours(x, labels, temperature, backend, ref=None, ref_labels=None):
    leaves = [x.detach().clone().requires_grad_()]
    if ref is not None:
        leaves.append(ref.detach().clone().requires_grad_())
    loss = cdcl_ops.supervised_contrast(leaves[0], labels, leaves[1] if ref is not None else None,
                                        ref_labels, temperature=temperature, backend=backend)
    loss.backward()
    return loss.detach(), [t.grad for t in leaves]


def _assert_same(ours, theirs, dtype):
    (loss, grads), (want, want_grads) = ours, theirs
    tol = TOL[dtype]
    torch.testing.assert_close(loss, want.to(loss.dtype), rtol=tol, atol=0)
    for g, w in zip(grads, want_grads):
        scale = w.abs().max()
        torch.testing.assert_close(g / scale, w / scale, rtol=0, atol=2 * tol)


@pytest.mark.parametrize("temperature", [0.1, 0.07])
@pytest.mark.parametrize("backend", BACKENDS)
def test_in_batch_form_matches_supcon_loss(backend, temperature):
    for dtype in _dtypes(backend):
        x, labels = _batch(dtype)
        _assert_same(_ours(x, labels, temperature, backend), _theirs(x, labels, temperature), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bank_form_matches_supcon_loss_with_reference_embeddings(backend):
    for dtype in _dtypes(backend):
        x, labels = _batch(dtype, n=23, seed=1)
        ref, ref_labels = _batch(dtype, n=37, seed=2)
        _assert_same(_ours(x, labels, 0.1, backend, ref, ref_labels),
                     _theirs(x, labels, 0.1, ref, ref_labels), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inactive_rows_are_rows_left_out(backend):
    """Our inactive rows (label -1) against SupConLoss on the active rows alone: the same loss, the
    same gradients for the active rows, and zero gradients for the inactive ones."""
    dtype = torch.float32 if backend == "triton" else torch.float64
    x, labels = _batch(dtype, n=47, seed=3)
    off = torch.zeros(47, dtype=torch.bool)
    off[::6] = True
    loss, (grad,) = _ours(x, torch.where(off, -1, labels), 0.1, backend)
    want, (want_grad,) = _theirs(x[~off], labels[~off], 0.1)
    _assert_same((loss, [grad[~off]]), (want, [want_grad]), dtype)
    assert torch.all(grad[off] == 0)


def test_supcon_loss_skips_a_batch_without_negatives_and_we_do_not():
    """The one place the two differ in kind: a single-class batch. SupConLoss returns 0 without
    computing; each of our queries has positives (the other rows) and its loss is
    LSE over them minus their mean, > 0 unless they tie."""
    x, _ = _batch(torch.float64, n=9)
    labels = torch.zeros(9, dtype=torch.long)
    theirs = losses.SupConLoss(temperature=0.1)(x, labels)
    assert float(theirs) == 0.0
    ours = cdcl_ops.supervised_contrast(x, labels, reduction="none", backend="reference")
    qh = torch.nn.functional.normalize(x, dim=1)
    s = (qh @ qh.T / 0.1).masked_fill(torch.eye(9, dtype=torch.bool), float("-inf"))
    want = torch.logsumexp(s, 1) - s.masked_fill(torch.eye(9, dtype=torch.bool), 0).sum(1) / 8
    torch.testing.assert_close(ours, want)
    assert torch.all(ours > 0)


# ------------------------------------------------------------------ hypothesis properties
SETTINGS = settings(max_examples=12, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@st.composite
def problems(draw, backend):
    """Shapes from 0, feature dtypes and row magnitudes (huge, tiny, zero, repeated rows), label
    and group dtypes at their extremes, group tables, the in-batch form or a bank, paired
    positives or not, either denominator, temperatures and reductions."""
    n, m, d = draw(st.integers(0, 10)), draw(st.integers(0, 14)), draw(st.integers(1, 6))
    dtype = draw(st.sampled_from([torch.float32] if backend == "triton" else [torch.float32, torch.float64]))
    lab_dtype = draw(st.sampled_from(LABEL_DTYPES))
    pool = draw(st.lists(st.sampled_from(_extremes(lab_dtype)), min_size=1, max_size=3, unique=True))
    in_batch = draw(st.booleans())
    args = dict(query=draw(features(n, d, dtype)), query_labels=draw(ids(n, lab_dtype, pool)))
    if not in_batch:
        args.update(bank=draw(features(m, d, dtype)), bank_labels=draw(ids(m, lab_dtype, pool)))
    if draw(st.booleans()):
        args["positive"] = draw(features(n, d, dtype))
    if draw(st.booleans()):
        g = draw(st.integers(1, 3))
        grp_dtype = draw(st.sampled_from(LABEL_DTYPES))
        info = torch.iinfo(grp_dtype)
        values = list(range(g)) + ([-1, info.min] if info.min < 0 else [])
        gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
        args.update(query_groups=draw(ids(n, grp_dtype, values)), group_table=torch.rand(g, g, generator=gen) < 0.6)
        if not in_batch:
            args["bank_groups"] = draw(ids(m, grp_dtype, values))
    kw = dict(temperature=draw(st.sampled_from([0.05, 0.1, 0.5, 2.0])),
              reduction=draw(st.sampled_from(["none", "mean", "sum"])),
              denominator=draw(st.sampled_from(["all", "negatives"])))
    return args, kw


def _oracle_inputs(args):
    """float64 features, labels renumbered by hand, groups < 0 as -1: the reference's input."""
    out = {k: (v.double() if k in ("query", "positive", "bank") else v) for k, v in args.items()}
    n = args["query_labels"].shape[0]
    bank = args.get("bank_labels", torch.zeros(0, dtype=torch.long))
    both = dense_labels(args["query_labels"].long().tolist() + bank.long().tolist())
    out["query_labels"] = both[:n]
    if "bank_labels" in args:
        out["bank_labels"] = both[n:]
    for name in ("query_groups", "bank_groups"):
        if name in args:
            out[name] = args[name].long().clamp(min=-1)
    return out


@pytest.mark.parametrize("backend", STREAMING)
def test_matches_the_float64_reference(backend):
    @SETTINGS
    @given(problems(backend))
    def check(problem):
        args, kw = problem
        want = loss_and_grads(_oracle_inputs(args), "reference", **kw)
        got = loss_and_grads(args, backend, **kw)
        dtype = args["query"].dtype
        assert got[0].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert not torch.isnan(got[0]).any()
        assert_matches(got, want, dtype, {k: v for k, v in args.items()})

    check()


@pytest.mark.parametrize("backend", BACKENDS)
def test_properties_of_the_loss(backend):
    """Each query's loss is >= 0 (all: LSE over a set that holds the positives is at least their
    mean; negatives: every term is -log of a probability), 0 without a positive, and does not
    depend on the rows' norms; the mean is the sum over the queries with a positive."""
    @settings(max_examples=8, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(problems(backend), st.floats(0.25, 4.0))
    def check(problem, scale):
        args, kw = problem
        kw = dict(kw, reduction="none")
        per_q = cdcl_ops.supervised_contrast(**args, backend=backend, **kw)
        assert torch.all(per_q >= -1e-6)
        scaled = {k: (v * scale if k in ("query", "positive", "bank") else v) for k, v in args.items()}
        torch.testing.assert_close(cdcl_ops.supervised_contrast(**scaled, backend=backend, **kw), per_q,
                                   rtol=1e-5, atol=1e-5)
        mean = cdcl_ops.supervised_contrast(**args, backend=backend, **dict(kw, reduction="mean"))
        want = loss_and_grads(_oracle_inputs(args), "reference", **kw)[0]
        contributing = _contributing(_oracle_inputs(args))
        expected = want.sum() / max(int(contributing.sum()), 1)
        torch.testing.assert_close(mean.double(), expected, rtol=2e-5, atol=2e-5)
        assert torch.all(per_q[~contributing] == 0)

    check()


def _contributing(inp):
    """The queries with a positive, from design.md §7's text (not the library's masks)."""
    n = inp["query_labels"].shape[0]
    in_batch = "bank" not in inp
    k_lab = inp["query_labels"] if in_batch else inp["bank_labels"]
    q_grp = inp.get("query_groups", torch.zeros(n, dtype=torch.long))
    k_grp = q_grp if in_batch else inp.get("bank_groups", torch.zeros(k_lab.shape[0], dtype=torch.long))
    table = inp.get("group_table", torch.ones(1, 1, dtype=torch.bool))
    active_q = (inp["query_labels"] >= 0) & (q_grp >= 0)
    active_k = (k_lab >= 0) & (k_grp >= 0)
    pos = active_q[:, None] & active_k[None, :] & (inp["query_labels"][:, None] == k_lab[None, :])
    pos &= table[q_grp.clamp(min=0)][:, k_grp.clamp(min=0)]
    if in_batch:
        pos &= ~torch.eye(n, dtype=torch.bool)
    return pos.any(1) | (active_q & ("positive" in inp))
