"""Random inputs for the masked InfoNCE tests."""
import torch

PAPER_TABLE = torch.tensor([[False, True], [True, False]])  # BDP queries vs FDB, FDP vs BDB


def make_inputs(n, m, d, *, dtype=torch.float64, device="cpu", groups=True, seed=None,
                n_groups=2, table=None):
    """Fresh random features, labels in {-1, 0, 1} (about 10% inactive) and optional groups."""
    gen = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**31)

    def feats(rows):
        return torch.randn(rows, d, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)

    def labels(rows):
        lab = torch.randint(0, 2, (rows,), generator=gen)
        lab[torch.rand(rows, generator=gen) < 0.1] = -1
        return lab.to(device)

    out = dict(query=feats(n), positive=feats(n), bank=feats(m),
               query_labels=labels(n), bank_labels=labels(m))
    if groups:
        if table is None:
            table = PAPER_TABLE if n_groups == 2 else torch.rand(n_groups, n_groups, generator=gen) < 0.5
        out["query_groups"] = torch.randint(-1, n_groups, (n,), generator=gen).to(device)
        out["bank_groups"] = torch.randint(-1, n_groups, (m,), generator=gen).to(device)
        out["group_table"] = table.to(device)
    return out


def loss_and_grads(inputs, backend, *, bank_grad=True, dtype=None, reduction="none", **kw):
    """Per-query loss and the gradients of its weighted sum w.r.t. query, positive and bank."""
    args = dict(inputs)
    feats = []
    for name in ("query", "positive", "bank"):
        t = args[name].detach()
        if dtype is not None:
            t = t.to(dtype)
        t = t.clone().requires_grad_(name != "bank" or bank_grad)
        args[name] = t
        feats.append(t)
    loss = __import__("cdcl_ops").masked_infonce(**args, backend=backend, reduction=reduction, **kw)
    gen = torch.Generator().manual_seed(1234)
    weights = torch.rand(loss.shape, generator=gen, dtype=torch.float64).to(loss.device, loss.dtype) \
        if loss.dim() else torch.ones((), dtype=loss.dtype, device=loss.device)
    (loss * weights).sum().backward()
    grads = [t.grad if t.requires_grad else None for t in feats]
    return loss.detach(), grads
