"""The CUDA kernels of csrc/cuda, run on the CPU by the emulator of tests/native/cuda_emu (see
tests/native/cuda_emulator.py): their results against the float64 reference through the public
API, on shapes that cross every block and tile edge, both the CUDA-core and the tensor-core (WMMA)
paths.

This checks the kernels' logic (indexing, ragged tiles, masks, online log-sum-exp, barriers,
launch configuration, shared-memory limits), not the hardware: the GPU tests (tests/gpu/) stay
the word on real devices. The emulator's own checks are tested first, with kernels that
break its rules (tests/native/cuda_emu/selftest.cu). Skipped where no C++ compiler is found.
"""
import ctypes
import dataclasses

import pytest
import torch

import cdcl_ops
from cdcl_ops._validate import canonical_masks
from cdcl_ops.backends import native, registry
from cdcl_ops.normalize import inverse_norms
from cuda_emulator import Emulator, compiler
from helpers import (
    assert_close_to_reference,
    assert_compiled_matches_eager,
    assert_matches,
    assert_outputs_match_fake,
    loss_and_grads,
    make_inputs,
    rows_of_magnitude,
    strided_weights,
    with_nan_rows,
)

pytestmark = pytest.mark.skipif(compiler() is None, reason="no C++ compiler for the CUDA emulator")

# CUDA-core kernels: blocks own 16 rows, tiles stream 32. Tensor-core kernels: 64 and 64, columns
# padded to a multiple of 16. D picks 1, 2, 4, 8 or 16 column chunks of 32 per lane.
SHAPES = [(37, 53, 1), (29, 45, 3), (19, 41, 96), (23, 39, 200), (65, 129, 33)]


@pytest.fixture(scope="module")
def emulator():
    return Emulator()


@pytest.fixture
def emulated_cuda(emulator):
    """backend="cuda" on CPU tensors, served by the emulated kernels: the public API end to end
    (validation, the custom op, its autograd, the bank-gradient rescaling) over the CUDA code."""
    real = registry.get("cuda")
    # the real record's limits, the emulator's kernels, and CPU tensors
    registry.register(dataclasses.replace(real, device_types=("cpu",), available=lambda device: (True, ""),
                                          forward=emulator.forward, bank_grad=emulator.bank_grad,
                                          patch_counts=None, patch_default_on=()), replace=True)
    emulator.schedule_seed = 0
    yield emulator
    emulator.schedule_seed = 0
    registry.register(real, replace=True)


# -- the emulator's own checks ---------------------------------------------------------------------

def _ptr(t):
    return ctypes.c_void_p(t.data_ptr())


@pytest.fixture
def lib(emulator):
    """The emulator's library with threads run in index order (the self-tests rely on it)."""
    emulator.lib.cdcl_emu_set_schedule(0)
    return emulator.lib


def test_selftest_block_barrier(lib):
    x, out = torch.rand(128), torch.zeros(1)
    assert lib.cdcl_emu_selftest_block_sum(_ptr(x), _ptr(out), 1) == 0
    torch.testing.assert_close(out[0], x.sum())
    # without the barrier thread 0 reads shared memory the others have not written yet
    assert lib.cdcl_emu_selftest_block_sum(_ptr(x), _ptr(out), 0) == 0
    assert torch.isnan(out[0])


def test_selftest_warp_collectives(lib):
    x = torch.randn(128)
    x[32:64] = -x[32:64].abs()  # warp 1 has no positive lane
    out, anyp = torch.zeros(4), torch.zeros(4, dtype=torch.int32)
    assert lib.cdcl_emu_selftest_warp_sum(_ptr(x), _ptr(out), _ptr(anyp)) == 0
    torch.testing.assert_close(out, x.view(4, 32).sum(1))
    assert anyp.tolist() == [int(bool((w > 0).any())) for w in x.view(4, 32)]


def test_selftest_divergent_barrier_is_a_deadlock(lib):
    out = torch.zeros(128)
    err = lib.cdcl_emu_selftest_divergent_barrier(_ptr(out))
    assert err == 719 and b"deadlock" in lib.cdcl_emu_message()


