"""The benchmark's inputs and contenders (docs/design.md §6).

Inputs are patch-major: rows [i * P, (i + 1) * P) are patch i's pixels, so the released code's
per-patch loop can slice them. Every contender returns the mean loss over active queries with
autograd, so all of them compute the same number.
"""
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import cdcl_ops
from cdcl_ops._validate import canonical_masks, negative_mask
from cdcl_ops.backends import reference

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


def reference_eager(inp):
    return cdcl_ops.masked_infonce(**_args(inp), temperature=TEMPERATURE, backend="reference",
                                   check_inputs=False)


def compiled_reference():
    compiled = torch.compile(reference.per_query_loss)

    def run(inp):
        masks = canonical_masks(inp["query_labels"], inp["bank_labels"], inp["query_groups"],
                                inp["bank_groups"], inp["group_table"])
        per_q = compiled(inp["query"], inp["positive"], inp["bank"], *masks, TEMPERATURE)
        return per_q.sum() / (masks[1] >= 0).sum().clamp(min=1)
    return run


def _patch_loss(qh, ph, kh, q_lab, q_grp, k_lab, k_grp, table):
    s_pos = (qh * ph).sum(-1) / TEMPERATURE
    s = (qh @ kh.T) / TEMPERATURE
    s = s.masked_fill(~negative_mask(q_lab, q_grp, k_lab, k_grp, table), float("-inf"))
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
    s = s.masked_fill(~negative_mask(q_lab, q_grp, k_lab, k_grp, table), float("-inf"))
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
        if device_type == "cuda":
            table["cuda-bf16"] = (lambda: ours("cuda"), torch.bfloat16)
            # the tensor-core kernels (on request until measured against the CUDA-core ones)
            table["cuda-bf16-tc"] = (lambda: ours("cuda", precision="tf32"), torch.bfloat16)
    return table


def flops(n, m, d, bank_grad):
    """Matrix FLOPs of the fused algorithm (docs/design.md §3): 4NMD forward, +4NMD for the bank grad."""
    return 4 * n * m * d * (2 if bank_grad else 1)
