"""Random inputs and comparisons shared by the masked InfoNCE tests."""
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import cdcl_ops

PAPER_TABLE = torch.tensor([[False, True], [True, False]])  # BDP queries vs FDB, FDP vs BDB
# (N, M, D): N, M not multiples of any block size; D over 1, 3, 64, 96, 128, 200
SHAPES = [(37, 53, 1), (29, 45, 3), (21, 70, 64), (19, 41, 96), (33, 17, 128), (23, 39, 200)]


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
    loss = cdcl_ops.masked_infonce(**args, backend=backend, reduction=reduction, **kw)
    gen = torch.Generator().manual_seed(1234)
    weights = torch.rand(loss.shape, generator=gen, dtype=torch.float64).to(loss.device, loss.dtype) \
        if loss.dim() else torch.ones((), dtype=loss.dtype, device=loss.device)
    (loss * weights).sum().backward()
    grads = [t.grad if t.requires_grad else None for t in feats]
    return loss.detach(), grads


def strided_copy(inputs):
    """The same inputs with non-contiguous features (every other column of a wider tensor) and
    int32 labels."""
    out = dict(inputs)
    for name in ("query", "positive", "bank"):
        t = inputs[name]
        wide = torch.zeros(t.shape[0], 2 * t.shape[1], dtype=t.dtype, device=t.device)
        wide[:, ::2] = t
        out[name] = wide[:, ::2]
        assert not out[name].is_contiguous()
    out["query_labels"] = inputs["query_labels"].to(torch.int32)
    out["bank_labels"] = inputs["bank_labels"].to(torch.int32)
    return out


TOL = {torch.float64: (1e-9, 1e-10), torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 2e-2),
       torch.float16: (1e-2, 1e-2)}
PRECISION_TOL = {"tf32": (5e-3, 5e-3), "tf32x3": (5e-5, 5e-5)}  # fp32 features on tensor cores


def assert_close_to_reference(inputs, backend, dtype, bank_grad=True, **kw):
    """Loss and gradients of `backend` (features cast to dtype) against the float64 reference."""
    ref_loss, ref_grads = loss_and_grads(inputs, "reference", bank_grad=bank_grad)
    loss, grads = loss_and_grads(inputs, backend, dtype=dtype, bank_grad=bank_grad, **kw)
    precision = kw.get("precision") if dtype == torch.float32 else None
    rtol, atol = PRECISION_TOL.get(precision, TOL[dtype])
    torch.testing.assert_close(loss.double(), ref_loss, rtol=rtol, atol=atol)
    for name, g, r in zip(("query", "positive", "bank"), grads, ref_grads):
        if r is None:
            assert g is None, name
            continue
        # normalisation amplifies rounding by 1/|x| (e.g. D = 1, where the exact gradient is 0):
        # compare |x| * grad, the gradient with respect to the unit vector, relative to its scale
        norm = inputs[name].double().norm(dim=1, keepdim=True)
        g, r = g.double() * norm, r * norm
        scale = r.abs().max().clamp(min=1.0)
        torch.testing.assert_close(g / scale, r / scale, rtol=rtol, atol=atol,
                                   msg=lambda m, name=name: f"{name}: {m}")


FEATURES = ("query", "positive", "bank")


def strided_weights(n, device, seed=7):
    """Per-query weights as a non-contiguous view (every other element of a 2n buffer): under
    torch.compile the op's upstream gradient then arrives with a stride of 2."""
    gen = torch.Generator().manual_seed(seed)
    wide = torch.rand(2 * n, generator=gen).to(device)
    return wide[::2]


def assert_compiled_matches_eager(inputs, backend, rtol=1e-5, atol=1e-6, compiler="inductor",
                                  requires_grad=FEATURES, weights=None, **kw):
    """masked_infonce under torch.compile(fullgraph=True, backend=compiler): same loss and
    gradients as eager. compiler="aot_eager" runs the traced graphs without Inductor's kernels,
    which tells a tracing problem from a code-generation one. requires_grad: the features that
    get gradients (the others are detached); weights: per-query weights of a reduction="none" loss
    (so the op's upstream gradient is those weights, with their strides), instead of the mean."""
    torch._dynamo.reset()

    def loss_fn(q, p, k):
        if weights is None:
            return cdcl_ops.masked_infonce(**dict(inputs, query=q, positive=p, bank=k), backend=backend, **kw)
        per_query = cdcl_ops.masked_infonce(**dict(inputs, query=q, positive=p, bank=k), backend=backend,
                                            reduction="none", **kw)
        return (per_query * weights).sum()

    results = []
    for fn in (loss_fn, torch.compile(loss_fn, fullgraph=True, backend=compiler)):
        feats = [inputs[n].clone().requires_grad_(n in requires_grad) for n in FEATURES]
        loss = fn(*feats)
        loss.backward()
        results.append([loss.detach()] + [f.grad for f in feats])
    for name, eager, comp in zip(("loss",) + FEATURES, *results):
        if eager is None:
            assert comp is None, f"{name}: compiled gave a gradient where eager gave none"
            continue
        torch.testing.assert_close(comp.float(), eager.float(), rtol=rtol, atol=atol,
                                   msg=lambda m, name=name: f"{name}: {m}")


