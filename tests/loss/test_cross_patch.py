"""cross_patch_infonce / CrossPatchInfoNCE against plain float64 transcriptions of the paper's
Eqs. (3)-(12) and of the released code's formula (tests/transcriptions.py: one patch and one pixel
at a time, no library code), over several batches in a row so the banks' ring buffer wraps."""
import dataclasses
import math

import pytest
import torch

import cdcl_ops
from cdcl_ops import CrossPatchOptions
from paths import ROOT
from transcriptions import (
    TOL,
    foreground_score,
    make_batch,
    official_loop,
    paper_loop,
    patch_cells,
    patch_kind,
    sim,
    transcription,
)


# ----------------------------------------------------------------------------- comparisons
def gen_for(*key):
    return torch.Generator().manual_seed(hash(key) % 2**31 + torch.seed() % 1000)


def loss_and_grad(fn, fs):
    fs = fs.detach().clone().requires_grad_(True)
    loss = fn(fs)
    (grad,) = torch.autograd.grad(loss, fs, allow_unused=True)
    return loss.detach(), torch.zeros_like(fs) if grad is None else grad


# (B, D, H, W, grid): 2x2 patches (MP only at 2 of 4), 2x3 patches on a 3x3 grid
SHAPES = [(2, 5, 8, 8, 4), (2, 3, 6, 9, 3)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("memory", [0, 1, 3])
@pytest.mark.parametrize("semantics", ["paper", "official"])
def test_module_matches_transcription_over_batches(shape, memory, semantics):
    b, d, h, w, grid = shape
    gen = gen_for(shape, memory, semantics)
    module = cdcl_ops.CrossPatchInfoNCE(CrossPatchOptions(grid=grid, memory=memory, semantics=semantics,
                                                          backend="reference"))
    history = []
    for step in range(memory + 3):  # the ring buffer wraps at least twice
        batch = make_batch(b, d, h, w, grid, gen)
        loss, grad = loss_and_grad(lambda fs: module(fs, batch["ft"], batch["ys"], batch["yt"]), batch["fs"])
        ref, ref_grad = loss_and_grad(
            lambda fs: transcription(semantics, "pixel-patch", dict(batch, fs=fs), history, grid), batch["fs"])
        assert loss.dtype == torch.float64
        torch.testing.assert_close(loss, ref, **TOL[semantics], msg=f"step {step}")
        torch.testing.assert_close(grad, ref_grad, **TOL[semantics], msg=f"grad, step {step}")
        history = ([batch] + history)[:memory]


@pytest.mark.parametrize("sampling", ["pixel", "random"])
@pytest.mark.parametrize("memory", [0, 2])
def test_table2_schemes_match_transcription(sampling, memory):
    b, d, h, w, grid = 2, 4, 4, 6, 2
    gen = gen_for(sampling, memory)
    module = cdcl_ops.CrossPatchInfoNCE(CrossPatchOptions(grid=grid, memory=memory, sampling=sampling,
                                                          backend="reference"))
    history = []
    for step in range(memory + 2):
        batch = make_batch(b, d, h, w, grid, gen)
        loss, grad = loss_and_grad(lambda fs: module(fs, batch["ft"], batch["ys"], batch["yt"]), batch["fs"])
        ref, ref_grad = loss_and_grad(
            lambda fs: transcription("paper", sampling, dict(batch, fs=fs), history, grid), batch["fs"])
        torch.testing.assert_close(loss, ref, rtol=1e-9, atol=1e-10, msg=f"step {step}")
        torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-10)
        history = ([batch] + history)[:memory]


