"""Patch foreground scores: every backend against a plain per-patch count, patch kinds, group ids."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import cdcl_ops
from cdcl_ops.sampling import per_pixel
from paths import ROOT

BACKENDS = ["torch"]
if "triton" in cdcl_ops.available_backends("cpu"):
    BACKENDS.append("triton")
if hasattr(torch.ops, "cdcl_ops_C") and hasattr(torch.ops.cdcl_ops_C, "patch_fg_counts"):
    BACKENDS.append("cpu")


def loop_counts(labels, grid, fg):
    """Foreground pixels of each patch, counted one patch at a time."""
    b, h, w = labels.shape
    ph, pw = h // grid, w // grid
    out = torch.zeros(b, grid, grid, dtype=torch.int64)
    for i in range(b):
        for gi in range(grid):
            for gj in range(grid):
                patch = labels[i, gi * ph:(gi + 1) * ph, gj * pw:(gj + 1) * pw]
                out[i, gi, gj] = int((patch == fg).sum())
    return out


def first_argmax(logits):
    """argmax over dim 1 written out: the first class holding the maximum; NaN beats numbers."""
    b, c, h, w = logits.shape
    out = torch.zeros(b, h, w, dtype=torch.int64)
    for i in range(b):
        for y in range(h):
            for x in range(w):
                vals = logits[i, :, y, x].tolist()
                nan = [k for k, v in enumerate(vals) if v != v]
                out[i, y, x] = nan[0] if nan else vals.index(max(vals))
    return out


# (B, H, W, grid): awkward patch sizes, grid 1 and grid = feature size
CASES = [(2, 12, 15, 3), (1, 6, 6, 6), (1, 7, 7, 1), (1, 40, 40, 8), (1, 9, 6, 3), (2, 33, 66, 1)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("b,h,w,grid", CASES)
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8])
def test_labels_match_loop(backend, b, h, w, grid, dtype):
    labels = torch.randint(0, 3, (b, h, w)).to(dtype)
    for fg in (1, 2):
        scores, counts = cdcl_ops.patch_foreground_scores(labels, grid, fg_class=fg, backend=backend)
        expected = loop_counts(labels, grid, fg)
        assert counts.dtype == torch.int32 and scores.dtype == torch.float32
        assert counts.shape == (b, grid, grid)
        assert torch.equal(counts.long(), expected)
        torch.testing.assert_close(scores, expected.float() / ((h // grid) * (w // grid)))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("b,h,w,grid", CASES[:4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_logits_with_ties_match_loop(backend, b, h, w, grid, dtype):
    # small integer logits: many pixels have two or three classes tied at the maximum
    logits = torch.randint(0, 3, (b, 4, h, w)).to(dtype)
    logits[0, 2, 0, 0] = float("nan")
    labels = first_argmax(logits.float())
    _, counts = cdcl_ops.patch_foreground_scores(logits, grid, fg_class=1, backend=backend)
    assert torch.equal(counts.long(), loop_counts(labels, grid, 1))


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    logits = torch.randn(2, 10, 3, 12).permute(0, 2, 3, 1)       # (2, 3, 12, 10), channels strided
    labels = torch.randint(0, 2, (12, 2, 16)).permute(1, 0, 2)   # (2, 12, 16)
    _, c1 = cdcl_ops.patch_foreground_scores(logits, 2, backend=backend)
    assert torch.equal(c1.long(), loop_counts(logits.argmax(1), 2, 1))
    _, c2 = cdcl_ops.patch_foreground_scores(labels, 4, backend=backend)
    assert torch.equal(c2.long(), loop_counts(labels, 4, 1))


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_and_absent_class(backend):
    scores, counts = cdcl_ops.patch_foreground_scores(torch.zeros(0, 8, 8, dtype=torch.long), 4,
                                                      backend=backend)
    assert scores.shape == counts.shape == (0, 4, 4)
    # a foreground class beyond C never wins the argmax
    _, counts = cdcl_ops.patch_foreground_scores(torch.randn(2, 2, 4, 4), 2, fg_class=5, backend=backend)
    assert not counts.any()


def test_default_backend_matches_torch():
    labels = torch.randint(0, 2, (2, 16, 16))
    for a, b in zip(cdcl_ops.patch_foreground_scores(labels, 4),
                    cdcl_ops.patch_foreground_scores(labels, 4, backend="torch")):
        assert torch.equal(a, b)


def test_bad_arguments():
    labels = torch.randint(0, 2, (2, 10, 12))
    with pytest.raises(ValueError, match="grid"):
        cdcl_ops.patch_foreground_scores(labels, 4)           # 10 % 4 != 0
    with pytest.raises(ValueError, match="grid"):
        cdcl_ops.patch_foreground_scores(labels, 0)
    with pytest.raises(ValueError, match="labels_or_logits"):
        cdcl_ops.patch_foreground_scores(labels.float(), 2)  # 3-D floats: neither labels nor logits
    with pytest.raises(ValueError, match="labels_or_logits"):
        cdcl_ops.patch_foreground_scores(torch.zeros(2, 2, 4, 4, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="backend"):
        cdcl_ops.patch_foreground_scores(labels, 2, backend="cudnn")
    if "triton" not in BACKENDS:
        with pytest.raises(ValueError, match="backend"):
            cdcl_ops.patch_foreground_scores(labels, 2, backend="triton")


def test_classify_patches_thresholds_inclusive():
    scores = torch.tensor([0.0, 0.3, 0.31, 0.5, 0.69, 0.7, 1.0])
    kinds = cdcl_ops.classify_patches(scores)
    assert kinds.tolist() == [0, 0, -1, -1, -1, 1, 1]
    kinds = cdcl_ops.classify_patches(scores.double(), fdp=0.5, bdp=0.0)
    assert kinds.tolist() == [0, -1, -1, 1, 1, 1, 1]
    # scores computed from counts land exactly on the thresholds (7 of 10, 3 of 10)
    s, _ = cdcl_ops.patch_foreground_scores(torch.tensor([[[1] * 7 + [0] * 3, [1] * 3 + [0] * 7]]), 1)
    assert cdcl_ops.classify_patches(s).item() == -1  # 10 of 20 pixels
    s, _ = cdcl_ops.patch_foreground_scores(torch.tensor([[[1] * 7 + [0] * 3]]), 1)
    assert cdcl_ops.classify_patches(s).item() == 1


@pytest.mark.parametrize("fdp,bdp", [(0.3, 0.3), (0.3, 0.7), (1.2, 0.3), (0.7, -0.1)])
def test_classify_rejects_bad_thresholds(fdp, bdp):
    with pytest.raises(ValueError, match="fdp|bdp"):
        cdcl_ops.classify_patches(torch.rand(3), fdp=fdp, bdp=bdp)


def test_per_pixel_groups_follow_patches():
    kinds = torch.randint(-1, 2, (2, 3, 3))
    pix = per_pixel(kinds, 6, 9).view(2, 6, 9)
    for b in range(2):
        for y in range(6):
            for x in range(9):
                assert pix[b, y, x] == kinds[b, y // 2, x // 3]


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton not installed")
def test_triton_patch_kernel_compiles_for_ampere_and_hopper():
    """The interpreter accepts code the compiler rejects: compile for sm_80 / sm_90 (no GPU needed)."""
    script = textwrap.dedent("""
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from cdcl_ops.backends import triton_patches as tp
        ints = {k: "i32" for k in ("C", "G", "PH", "PW", "stride_b", "stride_c", "stride_h",
                                   "stride_w", "fg")}
        for arch in (80, 90):
            for ptr, logits in (("*fp32", True), ("*bf16", True), ("*i64", False), ("*u8", False)):
                bh, bw = tp.tile_shape(5, 5)
                sig = dict(X=ptr, COUNTS="*i32", **ints, IS_LOGITS="constexpr", BLOCK_H="constexpr",
                           BLOCK_W="constexpr")
                triton.compile(ASTSource(fn=tp._patch_counts_kernel, signature=sig,
                                         constexprs=dict(IS_LOGITS=logits, BLOCK_H=bh, BLOCK_W=bw)),
                               target=GPUTarget("cuda", arch, 32))
                print("compiled", arch, ptr)
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("compiled") == 8


@pytest.mark.gpu
@pytest.mark.parametrize("b,h,w,grid", [(8, 40, 40, 8), (2, 33, 66, 1), (3, 12, 15, 3), (2, 320, 320, 8)])
def test_triton_patch_kernel_on_gpu(b, h, w, grid):
    """The compiled kernel (not the interpreter) against the PyTorch path on CUDA."""
    labels = torch.randint(0, 3, (b, h, w), device="cuda")
    logits = torch.randint(0, 3, (b, 3, h, w), device="cuda").to(torch.bfloat16)  # ties
    channels_last = logits.float().permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    for x in (labels, labels.to(torch.uint8), logits, channels_last):
        _, counts = cdcl_ops.patch_foreground_scores(x, grid, backend="triton")
        _, ref = cdcl_ops.patch_foreground_scores(x, grid, backend="torch")
        assert torch.equal(counts, ref)
