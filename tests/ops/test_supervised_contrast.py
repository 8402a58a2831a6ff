"""supervised_contrast on every backend that takes it, against the float64 reference (fresh random
inputs: both denominators, banks and the in-batch form, groups, inactive rows, rows without
positives, paired positives, odd shapes, empty inputs), its edge behaviour and input checks, and
its torch.library integration (opcheck, gradcheck, torch.compile, the no-N x M memory bound)."""
import pytest
import torch

import cdcl_ops
from cdcl_ops._validate import canonical_masks
from cdcl_ops.backends import registry
from memory import LiveTensorBytes
from supcon_helpers import (
    BACKENDS,
    LOSS,
    STREAMING,
    assert_close_to_reference,
    assert_matches,
    loss_and_grads,
    make_inputs,
)

DENOMINATORS = ["all", "negatives"]
# ragged against every tile: the chunked backend's (chunk 7 below), the C++ kernels' (64 x 256)
SHAPES = [(1, 1, 1), (5, 3, 2), (37, 53, 16), (130, 300, 33)]
TRITON_SHAPES = [(5, 3, 2), (19, 37, 8)]  # the interpreter is slow


def _dtype(backend):
    return torch.float32 if backend == "triton" else torch.float64


def _options(backend):
    return dict(chunk_size=7) if backend == "chunked" else {}  # several chunks per row


def _cases(backend):
    shapes = TRITON_SHAPES if backend == "triton" else SHAPES
    return [(s, bank, pos) for s in shapes for bank in (True, False) for pos in (False, True)]


@pytest.mark.parametrize("denominator", DENOMINATORS)
@pytest.mark.parametrize("backend", STREAMING)
def test_matches_the_float64_reference(backend, denominator):
    for i, (shape, bank, positive) in enumerate(_cases(backend)):
        for groups in (True, False):
            inputs = make_inputs(*shape, seed=i, bank=bank, positive=positive, groups=groups)
            assert_close_to_reference(inputs, backend, _dtype(backend), denominator=denominator,
                                      temperature=0.2, options=_options(backend))