def test_bank_none_is_memory_zero_and_stats():
    b, d, h, w, grid = 3, 6, 8, 8, 4
    batch = make_batch(b, d, h, w, grid, gen_for("stats"))
    loss, stats = cdcl_ops.cross_patch_infonce(batch["fs"], batch["ft"], batch["ys"], batch["yt"],
                                               options=CrossPatchOptions(grid=grid, backend="reference"),
                                               return_stats=True)
    ref = paper_loop(batch["fs"], batch["ft"], batch["ys"], batch["yt"], [], grid)
    torch.testing.assert_close(loss, ref, rtol=1e-9, atol=1e-10)
    kinds = batch["kinds_s"]
    pixels = (h // grid) * (w // grid)
    assert int(stats["fdp_patches"]) == int((kinds == 1).sum())
    assert int(stats["bdp_patches"]) == int((kinds == 0).sum())
    assert int(stats["queries"]) == int((kinds >= 0).sum()) * pixels
    assert all(isinstance(v, torch.Tensor) and v.device == loss.device for v in stats.values())
    # mean positive probability e^{s+} / (e^{s+} + sum J e^{s-}) over the queries, from the same loop
    probs, counts = [], []
    fdb_bdb = {}
    for f, y in [(batch["ft"], batch["yt"])]:
        for i, cells in patch_cells(b, h, w, grid):
            kind = patch_kind(foreground_score(y, i, cells))
            if kind >= 0:
                fdb_bdb.setdefault(kind, []).extend((f[i, :, r, c], int(y[i, r, c])) for r, c in cells)
    for i, cells in patch_cells(b, h, w, grid):
        kind = patch_kind(foreground_score(batch["ys"], i, cells))
        if kind < 0:
            continue
        for r, c in cells:
            q = batch["fs"][i, :, r, c]
            pos = sim(q, batch["ft"][i, :, r, c], 0.1)
            negs = [k for k, lab in fdb_bdb.get(1 - kind, []) if lab != int(batch["ys"][i, r, c])]
            neg = sum(float(sim(q, k, 0.1)) for k in negs)
            probs.append(float(pos) / (float(pos) + neg))
            counts.append(len(negs))
    assert math.isclose(float(stats["positive_prob"]), sum(probs) / len(probs), rel_tol=1e-9)
    assert int(stats["queries_with_negative"]) == sum(c > 0 for c in counts)
    assert math.isclose(float(stats["negatives_per_query"]), sum(counts) / len(counts), rel_tol=1e-9)


def test_logits_are_pooled_then_argmaxed():
    """Predictions at 2x the feature size: softmax, average over each 2x2 block, argmax (Eqs. 3-4)."""
    b, d, h, w, grid = 2, 4, 6, 6, 3
    gen = gen_for("logits")
    batch = make_batch(b, d, h, w, grid, gen)
    logits = [torch.randn(b, 3, 2 * h, 2 * w, generator=gen, dtype=torch.float64) * 3 for _ in range(2)]

    def pooled_argmax(z):
        p = z.softmax(dim=1)
        out = torch.zeros(b, h, w, dtype=torch.int64)
        for i in range(b):
            for r in range(h):
                for c in range(w):
                    block = p[i, :, 2 * r:2 * r + 2, 2 * c:2 * c + 2].reshape(3, 4).mean(dim=1)
                    out[i, r, c] = int(block.argmax())
        return out

    ys, yt = pooled_argmax(logits[0]), pooled_argmax(logits[1])
    for semantics in ("paper", "official"):
        options = CrossPatchOptions(grid=grid, semantics=semantics, backend="reference")
        loss = cdcl_ops.cross_patch_infonce(batch["fs"], batch["ft"], logits[0], logits[1], options=options)
        same = cdcl_ops.cross_patch_infonce(batch["fs"], batch["ft"], ys, yt, options=options)
        torch.testing.assert_close(loss, same, rtol=0, atol=0)
    torch.testing.assert_close(loss.new_tensor(float(official_loop(batch["fs"], batch["ft"], ys, yt, [], grid))),
                               loss, **TOL["official"])


# ----------------------------------------------------------------------------- edge cases
def test_no_fdp_or_bdp_patch_gives_attached_zero():
    b, d, h, w, grid = 2, 4, 8, 8, 4
    gen = gen_for("mp")
    mp = -torch.ones(b, grid, grid, dtype=torch.int64)
    batch = make_batch(b, d, h, w, grid, gen, kinds_s=mp, kinds_t=mp)
    for semantics in ("paper", "official"):
        module = cdcl_ops.CrossPatchInfoNCE(CrossPatchOptions(grid=grid, semantics=semantics, backend="chunked"))
        fs = batch["fs"].float().requires_grad_(True)
        loss, stats = module(fs, batch["ft"].float(), batch["ys"], batch["yt"], return_stats=True)
        assert loss.item() == 0.0 and loss.requires_grad
        loss.backward()
        assert fs.grad is not None and not fs.grad.any()
        assert int(stats["queries"]) == 0 and int(stats["fdp_patches"]) == int(stats["bdp_patches"]) == 0


@pytest.mark.parametrize("semantics", ["paper", "official"])
def test_only_fdps_have_no_negatives(semantics):
    b, d, h, w, grid = 2, 4, 8, 8, 2
    fs = torch.randn(b, d, h, w, requires_grad=True)
    ones = torch.ones(b, h, w, dtype=torch.int64)
    loss, stats = cdcl_ops.cross_patch_infonce(fs, torch.randn(b, d, h, w), ones, ones,
                                               options=CrossPatchOptions(grid=grid, semantics=semantics),
                                               return_stats=True)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(fs.grad).all() and not fs.grad.any()
    assert int(stats["queries"]) == b * h * w and int(stats["fdp_patches"]) == b * grid * grid
    assert float(stats["positive_prob"]) == 1.0


# one image; grid 1 (one patch per image); grid = feature size (one pixel per patch)
@pytest.mark.parametrize("shape", [(1, 4, 6, 6, 3), (2, 4, 5, 5, 1), (2, 3, 4, 4, 4)])
@pytest.mark.parametrize("semantics", ["paper", "official"])
def test_small_and_extreme_grids(shape, semantics):
    b, d, h, w, grid = shape
    gen = gen_for(shape, semantics)
    module = cdcl_ops.CrossPatchInfoNCE(CrossPatchOptions(grid=grid, memory=1, semantics=semantics,
                                                          backend="reference"))
    history = []
    for _ in range(2):
        batch = make_batch(b, d, h, w, grid, gen)
        loss, grad = loss_and_grad(lambda fs: module(fs, batch["ft"], batch["ys"], batch["yt"]), batch["fs"])
        ref, ref_grad = loss_and_grad(
            lambda fs: transcription(semantics, "pixel-patch", dict(batch, fs=fs), history, grid), batch["fs"])
        torch.testing.assert_close(loss, ref, **TOL[semantics])
        torch.testing.assert_close(grad, ref_grad, **TOL[semantics])
        history = [batch]


# ----------------------------------------------------------------------------- backends
COMBOS = [("paper", "pixel-patch"), ("official", "pixel-patch"), ("paper", "pixel"), ("paper", "random")]
STREAMING = [be for be in cdcl_ops.available_backends("cpu") if be != "reference"]


@pytest.mark.parametrize("backend", STREAMING)
@pytest.mark.parametrize("semantics,sampling", COMBOS)
def test_backends_agree_with_reference(backend, semantics, sampling):
    b, d, h, w, grid = 2, 8, 6, 6, 3
    gen = gen_for(backend, semantics, sampling)
    modules = {be: cdcl_ops.CrossPatchInfoNCE(CrossPatchOptions(grid=grid, memory=1, semantics=semantics,
                                                                sampling=sampling, backend=be))
               for be in ("reference", backend)}
    for _ in range(2):
        batch = make_batch(b, d, h, w, grid, gen)
        ft, ys, yt = batch["ft"].float(), batch["ys"], batch["yt"]
        results = {be: loss_and_grad(lambda fs: m(fs, ft, ys, yt), batch["fs"].float())
                   for be, m in modules.items()}
        (loss, grad), (ref, ref_grad) = results[backend], results["reference"]
        assert loss.dtype == torch.float32
        torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-6)


