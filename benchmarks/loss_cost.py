"""Forward + backward time of CrossPatchInfoNCE at the paper's size, per masked-InfoNCE backend.

Paper size: 8 unlabeled images, 128 x 40 x 40 projector features, predictions (logits) at the
320 x 320 input resolution, grid 8 (5 x 5-pixel patches), memory 1 (current + previous batch).
Predictions are smooth random blobs, about half foreground, so FDP, BDP and MP patches all occur.

    python -m benchmarks.loss_cost [--backends chunked reference] [--repeats 5] [--device cpu]
                                   [--compact no|yes|both]

The triton backend runs on CPU only in Triton's interpreter, which is far too slow to be a
measurement: it is left out on CPU unless named explicitly.
"""
import argparse
import platform
import statistics
import time

import torch
import torch.nn.functional as F

import cdcl_ops


def blob_logits(b, size, gen, device):
    """(B, 2, size, size) logits of smooth random blobs, about half of the pixels foreground."""
    field = torch.randn(b, 1, size // 16, size // 16, generator=gen)
    field = F.interpolate(field, size=(size, size), mode="bilinear", align_corners=False)
    return torch.cat([-field, field], dim=1).mul(4).to(device)


def make_batch(args, gen, device):
    b, d, h = args.batch, args.dim, args.feat
    return (torch.randn(b, d, h, h, generator=gen).to(device).requires_grad_(True),
            torch.randn(b, d, h, h, generator=gen).to(device),
            blob_logits(b, args.image, gen, device), blob_logits(b, args.image, gen, device))


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_backend(backend, args, device, compact):
    gen = torch.Generator().manual_seed(0)
    loss_fn = cdcl_ops.CrossPatchInfoNCE(cdcl_ops.CrossPatchOptions(grid=args.grid, memory=args.memory,
                                                                    backend=backend, compact=compact))
    batches = [make_batch(args, gen, device) for _ in range(2)]
    times = []
    for i in range(args.warmup + args.repeats):
        fs, ft, ps, pt = batches[i % 2]
        fs.grad = None
        sync(device)
        start = time.perf_counter()
        loss, stats = loss_fn(fs, ft, ps, pt, return_stats=True)
        loss.backward()
        sync(device)
        if i >= args.warmup:  # the first calls fill the bank and warm caches
            times.append(time.perf_counter() - start)
    stats = {k: round(float(v), 4) for k, v in stats.items()}
    return statistics.median(times), min(times), float(loss.detach()), stats


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backends", nargs="*", default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--feat", type=int, default=40)
    p.add_argument("--image", type=int, default=320)
    p.add_argument("--grid", type=int, default=cdcl_ops.CrossPatchOptions.grid)
    p.add_argument("--memory", type=int, default=cdcl_ops.CrossPatchOptions.memory)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--compact", choices=["no", "yes", "both"], default="both",
                   help="time the dense path (static shapes), the compacted one, or both")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    backends = args.backends
    if backends is None:
        backends = [be for be in cdcl_ops.available_backends(device)
                    if not (be == "triton" and device.type == "cpu")]
    print(f"# {platform.machine()} {device} ({torch.get_num_threads()} threads"
          f"{', ' + torch.cuda.get_device_name(device) if device.type == 'cuda' else ''}), "
          f"torch {torch.__version__}; {args.batch} x {args.dim} x {args.feat} x {args.feat} features, "
          f"{args.image} x {args.image} logits, grid {args.grid}, memory {args.memory}; "
          f"median of {args.repeats} after {args.warmup} warm-up")
    print("| backend | compact | forward+backward median (s) | min (s) | loss | stats |")
    print("| --- | --- | --- | --- | --- | --- |")
    modes = {"no": [False], "yes": [True], "both": [False, True]}[args.compact]
    for backend in backends:
        for compact in modes:
            med, best, loss, stats = time_backend(backend, args, device, compact)
            print(f"| {backend} | {compact} | {med:.3f} | {best:.3f} | {loss:.4f} | {stats} |", flush=True)


if __name__ == "__main__":
    main()
