"""The backend registry (cdcl_ops/backends/registry.py) and the one temperature rule."""
import dataclasses
import os
import re

import numpy as np
import pytest
import torch

import cdcl_ops
from cdcl_ops import CrossPatchOptions
from cdcl_ops.backends import chunked, interface, platform, registry
from cdcl_ops.patches import patch_backends
from helpers import make_inputs
from paths import ROOT


def test_public_names_read_the_registry():
    assert cdcl_ops.BACKENDS == registry.names()
    assert set(registry.names()) >= {"reference", "chunked", "triton", "cpu", "cuda"}
    assert cdcl_ops.available_backends("cpu") == registry.available("cpu")
    assert cdcl_ops.default_backend("cpu") == registry.default("cpu")
    assert cdcl_ops.default_backend("meta") == "chunked"  # runs anywhere: the fallback


def test_max_d_matches_the_cuda_kernels():
    # the C++ kernels keep their own copy of the limit: the two must agree
    with open(os.path.join(ROOT, "csrc", "cuda", "launch.h")) as f:
        kernel = int(re.search(r"constexpr int64_t MAX_D = (\d+);", f.read()).group(1))
    assert platform.MAX_D == kernel
    assert registry.get("cuda").max_d == registry.get("triton").max_d == platform.MAX_D


def test_unavailable_backends_say_why():
    ok, why = registry.get("cuda").runs_on("meta")
    assert not ok and "cuda" in why
    assert registry.get("chunked").runs_on("meta") == (True, "")


def test_a_new_backend_is_one_registration():
    calls = []

    def forward(*args):
        calls.append("forward")
        return chunked.forward(*args)

    def bank_grad(*args):
        calls.append("bank_grad")
        return chunked.bank_grad(*args)

    assert registry.register(registry.Backend("mine", lambda device: (True, ""), forward=forward,
                                              bank_grad=bank_grad)) is None
    try:
        assert "mine" in cdcl_ops.BACKENDS and "mine" in cdcl_ops.available_backends("cpu")
        assert cdcl_ops.default_backend("cpu") != "mine"  # not a default anywhere unless it says so
        inputs = make_inputs(9, 13, 5, dtype=torch.float32)
        inputs["query"].requires_grad_(True)
        inputs["bank"].requires_grad_(True)
        got = cdcl_ops.masked_infonce(**inputs, backend="mine")
        want = cdcl_ops.masked_infonce(**inputs, backend="chunked")
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        got.backward()
        assert calls == ["forward", "bank_grad"]
        with pytest.raises(ValueError, match="registered already"):
            registry.register(registry.Backend("mine", lambda device: (True, "")))
    finally:
        registry.unregister("mine")
    assert "mine" not in cdcl_ops.BACKENDS
    with pytest.raises(ValueError, match="^backend: expected None or one of"):
        registry.unregister("mine")


def test_replacing_a_backend_keeps_its_limits():
    real = registry.get("chunked")
    limited = dataclasses.replace(real, max_d=4, dtypes=(torch.float64,))
    assert registry.register(limited, replace=True) is real
    try:
        with pytest.raises(ValueError, match="D <= 4"):
            cdcl_ops.masked_infonce(**make_inputs(3, 4, 5, dtype=torch.float64), backend="chunked")
        with pytest.raises(ValueError, match="float64 features"):
            cdcl_ops.masked_infonce(**make_inputs(3, 4, 2, dtype=torch.float32), backend="chunked")
    finally:
        registry.register(real, replace=True)


def test_patch_backends_are_the_registered_patch_kernels():
    assert patch_backends()[-1] == "torch"
    assert set(patch_backends()[:-1]) == {n for n in registry.names()
                                           if registry.get(n).patch_counts is not None}
    with pytest.raises(ValueError, match="backend"):
        cdcl_ops.patch_foreground_scores(torch.zeros(1, 4, 4, dtype=torch.long), 2, backend="chunked")


# -- temperature: one rule for masked_infonce, MaskedInfoNCE and CrossPatchInfoNCE -----------------

ACCEPTED = [0.1, 1, cdcl_ops.MIN_TEMPERATURE, np.float32(0.25), np.float64(0.1), np.int64(2),
            torch.tensor(0.1), torch.tensor(0.5, dtype=torch.float64), torch.tensor(2)]
REFUSED = [True, False, np.bool_(True), torch.tensor(True), 0, 0.0, -0.1, -1, float("nan"),
           float("inf"), -float("inf"), np.float32("nan"), torch.tensor(float("inf")), torch.tensor(0.0),
           torch.tensor([0.1]), cdcl_ops.MIN_TEMPERATURE / 2, "0.1", None, 1j]


def _feats():
    feats = torch.randn(1, 3, 4, 4)
    labels = torch.randint(0, 2, (1, 4, 4))
    return feats, labels