def test_bf16_features_give_fp32_loss_close_to_fp32():
    b, d, h, w, grid = 2, 16, 8, 8, 4
    batch = make_batch(b, d, h, w, grid, gen_for("bf16"))
    options = CrossPatchOptions(grid=grid, backend="chunked")
    ref = cdcl_ops.cross_patch_infonce(batch["fs"].float(), batch["ft"].float(), batch["ys"], batch["yt"],
                                       options=options)
    loss = cdcl_ops.cross_patch_infonce(batch["fs"].bfloat16(), batch["ft"].float(), batch["ys"],
                                        batch["yt"], options=options)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref, rtol=2e-2, atol=2e-2)


def test_torch_compile_fullgraph_chunked():
    b, d, h, w, grid = 2, 8, 8, 8, 4
    batch = make_batch(b, d, h, w, grid, gen_for("compile"))
    logits_s = torch.randn(b, 2, 2 * h, 2 * w)
    ft, yt = batch["ft"].float(), batch["yt"]

    def fn(fs):
        return cdcl_ops.cross_patch_infonce(fs, ft, logits_s, yt,
                                            options=CrossPatchOptions(grid=grid, backend="chunked"))

    compiled = torch.compile(fn, fullgraph=True)
    loss, grad = loss_and_grad(compiled, batch["fs"].float())
    ref, ref_grad = loss_and_grad(fn, batch["fs"].float())
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- bad input
def test_bad_arguments_name_the_argument():
    fs, ft = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    y = torch.randint(0, 2, (2, 8, 8))
    call = cdcl_ops.cross_patch_infonce
    with pytest.raises(ValueError, match="teacher_feats"):
        call(fs, torch.randn(2, 4, 8, 4), y, y, options=CrossPatchOptions(grid=4))
    with pytest.raises(ValueError, match="student_feats"):
        call(fs[0], ft[0], y, y, options=CrossPatchOptions(grid=4))
    with pytest.raises(ValueError, match="student_pred"):
        call(fs, ft, torch.randint(0, 2, (2, 4, 4)), y, options=CrossPatchOptions(grid=4))
    with pytest.raises(ValueError, match="teacher_pred"):
        call(fs, ft, y, torch.randn(2, 2, 12, 12), options=CrossPatchOptions(grid=4))  # 12 is not a multiple of 8
    with pytest.raises(ValueError, match="teacher_pred"):
        call(fs, ft, y, torch.randn(3, 2, 8, 8), options=CrossPatchOptions(grid=4))  # batch mismatch
    with pytest.raises(ValueError, match="grid"):
        call(fs, ft, y, y, options=CrossPatchOptions(grid=3))
    with pytest.raises(ValueError, match="grid"):
        call(torch.randn(2, 4, 8, 6), torch.randn(2, 4, 8, 6), y[:, :, :6], y[:, :, :6],
             options=CrossPatchOptions(grid=4))
    for fdp, bdp in ((0.3, 0.7), (0.5, 0.5), (1.5, 0.3), (0.7, -0.2)):
        with pytest.raises(ValueError, match="fdp|bdp"):
            call(fs, ft, y, y, options=CrossPatchOptions(grid=4, fdp=fdp, bdp=bdp))
    with pytest.raises(ValueError, match="semantics"):
        call(fs, ft, y, y, options=CrossPatchOptions(grid=4, semantics="released"))
    with pytest.raises(ValueError, match="sampling"):
        call(fs, ft, y, y, options=CrossPatchOptions(grid=4, sampling="patch"))
    with pytest.raises(ValueError, match="sampling"):
        call(fs, ft, y, y, options=CrossPatchOptions(grid=4, semantics="official", sampling="pixel"))
    with pytest.raises(ValueError, match="bank"):
        call(fs, ft, y, y, bank=cdcl_ops.FeatureBank(dim=5), options=CrossPatchOptions(grid=4))
    with pytest.raises(ValueError, match="bank"):
        call(fs, ft, y, y, bank=cdcl_ops.FeatureBank(dim=4, capacity=128, device="meta"),
             options=CrossPatchOptions(grid=4))
    with pytest.raises(ValueError, match="bank"):
        call(fs, ft, y, y, bank=torch.zeros(3, 4), options=CrossPatchOptions(grid=4))
    with pytest.raises(ValueError, match="temperature"):
        call(fs, ft, y, y, options=CrossPatchOptions(grid=4, temperature=0.0))
    with pytest.raises(ValueError, match="fdp|bdp"):
        cdcl_ops.CrossPatchInfoNCE(CrossPatchOptions(fdp=0.2, bdp=0.4))