def test_selftest_wmma(lib):
    a, b = torch.randn(16, 16).half(), torch.randn(16, 16).half()
    b_col = b.t().contiguous()  # column-major b
    c = torch.zeros(16, 16)
    assert lib.cdcl_emu_selftest_wmma(_ptr(a), _ptr(b_col), _ptr(c), 0) == 0
    torch.testing.assert_close(c, a.float() @ b.float(), rtol=1e-5, atol=1e-5)
    # a tile 2 elements (4 bytes) off the 256-bit alignment WMMA requires
    assert lib.cdcl_emu_selftest_wmma(_ptr(a), _ptr(b_col), _ptr(c), 2) == 719
    assert b"aligned" in lib.cdcl_emu_message()


def test_selftest_shared_memory_limit(lib):
    x, out = torch.rand(128), torch.zeros(1)
    assert lib.cdcl_emu_selftest_smem_optin(_ptr(x), _ptr(out), 0) == 1  # InvalidValue
    assert lib.cdcl_emu_selftest_smem_optin(_ptr(x), _ptr(out), 1) == 0
    torch.testing.assert_close(out[0], x.sum())


def test_selftest_16bit_conversions_match_torch(lib):
    # every fp16 and bf16 value and the points halfway between neighbours (ties to even), the
    # fp16 subnormals, overflow to inf, signs, inf and NaN
    half = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.float16).float()
    bf16 = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).float()
    finite = torch.cat([half, bf16])
    finite = finite[torch.isfinite(finite)].unique()
    mids = (finite[:-1].double() + finite[1:].double()).div(2).float()
    x = torch.cat([finite, mids, torch.randn(10000) * 1e-5, torch.randn(10000) * 3e4,
                   torch.tensor([65519.0, 65520.0, 1e38, float("inf"), -float("inf"), float("nan")])])
    n = x.numel()
    hb, bb = torch.zeros(n, dtype=torch.int16), torch.zeros(n, dtype=torch.int16)
    hf, bf = torch.zeros(n), torch.zeros(n)
    f = lib.cdcl_emu_selftest_convert
    f.argtypes = [ctypes.c_void_p, ctypes.c_int64] + [ctypes.c_void_p] * 4
    f(_ptr(x), n, _ptr(hb), _ptr(bb), _ptr(hf), _ptr(bf))
    for bits, back, dtype in ((hb, hf, torch.float16), (bb, bf, torch.bfloat16)):
        expect = x.to(dtype)
        got = bits.view(dtype)
        nan = torch.isnan(expect)
        assert torch.equal(torch.isnan(got), nan) and torch.isnan(back[nan]).all()
        assert torch.equal(got[~nan].view(torch.int16), expect[~nan].view(torch.int16))
        assert torch.equal(back[~nan], expect[~nan].float())


# -- the library's kernels -------------------------------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES)
def test_cuda_core_fp32(emulated_cuda, shape):
    assert_close_to_reference(make_inputs(*shape), "cuda", torch.float32, True)