def assert_bank_grad_of_mean_close(backend, dtype, n=16384, m=8192, device="cuda", **kw):
    """The bank gradient of the mean loss over many queries: gs = 1 / (N tau) is small, and the
    16-bit weights exp(s - lse) gs underflowed fp16 until the bank-gradient op rescaled gs."""
    inputs = make_inputs(n, m, 64, device=device, seed=3)
    _, ref = loss_and_grads(inputs, "reference", reduction="mean")
    _, got = loss_and_grads(inputs, backend, dtype=dtype, reduction="mean", **kw)
    scale = ref[2].abs().max()
    torch.testing.assert_close(got[2].double() / scale, ref[2] / scale, rtol=2e-2, atol=2e-2)


def with_nan_rows(inputs, where, bank_rows):
    """Put NaN into `inputs` (from make_inputs): some bank rows, every bank row, or one active query."""
    if where == "some_bank_rows":
        inputs["bank"][bank_rows] = float("nan")
    elif where == "all_bank_rows":
        inputs["bank"][:] = float("nan")
    else:
        inputs["query"][3] = float("nan")
        inputs["query_labels"][3], inputs["query_groups"][3] = 0, 0  # active
    return inputs


FP32_TOL = dict(rtol=1e-5, atol=1e-5)


def dense_labels(values):
    """Labels by hand: equal values get equal small ids, negative ones -1 (inactive)."""
    values = [int(v) for v in values]
    ids = {v: i for i, v in enumerate(sorted({v for v in values if v >= 0}))}
    return torch.tensor([ids[v] if v >= 0 else -1 for v in values], dtype=torch.int64)


def assert_matches(got, want, scale_rows=None):
    """Per-query losses and gradients of `backend` against the oracle (float64 reference)."""
    (loss, grads), (ref_loss, ref_grads) = got, want
    torch.testing.assert_close(loss.double(), ref_loss, equal_nan=True, **FP32_TOL)
    for name, g, r in zip(("query", "positive", "bank"), grads, ref_grads):
        norm = 1.0 if scale_rows is None else scale_rows[name]
        g, r = g.double() * norm, r * norm
        finite = r[torch.isfinite(r)]
        scale = finite.abs().max().clamp(min=1.0) if finite.numel() else 1.0
        torch.testing.assert_close(g / scale, r / scale, equal_nan=True, **FP32_TOL,
                                   msg=lambda m, name=name: f"{name}: {m}")


def rows_of_magnitude(inputs, dtype, scales):
    """The inputs in `dtype` with some rows of each feature tensor scaled to the given magnitudes."""
    out = dict(inputs)
    for name in ("query", "positive", "bank"):
        x = inputs[name].to(dtype).clone()
        for row, scale in zip(range(1, 3 * len(scales), 3), scales):
            r = x[row].double()
            x[row] = (r / r.abs().max() * scale).to(dtype)
        out[name] = x
    return out


def _fake_run(op, args):
    with FakeTensorMode() as mode:
        return op(*[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args])


def _storages(tensors):
    return [t.untyped_storage().data_ptr() for t in tensors if t.numel() > 0]


def assert_outputs_match_fake(op, args):
    """Run `op` for real and on fake tensors: the outputs' metadata must agree, and the real
    outputs must neither alias the inputs or each other nor have changed an input."""
    inputs = [a for a in args if isinstance(a, torch.Tensor)]
    before = [a.clone() for a in inputs]
    real = op(*args)
    fake = _fake_run(op, args)
    real = real if isinstance(real, (tuple, list)) else (real,)
    fake = fake if isinstance(fake, (tuple, list)) else (fake,)
    assert len(real) == len(fake)
    for i, (r, f) in enumerate(zip(real, fake)):
        got = (tuple(r.shape), r.stride(), r.dtype, r.device.type)
        want = (tuple(f.shape), f.stride(), f.dtype, f.device.type)
        assert got == want, f"output {i}: real (shape, strides, dtype, device) {got}, fake {want}"
    outs = _storages(real)
    assert len(set(outs)) == len(outs), "two outputs share memory"
    assert not set(outs) & set(_storages(inputs)), "an output shares memory with an input"
    for i, (a, b) in enumerate(zip(inputs, before)):
        assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num()), \
            f"input {i} was written"
    return real