# ----------------------------------------------------------------------------- the options object
def test_every_mode_is_tested():
    from cdcl_ops.sampling import MODES
    assert set(COMBOS) == set(MODES)


@pytest.mark.parametrize("field,value", [
    ("grid", 0), ("grid", 2.0), ("grid", True), ("fdp", 1.5), ("fdp", "0.7"), ("bdp", -0.1), ("bdp", True),
    ("temperature", 0.0), ("temperature", None), ("fg_class", 1.0), ("fg_class", False), ("memory", -1),
    ("memory", 1.0), ("semantics", "released"), ("sampling", "patch"), ("backend", 3), ("compact", 1),
    ("compact", None)])
def test_options_refuse_a_bad_field_by_name(field, value):
    with pytest.raises(ValueError, match=f"^{field}: "):
        CrossPatchOptions(**{field: value})


def test_options_are_frozen_keyword_only_and_hold_a_float_temperature():
    options = CrossPatchOptions(temperature=torch.tensor(0.25, dtype=torch.float64))
    assert type(options.temperature) is float and options.temperature == 0.25
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.grid = 4
    with pytest.raises(TypeError):
        CrossPatchOptions(4)
    assert dataclasses.replace(options, grid=4).grid == 4
    with pytest.raises(ValueError, match="^grid: "):  # a variant is checked as well
        dataclasses.replace(options, grid=-4)
    assert CrossPatchOptions() == CrossPatchOptions(grid=8, fdp=0.7, bdp=0.3, temperature=0.1, memory=1)


