"""The benchmark's inputs and contenders (docs/design.md §6).

Inputs are patch-major: rows [i * P, (i + 1) * P) are patch i's pixels, so the released code's
per-patch loop can slice them. Every contender returns the mean loss over active queries with
autograd, so all of them compute the same number.
"""
import inspect
import os
import warnings

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import cdcl_ops
from cdcl_ops._validate import canonical_masks, negative_mask
from cdcl_ops.backends import native, reference
from cdcl_ops.backends.interface import Masks

PAPER_TABLE = [[False, True], [True, False]]
SIZES = {
    # name: (N queries, M bank rows, D, pixels per patch)
    "tiny": (1_600, 3_200, 128, 25),
    "small": (3_200, 6_400, 128, 25),
    "paper": (12_800, 25_600, 128, 25),
    "large": (51_200, 102_400, 128, 100),
    "bank": (12_800, 1_048_576, 128, 25),
}
TEMPERATURE = 0.1


def make_inputs(n, m, d, patch, device, dtype=torch.float32, seed=0):
    """Random unit vectors; patch kinds BDP/FDP/MP (groups 0/1/-1), labels mostly following them."""
    gen = torch.Generator().manual_seed(seed)

    def unit(rows):
        return F.normalize(torch.randn(rows, d, generator=gen), dim=1).to(device=device, dtype=dtype)

    def kinds(rows, mp_fraction):
        n_patches = -(-rows // patch)
        kind = torch.randint(0, 2, (n_patches,), generator=gen)
        kind[torch.rand(n_patches, generator=gen) < mp_fraction] = -1
        return kind.repeat_interleave(patch)[:rows]

    q_grp = kinds(n, 0.2)
    k_grp = kinds(m, 0.0)  # the bank holds FDP and BDP pixels only

    def labels(grp):
        flip = torch.rand(grp.shape, generator=gen) < 0.1
        lab = torch.where(grp >= 0, grp, torch.randint(0, 2, grp.shape, generator=gen))
        return torch.where(flip, 1 - lab, lab)

    return dict(query=unit(n), positive=unit(n), bank=unit(m),
                query_labels=labels(q_grp).to(device), bank_labels=labels(k_grp).to(device),
                query_groups=q_grp.to(device), bank_groups=k_grp.to(device),
                group_table=torch.tensor(PAPER_TABLE, device=device), patch=patch)


def _args(inp):
    return {k: v for k, v in inp.items() if k != "patch"}


def ours(backend, **options):
    def run(inp):
        return cdcl_ops.masked_infonce(**_args(inp), temperature=TEMPERATURE, backend=backend,
                                       check_inputs=False, **options)
    return run


def cpu_with_blas():
    """The cpu backend with BLAS products instead of our AVX-512 blocks (what a CPU without the
    instructions runs; bf16 rows upcast per tile). Set for the whole process, forward and
    backward: each CPU contender runs in a process of its own (benchmarks/run.py)."""
    os.environ["CDCL_OPS_CPU_PRODUCTS"] = "blas"
    return ours("cpu")


def reference_eager(inp):
    return cdcl_ops.masked_infonce(**_args(inp), temperature=TEMPERATURE, backend="reference",
                                   check_inputs=False)


def compiled_reference():
    compiled = torch.compile(reference.per_query_loss)

    def run(inp):
        masks = canonical_masks(inp["query_labels"], inp["bank_labels"], inp["query_groups"],
                                inp["bank_groups"], inp["group_table"])
        per_q = compiled(inp["query"], inp["positive"], inp["bank"], masks, TEMPERATURE)
        return per_q.sum() / (masks.q_grp >= 0).sum().clamp(min=1)
    return run


def _patch_loss(qh, ph, kh, q_lab, q_grp, k_lab, k_grp, table):
    s_pos = (qh * ph).sum(-1) / TEMPERATURE
    s = (qh @ kh.T) / TEMPERATURE
    # flat tensors: checkpoint passes its tensor arguments one by one
    s = s.masked_fill(~negative_mask(Masks(q_lab, q_grp, k_lab, k_grp, table)), float("-inf"))
    return (torch.logsumexp(torch.cat([s_pos[:, None], s], 1), 1) - s_pos).sum()


def released_per_patch_checkpoint(inp):
    """The released code's approach: a Python loop over anchor patches, each under checkpoint."""
    q_lab, q_grp, k_lab, k_grp, table = canonical_masks(
        inp["query_labels"], inp["bank_labels"], inp["query_groups"], inp["bank_groups"],
        inp["group_table"])
    qh, ph, kh = (F.normalize(inp[k].float(), dim=1) for k in ("query", "positive", "bank"))
    patch = inp["patch"]
    kinds = q_grp[::patch].tolist()  # the released loop decides on the host which patches count
    total = qh.new_zeros(())
    count = 0
    for i, kind in enumerate(kinds):
        if kind < 0:
            continue
        sl = slice(i * patch, (i + 1) * patch)
        total = total + checkpoint(_patch_loss, qh[sl], ph[sl], kh, q_lab[sl], q_grp[sl], k_lab,
                                   k_grp, table, use_reentrant=False)
        count += patch
    return total / max(count, 1)


def _chunk_lse(qh, kh, q_lab, q_grp, k_lab, k_grp, table):
    s = (qh @ kh.T) / TEMPERATURE
    s = s.masked_fill(~negative_mask(Masks(q_lab, q_grp, k_lab, k_grp, table)), float("-inf"))
    return torch.logsumexp(s, 1)


def chunked_checkpoint(inp, chunk=8000):
    """What other semi-supervised codes do: bank chunks of 8,000 rows, each checkpointed."""
    q_lab, q_grp, k_lab, k_grp, table = canonical_masks(
        inp["query_labels"], inp["bank_labels"], inp["query_groups"], inp["bank_groups"],
        inp["group_table"])
    qh, ph, kh = (F.normalize(inp[k].float(), dim=1) for k in ("query", "positive", "bank"))
    s_pos = (qh * ph).sum(-1) / TEMPERATURE
    parts = [s_pos]
    for c in range(0, kh.shape[0], chunk):
        parts.append(checkpoint(_chunk_lse, qh, kh[c:c + chunk], q_lab, q_grp, k_lab[c:c + chunk],
                                k_grp[c:c + chunk], table, use_reentrant=False))
    lse = torch.logsumexp(torch.stack(parts, 1), 1)
    per_q = torch.where(q_grp >= 0, lse - s_pos, torch.zeros_like(lse))
    return per_q.sum() / (q_grp >= 0).sum().clamp(min=1)


def _flex_api():
    """FlexAttention of this torch: (flex_attention, create_block_mask, keyword arguments that ask
    for the log-sum-exp, a function that picks it from the result), or None without it. Releases
    with `AuxRequest` take `return_aux=AuxRequest(lse=True)`; older ones only `return_lse=True`
    (deprecated where both exist)."""
    try:
        from torch.nn.attention import flex_attention as fa
    except ImportError:
        return None
    if hasattr(fa, "AuxRequest") and "return_aux" in inspect.signature(fa.flex_attention).parameters:
        return fa.flex_attention, fa.create_block_mask, dict(return_aux=fa.AuxRequest(lse=True)), \
            lambda result: result[1].lse
    return fa.flex_attention, fa.create_block_mask, dict(return_lse=True), lambda result: result[1]


def _negatives_mask_mod(q_lab, q_grp, k_lab, k_grp, table):
    """design.md §2's J as a FlexAttention mask_mod over (query i, bank row j), from the canonical
    masks (inactive rows have group -1); the table is read flat, one gather per pair."""
    g = table.shape[1]
    allowed = table.flatten()

    def negative(b, h, i, j):
        qg, kg = q_grp[i], k_grp[j]
        return (qg >= 0) & (kg >= 0) & (q_lab[i] != k_lab[j]) & allowed[qg.clamp(min=0) * g + kg.clamp(min=0)]
    return negative


def flex_loss(compiled, tf32=False):
    """The loss through FlexAttention: the unit queries against the unit bank as keys and values,
    scale 1 / tau, a block mask of J, and the log-sum-exp returned (O is computed and unused).
    With s+ = qh.ph / tau the per-query loss is logaddexp(s+, LSE) - s+: a row without a
    negative has LSE = -inf, so logaddexp gives s+ and the loss is 0, with zero gradients (no NaN).

    The block mask is built inside the step, as a user must: it follows each batch's labels and
    groups. `compiled`: torch.compile the attention and the block-mask construction (the fused
    kernels; on a GPU). Without it FlexAttention runs eagerly and materialises the scores (the
    only mode on a CPU where the log-sum-exp is wanted). `tf32`: fp32 products on TF32 tensor cores
    (FlexAttention's kernel option); otherwise fp32 inputs get IEEE fp32 products."""
    attend, block_mask_of, lse_request, pick_lse = _flex_api()
    if compiled:
        attend = torch.compile(attend)
    options = dict(kernel_options={"FLOAT32_PRECISION": "'tf32'"}) if tf32 else {}

    def run(inp):
        q_lab, q_grp, k_lab, k_grp, table = canonical_masks(
            inp["query_labels"], inp["bank_labels"], inp["query_groups"], inp["bank_groups"],
            inp["group_table"])
        n, m = q_lab.shape[0], k_lab.shape[0]
        with warnings.catch_warnings():  # _compile=True: deprecated in favour of torch.compile in 2.13
            warnings.simplefilter("ignore", DeprecationWarning)
            block_mask = block_mask_of(_negatives_mask_mod(q_lab, q_grp, k_lab, k_grp, table), None,
                                       None, n, m, device=q_lab.device, _compile=compiled)
        qh, ph, kh = (F.normalize(inp[k].float(), dim=1) for k in ("query", "positive", "bank"))
        dtype = inp["query"].dtype  # bf16 features: bf16 products, as the other 16-bit contenders
        q4, k4 = qh.to(dtype)[None, None], kh.to(dtype)[None, None]
        lse = pick_lse(attend(q4, k4, k4, block_mask=block_mask, scale=1.0 / TEMPERATURE,
                              **lse_request, **options))[0, 0].float()
        s_pos = (qh * ph).sum(-1) / TEMPERATURE
        per_q = torch.where(q_grp >= 0, torch.logaddexp(s_pos, lse) - s_pos, torch.zeros_like(s_pos))
        return per_q.sum() / (q_grp >= 0).sum().clamp(min=1)
    return run


def contenders(device_type):
    """name -> (factory of the loss function, feature dtype)."""
    table = {
        "reference": (lambda: reference_eager, torch.float32),
        "released-ckpt": (lambda: released_per_patch_checkpoint, torch.float32),
        "chunked-ckpt": (lambda: chunked_checkpoint, torch.float32),
        "compile(reference)": (compiled_reference, torch.float32),
        "chunked": (lambda: ours("chunked"), torch.float32),
    }
    if "triton" in cdcl_ops.available_backends(device_type) and device_type == "cuda":
        table["triton"] = (lambda: ours("triton", precision="tf32x3"), torch.float32)
        table["triton-ieee"] = (lambda: ours("triton", precision="ieee"), torch.float32)
        table["triton-tf32"] = (lambda: ours("triton", precision="tf32"), torch.float32)
        table["triton-bf16"] = (lambda: ours("triton"), torch.bfloat16)
    if device_type in ("cpu", "cuda") and device_type in cdcl_ops.available_backends(device_type):
        table[device_type] = (lambda: ours(device_type), torch.float32)  # the native kernels
        if device_type == "cpu":
            table["cpu-bf16"] = (lambda: ours("cpu"), torch.bfloat16)
            # the same kernels with BLAS products, where ours run here
            if native.cpu_products(torch.float32) != "blas":
                table["cpu-blas"] = (cpu_with_blas, torch.float32)
            if native.cpu_products(torch.bfloat16) != "blas":
                table["cpu-bf16-blas"] = (cpu_with_blas, torch.bfloat16)
        if device_type == "cuda":
            table["cuda-bf16"] = (lambda: ours("cuda"), torch.bfloat16)
            # the tensor-core kernels (on request until measured against the CUDA-core ones)
            table["cuda-bf16-tc"] = (lambda: ours("cuda", precision="tf32"), torch.bfloat16)
    if _flex_api() is not None:
        # on a CPU FlexAttention runs eagerly and only forward (benchmarks/measure.py records the
        # refused backward); on a GPU compiled, forward and backward
        gpu = device_type == "cuda"
        table["flex"] = (lambda: flex_loss(compiled=gpu), torch.float32)
        if gpu:
            table["flex-tf32"] = (lambda: flex_loss(compiled=True, tf32=True), torch.float32)
            table["flex-bf16"] = (lambda: flex_loss(compiled=True), torch.bfloat16)
    return table


def flops(n, m, d, bank_grad, backward=True):
    """Matrix FLOPs of the fused algorithm (docs/design.md §3): 4NMD forward, +4NMD for the bank
    grad (its pass recomputes the scores: bounded memory); 2NMD for a forward alone (no O needed)."""
    if not backward:
        return 2 * n * m * d
    return 4 * n * m * d * (2 if bank_grad else 1)


def exponentials(n, m, bank_grad, backward=True):
    """exp evaluations of the fused algorithm: N x M per pass over the bank (the bank gradient's
    pass recomputes exp(s - LSE))."""
    return n * m * (2 if bank_grad and backward else 1)