@pytest.mark.parametrize("tau", ACCEPTED, ids=repr)
def test_temperature_accepted_forms(tau):
    inputs = make_inputs(6, 9, 3, dtype=torch.float32, seed=1)
    want = cdcl_ops.masked_infonce(**inputs, temperature=float(tau), backend="reference")
    torch.testing.assert_close(cdcl_ops.masked_infonce(**inputs, temperature=tau, backend="chunked"), want)
    torch.testing.assert_close(cdcl_ops.MaskedInfoNCE(temperature=tau, backend="reference")(**inputs), want)
    feats, labels = _feats()
    want = cdcl_ops.cross_patch_infonce(feats, feats, labels, labels,
                                        options=CrossPatchOptions(grid=2, temperature=float(tau)))
    torch.testing.assert_close(cdcl_ops.cross_patch_infonce(feats, feats, labels, labels,
                                                            options=CrossPatchOptions(grid=2, temperature=tau)), want)
    module = cdcl_ops.CrossPatchInfoNCE(CrossPatchOptions(grid=2, temperature=tau))
    want = cdcl_ops.CrossPatchInfoNCE(CrossPatchOptions(grid=2, temperature=float(tau)))(feats, feats, labels, labels)
    torch.testing.assert_close(module(feats, feats, labels, labels), want)


@pytest.mark.parametrize("tau", REFUSED, ids=repr)
def test_temperature_refused_forms(tau):
    inputs = make_inputs(6, 9, 3, dtype=torch.float32, seed=1)
    with pytest.raises(ValueError, match="^temperature: "):
        cdcl_ops.masked_infonce(**inputs, temperature=tau)
    with pytest.raises(ValueError, match="^temperature: "):
        cdcl_ops.MaskedInfoNCE(temperature=tau)
    with pytest.raises(ValueError, match="^temperature: "):
        cdcl_ops.CrossPatchInfoNCE(CrossPatchOptions(temperature=tau))
    feats, labels = _feats()
    with pytest.raises(ValueError, match="^temperature: "):
        cdcl_ops.cross_patch_infonce(feats, feats, labels, labels, options=CrossPatchOptions(grid=2, temperature=tau))


def test_masks_travel_as_one_bundle():
    from cdcl_ops._validate import canonical_masks
    from cdcl_ops.backends.interface import Masks
    inp = make_inputs(5, 7, 2)
    masks = canonical_masks(inp["query_labels"], inp["bank_labels"], inp["query_groups"],
                            inp["bank_groups"], inp["group_table"])
    assert isinstance(masks, Masks) and masks._fields == ("q_lab", "q_grp", "k_lab", "k_grp", "table")
    tile = masks.tile(1, 3, 2, 6)
    assert tile.q_lab.shape == (2,) and tile.k_grp.shape == (4,) and tile.table is masks.table


def test_inverse_norms_are_one_bundle_like_the_kernels_struct():
    from cdcl_ops.backends.interface import InverseNorms
    from cdcl_ops.normalize import inverse_norms
    with open(os.path.join(ROOT, "csrc", "cuda", "launch.h")) as f:
        struct = re.search(r"struct InverseNorms \{(.*?)\};", f.read(), re.S).group(1)
    assert tuple(re.findall(r"\* (\w+);", struct)) == InverseNorms._fields == ("q", "p", "k")
    inp = make_inputs(5, 7, 3, dtype=torch.float32)
    q, p, k = inp["query"], inp["positive"], inp["bank"]
    inv = InverseNorms.of(q, None, k)
    assert inv.p is None
    torch.testing.assert_close(inv.k, inverse_norms(k), rtol=0, atol=0)
    out = torch.ops.cdcl_ops.masked_infonce_fwd(q, p, k, *canonical(inp), 10.0, "chunked", 0, "auto", False)
    for got, want in zip(out[3:], InverseNorms.of(q, p, k)):  # the op returns the bundle it used
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def canonical(inp):
    from cdcl_ops._validate import canonical_masks
    return canonical_masks(inp["query_labels"], inp["bank_labels"], inp["query_groups"],
                           inp["bank_groups"], inp["group_table"])


# -- options: each backend is handed only the knobs it reads ----------------------------------------

def _spy(name, options):
    seen = []

    def forward(q, p, k, inv, masks, opts, need_o):
        seen.append(opts)
        return chunked.forward(q, p, k, inv, masks, opts, need_o)

    def bank_grad(q, k, inv, masks, lse, gs, opts):
        seen.append(opts)
        assert inv.p is None  # the bank gradient reads no positives
        return chunked.bank_grad(q, k, inv, masks, lse, gs, opts)

    registry.register(registry.Backend(name, lambda device: (True, ""), forward=forward,
                                       bank_grad=bank_grad, options=options, default_on=("cpu",),
                                       priority=99))
    return seen