def test_both_entry_points_take_only_options():
    fs = torch.randn(1, 3, 4, 4)
    y = torch.zeros(1, 4, 4, dtype=torch.long)
    for bad in ({"grid": 2}, None, "grid=2"):
        with pytest.raises(ValueError, match="^options: expected a cdcl_ops.CrossPatchOptions"):
            cdcl_ops.cross_patch_infonce(fs, fs, y, y, options=bad)
        with pytest.raises(ValueError, match="^options: expected a cdcl_ops.CrossPatchOptions"):
            cdcl_ops.CrossPatchInfoNCE(bad)
    module = cdcl_ops.CrossPatchInfoNCE(CrossPatchOptions(grid=2, memory=3, sampling="pixel"))
    assert module.bank.memory == 3
    assert "grid=2" in repr(module) and "memory=3" in repr(module) and "sampling='pixel'" in repr(module)


def test_the_methods_defaults_are_written_once():
    """No function of cdcl_ops writes a default of its own for a setting of CrossPatchOptions: they
    take CrossPatchOptions' (whose class attributes are the field defaults)."""
    import ast
    import pathlib
    settings = {f.name for f in dataclasses.fields(CrossPatchOptions)}
    package = pathlib.Path(cdcl_ops.__file__).parent
    own = []
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            args = node.args
            positional = args.posonlyargs + args.args
            pairs = list(zip(positional[len(positional) - len(args.defaults):], args.defaults))
            pairs += [(a, d) for a, d in zip(args.kwonlyargs, args.kw_defaults) if d is not None]
            own += [f"{path.name}:{node.name}({a.arg}={ast.unparse(d)})" for a, d in pairs
                    if a.arg in settings and isinstance(d, ast.Constant) and d.value is not None]
    assert own == []
    assert cdcl_ops.classify_patches(torch.tensor([0.69, 0.7, 0.3, 0.31])).tolist() == [-1, 1, 0, -1]


