"""Empty inputs, rows without negatives, inactive queries, gradcheck, input validation."""
import pytest
import torch

import cdcl_ops
from helpers import PAPER_TABLE, loss_and_grads, make_inputs

BACKENDS = ["reference", "chunked", "triton"]


def _dtype(backend):
    return torch.float32 if backend == "triton" else torch.float64


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n,m", [(0, 9), (7, 0), (0, 0)])
def test_empty(backend, n, m):
    inputs = make_inputs(n, m, 6, dtype=_dtype(backend))
    mean = cdcl_ops.masked_infonce(**inputs, backend=backend)
    assert mean.item() == 0.0
    loss, grads = loss_and_grads(inputs, backend)
    assert loss.shape == (n,) and torch.all(loss == 0)
    for g, rows in zip(grads, (n, n, m)):
        assert g.shape[0] == rows and torch.all(g == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_without_negatives_are_exactly_zero(backend):
    inputs = make_inputs(12, 20, 5, dtype=_dtype(backend), groups=False)
    inputs["query_labels"] = torch.ones(12, dtype=torch.long)
    inputs["bank_labels"] = torch.ones(20, dtype=torch.long)   # same label: every key masked
    inputs["query_labels"][:4] = 0                           # these four keep their negatives
    loss, grads = loss_and_grads(inputs, backend)
    assert torch.all(loss[4:] == 0) and torch.all(loss[:4] > 0)
    assert torch.all(grads[0][4:] == 0) and torch.all(grads[1][4:] == 0)
    assert not torch.isnan(loss).any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_inactive_queries_mean_zero_and_attached(backend):
    inputs = make_inputs(10, 14, 4, dtype=_dtype(backend))
    inputs["query_groups"] = torch.full((10,), -1)
    q = inputs["query"].clone().requires_grad_()
    inputs["query"] = q
    loss = cdcl_ops.masked_infonce(**inputs, backend=backend)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.all(q.grad == 0)


@pytest.mark.parametrize("backend", ["reference", "chunked"])
@pytest.mark.parametrize("groups", [True, False])
def test_gradcheck_float64(backend, groups):
    inputs = make_inputs(9, 13, 4, groups=groups, seed=7)
    names = ("query", "positive", "bank")
    feats = [inputs[n].clone().requires_grad_() for n in names]

    def f(q, p, k):
        args = dict(inputs, query=q, positive=p, bank=k)
        options = dict(chunk_size=4) if backend == "chunked" else {}  # several chunks per row
        return cdcl_ops.masked_infonce(**args, backend=backend, reduction="none", **options)

    assert torch.autograd.gradcheck(f, feats, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", ["chunked", "triton"])
def test_no_grad_evaluation(backend):
    inputs = make_inputs(15, 22, 8, dtype=torch.float32)
    with torch.no_grad():
        got = cdcl_ops.masked_infonce(**inputs, backend=backend, reduction="none")
    torch.testing.assert_close(got, cdcl_ops.masked_infonce(**inputs, backend="reference",
                                                            reduction="none"), rtol=1e-5, atol=1e-6)


def _good():
    return make_inputs(6, 8, 4, dtype=torch.float32, seed=0)


BAD = [
    ("query", lambda a: a.update(query=a["query"][0])),
    ("query", lambda a: a.update(query=a["query"].long())),
    ("positive", lambda a: a.update(positive=a["positive"][:5])),
    ("positive", lambda a: a.update(positive=a["positive"].double())),
    ("bank", lambda a: a.update(bank=a["bank"][:, :3])),
    ("query_labels", lambda a: a.update(query_labels=a["query_labels"][:5])),
    ("query_labels", lambda a: a.update(query_labels=a["query_labels"].float())),
    ("bank_labels", lambda a: a.update(bank_labels=a["bank_labels"][None])),
    ("query_groups", lambda a: a.update(query_groups=None)),
    ("group_table", lambda a: a.update(group_table=torch.ones(2, 3, dtype=torch.bool))),
    ("query_groups", lambda a: a["query_groups"].__setitem__(0, 2)),
    ("bank_groups", lambda a: a["bank_groups"].__setitem__(1, 5)),
    ("temperature", lambda a: a.update(temperature=0.0)),
    ("temperature", lambda a: a.update(temperature=-1)),
    ("reduction", lambda a: a.update(reduction="avg")),
    ("backend", lambda a: a.update(backend="nope")),
    ("chunk_size", lambda a: a.update(chunk_size=-1)),
]


@pytest.mark.parametrize("name,mutate", BAD)
def test_bad_input_names_the_argument(name, mutate):
    args = _good()
    mutate(args)
    with pytest.raises(ValueError, match=name):
        cdcl_ops.masked_infonce(**args)


def test_check_finite():
    args = _good()
    args["bank"][3, 1] = float("nan")
    with pytest.raises(ValueError, match="bank"):
        cdcl_ops.masked_infonce(**args, check_finite=True)


def test_triton_rejects_float64_and_wide_features():
    with pytest.raises(ValueError, match="query"):
        cdcl_ops.masked_infonce(**make_inputs(4, 4, 3), backend="triton")
    with pytest.raises(ValueError, match="D <= 512"):
        cdcl_ops.masked_infonce(**make_inputs(4, 4, 513, dtype=torch.float32), backend="triton")


def test_module_matches_function():
    inputs = make_inputs(11, 17, 6, dtype=torch.float32, seed=5)
    module = cdcl_ops.MaskedInfoNCE(temperature=0.2, backend="chunked")
    torch.testing.assert_close(module(**inputs),
                               cdcl_ops.masked_infonce(**inputs, temperature=0.2, backend="reference"))
    assert "temperature=0.2" in repr(module)


def test_paper_table_semantics_by_hand():
    # one BDP query (group 0) with label 0: only FDB rows (group 1) with label != 0 are negatives
    q = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    p = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    k = torch.tensor([[0.0, 1.0], [1.0, 0.0], [-1.0, 0.0], [0.6, 0.8]], dtype=torch.float64)
    k_lab = torch.tensor([1, 1, 0, 1])
    k_grp = torch.tensor([1, 0, 1, 1])  # row 1 is in the wrong bank, row 2 has the same label
    tau = 0.5
    got = cdcl_ops.masked_infonce(q, p, k, torch.tensor([0]), k_lab, torch.tensor([0]), k_grp,
                                  PAPER_TABLE, temperature=tau, backend="chunked")
    pos = torch.exp(torch.tensor(1.0 / tau, dtype=torch.float64))
    neg = (torch.exp(torch.tensor(0.0 / tau, dtype=torch.float64))
           + torch.exp(torch.tensor(0.6 / tau, dtype=torch.float64)))
    torch.testing.assert_close(got, -torch.log(pos / (pos + neg)))
