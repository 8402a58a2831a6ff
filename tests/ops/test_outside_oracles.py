"""masked_infonce against implementations we did not write: FlexAttention's eager forward (the
log-sum-exp of attention with the bank as keys) and pytorch-metric-learning's NTXentLoss given the
pairs of design.md §2 explicitly. Both oracles build J from labels, groups and the table here, from
§2's text, not from cdcl_ops' own mask code: an error the library's backends share (they share
`canonical_masks` and one autograd formula) shows up against them.

Inputs (small, fast): raw rows of random norms, groups with a table that has an all-False row
(queries without any negative), inactive queries (negative label, negative group) and inactive
bank rows (negative label, negative group).
"""
import pytest
import torch
import torch.nn.functional as F

import cdcl_ops

N, M, D, G = 37, 53, 16, 3
# group 2's queries have no allowed bank group: every one of them is a row without a negative
TABLE = torch.tensor([[False, True, True], [True, False, True], [False, False, False]])
BACKENDS = cdcl_ops.available_backends("cpu")
TOL = {torch.float32: 1e-6, torch.float64: 1e-12}
# FlexAttention's eager mode warns that it is unfused on every first call; that is the point here
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def _skip_unsupported(backend, dtype):
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the triton backend takes no float64 features")


def _inputs(dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rows(n):
        norms = torch.exp(torch.randn(n, 1, generator=gen, dtype=torch.float64))  # far from 1
        return (torch.randn(n, D, generator=gen, dtype=torch.float64) * norms).to(dtype)

    q_lab = torch.randint(0, 3, (N,), generator=gen)
    k_lab = torch.randint(0, 3, (M,), generator=gen)
    q_grp = torch.randint(0, G, (N,), generator=gen)
    k_grp = torch.randint(0, G, (M,), generator=gen)
    q_lab[:3], q_grp[3:6] = -1, -1  # inactive queries
    q_grp[6:9] = 2  # rows without a negative (the table's row 2 is all False)
    k_lab[:4], k_grp[4:8] = -1, -1  # bank rows that are nobody's negative
    return dict(query=rows(N), positive=rows(N), bank=rows(M), query_labels=q_lab,
                bank_labels=k_lab, query_groups=q_grp, bank_groups=k_grp, group_table=TABLE)


def _active(inp):
    """§2: a query with a negative label or a negative group is inactive."""
    return (inp["query_labels"] >= 0) & (inp["query_groups"] >= 0)


def _negative(inp, i, j):
    """§2's J[i, j] for index tensors i, j (any broadcastable shapes)."""
    q_lab, k_lab = inp["query_labels"][i], inp["bank_labels"][j]
    q_grp, k_grp = inp["query_groups"][i], inp["bank_groups"][j]
    allowed = inp["group_table"][q_grp.clamp(min=0), k_grp.clamp(min=0)]
    return (k_lab >= 0) & (q_lab != k_lab) & (k_grp >= 0) & allowed


def _dense_j(inp):
    return _negative(inp, torch.arange(N)[:, None], torch.arange(M)[None, :])


def test_the_inputs_have_every_kind_of_row():
    inp = _inputs(torch.float64)
    active, j = _active(inp), _dense_j(inp)
    assert (~active).sum() >= 6
    assert (active & ~j.any(1)).sum() >= 3  # active rows without a negative
    assert (active & j.any(1)).sum() >= 15
    assert (~j.any(0)).sum() >= 8  # bank rows that are nobody's negative


def _ours(inp, backend, reduction, temperature, bank_grad=True):
    leaves = {k: inp[k].detach().clone().requires_grad_(k != "bank" or bank_grad)
              for k in ("query", "positive", "bank")}
    loss = cdcl_ops.masked_infonce(**{**inp, **leaves}, temperature=temperature, reduction=reduction,
                                   backend=backend)
    return loss, leaves


# ---- FlexAttention ---------------------------------------------------------------------------


def _flex_lse(inp, temperature):
    """LSE_i of the scores s_ij = qh_i . kh_j / tau over J's bank rows, by FlexAttention's eager
    forward: the unit bank as keys and values, a block mask from §2's J; -inf where a row has no
    negative."""
    fa = pytest.importorskip("torch.nn.attention.flex_attention")
    block_mask = fa.create_block_mask(lambda b, h, i, j: _negative(inp, i, j), None, None, N, M,
                                      device="cpu")
    qh = F.normalize(inp["query"], dim=1)[None, None]
    kh = F.normalize(inp["bank"], dim=1)[None, None]
    if hasattr(fa, "AuxRequest"):
        _, aux = fa.flex_attention(qh, kh, kh, block_mask=block_mask, scale=1.0 / temperature,
                                   return_aux=fa.AuxRequest(lse=True))
        return aux.lse[0, 0]
    _, lse = fa.flex_attention(qh, kh, kh, block_mask=block_mask, scale=1.0 / temperature,
                               return_lse=True)
    return lse[0, 0]


def _flex_per_query(inp, temperature):
    lse = _flex_lse(inp, temperature)
    s_pos = (F.normalize(inp["query"], dim=1) * F.normalize(inp["positive"], dim=1)).sum(1) / temperature
    per_q = torch.logaddexp(s_pos, lse) - s_pos  # a row without negatives: LSE -inf, loss 0
    return torch.where(_active(inp), per_q, torch.zeros_like(per_q)), lse


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_flex_lse_is_minus_inf_exactly_where_a_row_has_no_negative(dtype):
    inp = _inputs(dtype)
    with torch.no_grad():
        per_q, lse = _flex_per_query(inp, 0.1)
    assert torch.equal(torch.isneginf(lse), ~_dense_j(inp).any(1))
    assert not per_q.isnan().any()
    assert (per_q[_active(inp) & ~_dense_j(inp).any(1)] == 0).all()


@pytest.mark.parametrize("temperature", [0.1, 0.05])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_infonce_matches_flex_attention(backend, dtype, temperature):
    _skip_unsupported(backend, dtype)
    inp = _inputs(dtype)
    with torch.no_grad():
        expected, _ = _flex_per_query(inp, temperature)
        got = cdcl_ops.masked_infonce(**inp, temperature=temperature, reduction="none", backend=backend)
        mean = cdcl_ops.masked_infonce(**inp, temperature=temperature, backend=backend)
    assert got.dtype == dtype
    tol = TOL[dtype] * expected.abs().max().item()
    torch.testing.assert_close(got, expected, rtol=0, atol=tol)
    assert (got[~_active(inp)] == 0).all() and (got[~_dense_j(inp).any(1)] == 0).all()
    torch.testing.assert_close(mean, expected.sum() / _active(inp).sum(), rtol=TOL[dtype], atol=0)


# ---- pytorch-metric-learning's NTXentLoss -----------------------------------------------------


def _pairs(inp):
    """NTXentLoss's indices into ref_emb = cat(positive, bank): one positive pair (i, i) per active
    query, a negative pair (i, N + j) wherever J[i, j] for an active query i. Inactive queries get
    no pair at all, so they are out of its mean as they are out of ours; an active query without
    a negative keeps its positive pair, and its loss -log(e+ / e+) = 0 counts in both means."""
    active = _active(inp)
    a1 = torch.nonzero(active).flatten()
    a2, n = torch.nonzero(_dense_j(inp) & active[:, None], as_tuple=True)
    return a1, a1.clone(), a2, n + N


def _ntxent(inp, temperature, reducer=None):
    losses = pytest.importorskip("pytorch_metric_learning.losses")
    leaves = {k: inp[k].detach().clone().requires_grad_() for k in ("query", "positive", "bank")}
    kwargs = {} if reducer is None else dict(reducer=reducer)
    # NTXentLoss's temperature divides the cosine similarity, as tau does in s = cos / tau; its
    # default reducer (MeanReducer) averages over the positive pairs, i.e. over the active queries
    loss_fn = losses.NTXentLoss(temperature=temperature, **kwargs)
    out = loss_fn(leaves["query"], indices_tuple=_pairs(inp),
                  ref_emb=torch.cat([leaves["positive"], leaves["bank"]]))
    return out, leaves


def test_ntxent_pairs_are_large_enough_for_its_pair_path():
    # NTXentLoss returns 0 without computing when every index tensor has at most one entry, and
    # when there is no negative pair at all: these inputs are far from both
    a1, _, a2, _ = _pairs(_inputs(torch.float64))
    assert len(a1) > 1 and len(a2) > 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_infonce_per_query_matches_ntxent(backend, dtype):
    _skip_unsupported(backend, dtype)
    reducers = pytest.importorskip("pytorch_metric_learning.reducers")
    inp = _inputs(dtype)
    with torch.no_grad():
        out, _ = _ntxent(inp, 0.1, reducer=reducers.DoNothingReducer())
        got = cdcl_ops.masked_infonce(**inp, temperature=0.1, reduction="none", backend=backend)
    per_pair, (a1, p) = out["loss"]["losses"], out["loss"]["indices"]
    assert torch.equal(a1, torch.nonzero(_active(inp)).flatten()) and torch.equal(p, a1)
    tol = TOL[dtype] * per_pair.abs().max().item()
    torch.testing.assert_close(got[a1], per_pair, rtol=0, atol=tol)
    assert (got[~_active(inp)] == 0).all()


@pytest.mark.parametrize("temperature", [0.1, 0.05])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_infonce_mean_and_gradients_match_ntxent(backend, dtype, temperature):
    _skip_unsupported(backend, dtype)
    inp = _inputs(dtype)
    expected, theirs = _ntxent(inp, temperature)
    expected.backward()
    got, ours = _ours(inp, backend, "mean", temperature)
    got.backward()
    torch.testing.assert_close(got, expected, rtol=TOL[dtype], atol=0)
    for name in ("query", "positive", "bank"):
        g_ours, g_theirs = ours[name].grad, theirs[name].grad
        tol = 2 * TOL[dtype] * g_theirs.abs().max().item()  # two more roundings: the norms' backward
        torch.testing.assert_close(g_ours, g_theirs, rtol=0, atol=tol, msg=lambda m, n=name: f"d{n}: {m}")
    # inactive queries and bank rows that are nobody's negative get no gradient in either
    assert (ours["query"].grad[~_active(inp)] == 0).all()
    assert (ours["bank"].grad[~_dense_j(inp)[_active(inp)].any(0)] == 0).all()