def test_torch_compile_module_with_bank():
    """The bank's ring-buffer writes trace too (the storage is sized by an eager first call)."""
    b, d, h, w, grid = 2, 8, 8, 8, 4
    gen = gen_for("compile-bank")
    eager = cdcl_ops.CrossPatchInfoNCE(CrossPatchOptions(grid=grid, memory=1, backend="chunked"))
    module = cdcl_ops.CrossPatchInfoNCE(CrossPatchOptions(grid=grid, memory=1, backend="chunked"))
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    for step in range(4):
        batch = make_batch(b, d, h, w, grid, gen)
        args = (batch["ft"].float(), batch["ys"], batch["yt"])
        run = module if step == 0 else compiled
        loss, grad = loss_and_grad(lambda fs: run(fs, *args), batch["fs"].float())
        ref, ref_grad = loss_and_grad(lambda fs: eager(fs, *args), batch["fs"].float())
        torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-6, atol=1e-7)
    assert torch.equal(module.bank.feats, eager.bank.feats)
    assert torch.equal(module.bank.labels, eager.bank.labels)


def test_docs_example_runs(tmp_path, monkeypatch, capsys):
    import re
    doc = ROOT / "docs" / "loss.md"
    (code,) = re.findall(r"```python\n(.*?)```", doc.read_text(), flags=re.S)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, str(doc), "exec"), {})
    assert capsys.readouterr().out.count("L_contr =") == 3
    state = torch.load(tmp_path / "checkpoint.pt")["contrastive"]
    restored = cdcl_ops.CrossPatchInfoNCE(CrossPatchOptions(grid=8))
    restored.load_state_dict(state)
    assert restored.bank.capacity == 2 * 16 * 16