@pytest.mark.parametrize("options", [(), ("chunk_size",), ("precision",), ("chunk_size", "precision")])
def test_backends_see_only_the_options_they_read(options):
    seen = _spy("spy", options)
    try:
        inputs = make_inputs(9, 13, 5, dtype=torch.float32)
        inputs["bank"].requires_grad_(True)
        asked = dict(chunk_size=4, precision="tf32")
        # backend=None picks the spy (priority 99): options it does not read are dropped
        cdcl_ops.masked_infonce(**inputs, temperature=0.5, **asked).backward()
        want = interface.Options(2.0, **{f: asked[f] for f in options})
        assert seen == [want, want]
        for field in set(interface.TUNABLE) - set(options):
            with pytest.raises(ValueError, match=f"^{field}: the spy backend does not take it"):
                cdcl_ops.masked_infonce(**inputs, backend="spy", **{field: asked[field]})
        # the defaults are never refused
        cdcl_ops.masked_infonce(**inputs, backend="spy", chunk_size=0, precision="auto")
    finally:
        registry.unregister("spy")


def test_registered_backends_declare_their_options():
    reads = {name: registry.get(name).options for name in registry.names()}
    assert reads == {"reference": (), "chunked": ("chunk_size",), "triton": ("precision",),
                     "cpu": (), "cuda": ("precision",)}
    inputs = make_inputs(6, 9, 3, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"^chunk_size: the cpu backend does not take it \(only chunked\)"):
        cdcl_ops.masked_infonce(**inputs, backend="cpu", chunk_size=16)
    with pytest.raises(ValueError, match=r"^precision: the reference backend .*only triton, cuda"):
        cdcl_ops.masked_infonce(**inputs, backend="reference", precision="ieee")
    # the same call with backend=None runs wherever it lands (here: cpu, which drops both)
    torch.testing.assert_close(cdcl_ops.masked_infonce(**inputs, chunk_size=16, precision="ieee"),
                               cdcl_ops.masked_infonce(**inputs))


def test_default_backend_says_when_nothing_may_be_the_default():
    real = registry.get("chunked")
    registry.register(dataclasses.replace(real, default_on=()), replace=True)
    try:
        with pytest.raises(ValueError, match="^device: no registered backend may be the default on meta"):
            cdcl_ops.default_backend("meta")
    finally:
        registry.register(real, replace=True)
    assert cdcl_ops.default_backend("meta") == "chunked"


# -- the layout: each backend declares its records, the registry imports none of them -------------

def test_each_backend_module_declares_its_records():
    from cdcl_ops.backends import native, reference, triton_backend
    declared = [r for m in (reference, chunked, triton_backend, native) for r in m.RECORDS]
    assert tuple(r.name for r in declared) == registry.names()
    assert all(registry.get(r.name) is r for r in declared)


PACKAGE = os.path.join(ROOT, "cdcl_ops")


def _modules():
    """{dotted name: path} of the package's Python modules (a package is its __init__.py)."""
    found = {}
    for folder, _, files in os.walk(PACKAGE):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, f), ROOT)[:-3].split(os.sep)
                found[".".join(rel[:-1] if rel[-1] == "__init__" else rel)] = os.path.join(folder, f)
    return found


def _import_graph():
    """{module: the package modules it imports}, anywhere in its code (a function's import too),
    from the source. `from pkg import name` counts as importing pkg.name when that is a module
    (the compiled cdcl_ops._C included), else pkg itself."""
    import ast
    modules = _modules()
    known = set(modules) | {"cdcl_ops._C"}
    graph = {}
    for name, path in modules.items():
        package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.Import):
                edges |= {a.name for a in node.names if a.name.split(".")[0] == "cdcl_ops"}
            elif isinstance(node, ast.ImportFrom):
                base = package.split(".")
                base = ".".join(base[:len(base) - node.level + 1]) if node.level else ""
                source = ".".join(filter(None, (base, node.module)))
                if source.split(".")[0] != "cdcl_ops":
                    continue
                for alias in node.names:
                    edges.add(f"{source}.{alias.name}" if f"{source}.{alias.name}" in known else source)
        graph[name] = edges & set(modules)
    return graph


def _reach(graph, start):
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_the_registry_imports_no_backend():
    graph = _import_graph()
    assert graph["cdcl_ops.backends.registry"] == {"cdcl_ops.backends.interface", "cdcl_ops.backends.platform"}
    # everything it rests on, transitively: the interface, the platform facts and the row norms
    assert _reach(graph, "cdcl_ops.backends.registry") == {
        "cdcl_ops.backends.interface", "cdcl_ops.backends.platform", "cdcl_ops.normalize"}
    assert graph["cdcl_ops.backends.platform"] == set()  # a leaf
    assert "cdcl_ops.backends.registry" not in _reach(graph, "cdcl_ops.backends.tl_utils")
    for backend in ("reference", "chunked", "triton_backend", "native"):
        assert f"cdcl_ops.backends.{backend}" in graph["cdcl_ops.backends.builtin"]


def test_no_import_cycle():
    graph = _import_graph()
    # the package's __init__ imports the layers to make the API; no module imports it back
    importers = sorted(m for m, edges in graph.items() if "cdcl_ops" in edges)
    assert importers == [], importers
    cycles = [m for m in graph if m in _reach(graph, m)]
    assert cycles == [], cycles
    # the graph is read as Python resolves it: the compiled extension is a module, not the package
    assert "cdcl_ops.backends.native" in graph["cdcl_ops.backends.builtin"]
