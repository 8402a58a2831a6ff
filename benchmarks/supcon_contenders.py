"""The benchmark of the supervised contrastive loss (docs/design.md §6, §7): its inputs, contenders
and work counts, for denominator "all" (SupCon's L_out, pytorch-metric-learning's SupConLoss) and
"negatives" (ContrastiveSeg's pixel contrast).

Inputs: N anchors against a queue of M rows, as ContrastiveSeg's memory: random unit vectors,
anchor labels drawn from C classes, the queue C blocks of M / C rows, one per class; no inactive
rows and no groups (SupConLoss has neither). The queue is detached in ContrastiveSeg; the
benchmark's --bank-grad yes also times the bank gradient. Every contender returns the mean over
the anchors with a positive, with autograd.
"""
import torch
import torch.nn.functional as F

import cdcl_ops
from cdcl_ops._validate import canonical_masks
from cdcl_ops.backends import reference

SIZES = {
    # name: (N anchors, M queue rows, D, C classes)
    "tiny": (1_600, 3_800, 128, 19),
    # the CDCL paper's size (design.md §6), two classes (foreground, background)
    "paper": (12_800, 25_600, 128, 2),
    # ContrastiveSeg on Cityscapes: 16,384 anchors against 19 classes x 5,000 queue rows, D 256
    "contrastiveseg": (16_384, 95_000, 256, 19),
}
SWEEP_CLASSES = 19  # sweep points N<n>xM<m>: D 128, 19 classes
TEMPERATURE = 0.1


def size(name):
    """A named size, or a sweep point 'N<n>xM<m>'; None when the name is neither."""
    if name in SIZES:
        return SIZES[name]
    try:
        n, m = name[1:].split("xM")
        return int(n), int(m), 128, SWEEP_CLASSES
    except ValueError:
        return None


def make_inputs(n, m, d, classes, device, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def unit(rows):
        return F.normalize(torch.randn(rows, d, generator=gen), dim=1).to(device=device, dtype=dtype)

    return dict(query=unit(n), bank=unit(m),
                query_labels=torch.randint(0, classes, (n,), generator=gen).to(device),
                bank_labels=(torch.arange(m) * classes // max(m, 1)).to(device))


def _args(inp, denominator):
    return dict(query=inp["query"], query_labels=inp["query_labels"], bank=inp["bank"],
                bank_labels=inp["bank_labels"], denominator=denominator, temperature=TEMPERATURE)


def ours(backend, denominator, **options):
    def run(inp):
        return cdcl_ops.supervised_contrast(**_args(inp, denominator), backend=backend,
                                            check_inputs=False, **options)
    return run


def compiled_reference(denominator):
    compiled = torch.compile(reference.contrast_per_query)

    def run(inp):
        masks = canonical_masks(inp["query_labels"], inp["bank_labels"], None, None, None)
        per_q, n_pos = compiled(inp["query"], None, inp["bank"], masks, TEMPERATURE, denominator)
        return per_q.sum() / (n_pos > 0).sum().clamp(min=1)
    return run


def supcon_loss():
    """pytorch-metric-learning's SupConLoss with the queue as its reference embeddings (the
    N x M similarity and both masks materialised; its mean over the anchors with a non-zero loss
    is ours here: every anchor has positives and negatives)."""
    from pytorch_metric_learning.losses import SupConLoss
    loss_fn = SupConLoss(temperature=TEMPERATURE)

    def run(inp):
        return loss_fn(inp["query"].float(), inp["query_labels"], ref_emb=inp["bank"].float(),
                       ref_labels=inp["bank_labels"])
    return run


def _has_pml():
    try:
        import pytorch_metric_learning  # noqa: F401
    except ImportError:
        return False
    return True


def contenders(device_type, denominator):
    """name -> (factory of the loss function, feature dtype)."""
    table = {
        "reference": (lambda: ours("reference", denominator), torch.float32),
        "compile(reference)": (lambda: compiled_reference(denominator), torch.float32),
        "chunked": (lambda: ours("chunked", denominator), torch.float32),
    }
    if denominator == "all" and _has_pml():
        table["supconloss"] = (supcon_loss, torch.float32)
    backends = cdcl_ops.available_backends(device_type, loss="supervised_contrast")
    if device_type == "cuda" and "triton" in backends:
        table["triton"] = (lambda: ours("triton", denominator, precision="tf32x3"), torch.float32)
        table["triton-tf32"] = (lambda: ours("triton", denominator, precision="tf32"), torch.float32)
        table["triton-bf16"] = (lambda: ours("triton", denominator), torch.bfloat16)
    if device_type == "cpu" and "cpu" in backends:
        table["cpu"] = (lambda: ours("cpu", denominator), torch.float32)
        table["cpu-bf16"] = (lambda: ours("cpu", denominator), torch.bfloat16)
    return table


def flops(n, m, d, bank_grad, backward=True, denominator="all"):
    """Matrix FLOPs of the fused algorithm (docs/design.md §7), 2NMD per product:
    "all": scores, O and the positives' rows (6NMD); "negatives": scores and O, then scores and the
    positives' weighted rows in the second pass (8NMD); the bank gradient +4NMD (scores again,
    and its product). A forward alone: the scores of each pass (2NMD, 4NMD)."""
    passes = 1 if denominator == "all" else 2
    if not backward:
        return 2 * n * m * d * passes
    forward = 6 * n * m * d if denominator == "all" else 8 * n * m * d
    return forward + (4 * n * m * d if bank_grad else 0)


def exponentials(n, m, bank_grad, backward=True, denominator="all"):
    """exp evaluations: N x M per pass over the bank (the second pass of "negatives" and the bank
    gradient's included)."""
    passes = 1 if denominator == "all" else 2
    return n * m * (passes + (1 if bank_grad and backward else 0))