@pytest.mark.parametrize("semantics,sampling", COMBOS)
@pytest.mark.parametrize("backend", ["reference", "chunked"])
def test_compact_path_matches_dense(semantics, sampling, backend):
    b, d, h, w, grid = 2, 5, 8, 8, 4
    gen = gen_for("compact", semantics, sampling, backend)
    modules = [cdcl_ops.CrossPatchInfoNCE(CrossPatchOptions(grid=grid, memory=2, semantics=semantics,
                                                            sampling=sampling, backend=backend, compact=c))
               for c in (False, True)]
    mp = -torch.ones(b, grid, grid, dtype=torch.int64)
    for step in range(4):  # step 2: no FDP/BDP at all (empty query set after compaction)
        batch = make_batch(b, d, h, w, grid, gen, *((mp, mp) if step == 2 else ()))
        dense, compact = (loss_and_grad(lambda fs: m(fs, batch["ft"], batch["ys"], batch["yt"]), batch["fs"])
                          for m in modules)
        torch.testing.assert_close(compact[0], dense[0], rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(compact[1], dense[1], rtol=1e-9, atol=1e-10)
    fs = batch["fs"].clone().requires_grad_(True)
    loss, stats = modules[1](fs, batch["ft"], batch["ys"], batch["yt"], return_stats=True)
    ref, ref_stats = modules[0](fs, batch["ft"], batch["ys"], batch["yt"], return_stats=True)
    for key in ref_stats:
        torch.testing.assert_close(stats[key], ref_stats[key], rtol=1e-9, atol=1e-12)


def test_compact_no_queries_is_attached_zero():
    fs = torch.randn(2, 4, 4, 4, requires_grad=True)
    half = torch.tensor([[1, 0, 1, 0]] * 4).expand(2, 4, 4)  # every 2x2 patch is half foreground
    loss = cdcl_ops.cross_patch_infonce(fs, torch.randn(2, 4, 4, 4), half, half,
                                        options=CrossPatchOptions(grid=2, compact=True))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert not fs.grad.any()


@pytest.mark.parametrize("semantics,sampling", COMBOS)
def test_ignored_pixels_are_never_queries(semantics, sampling):
    """Pixels labelled < 0 in student_pred are not queries: their student features do not matter
    (they are not bank rows either, except in official mode) and they leave the mean."""
    b, d, h, w, grid = 2, 4, 8, 8, 4
    batch = make_batch(b, d, h, w, grid, gen_for("ignore", semantics, sampling))
    ys = batch["ys"].clone()
    ys[0, :2, :2] = -1                                  # one whole patch and ...
    ys[1, 5, 6] = -1                                    # ... one pixel of another
    options = CrossPatchOptions(grid=grid, semantics=semantics, sampling=sampling, backend="reference")
    call = lambda fs, y: cdcl_ops.cross_patch_infonce(fs, batch["ft"], y, batch["yt"], options=options,
                                                      return_stats=True)
    loss, stats = call(batch["fs"], ys)
    ignored = (ys < 0) & (batch["ys"] >= 0)
    if semantics == "paper":  # student features are bank rows only in official mode
        changed = batch["fs"].clone()
        changed.permute(0, 2, 3, 1)[ignored] = torch.randn(int(ignored.sum()), d, dtype=torch.float64)
        again, _ = call(changed, ys)
        torch.testing.assert_close(again, loss, rtol=1e-12, atol=1e-12)
    kinds = cdcl_ops.classify_patches(cdcl_ops.patch_foreground_scores(ys, grid)[0].double())
    per_pixel_active = kinds.repeat_interleave(h // grid, 1).repeat_interleave(w // grid, 2) >= 0
    if sampling != "pixel-patch":
        per_pixel_active = torch.ones_like(per_pixel_active)
    # the all-ignored patch scores 0 (a BDP): counting its pixels as queries would show here
    assert int(stats["queries"]) == int((per_pixel_active & (ys >= 0)).sum())
    compact, _ = cdcl_ops.cross_patch_infonce(batch["fs"], batch["ft"], ys, batch["yt"],
                                              options=dataclasses.replace(options, compact=True),
                                              return_stats=True)
    torch.testing.assert_close(compact, loss, rtol=1e-12, atol=1e-12)


@pytest.mark.gpu
@pytest.mark.parametrize("semantics,sampling", COMBOS)
def test_cuda_backends_agree_with_reference(semantics, sampling):
    """On a GPU: backend=None (triton patch kernel, fastest op backend) against the reference."""
    b, d, h, w, grid = 4, 32, 16, 16, 4
    gen = gen_for("cuda", semantics, sampling)
    modules = [cdcl_ops.CrossPatchInfoNCE(CrossPatchOptions(grid=grid, memory=1, semantics=semantics,
                                                            sampling=sampling, backend=be, compact=c)).cuda()
               for be, c in (("reference", False), (None, False), (None, True))]
    for _ in range(3):
        batch = make_batch(b, d, h, w, grid, gen)
        args = [batch["ft"].float().cuda(), torch.randn(b, 2, 2 * h, 2 * w, generator=gen).cuda(),
                batch["yt"].cuda()]
        fs = batch["fs"].float().cuda()
        (ref, ref_grad), *others = [loss_and_grad(lambda x: m(x, *args), fs) for m in modules]
        for loss, grad in others:
            torch.testing.assert_close(loss, ref, rtol=1e-4, atol=1e-5)  # TF32 where allowed
            torch.testing.assert_close(grad, ref_grad, rtol=1e-3, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("semantics,sampling", COMBOS)
def test_no_host_synchronisation_on_cuda(semantics, sampling):
    """docs/design.md §2: the loss (forward and backward, bank push included) never waits for the GPU."""
    b, d, h, w, grid = 2, 16, 16, 16, 4
    module = cdcl_ops.CrossPatchInfoNCE(CrossPatchOptions(grid=grid, memory=1, semantics=semantics,
                                                          sampling=sampling)).cuda()
    gen = gen_for("sync", semantics, sampling)
    batches = []
    for _ in range(2):
        batch = make_batch(b, d, h, w, grid, gen)
        batches.append((batch["fs"].float().cuda().requires_grad_(True), batch["ft"].float().cuda(),
                        torch.randn(b, 2, 2 * h, 2 * w, generator=gen).cuda(), batch["yt"].cuda()))
    module(*batches[0]).backward()  # the first call sizes the bank
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss, stats = module(*batches[1], return_stats=True)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss).item()
