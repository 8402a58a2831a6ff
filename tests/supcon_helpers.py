"""Random inputs and comparisons shared by the supervised contrastive loss tests."""
import torch

import cdcl_ops

LOSS = "supervised_contrast"
FEATURES = ("query", "positive", "bank")
# every backend of this process that takes the loss, the reference first
BACKENDS = cdcl_ops.available_backends("cpu", loss=LOSS)
STREAMING = [b for b in BACKENDS if b != "reference"]


def make_inputs(n, m, d, *, dtype=torch.float64, seed=0, bank=True, positive=False, groups=True,
                n_labels=3, n_groups=2, table=None):
    """Features of random norms, labels in [0, n_labels) with about 10% inactive (-1), optional
    groups (-1: inactive) and table, optional paired positives; bank=False: the in-batch form."""
    gen = torch.Generator().manual_seed(seed)

    def feats(rows):
        norms = torch.exp(torch.randn(rows, 1, generator=gen, dtype=torch.float64))
        return (torch.randn(rows, d, generator=gen, dtype=torch.float64) * norms).to(dtype)

    def labels(rows):
        lab = torch.randint(0, n_labels, (rows,), generator=gen)
        return torch.where(torch.rand(rows, generator=gen) < 0.1, -1, lab)

    out = dict(query=feats(n), query_labels=labels(n))
    if bank:
        out.update(bank=feats(m), bank_labels=labels(m))
    if positive:
        out["positive"] = feats(n)
    if groups:
        if table is None:
            table = torch.tensor([[True, True], [False, True]]) if n_groups == 2 \
                else torch.rand(n_groups, n_groups, generator=gen) < 0.6
        out["query_groups"] = torch.randint(-1, n_groups, (n,), generator=gen)
        out["group_table"] = table
        if bank:
            out["bank_groups"] = torch.randint(-1, n_groups, (m,), generator=gen)
    return out


def loss_and_grads(inputs, backend, *, dtype=None, reduction="none", bank_grad=True, **kw):
    """The loss and the gradients of its weighted sum with respect to the feature tensors given
    (None for those not given, or for a bank without grad)."""
    args = dict(inputs)
    leaves = {}
    for name in FEATURES:
        if name not in args:
            continue
        t = args[name].detach()
        t = (t.to(dtype) if dtype is not None else t).clone()
        args[name] = leaves[name] = t.requires_grad_(name != "bank" or bank_grad)
    loss = cdcl_ops.supervised_contrast(**args, backend=backend, reduction=reduction, **kw)
    weights = torch.rand(loss.shape, generator=torch.Generator().manual_seed(1234),
                         dtype=torch.float64).to(loss.dtype) if loss.dim() else torch.ones((), dtype=loss.dtype)
    if loss.requires_grad:
        (loss * weights).sum().backward()
    grads = [leaves[n].grad if n in leaves and leaves[n].requires_grad else None for n in FEATURES]
    return loss.detach(), grads


TOL = {torch.float64: (1e-9, 1e-10), torch.float32: (2e-5, 2e-5), torch.bfloat16: (2e-2, 2e-2),
       torch.float16: (1e-2, 1e-2)}


def assert_matches(got, want, dtype, inputs):
    """Loss and gradients against the oracle's; gradients as |x| grad (the gradient with respect
    to the unit row: normalisation amplifies rounding by 1 / |x|), relative to their scale."""
    rtol, atol = TOL[dtype]
    (loss, grads), (ref_loss, ref_grads) = got, want
    assert loss.shape == ref_loss.shape
    torch.testing.assert_close(loss.double(), ref_loss.double(), rtol=rtol, atol=atol, equal_nan=True)
    for name, g, r in zip(FEATURES, grads, ref_grads):
        if r is None:
            assert g is None, name
            continue
        norm = inputs[name].double().norm(dim=1, keepdim=True).clamp(min=1e-12)
        g, r = g.double() * norm, r.double() * norm
        finite = r[torch.isfinite(r)]
        scale = finite.abs().max().clamp(min=1.0) if finite.numel() else 1.0
        torch.testing.assert_close(g / scale, r / scale, rtol=rtol, atol=atol, equal_nan=True,
                                   msg=lambda m, name=name: f"{name}: {m}")


def assert_close_to_reference(inputs, backend, dtype, *, bank_grad=True, reduction="none",
                              options=None, **kw):
    """`backend` (features cast to dtype; `options`: its own knobs) against the float64 reference."""
    want = loss_and_grads(inputs, "reference", bank_grad=bank_grad, reduction=reduction, **kw)
    got = loss_and_grads(inputs, backend, dtype=dtype, bank_grad=bank_grad, reduction=reduction,
                         **kw, **(options or {}))
    assert_matches(got, want, dtype, inputs)
    return got
