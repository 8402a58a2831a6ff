"""Pixel contrast over every pixel with cdcl_ops.supervised_contrast: ContrastiveSeg's loss with
its memory queue, and pytorch-metric-learning's SupConLoss, without subsampling the anchors
(docs/loss.md, "Supervised pixel contrast"; docs/design.md §7).

    python examples/pixel_contrast.py

Each part first checks the op against the loss written out with its N x M matrix on a small
batch, then runs it on every pixel of a batch of feature maps (at training sizes, that matrix is
what runs GPUs out of memory). tests/test_supervised_contrast_example.py runs this file.
"""
import torch
import torch.nn.functional as F

import cdcl_ops

IGNORE = -1  # labels < 0 are inactive rows: ContrastiveSeg's ignore label, mapped to -1


def contrastiveseg_loss(anchors, labels, queue, queue_labels, temperature, base_temperature):
    """ContrastiveSeg's pixel-contrast loss (Wang et al. 2021, Eq. 3) against a memory queue,
    written out with the N x M matrix: for each anchor, the mean over the queue rows of its class
    p of -log(e^s_p / (e^s_p + sum over the other classes' rows n of e^s_n)), s = cos / tau,
    scaled by tau / base_tau and averaged over the anchors."""
    s = F.normalize(anchors, dim=1) @ F.normalize(queue, dim=1).T / temperature
    pos = labels[:, None] == queue_labels[None, :]
    neg_lse = torch.logsumexp(s.masked_fill(pos, float("-inf")), dim=1, keepdim=True)
    per_pair = torch.logaddexp(s, neg_lse) - s
    per_anchor = (per_pair * pos).sum(1) / pos.sum(1)
    return temperature / base_temperature * per_anchor.mean()


class PixelContrast(torch.nn.Module):
    """ContrastiveSeg's pixel contrast of every labelled pixel against a class-wise memory queue
    (`per_class` rows of each class, refreshed with pixels of the current batch)."""

    def __init__(self, classes, dim, per_class, temperature=0.1, base_temperature=0.07, pixels_per_image=10):
        super().__init__()
        self.temperature, self.base_temperature = temperature, base_temperature
        self.pixels_per_image = pixels_per_image
        self.register_buffer("queue", F.normalize(torch.randn(classes * per_class, dim), dim=1))
        self.register_buffer("queue_labels", torch.arange(classes).repeat_interleave(per_class))
        self.register_buffer("cursor", torch.zeros(classes, dtype=torch.long))
        self.per_class = per_class

    def forward(self, features, labels):
        """features (B, D, H, W), labels (B, H, W) with IGNORE for unlabelled pixels."""
        b, d, h, w = features.shape
        rows = features.permute(0, 2, 3, 1).reshape(-1, d)
        flat = labels.reshape(-1)
        # every pixel is an anchor: no max_samples, no max_views
        loss = cdcl_ops.supervised_contrast(rows, flat, self.queue, self.queue_labels,
                                            denominator="negatives", temperature=self.temperature)
        self._enqueue(F.normalize(rows.detach(), dim=1).view(b, h * w, d), flat.view(b, h * w))
        return loss * (self.temperature / self.base_temperature)

    @torch.no_grad()
    def _enqueue(self, rows, labels):
        """A few random pixels of each class present in each image replace that class's oldest."""
        for image, image_labels in zip(rows, labels):
            for c in image_labels[image_labels >= 0].unique().tolist():
                pick = torch.nonzero(image_labels == c).flatten()
                pick = pick[torch.randperm(len(pick))[: self.pixels_per_image]]
                slots = c * self.per_class + (self.cursor[c] + torch.arange(len(pick))) % self.per_class
                self.queue[slots] = image[pick]
                self.cursor[c] = (self.cursor[c] + len(pick)) % self.per_class


def contrastiveseg_example(gen):
    # 1. the op against the loss written out, on a small batch
    anchors = torch.randn(300, 32, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 5, (300,), generator=gen)
    queue = torch.randn(5 * 40, 32, generator=gen, dtype=torch.float64)
    queue_labels = torch.arange(5).repeat_interleave(40)
    want = contrastiveseg_loss(anchors, labels, queue, queue_labels, 0.1, 0.07)
    got = cdcl_ops.supervised_contrast(anchors, labels, queue, queue_labels, denominator="negatives",
                                       temperature=0.1) * (0.1 / 0.07)
    torch.testing.assert_close(got, want)

    # 2. every pixel of a batch of 19-class feature maps: 2 x 96 x 96 = 18,432 anchors against a
    # queue of 19 x 500 rows (the matrix: 175 million scores, 700 MB in fp32, per copy)
    criterion = PixelContrast(classes=19, dim=64, per_class=500)
    features = torch.randn(2, 64, 96, 96, generator=gen, requires_grad=True)
    seg = torch.randint(0, 19, (2, 96, 96), generator=gen)
    seg[:, :8] = IGNORE
    loss = criterion(features, seg)
    loss.backward()
    assert torch.isfinite(loss) and features.grad[:, :, :8].abs().max() == 0  # ignored pixels
    print(f"ContrastiveSeg pixel contrast over {int((seg >= 0).sum())} pixels: {loss.item():.4f}")


def supcon_example(gen):
    try:
        from pytorch_metric_learning.losses import SupConLoss
    except ImportError:
        print("pytorch-metric-learning is not installed: the SupConLoss comparison is skipped")
        return
    # 1. SupConLoss (in-batch: every other row of the anchor's label is a positive) and the op
    # with bank=None; every anchor here has positives and negatives, where the two means agree
    emb = torch.randn(256, 32, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 10, (256,), generator=gen)
    a, b = emb.clone().requires_grad_(), emb.clone().requires_grad_()
    theirs = SupConLoss(temperature=0.1)(a, labels)
    ours = cdcl_ops.supervised_contrast(b, labels, temperature=0.1)
    theirs.backward()
    ours.backward()
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(b.grad, a.grad)

    # 2. every pixel of a batch as an anchor of SupCon: 2 x 64 x 64 = 8,192 pixels, each
    # against all the others (its N x N matrix: 67 million scores)
    features = torch.randn(2, 32, 64, 64, generator=gen, requires_grad=True)
    seg = torch.randint(0, 10, (2, 64, 64), generator=gen)
    rows = features.permute(0, 2, 3, 1).reshape(-1, 32)
    loss = cdcl_ops.supervised_contrast(rows, seg.reshape(-1), temperature=0.1)
    loss.backward()
    print(f"SupCon over {rows.shape[0]} pixels: {loss.item():.4f}")


if __name__ == "__main__":
    generator = torch.Generator().manual_seed(0)
    contrastiveseg_example(generator)
    supcon_example(generator)