@pytest.mark.parametrize("backend", [b for b in STREAMING if b != "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_features(backend, dtype):
    inputs = make_inputs(70, 290, 24, seed=3, positive=True)
    for denominator in DENOMINATORS:
        assert_close_to_reference(inputs, backend, dtype, denominator=denominator)


@pytest.mark.skipif("cpu" not in STREAMING, reason="cdcl_ops._C not built")
@pytest.mark.parametrize("products", ["auto", "blas"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_both_product_paths(products, dtype, monkeypatch):
    """Our AVX-512 products where the CPU has them ("auto"), and BLAS, across the kernels' tiles
    (64 x 256, both passes) with ragged ends."""
    monkeypatch.setenv("CDCL_OPS_CPU_PRODUCTS", products)
    for bank, shape in ((True, (130, 517, 40)), (False, (300, 0, 17))):
        inputs = make_inputs(*shape, seed=6, bank=bank, positive=True, n_labels=4)
        for denominator in DENOMINATORS:
            assert_close_to_reference(inputs, "cpu", dtype, denominator=denominator)


@pytest.mark.parametrize("backend", STREAMING)
def test_many_groups_and_a_detached_bank(backend):
    # G > 64: the C++ kernels' table lookup instead of bit sets (Triton: beyond 32)
    inputs = make_inputs(21, 45, 4, seed=4, n_groups=70, n_labels=2)
    inputs["bank_groups"][::3] = 69
    for denominator in DENOMINATORS:
        assert_close_to_reference(inputs, backend, _dtype(backend), bank_grad=False,
                                  denominator=denominator)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n,m", [(0, 9), (7, 0), (0, 0)])
def test_empty_inputs(backend, n, m):
    for bank in (True, False):
        inputs = make_inputs(n, m, 6, dtype=_dtype(backend), positive=True, bank=bank)
        for denominator in DENOMINATORS:
            loss, grads = loss_and_grads(inputs, backend, denominator=denominator)
            assert loss.shape == (n,)
            if bank or n == 0:  # no bank row: nobody has a positive but its pair
                assert torch.all(loss == 0)
                mean = cdcl_ops.supervised_contrast(**inputs, denominator=denominator, backend=backend)
                assert mean.item() == 0.0
            for g in grads:
                assert g is None or torch.all(torch.isfinite(g))


def _without_positives(backend):
    """Rows 0-3 have positives and negatives, 4-7 negatives only, 8-11 positives only, 12-13 no
    candidate at all (their group sees no bank group), 14-15 are inactive (label, group)."""
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(16, 4, generator=gen, dtype=torch.float64).to(_dtype(backend))
    k = torch.randn(12, 4, generator=gen, dtype=torch.float64).to(_dtype(backend))
    q_lab = torch.tensor([0] * 4 + [2] * 4 + [1] * 4 + [0, 0] + [-1, 0])
    q_grp = torch.tensor([0] * 8 + [2] * 4 + [1, 1] + [0, -1])
    # group 0 sees bank group 0 (labels 0 and 1, one inactive row), group 2 only bank group 2
    # (label 1 alone), group 1 nothing
    k_lab = torch.tensor([0, 0, 1, 1, 1, 0, 1, 0, 1, -1, 1, 1])
    k_grp = torch.tensor([0] * 10 + [2, 2])
    table = torch.tensor([[True, False, False], [False, False, False], [False, False, True]])
    return dict(query=q, query_labels=q_lab, bank=k, bank_labels=k_lab, query_groups=q_grp,
                bank_groups=k_grp, group_table=table)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("denominator", DENOMINATORS)
def test_rows_without_positives_are_exactly_zero(backend, denominator):
    inputs = _without_positives(backend)
    loss, (dq, _, _) = loss_and_grads(inputs, backend, denominator=denominator)
    assert not torch.isnan(loss).any()
    assert torch.all(loss[4:8] == 0) and torch.all(dq[4:8] == 0)  # negatives only
    assert torch.all(loss[12:] == 0) and torch.all(dq[12:] == 0)  # nothing, inactive
    assert torch.all(loss[:4] > 0)
    if denominator == "negatives":  # positives only: each against nothing, -log 1
        assert torch.all(loss[8:12] == 0) and torch.all(dq[8:12] == 0)
    else:  # LSE over the positives minus their mean: > 0 unless they tie
        assert torch.all(loss[8:12] > 0)
    # "mean" is over the queries with a positive: rows 0-3 and 8-11
    mean = cdcl_ops.supervised_contrast(**inputs, denominator=denominator, backend=backend)
    torch.testing.assert_close(mean, loss.sum() / 8)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_positive_anywhere_gives_zero_attached(backend):
    inputs = make_inputs(10, 14, 4, dtype=_dtype(backend), groups=False)
    inputs["bank_labels"] = torch.full((14,), 5)
    inputs["query"].requires_grad_()
    loss = cdcl_ops.supervised_contrast(**inputs, backend=backend)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.all(inputs["query"].grad == 0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("denominator", DENOMINATORS)
def test_reductions_agree(backend, denominator):
    inputs = make_inputs(23, 31, 5, dtype=_dtype(backend), positive=True)
    args = dict(inputs, denominator=denominator, backend=backend)
    per_q = cdcl_ops.supervised_contrast(**args, reduction="none")
    masks = canonical_masks(inputs["query_labels"], inputs["bank_labels"], inputs["query_groups"],
                            inputs["bank_groups"], inputs["group_table"])
    # every active query has its paired positive here: the mean is over the active queries
    torch.testing.assert_close(cdcl_ops.supervised_contrast(**args), per_q.sum() / (masks.q_grp >= 0).sum())
    torch.testing.assert_close(cdcl_ops.supervised_contrast(**args, reduction="sum"), per_q.sum())


@pytest.mark.parametrize("backend", BACKENDS)
def test_by_hand(backend):
    # one query [1, 0], bank: a positive at 60 degrees, a negative at 90 and one at 180
    dtype = _dtype(backend)
    q = torch.tensor([[1.0, 0.0]], dtype=dtype)
    k = torch.tensor([[0.5, 3**0.5 / 2], [0.0, 1.0], [-1.0, 0.0], [1.0, 0.0]], dtype=dtype)
    k_lab = torch.tensor([0, 1, 1, -1])  # the last row is inactive
    p = torch.tensor([[1.0, 1.0]], dtype=dtype)  # the paired positive: 45 degrees
    tau = 0.5
    s_p, s_n, s_pair = 0.5 / tau, torch.tensor([0.0, -1.0]) / tau, 2**-0.5 / tau
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else {}
    kw = dict(temperature=tau, backend=backend)
    got = cdcl_ops.supervised_contrast(q, torch.tensor([0]), k, k_lab, **kw)
    want = torch.logsumexp(torch.tensor([s_p, *s_n], dtype=torch.float64), 0) - s_p
    torch.testing.assert_close(got.double(), want, **tol)
    got = cdcl_ops.supervised_contrast(q, torch.tensor([0]), k, k_lab, positive=p, **kw)
    lse = torch.logsumexp(torch.tensor([s_pair, s_p, *s_n], dtype=torch.float64), 0)
    torch.testing.assert_close(got.double(), lse - (s_p + s_pair) / 2, **tol)
    got = cdcl_ops.supervised_contrast(q, torch.tensor([0]), k, k_lab, positive=p,
                                       denominator="negatives", **kw)
    neg = torch.logsumexp(s_n.double(), 0)
    terms = [torch.logaddexp(torch.tensor(s, dtype=torch.float64), neg) - s for s in (s_p, s_pair)]
    torch.testing.assert_close(got.double(), sum(terms) / 2, **tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_in_batch_form_excludes_only_the_row_itself(backend):
    """bank=None is the bank of the queries with row i left out of query i's sets: a bank of the
    same rows with each query's own copy made inactive for it is the same loss."""
    inputs = make_inputs(9, 0, 3, dtype=_dtype(backend), bank=False, groups=False, n_labels=2)
    got = cdcl_ops.supervised_contrast(**inputs, backend=backend, reduction="none")
    for i in range(9):
        bank_labels = inputs["query_labels"].clone()
        bank_labels[i] = -1
        one = cdcl_ops.supervised_contrast(inputs["query"][i:i + 1], inputs["query_labels"][i:i + 1],
                                           inputs["query"], bank_labels, backend=backend, reduction="none")
        torch.testing.assert_close(got[i:i + 1], one)


@pytest.mark.parametrize("backend", STREAMING)
def test_no_grad_evaluation(backend):
    inputs = make_inputs(15, 22, 8, dtype=torch.float32, positive=True)
    for denominator in DENOMINATORS:
        with torch.no_grad():
            got = cdcl_ops.supervised_contrast(**inputs, denominator=denominator, backend=backend,
                                               reduction="none")
        want = cdcl_ops.supervised_contrast(**inputs, denominator=denominator, backend="reference",
                                            reduction="none")
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", STREAMING)
def test_bank_gradient_is_deterministic(backend):
    inputs = make_inputs(70, 130, 8, dtype=torch.float32, positive=True)
    runs = [loss_and_grads(inputs, backend, denominator="negatives")[1] for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


# ------------------------------------------------------------------ inputs at the edges
def test_int64_and_unsigned_labels_keep_their_identity():
    inputs = make_inputs(20, 30, 4, groups=False)
    want = loss_and_grads(inputs, "reference")
    wide = dict(inputs)
    # labels 0, 1, 2 become values that a narrowing cast would merge or make negative
    big = torch.tensor([2**40, 2**40 + 2**32, 2**63 - 1])
    wide["query_labels"] = torch.where(inputs["query_labels"] >= 0, big[inputs["query_labels"].clamp(min=0)], -5)
    wide["bank_labels"] = torch.where(inputs["bank_labels"] >= 0, big[inputs["bank_labels"].clamp(min=0)], -5)
    for backend in STREAMING:
        assert_matches(loss_and_grads(wide, backend, dtype=_dtype(backend)), want, _dtype(backend), inputs)
    unsigned = dict(inputs)
    for name in ("query_labels", "bank_labels"):
        # uint32 holds no -1: the inactive rows become label 7, another class
        unsigned[name] = torch.where(inputs[name] >= 0, inputs[name] + 2**31, 7).to(torch.uint32)
    ref = dict(inputs)
    for name in ("query_labels", "bank_labels"):
        ref[name] = torch.where(inputs[name] >= 0, inputs[name], 7)
    want = loss_and_grads(ref, "reference")
    for backend in STREAMING:
        assert_matches(loss_and_grads(unsigned, backend, dtype=_dtype(backend)), want, _dtype(backend), inputs)


@pytest.mark.parametrize("backend", STREAMING)
@pytest.mark.parametrize("where", ["a_bank_row", "a_query_row"])
def test_nan_rows_give_nan_where_the_reference_does(backend, where):
    # groups [[T, T], [F, T]]: queries of group 1 do not see bank group 0, where the NaN row is
    inputs = make_inputs(20, 30, 6, positive=True)
    inputs["query_groups"][:6] = 1
    if where == "a_bank_row":
        inputs["bank"][7] = float("nan")
        inputs["bank_labels"][7], inputs["bank_groups"][7] = 1, 0
    else:
        inputs["query"][9] = float("nan")
        inputs["query_labels"][9], inputs["query_groups"][9] = 0, 0
    for denominator in DENOMINATORS:
        want, _ = loss_and_grads(inputs, "reference", denominator=denominator)
        got, _ = loss_and_grads(inputs, backend, dtype=_dtype(backend), denominator=denominator)
        assert torch.isnan(want).any() and not torch.isnan(want).all()
        assert torch.equal(torch.isnan(got), torch.isnan(want))
        ok = ~torch.isnan(want)
        torch.testing.assert_close(got[ok].double(), want[ok], rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("backend", STREAMING)
@pytest.mark.parametrize("tau", [1e-2, 1e-4])
def test_small_temperatures(backend, tau):
    inputs = make_inputs(40, 70, 16, seed=1, positive=True)
    for denominator in DENOMINATORS:
        want = loss_and_grads(inputs, "reference", temperature=tau, denominator=denominator)
        got = loss_and_grads(inputs, backend, dtype=torch.float32, temperature=tau, denominator=denominator)
        # fp32 scores of size 1 / tau: the loss to ~1e-7 / tau absolute
        torch.testing.assert_close(got[0].double(), want[0], rtol=1e-5, atol=max(1e-5, 2e-7 / tau))
        tol = max(2e-5, 3e-8 / tau)
        for name, g, r in zip(("query", "positive", "bank"), got[1], want[1]):
            scale = r.abs().max()
            torch.testing.assert_close(g.double() / scale, r / scale, rtol=tol, atol=tol,
                                       msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tau", [9.99e-5, 0.0, float("inf"), float("nan"), True])
def test_temperature_out_of_range_is_refused(backend, tau):
    with pytest.raises(ValueError, match="^temperature: "):
        cdcl_ops.supervised_contrast(**make_inputs(5, 6, 3), temperature=tau, backend=backend)
    with pytest.raises(ValueError, match="^temperature: "):
        cdcl_ops.SupervisedContrast(temperature=tau)


def _good():
    return make_inputs(6, 8, 4, dtype=torch.float32, positive=True)


BAD = [
    ("query", lambda a: a.update(query=a["query"][0])),
    ("query", lambda a: a.update(query=a["query"].long())),
    ("positive", lambda a: a.update(positive=a["positive"][:5])),
    ("positive", lambda a: a.update(positive=a["positive"].double())),
    ("bank", lambda a: a.update(bank=a["bank"][:, :3])),
    ("bank_labels", lambda a: a.update(bank_labels=None)),
    ("bank_labels", lambda a: a.update(bank=None, bank_groups=None)),
    ("bank_groups", lambda a: a.update(bank=None, bank_labels=None)),
    ("query_groups, group_table", lambda a: a.update(bank=None, bank_labels=None, bank_groups=None,
                                                     group_table=None)),
    ("query_labels", lambda a: a.update(query_labels=a["query_labels"][:5])),
    ("query_labels", lambda a: a.update(query_labels=a["query_labels"].float())),
    ("bank_labels", lambda a: a.update(bank_labels=a["bank_labels"][None])),
    ("query_groups", lambda a: a.update(query_groups=None)),
    ("group_table", lambda a: a.update(group_table=torch.ones(2, 3, dtype=torch.bool))),
    ("query_groups", lambda a: a["query_groups"].__setitem__(0, 2)),
    ("bank_groups", lambda a: a["bank_groups"].__setitem__(1, 5)),
    ("temperature", lambda a: a.update(temperature=-1)),
    ("reduction", lambda a: a.update(reduction="avg")),
    ("denominator", lambda a: a.update(denominator="positives")),
    ("backend", lambda a: a.update(backend="nope")),
    ("chunk_size", lambda a: a.update(chunk_size=-1)),
    ("precision", lambda a: a.update(precision="fp8")),
]


@pytest.mark.parametrize("name,mutate", BAD)
def test_bad_input_names_the_argument(name, mutate):
    args = _good()
    mutate(args)
    with pytest.raises(ValueError, match=f"^{name}"):
        cdcl_ops.supervised_contrast(**args)


def test_check_finite():
    args = _good()
    args["positive"][3, 1] = float("nan")
    with pytest.raises(ValueError, match="^positive"):
        cdcl_ops.supervised_contrast(**args, check_finite=True)


def test_the_cuda_backend_refuses_the_loss_by_name():
    with pytest.raises(ValueError, match="^backend: the cuda backend does not take the supervised_contrast loss"):
        cdcl_ops.supervised_contrast(**_good(), backend="cuda")
    assert not registry.get("cuda").takes(LOSS) and registry.get("cuda").takes("masked_infonce")
    assert "cuda" not in cdcl_ops.available_backends("cuda", loss=LOSS)
    with pytest.raises(ValueError, match="^loss: "):
        cdcl_ops.available_backends("cpu", loss="supcon")


def test_registry_says_which_losses_each_backend_takes():
    takes = {name: registry.get(name).losses for name in registry.names()}
    assert takes["cuda"] == ("masked_infonce",)
    assert {name for name, losses in takes.items() if LOSS in losses} == {"reference", "chunked", "cpu", "triton"}
    assert all("masked_infonce" in losses for losses in takes.values())
    # the default for the loss is the default for masked_infonce wherever that one takes it
    assert registry.default("cpu", loss=LOSS) == registry.default("cpu")
    # the default for the loss is the default for masked_infonce wherever that one takes it
    assert registry.default("meta", loss=LOSS) == "chunked"
    with pytest.raises(ValueError, match="lacks its forward or bank-gradient entry point"):
        registry.Backend("half", forward=registry.get("chunked").forward,
                         bank_grad=registry.get("chunked").bank_grad, losses=("masked_infonce", LOSS))


def test_module_matches_function():
    inputs = make_inputs(11, 17, 6, dtype=torch.float32, seed=5, positive=True)
    module = cdcl_ops.SupervisedContrast(denominator="negatives", temperature=0.2, backend="chunked")
    torch.testing.assert_close(module(**inputs), cdcl_ops.supervised_contrast(
        **inputs, denominator="negatives", temperature=0.2, backend="reference"))
    assert "denominator='negatives'" in repr(module) and "temperature=0.2" in repr(module)
    with pytest.raises(ValueError, match="^denominator: "):
        cdcl_ops.SupervisedContrast(denominator="mean")


# ------------------------------------------------------------------ torch.library integration
def _op_args(backend, dtype, bank=True, positive=True, denominator="all", need_u=True):
    inp = make_inputs(23, 37, 6, dtype=dtype, seed=11, bank=bank, positive=positive)
    masks = canonical_masks(inp["query_labels"], inp.get("bank_labels", inp["query_labels"]),
                            inp["query_groups"], inp.get("bank_groups", inp["query_groups"]),
                            inp["group_table"])
    feats = [inp[n].requires_grad_() if n in inp else None for n in ("query", "positive", "bank")]
    return (*feats, *masks, 5.0, denominator, backend, 8 if backend == "chunked" else 0,
            "ieee" if backend == "triton" else "auto", need_u)


@pytest.mark.parametrize("backend", STREAMING)
@pytest.mark.parametrize("denominator", DENOMINATORS)
def test_opcheck_forward(backend, denominator):
    # "all" with a bank and paired positives, "negatives" in the in-batch form without
    bank = positive = denominator == "all"
    torch.library.opcheck(torch.ops.cdcl_ops.supcon_fwd,
                          _op_args(backend, torch.float32, bank, positive, denominator))


@pytest.mark.parametrize("backend", STREAMING)
def test_opcheck_bank_grad(backend):
    q, p, k, ql, qg, kl, kg, table, inv_tau, den, _, chunk, prec, _ = _op_args(backend, torch.float32)
    out = torch.ops.cdcl_ops.supcon_fwd(q, p, k, ql, qg, kl, kg, table, inv_tau, den, backend, chunk,
                                        prec, False)
    lse, inv_q, inv_k = out[1], out[6], out[8]
    gen = torch.Generator().manual_seed(0)
    gs_lse, gs_pos = torch.rand(q.shape[0], generator=gen), torch.rand(q.shape[0], generator=gen)
    torch.library.opcheck(torch.ops.cdcl_ops.supcon_bank_grad,
                          (q.detach(), k.detach(), inv_q, inv_k, ql, qg, kl, kg, table, lse, gs_lse,
                           gs_pos, inv_tau, den, backend, chunk, prec))


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
@pytest.mark.parametrize("bank", [True, False])
def test_gradcheck_float64(backend, bank):
    inputs = make_inputs(9, 13, 4, seed=7, bank=bank, positive=True)
    names = [n for n in ("query", "positive", "bank") if n in inputs]
    feats = [inputs[n].clone().requires_grad_() for n in names]

    def f(*xs):
        args = dict(inputs, **dict(zip(names, xs)))
        return torch.cat([cdcl_ops.supervised_contrast(**args, denominator=den, backend=backend,
                                                       reduction="none", **_options(backend))
                          for den in DENOMINATORS])

    assert torch.autograd.gradcheck(f, feats, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", STREAMING)
def test_compile_fullgraph_matches_eager(backend):
    torch._dynamo.reset()
    inputs = make_inputs(20, 33, 8, dtype=torch.float32, seed=2, positive=True)

    def loss_fn(q, p, k):
        with_bank = sum(cdcl_ops.supervised_contrast(**dict(inputs, query=q, positive=p, bank=k),
                                                     denominator=den, backend=backend, temperature=0.2)
                        for den in DENOMINATORS)
        # the in-batch form without paired positives: both optional tensors of the op are None
        in_batch = cdcl_ops.supervised_contrast(k, inputs["bank_labels"], backend=backend)
        return with_bank + in_batch

    results = []
    for fn in (loss_fn, torch.compile(loss_fn, fullgraph=True)):
        feats = [inputs[n].clone().requires_grad_() for n in ("query", "positive", "bank")]
        loss = fn(*feats)
        loss.backward()
        results.append([loss.detach()] + [f.grad for f in feats])
    for eager, comp in zip(*results):
        torch.testing.assert_close(comp, eager, rtol=1e-5, atol=1e-6)


def _peak_and_saved(inputs, backend, denominator, **options):
    feats = [inputs[k] for k in ("query", "positive", "bank") if k in inputs]
    for f in feats:
        f.requires_grad_()
    input_ptrs = {f.untyped_storage().data_ptr() for f in feats}
    saved = []

    def pack(t):
        if t.untyped_storage().data_ptr() not in input_ptrs:
            saved.append(t.untyped_storage().nbytes())
        return t

    tracker = LiveTensorBytes(exclude=feats)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), tracker:
        cdcl_ops.supervised_contrast(**inputs, denominator=denominator, backend=backend,
                                     **options).backward()
    assert all(f.grad is not None for f in feats)
    return tracker.peak, sum(saved)


@pytest.mark.parametrize("backend", STREAMING)
@pytest.mark.parametrize("denominator", DENOMINATORS)
@pytest.mark.parametrize("bank", [True, False])
def test_no_n_by_m_buffer(backend, denominator, bank):
    """Kept for backward beyond the inputs: u (N x D) and per-row vectors; alive at the peak: the
    gradients, u, per-row vectors and the backend's tiles, never an N x M buffer."""
    n, m, d = (96, 160, 8) if backend == "triton" else (2048, 8192, 16)
    inputs = make_inputs(n, m, d, dtype=torch.float32, seed=5, positive=True, bank=bank)
    m = m if bank else n
    chunk = 128
    peak, saved = _peak_and_saved(inputs, backend, denominator,
                                  **(dict(chunk_size=chunk) if backend == "chunked" else {}))
    rows = 12 * (n + m) * 4  # labels, groups, the forward's five vectors, inverse norms
    assert saved <= n * d * 4 + rows, saved
    # the chunked backend's query tile x bank chunk buffers, a few at a time (the other backends'
    # tiles live in the kernels, not in torch tensors)
    tiles = 12 * n * chunk * 4 if backend == "chunked" else 0
    assert peak <= (4 * n + 2 * m) * d * 4 + rows + tiles, (peak, n * m * 4)
    assert peak < n * m * 4 / 2 or backend == "triton"  # the shapes above: far below N x M