@pytest.mark.parametrize("shape", [(29, 45, 3), (23, 39, 200)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_core_16bit(emulated_cuda, shape, dtype):
    assert_close_to_reference(make_inputs(*shape), "cuda", dtype, True)


def test_cuda_core_largest_d_needs_the_shared_memory_opt_in(emulated_cuda):
    # D = 512: 98 KB of shared memory per block, over the 48 KB default
    assert_close_to_reference(make_inputs(20, 40, 512), "cuda", torch.float32, True)


# D = 16 and 256 are the edges of the tensor-core kernels' padding; 300 falls back to CUDA cores
@pytest.mark.parametrize("shape", [(37, 53, 1), (70, 130, 16), (65, 129, 33), (23, 39, 200),
                                   (17, 70, 256), (9, 20, 300)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_tensor_cores_16bit(emulated_cuda, shape, dtype):
    assert_close_to_reference(make_inputs(*shape), "cuda", dtype, True, precision="tf32")


@pytest.mark.parametrize("precision", ["auto", "tf32"])
@pytest.mark.parametrize("groups", [True, False])
def test_bank_detached_and_groups(emulated_cuda, precision, groups):
    assert_close_to_reference(make_inputs(70, 90, 24, groups=groups), "cuda", torch.bfloat16, False,
                              precision=precision)


@pytest.mark.parametrize("precision", ["auto", "tf32"])
def test_many_groups_table_lookup(emulated_cuda, precision):
    inputs = make_inputs(40, 100, 8, n_groups=70)
    inputs["bank_groups"][::3] = 69
    assert_close_to_reference(inputs, "cuda", torch.float16, True, precision=precision)


@pytest.mark.parametrize("precision", ["auto", "tf32"])
def test_rows_without_negatives_are_zero(emulated_cuda, precision):
    inputs = make_inputs(80, 70, 16)
    inputs["query_labels"][40:] = -1  # inactive queries: loss and gradients exactly 0
    loss, grads = loss_and_grads(inputs, "cuda", dtype=torch.bfloat16, precision=precision)
    assert torch.all(loss[40:] == 0) and torch.all(grads[0][40:] == 0)
    assert torch.isfinite(grads[2]).all()


@pytest.mark.parametrize("precision", ["auto", "tf32"])
def test_no_negative_anywhere(emulated_cuda, precision):
    # every block skips its tile loop (the block-uniform early exit): loss 0, zero gradients
    inputs = make_inputs(40, 70, 16)
    inputs["bank_labels"][:] = -1
    loss, grads = loss_and_grads(inputs, "cuda", dtype=torch.float16, precision=precision)
    assert torch.all(loss == 0) and all(torch.all(g == 0) for g in grads)


@pytest.mark.parametrize("n,m", [(0, 40), (40, 0), (0, 0)])
def test_empty(emulated_cuda, n, m):
    loss, grads = loss_and_grads(make_inputs(n, m, 8), "cuda", dtype=torch.float32)
    assert loss.shape == (n,) and torch.all(loss == 0)
    assert all(torch.all(g == 0) for g in grads)


@pytest.mark.parametrize("precision", ["auto", "tf32"])
def test_other_thread_orders(emulated_cuda, precision):
    # a fresh random order of the threads at every barrier round: other interleavings
    emulated_cuda.schedule_seed = 12345
    inputs = make_inputs(70, 130, 40)
    assert_close_to_reference(inputs, "cuda", torch.bfloat16, True, precision=precision)
    first = loss_and_grads(inputs, "cuda", dtype=torch.bfloat16, precision=precision)
    emulated_cuda.schedule_seed = 999
    second = loss_and_grads(inputs, "cuda", dtype=torch.bfloat16, precision=precision)
    assert torch.equal(first[0], second[0])  # deterministic whatever the order
    assert all(torch.equal(a, b) for a, b in zip(first[1], second[1]))


def test_fp16_bank_grad_weights_need_the_rescaling(emulator):
    # The WMMA bank gradient rounds the weights exp(s - lse) gs to fp16 before its second product.
    # Under a mean over 51,200 queries gs = 1 / (N tau) ~ 2e-4, and against a 25,600-row bank
    # exp(s - lse) ~ 1e-4: the weights fall below fp16's smallest subnormal (6e-8) unless gs is
    # divided by its largest magnitude first, as the bank-gradient op does. dK rows are independent,
    # so 64 bank rows (with the LSE of the whole bank) and 4,096 of the queries show it.
    from cdcl_ops._validate import canonical_masks
    from cdcl_ops.backends import chunked
    from cdcl_ops.backends.interface import InverseNorms, Masks, Options
    from cdcl_ops.normalize import inverse_norms
    n, m = 4096, 25600
    inp = make_inputs(n, m, 64, seed=3)
    ql, qg, kl, kg, table = canonical_masks(inp["query_labels"], inp["bank_labels"],
                                            inp["query_groups"], inp["bank_groups"], inp["group_table"])
    q, p, k = (inp[name].float() for name in ("query", "positive", "bank"))
    lse = chunked.forward(q, p, k, InverseNorms.of(q, p, k), Masks(ql, qg, kl, kg, table),
                          Options(10.0), False)[1]
    masks = Masks(ql, qg, kl[:64].contiguous(), kg[:64].contiguous(), table)
    gs = torch.full((n,), 10.0 / 51200)
    qd, kd = q.double(), k[:64].double()
    ref = chunked.bank_grad(qd, kd, InverseNorms.of(qd, None, kd), masks, lse.double(), gs.double(),
                            Options(10.0))
    qh, kh = q.half(), k[:64].half()

    def rel_err(scale):
        got = emulator.infonce_bank_grad(qh, kh, inverse_norms(qh), inverse_norms(kh), *masks, lse,
                                         gs / scale, 10.0, True) * scale
        return ((got.double() - ref).abs().max() / ref.abs().max()).item()

    assert rel_err(gs.abs().max()) < 5e-3  # the op's rescaling (measured 6e-4)
    assert rel_err(1.0) > 3e-2  # without it (measured 8%)


def test_deterministic(emulated_cuda):
    inputs = make_inputs(50, 100, 24)
    l1, g1 = loss_and_grads(inputs, "cuda", dtype=torch.float32)
    l2, g2 = loss_and_grads(inputs, "cuda", dtype=torch.float32)
    assert torch.equal(l1, l2) and all(torch.equal(a, b) for a, b in zip(g1, g2))


@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8, torch.bool, torch.float32,
                                   torch.bfloat16, torch.float16])
def test_patch_fg_counts_match_cpu(emulator, dtype):
    native = pytest.importorskip("cdcl_ops.backends.native")
    if not native.HAS_CPU:
        pytest.skip(f"cdcl_ops._C not built: {native.LOAD_ERROR}")
    if dtype.is_floating_point:
        x = torch.randint(0, 3, (2, 3, 24, 40)).to(dtype)  # ties: the first maximum wins
        x[0, 1, :3, :5] = float("nan")  # NaN counts as the maximum, as torch.argmax
    else:
        x = torch.randint(0, 2 if dtype == torch.bool else 3, (2, 24, 40)).to(dtype)
    expect = torch.ops.cdcl_ops_C.patch_fg_counts(x, 4, 1)
    assert torch.equal(emulator.patch_fg_counts(x, 4, 1), expect)


def test_public_api_reaches_the_emulated_kernels(emulated_cuda):
    before = emulated_cuda.fiber_switches
    inputs = make_inputs(5, 7, 4, dtype=torch.float32)
    cdcl_ops.masked_infonce(**inputs, backend="cuda")
    assert emulated_cuda.fiber_switches > before


# -- what the ops promise torch.compile (tests/ops/test_op_contract.py), on the CUDA kernels ------

@pytest.fixture(scope="module")
def emulated_ops(emulator):
    """The emulated kernels as ops of their own (the cdcl_ops_C schemas, CPU tensors) whose fake
    kernels are the ones cdcl_ops registers for the CUDA ops: what the glue allocates (the
    emulator's wrappers allocate as csrc/cuda/cuda_glue.cpp does) held to what Inductor is told."""
    if not native.LOADED:
        pytest.skip(f"the schemas come from cdcl_ops._C, not loaded here ({native.LOAD_ERROR})")
    lib = torch.library.Library("cdcl_emu_contract", "DEF")
    for name, impl, fake in (("infonce_fwd", emulator.infonce_fwd, native.fwd_fake),
                             ("infonce_bank_grad", emulator.infonce_bank_grad, native.bank_grad_fake)):
        schema = str(getattr(torch.ops.cdcl_ops_C, name).default._schema)
        lib.define(schema.split("::", 1)[1])
        lib.impl(name, impl, "CPU")
        torch.library.register_fake(f"cdcl_emu_contract::{name}", fake, lib=lib)
    yield torch.ops.cdcl_emu_contract
    lib._destroy()


@pytest.mark.parametrize("n,m,d", [(0, 9, 3), (7, 0, 3), (5, 9, 1), (19, 41, 200)])
@pytest.mark.parametrize("dtype,tensor_cores", [(torch.float32, False), (torch.bfloat16, True)])
def test_emulated_glue_matches_the_fake_kernels(emulated_ops, n, m, d, dtype, tensor_cores):
    inp = make_inputs(n, m, d, dtype=dtype, seed=11)
    masks = canonical_masks(inp["query_labels"], inp["bank_labels"], inp["query_groups"],
                            inp["bank_groups"], inp["group_table"])
    q, p, k = inp["query"], inp["positive"], inp["bank"]
    inv = [inverse_norms(x) for x in (q, p, k)]
    for need_o in (True, False):
        args = (q, p, k, *inv, *masks, 10.0, need_o, tensor_cores)
        _, lse, _ = assert_outputs_match_fake(emulated_ops.infonce_fwd, args)
        torch.library.opcheck(emulated_ops.infonce_fwd, args)
    args = (q, k, inv[0], inv[2], *masks, lse, torch.rand(n), 10.0, tensor_cores)
    assert_outputs_match_fake(emulated_ops.infonce_bank_grad, args)
    torch.library.opcheck(emulated_ops.infonce_bank_grad, args)


@pytest.mark.parametrize("precision", ["auto", "tf32"])
def test_opcheck_library_ops_on_the_emulated_kernels(emulated_cuda, precision):
    # with features that require grad opcheck also compiles the op's autograd (aot_eager) and
    # compares its gradients with eager ones
    dtype = torch.bfloat16 if precision == "tf32" else torch.float32  # tf32: the tensor-core path
    inp = make_inputs(23, 37, 24, dtype=dtype, seed=12)
    masks = canonical_masks(inp["query_labels"], inp["bank_labels"], inp["query_groups"],
                            inp["bank_groups"], inp["group_table"])
    q, p, k = (inp[n].requires_grad_() for n in ("query", "positive", "bank"))
    torch.library.opcheck(torch.ops.cdcl_ops.masked_infonce_fwd,
                          (q, p, k, *masks, 10.0, "cuda", 0, precision, True))
    _, lse, _, inv_q, _, inv_k = torch.ops.cdcl_ops.masked_infonce_fwd(
        q.detach(), p.detach(), k.detach(), *masks, 10.0, "cuda", 0, precision, False)
    torch.library.opcheck(torch.ops.cdcl_ops.masked_infonce_bank_grad,
                          (q.detach(), k.detach(), inv_q, inv_k, *masks, lse, torch.rand(23) * 10.0,
                           10.0, "cuda", 0, precision))


@pytest.mark.parametrize("case", ["bank-detached", "query-only", "strided-upstream"])
def test_compiled_gradients_match_eager_cases(emulated_cuda, case):
    kw = {"bank-detached": dict(requires_grad=("query", "positive")),
          "query-only": dict(requires_grad=("query",)),
          "strided-upstream": dict(weights=strided_weights(70, "cpu"))}[case]
    assert_compiled_matches_eager(make_inputs(70, 130, 32, dtype=torch.float32, seed=2), "cuda",
                                  compiler="aot_eager", **kw)


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compile_fullgraph(emulated_cuda, compiler):
    # the dtype and D of the GPU test that failed on the H200 in the first GPU run (smaller N, M)
    assert_compiled_matches_eager(make_inputs(70, 130, 32, dtype=torch.float32, seed=2), "cuda",
                                  compiler=compiler)


# -- issue 12: NaN rows, rows up to the float32 range, small temperatures -------------------------

@pytest.mark.parametrize("where", ["some_bank_rows", "all_bank_rows", "a_query_row"])
@pytest.mark.parametrize("precision", ["auto", "tf32"])
def test_nan_rows_give_nan_where_the_reference_does(emulated_cuda, where, precision):
    inputs = with_nan_rows(make_inputs(20, 40, 16, seed=6), where, [2, 7, 33])
    want = loss_and_grads(inputs, "reference")
    dtype = torch.bfloat16 if precision == "tf32" else torch.float32  # tf32: the tensor-core path
    got = loss_and_grads(inputs, "cuda", dtype=dtype, precision=precision)
    assert torch.equal(torch.isnan(got[0]), torch.isnan(want[0])) and torch.isnan(want[0]).any()
    assert torch.isnan(got[1][0][torch.isnan(want[0])]).all()  # the queries whose loss is NaN
    # the kernels skip weights that are exactly 0, so the reference's 0 * NaN terms of its dense
    # products (NaN in every bank row once one query row is NaN) do not appear: no NaN beyond it
    for g, r in zip(got[1], want[1]):
        assert not (torch.isnan(g) & ~torch.isnan(r)).any()


@pytest.mark.parametrize("scales", [[1e19, 3e19], [3.4e38, 1e38], [1e-20, 1e-40]])
def test_float32_rows_of_any_magnitude(emulated_cuda, scales):
    inputs = rows_of_magnitude(make_inputs(10, 40, 4, seed=8), torch.float32, scales)
    want = loss_and_grads({k: (v.double() if k in ("query", "positive", "bank") else v)
                           for k, v in inputs.items()}, "reference")
    norms = {name: inputs[name].double().norm(dim=1, keepdim=True).clamp(min=1e-12)
             for name in ("query", "positive", "bank")}
    assert_matches(loss_and_grads(inputs, "cuda"), want, scale_rows=norms)


@pytest.mark.parametrize("tau", [1e-3, 1e-4])
def test_bank_gradient_at_the_minimum_temperature(emulated_cuda, tau):
    # the CUDA-core kernels recompute each score with the forward's FMA chain and rounding
    inputs = make_inputs(40, 70, 16, seed=1)
    want = loss_and_grads(inputs, "reference", temperature=tau)
    assert_matches(loss_and_grads(inputs, "cuda", dtype=torch.float32, temperature=tau), want)
