"""Property-based tests (hypothesis): random shapes (0 and 1 included), feature dtypes and row
magnitudes, label and group dtypes with their extreme values, group tables, inactive rows and
reductions, for every CPU-runnable backend against the float64 reference with labels renumbered
by hand. Bounded (few examples, small shapes) so the suite keeps its time limit."""
import io

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cdcl_ops
from cdcl_ops import CrossPatchOptions, FeatureBank
from helpers import assert_matches, dense_labels, loss_and_grads
from strategies import LABEL_DTYPES, MAGNITUDES, _extremes, features, ids  # noqa: F401

BACKENDS = [b for b in ("reference", "chunked", "cpu", "triton") if b in cdcl_ops.available_backends("cpu")]
SETTINGS = settings(max_examples=40, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
TOL = {torch.float64: 1e-9, torch.float32: 1e-5, torch.bfloat16: 2e-2}


@st.composite
def problems(draw, backend):
    n, m, d = draw(st.integers(0, 12)), draw(st.integers(0, 16)), draw(st.integers(1, 8))
    dtypes = [torch.float32] if backend == "triton" else [torch.float32, torch.float64]
    dtype = draw(st.sampled_from(dtypes))
    lab_dtype = draw(st.sampled_from(LABEL_DTYPES))
    pool = draw(st.lists(st.sampled_from(_extremes(lab_dtype)), min_size=1, max_size=4, unique=True))
    args = dict(query=draw(features(n, d, dtype)), positive=draw(features(n, d, dtype)),
                bank=draw(features(m, d, dtype)), query_labels=draw(ids(n, lab_dtype, pool)),
                bank_labels=draw(ids(m, lab_dtype, pool)))
    if draw(st.booleans()):
        g = draw(st.integers(1, 4))
        grp_dtype = draw(st.sampled_from(LABEL_DTYPES))
        info = torch.iinfo(grp_dtype)
        values = list(range(g)) + ([-1, info.min] if info.min < 0 else [])
        gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
        args.update(query_groups=draw(ids(n, grp_dtype, values)), bank_groups=draw(ids(m, grp_dtype, values)),
                    group_table=torch.rand(g, g, generator=gen) < 0.6)
    tau = draw(st.sampled_from([0.01, 0.07, 0.1, 0.5, 1.0, 10.0]))
    return args, tau, draw(st.sampled_from(["none", "mean", "sum"]))


def oracle_inputs(args):
    """float64 features, labels renumbered by hand, groups < 0 as -1: the reference's input."""
    out = {k: (v.double() if k in ("query", "positive", "bank") else v) for k, v in args.items()}
    n = args["query_labels"].shape[0]
    both = dense_labels(args["query_labels"].long().tolist() + args["bank_labels"].long().tolist())
    out["query_labels"], out["bank_labels"] = both[:n], both[n:]
    for name in ("query_groups", "bank_groups"):
        if name in args:
            out[name] = args[name].long().clamp(min=-1)
    return out


def row_norms(args):
    return {name: args[name].double().norm(dim=1, keepdim=True).clamp(min=1e-12)
            for name in ("query", "positive", "bank")}


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_infonce_matches_the_float64_reference(backend):
    @SETTINGS
    @given(problems(backend))
    def check(problem):
        args, tau, reduction = problem
        want = loss_and_grads(oracle_inputs(args), "reference", temperature=tau, reduction=reduction)
        got = loss_and_grads(args, backend, temperature=tau, reduction=reduction)
        assert got[0].dtype == (torch.float64 if args["query"].dtype == torch.float64 else torch.float32)
        assert got[0].shape == want[0].shape
        tol = TOL[args["query"].dtype]
        torch.testing.assert_close(got[0].double(), want[0], rtol=tol, atol=tol)
        if args["query"].dtype == torch.float32:
            assert_matches(got, want, scale_rows=row_norms(args))
        else:
            for g, r, s in zip(got[1], want[1], row_norms(args).values()):
                scale = (r * s).abs().max().clamp(min=1.0) if r.numel() else 1.0
                torch.testing.assert_close(g * s / scale, r * s / scale, rtol=tol, atol=tol)

    check()


@st.composite
def label_maps(draw):
    b, grid, cell = draw(st.integers(0, 2)), draw(st.integers(1, 2)), draw(st.integers(1, 3))
    h = grid * cell
    dtype = draw(st.sampled_from(LABEL_DTYPES))
    pool = [v for v in (0, 1, 2, 255, 65535, 2**31, 2**32 - 1) if v <= torch.iinfo(dtype).max]
    values = draw(st.lists(st.sampled_from(pool), min_size=b * h * h, max_size=b * h * h))
    labels = torch.tensor(values, dtype=torch.int64).view(b, h, h)
    return labels, dtype, grid


@pytest.mark.parametrize("backend", ["reference", "chunked"] + [b for b in ("cpu",) if b in BACKENDS])
def test_cross_patch_loss_matches_the_reference_backend(backend):
    @SETTINGS
    @given(label_maps(), st.sampled_from([("paper", "pixel-patch"), ("official", "pixel-patch"),
                                          ("paper", "pixel"), ("paper", "random")]),
           st.booleans(), st.integers(0, 2**31 - 1))
    def check(maps, mode, compact, seed):
        labels, dtype, grid = maps
        gen = torch.Generator().manual_seed(seed)
        b, h, w = labels.shape
        fs = torch.randn(b, 3, h, w, generator=gen, dtype=torch.float64, requires_grad=True)
        ft = torch.randn(b, 3, h, w, generator=gen, dtype=torch.float64)
        yt = labels.flip(-1)
        kw = dict(grid=grid, fdp=0.6, bdp=0.4, semantics=mode[0], sampling=mode[1])
        want = cdcl_ops.cross_patch_infonce(fs, ft, labels, yt,
                                            options=CrossPatchOptions(backend="reference", **kw))
        (want_grad,) = torch.autograd.grad(want, fs) if want.requires_grad else (torch.zeros_like(fs),)
        got = cdcl_ops.cross_patch_infonce(fs, ft, labels.to(dtype), yt.to(dtype),
                                           options=CrossPatchOptions(backend=backend, compact=compact, **kw))
        (got_grad,) = torch.autograd.grad(got, fs) if got.requires_grad else (torch.zeros_like(fs),)
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(got_grad, want_grad, rtol=1e-9, atol=1e-10)

    check()


@SETTINGS
@given(st.integers(0, 3), st.lists(st.integers(0, 5), min_size=1, max_size=8), st.integers(0, 8),
       st.integers(0, 2**31 - 1))
def test_feature_bank_state_round_trip_at_any_point(memory, sizes, cut, seed):
    """Pushes of 0..5 rows (an empty first push included), a state_dict round trip after `cut` of
    them, then both banks go on identically; every loaded cursor is in range."""
    gen = torch.Generator().manual_seed(seed)
    lazy = seed % 2 == 0  # sized by its first non-empty push, which later pushes may not exceed
    first = next((n for n in sizes if n), 0)
    sizes = [min(n, first) for n in sizes] if lazy else sizes
    batches = [(torch.randn(n, 2, generator=gen),
                torch.randint(0, 3, (n,), generator=gen).to(torch.uint8) if n % 2
                else torch.randint(-1, 3, (n,), generator=gen)) for n in sizes]
    a = FeatureBank(memory=memory) if lazy or not max(sizes) else \
        FeatureBank(dim=2, capacity=max(sizes), memory=memory)
    for feats, labels in batches[:cut]:
        a.push(feats, labels)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = FeatureBank(memory=memory)
    b.load_state_dict(torch.load(buf))
    assert 0 <= int(b.cursor) <= memory
    for feats, labels in batches[cut:]:
        a.push(feats, labels)
        b.push(feats, labels)
    for t, u in zip(a.tensors(), b.tensors()):
        assert torch.equal(t, u)


@pytest.mark.parametrize("backend", ["torch"] + [b for b in ("cpu", "triton") if b in BACKENDS])
def test_patch_counts_of_any_integer_label_dtype(backend):
    @SETTINGS
    @given(label_maps(), st.sampled_from([0, 1, 2, 255, 65535, 2**32 - 1, -1, -2**63, 2**64]))
    def check(maps, fg):
        labels, dtype, grid = maps
        b, h, w = labels.shape
        cell = h // grid
        want = torch.tensor([[[sum(int(labels[i, r, c]) == fg for r in range(gy * cell, (gy + 1) * cell)
                                   for c in range(gx * cell, (gx + 1) * cell)) for gx in range(grid)]
                              for gy in range(grid)] for i in range(b)], dtype=torch.int32).view(b, grid, grid)
        _, counts = cdcl_ops.patch_foreground_scores(labels.to(dtype), grid, fg, backend=backend)
        assert torch.equal(counts, want)

    check()
