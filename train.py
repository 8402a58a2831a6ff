"""Semi-supervised nuclei segmentation with mean teacher and the CDCL loss (docs/training.md).

    python train.py --data data/dsb2018_sample --preset small --method cdcl --out runs/demo
    torchrun --nproc_per_node 2 train.py ...            # DDP (gloo on CPU, nccl on CUDA)

Methods: suponly (labeled part only), fullsup (every training image labeled), meanteacher
(L_sup + w_cons L_cons + 0.01 L_ent: the paper's Scheme 6, CDCL without L_contr), cdcl
(L_sup + 0.1 L_contr + w_cons L_cons + 0.01 L_ent). --no-contr, --no-cons, --no-ent, --sampling
give the ablations. One epoch is ceil(training images / batch) iterations for every method
(--iters-per-epoch overrides), so budgets compare across methods.
Training sees random --input-size crops of each image at its own pixel scale; validation, the test
and predict.py run the model over overlapping, blended windows at native resolution. --resize gives
the paper's protocol instead (every image resized to --input-size squared, for Table-1-style runs).
Outputs in --out: config.json, splits.json, log.csv, last.pt, best.pt, metrics.json/.md (the test
images at native resolution, with Otsu's threshold beside the model), overlays/.
"""
from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import os
import sys
import time
import uuid

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from cdcl_nuclei import augment, cli, crops, data, models, schedules
from cdcl_nuclei.checkpoint import (
    CheckpointError,
    check_compatible,
    load_checkpoint,
    load_into,
    remove_stale_temporaries,
    save_checkpoint,
)
from cdcl_nuclei.evaluate import (
    InferenceConfig,
    evaluate_samples,
    otsu_dice,
    overlay,
    predict_probability,
    summary_lines,
    validation_dice,
    write_report,
)
from cdcl_ops import CrossPatchInfoNCE, CrossPatchOptions, available_backends

METHODS = ("suponly", "fullsup", "meanteacher", "cdcl")
# losses on by default per method: (cons, contr, ent)
DEFAULT_LOSSES = {"suponly": (False, False, False), "fullsup": (False, False, False),
                  "meanteacher": (True, False, True), "cdcl": (True, True, True)}
LOSS_TERMS = ("loss", "sup", "dice", "cons", "contr", "ent")
# settings a resumed run may change: where it writes and how it runs, never what it computes
RESUME_FREE = ("out", "threads", "no_progress", "stop_after_epochs", "device", "resume", "overlays", "no_test")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--data", default="data/dsb2018_sample", help="dataset folder (dsb: one folder, split 7:1:2; "
      "monuseg: a folder with train/ and test/)")
    a("--dataset", default="dsb", choices=("dsb", "monuseg"))
    a("--format", default="auto", choices=("auto", "layout", "dsb", "monuseg"), help="on-disk format")
    a("--max-images", type=int, default=None, help="use a seeded subset of this many images")
    a("--out", default="runs/train")
    a("--method", default="cdcl", choices=METHODS)
    a("--labeled-fraction", default="1/8", help="1/32, 1/16, 1/8, 1 or any fraction")
    a("--preset", default="small", choices=sorted(models.PRESETS))
    a("--input-size", type=int, default=None, help="side of the training crops, a multiple of 8 x --grid "
      "(default: the preset's)")
    a("--resize", action="store_true", help="the paper's protocol: resize every image (MoNuSeg: every "
      "250x250 tile) to --input-size x --input-size for training and inference, instead of native-"
      "resolution crops and tiled inference")
    a("--scale-range", type=float, nargs=2, default=(0.8, 1.25), metavar=("LO", "HI"),
      help="zoom range of the augmentation at native resolution (with --resize: the paper's 0.7 1.0 crop)")
    a("--window", type=int, default=256, help="inference window side at native resolution (multiple of 32)")
    a("--overlap", type=int, default=64, help="overlap of neighbouring inference windows, in pixels")
    a("--flips", action=argparse.BooleanOptionalAction, default=True, help="test-time augmentation: "
      "average the four flips of each window in the test evaluation and predict.py (validation runs "
      "without, as it runs every epoch)")
    a("--pretrained", default=None, help="local torchvision DenseNet state dict for the encoder")
    a("--epochs", type=int, default=80)
    a("--iters-per-epoch", type=int, default=None)
    a("--batch-size", type=int, default=8, help="labeled images per step (all ranks together)")
    a("--unlabeled-batch-size", type=int, default=8, help="unlabeled images per step (all ranks)")
    a("--lr", type=float, default=1e-4)
    a("--poly-power", type=float, default=0.9)
    a("--ema-alpha", type=float, default=0.999)
    a("--unsup-start-epoch", type=int, default=6, help="first epoch (1-based) of the unlabeled branch")
    a("--rampup-epochs", type=float, default=None, help="length T of the w_cons ramp (default: --epochs)")
    a("--w-contr", type=float, default=0.1)
    a("--w-cons", type=float, default=1.0, help="final consistency weight")
    a("--w-ent", type=float, default=0.01)
    a("--w-dice", type=float, default=0.0, help="weight of a soft-Dice term added to L_sup (0: the paper's "
      "cross-entropy alone)")
    for name in ("cons", "contr", "ent"):
        a(f"--{name}", action=argparse.BooleanOptionalAction, default=None,
          help=f"L_{name} on/off (default: per method)")
    a("--sampling", default="pixel-patch", choices=("pixel-patch", "pixel", "random"))
    a("--semantics", default="paper", choices=("paper", "official"))
    a("--grid", type=int, default=8)
    a("--fdp", type=float, default=0.7)
    a("--bdp", type=float, default=0.3)
    a("--temperature", type=float, default=0.1)
    a("--memory", type=int, default=1)
    a("--loss-backend", default=None)
    a("--loss-compact", action="store_true", help="CrossPatchInfoNCE(compact=True): drop inactive rows "
      "before the op (less work, one host synchronisation)")
    a("--seed", type=int, default=0, help="initialisation, labeled subset, sampling and augmentation")
    a("--split-seed", type=int, default=0, help="the train/val/test split (fixed across --seed)")
    a("--device", default="auto")
    a("--autocast", default="none", choices=("none", "bf16"), help="bf16 autocast for the training "
      "forward passes (GPU runs of the paper preset)")
    a("--channels-last", action="store_true", help="channels_last memory format for model and inputs")
    a("--threads", type=int, default=None)
    a("--resume", default=None, help="checkpoint to continue from ('auto': OUT/last.pt if present)")
    a("--stop-after-epochs", type=int, default=None,
      help="leave after this many epochs of this invocation (the schedules still span --epochs)")
    a("--val-every", type=int, default=1, help="validate (and update best.pt) every N epochs and after the last")
    a("--overlays", type=int, default=8, help="test images to draw overlays for")
    a("--no-test", action="store_true", help="skip the final test evaluation")
    a("--no-progress", action="store_true")
    return p.parse_args(argv)


# numeric flags and their ranges (cli.number's arguments); checked before anything is read or written
RANGES = {
    "epochs": dict(lo=1), "batch_size": dict(lo=1), "unlabeled_batch_size": dict(lo=1),
    "unsup_start_epoch": dict(lo=1), "grid": dict(lo=1), "memory": dict(lo=1), "val_every": dict(lo=1),
    "overlays": dict(lo=0), "max_images": dict(lo=1, optional=True), "iters_per_epoch": dict(lo=1, optional=True),
    "threads": dict(lo=1, optional=True), "stop_after_epochs": dict(lo=1, optional=True),
    "rampup_epochs": dict(lo=0, optional=True), "lr": dict(lo=0, lo_open=True),
    "temperature": dict(lo=0, lo_open=True), "poly_power": dict(lo=0), "ema_alpha": dict(lo=0, hi=1),
    "fdp": dict(lo=0, hi=1), "bdp": dict(lo=0, hi=1), "w_contr": dict(lo=0), "w_cons": dict(lo=0),
    "w_ent": dict(lo=0), "w_dice": dict(lo=0), "input_size": dict(lo=1, optional=True),
}


def flag(name):
    return "--" + name.replace("_", "-")


def resolve(args):
    for name, limits in RANGES.items():
        cli.number(flag(name), getattr(args, name), **limits)
    device = cli.device("--device", args.device)
    if args.loss_backend is not None and args.loss_backend not in available_backends(device):
        raise ValueError(f"--loss-backend: expected one of {available_backends(device)} on {device.type}, "
                         f"got {args.loss_backend!r}")
    cli.output_folder("--out", args.out)
    if args.pretrained is not None:
        cli.regular_file("--pretrained", args.pretrained)
    try:
        fraction = data.parse_fraction("1" if args.method == "fullsup" else args.labeled_fraction)
    except ValueError as e:  # its message starts with the parameter's name
        raise ValueError(f"--labeled-fraction{str(e).removeprefix('labeled_fraction')}") from None
    args.labeled_fraction = str(fraction)
    d_cons, d_contr, d_ent = DEFAULT_LOSSES[args.method]
    supervised = args.method in ("suponly", "fullsup")
    for name, default in (("cons", d_cons), ("contr", d_contr), ("ent", d_ent)):
        v = getattr(args, name)
        if supervised and v:
            raise ValueError(f"--{name}: method {args.method} trains on labeled images only")
        setattr(args, name, default if v is None else v)
    size = args.input_size or models.PRESETS[args.preset].input_size
    if size % (8 * args.grid) or size % 32:
        raise ValueError(f"--input-size: expected a multiple of {math.lcm(8 * args.grid, 32)} (stride-8 features "
                         f"cut into a {args.grid}x{args.grid} grid, a stride-32 encoder), got {size}")
    cfg = models.model_config(args.preset, input_size=args.input_size)
    args.model = cfg
    try:
        args.inference = InferenceConfig(window=args.window, overlap=args.overlap, flips=args.flips,
                                         resize=cfg.input_size if args.resize else None)
    except ValueError as e:  # its messages start with the field name, which is the flag's
        raise ValueError(f"--{e}") from None
    if args.val_every < 1:
        raise ValueError(f"--val-every: expected >= 1, got {args.val_every}")
    lo, hi = args.scale_range = [float(v) for v in args.scale_range]  # one type through JSON and checkpoints
    if not (0 < lo <= hi and math.isfinite(hi)):
        raise ValueError(f"--scale-range: expected 0 < LO <= HI, got {lo} {hi}")
    args.data = os.path.realpath(args.data)  # a resumed run must read the same folder, from any cwd
    if args.rampup_epochs is None:
        args.rampup_epochs = float(args.epochs)
    return args


def run_config(args):
    d = {k: v for k, v in vars(args).items() if k not in ("model", "inference")}
    d["model"] = models.asdict(args.model)
    d["inference"] = models.asdict(args.inference)
    return d


# ---------------------------------------------------------------- distributed

def setup_distributed(device_arg):
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device_arg == "auto":
        device_arg = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device_arg)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return world, rank, device


def all_mean(x: float, world: int) -> float:
    if world == 1:
        return x
    t = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t) / world


# ---------------------------------------------------------------- data

class IndexStream:
    """Endless stream of indices: seeded permutations of `pool` one after another."""

    def __init__(self, pool, g):
        self.pool, self.g, self.buf = list(pool), g, []

    def take(self, n):
        while len(self.buf) < n:
            self.buf += [self.pool[i] for i in torch.randperm(len(self.pool), generator=self.g).tolist()]
        out, self.buf = self.buf[:n], self.buf[n:]
        return out


def load_data(args, rank):
    splits = data.dataset_splits(args.dataset, args.data, seed=args.split_seed, fmt=args.format,
                                 max_images=args.max_images)
    tile = 250 if args.dataset == "monuseg" else None
    show = rank == 0 and not args.no_progress
    train = data.training_samples(splits["train"], tile, args.model.input_size if args.resize else None,
                                  "train images", show)
    labeled = data.labeled_indices(len(train), args.labeled_fraction, args.seed)
    lab_set = set(labeled)
    unlabeled = [i for i in range(len(train)) if i not in lab_set]
    split_ids = {"train_labeled": [train[i].id for i in labeled],
                 "train_unlabeled": [train[i].id for i in unlabeled],
                 "val": [e.id for e in splits["val"]], "test": [e.id for e in splits["test"]]}
    return dict(train=train, labeled=labeled, unlabeled=unlabeled, val=data.load_full(splits["val"], tile),
                test_entries=splits["test"], tile=tile, split_ids=split_ids)


# ---------------------------------------------------------------- losses

def entropy(logits):
    p = logits.float().softmax(dim=1)
    return -(p * torch.log(p.clamp_min(1e-8))).sum(dim=1).mean()


def soft_dice_loss(logits, target):
    """1 - soft Dice of the foreground probability against the binary target, over the batch."""
    p = 1.0 - logits.float().softmax(dim=1)[:, 0]
    t = (target > 0).float()
    return 1.0 - (2.0 * (p * t).sum() + 1.0) / (p.sum() + t.sum() + 1.0)


def contrast_shares(stats, feats, grid):
    """What the contrastive loss saw in one step: the share of student patches that are FDP and BDP,
    the share of pixels that are queries with at least one negative, negatives per query."""
    b, _, h, w = feats.shape
    patches, pixels = b * grid * grid, b * h * w
    return {"fdp_share": stats["fdp_patches"] / patches, "bdp_share": stats["bdp_patches"] / patches,
            "query_share": stats["queries"] / pixels,
            "with_negative_share": stats["queries_with_negative"] / pixels,
            "negatives_per_query": stats["negatives_per_query"]}


class NonFiniteLoss(RuntimeError):
    """A loss term became NaN or infinite: the run stops before the step changes any weight."""


def epoch_seed(seed, epoch, rank):
    return (seed * 1_000_003 + epoch * 9_973 + rank * 101) % (2 ** 63)


class Trainer:
    def __init__(self, args, world, rank, device):
        self.args, self.world, self.rank, self.device = args, world, rank, device
        self.main = rank == 0
        for name, total in (("--batch-size", args.batch_size), ("--unlabeled-batch-size", args.unlabeled_batch_size)):
            if total % world:
                raise ValueError(f"{name}: expected a multiple of the {world} processes, got {total}")
        self.bl, self.bu = args.batch_size // world, args.unlabeled_batch_size // world
        torch.manual_seed(args.seed)
        self.d = load_data(args, rank)
        self.semi = args.method in ("meanteacher", "cdcl")
        if self.semi and not self.d["unlabeled"]:
            raise ValueError(f"--labeled-fraction: {args.labeled_fraction} leaves no unlabeled image for {args.method}")
        n_train = len(self.d["train"])
        self.iters = args.iters_per_epoch or max(1, math.ceil(n_train / args.batch_size))
        args.iters_per_epoch = self.iters
        self.student = models.build_model(args.model, args.pretrained).to(device)
        if args.channels_last:
            self.student = self.student.to(memory_format=torch.channels_last)
        self.teacher = copy.deepcopy(self.student).eval() if self.semi else None
        if self.teacher is not None:
            for p in self.teacher.parameters():
                p.requires_grad_(False)
        self.net = self.student
        if world > 1:
            # the projector is idle before the unlabeled branch starts
            self.net = torch.nn.parallel.DistributedDataParallel(
                self.student, device_ids=[device.index] if device.type == "cuda" else None,
                find_unused_parameters=True)
        self.contr = CrossPatchInfoNCE(CrossPatchOptions(
            grid=args.grid, fdp=args.fdp, bdp=args.bdp, temperature=args.temperature, memory=args.memory,
            semantics=args.semantics, sampling=args.sampling, backend=args.loss_backend,
            compact=args.loss_compact)).to(device) if args.contr else None
        self.opt = torch.optim.Adam(self.student.parameters(), lr=args.lr)
        self.sched = schedules.poly_scheduler(self.opt, args.epochs * self.iters, args.poly_power)
        self.aug = augment.AugmentConfig(scale=(0.7, 1.0) if args.resize else tuple(args.scale_range))
        self.epoch, self.step, self.best = 0, 0, -1.0
        self.run_id = uuid.uuid4().hex  # a resumed run takes its checkpoint's

    # -- checkpoints
    def state(self):
        return {"epoch": self.epoch, "step": self.step, "best_dice": self.best, "run_id": self.run_id,
                "config": run_config(self.args), "student": self.student.state_dict(),
                "teacher": self.teacher.state_dict() if self.teacher is not None else None,
                "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
                "loss": self.contr.state_dict() if self.contr is not None else None,
                "rng": {"torch": torch.get_rng_state(),
                        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}}

    def resume(self, path):
        st = load_checkpoint(path, map_location=self.device)
        now = run_config(self.args)
        check_compatible(path, st["config"], now, [k for k in now if k not in RESUME_FREE])
        load_into(self.student, st["student"], path, "student")
        if self.teacher is not None:
            load_into(self.teacher, st["teacher"], path, "teacher")
        if self.contr is not None:
            load_into(self.contr, st["loss"], path, "loss (feature bank)")
        try:
            self.opt.load_state_dict(st["optimizer"])
            self.sched.load_state_dict(st["scheduler"])
            torch.set_rng_state(st["rng"]["torch"].cpu())
            if torch.cuda.is_available() and st["rng"]["cuda"]:
                torch.cuda.set_rng_state_all(st["rng"]["cuda"])
            self.epoch, self.step, self.best, self.run_id = (int(st["epoch"]), int(st["step"]),
                                                              float(st["best_dice"]), str(st["run_id"]))
        except (ValueError, KeyError, RuntimeError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{path}: the training state does not fit this run "
                                  f"({type(e).__name__}: {e})") from None
        if not 0 <= self.epoch <= self.args.epochs:
            raise CheckpointError(f"{path}: epoch {self.epoch} is outside this run's 0..{self.args.epochs}")

    def save(self, name):
        if self.main:
            save_checkpoint(os.path.join(self.args.out, name), self.state())

    # -- one step
    def batch(self, idx, g, labeled):
        x, labels = crops.random_crops(self.d["train"], idx, self.args.model.input_size, g)
        fmt = torch.channels_last if self.args.channels_last else torch.contiguous_format
        if labeled:
            xs, y = augment.labeled_view(x, labels, self.aug, g)
            return augment.normalize(xs).to(self.device, memory_format=fmt), (y > 0).long().to(self.device)
        weak, strong = augment.weak_strong_pair(x, self.aug, g)
        return (augment.normalize(weak).to(self.device, memory_format=fmt),
                augment.normalize(strong).to(self.device, memory_format=fmt))

    def train_step(self, lab_stream, unl_stream, g, t_epoch, unsup):
        a = self.args
        xl, yl = self.batch(lab_stream.take(self.bl), g, True)
        parts = {}
        cast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=a.autocast == "bf16")
        if unsup:
            weak, strong = self.batch(unl_stream.take(self.bu), g, False)
            with cast:
                out = self.net(torch.cat([xl, strong]), features=a.contr)
        else:
            with cast:
                out = self.net(xl, features=False)
        logits = out["logits"]
        loss = parts["sup"] = F.cross_entropy(logits[:self.bl].float(), yl)
        if a.w_dice:
            parts["dice"] = soft_dice_loss(logits[:self.bl], yl)
            loss = loss + a.w_dice * parts["dice"]
        w_cons = a.w_cons * schedules.sigmoid_rampup(t_epoch, a.rampup_epochs)
        if unsup:
            s_logits = logits[self.bl:]
            with torch.no_grad(), cast:
                t_out = self.teacher(weak, features=a.contr)
            if a.cons:
                parts["cons"] = F.cross_entropy(s_logits.float(), t_out["logits"].argmax(dim=1))
                loss = loss + w_cons * parts["cons"]
            if a.ent:
                parts["ent"] = entropy(s_logits)
                loss = loss + a.w_ent * parts["ent"]
            if a.contr:
                parts["contr"], st = self.contr(out["proj"][self.bl:], t_out["proj"],
                                                out["logits_low"][self.bl:], t_out["logits_low"], return_stats=True)
                loss = loss + a.w_contr * parts["contr"]
                parts.update(contrast_shares(st, out["proj"][self.bl:], a.grid))
        terms = {k: v for k, v in parts.items() if isinstance(v, torch.Tensor)}
        values = torch.stack([v.detach().float() for v in terms.values()])
        if not bool(torch.isfinite(values).all()):  # one synchronisation; the values are logged anyway
            name, v = next((k, v) for k, v in terms.items() if not bool(torch.isfinite(v)))
            raise NonFiniteLoss(f"step {self.step + 1}: the loss term {name} is {float(v.detach())}; stopped before "
                                "this step changed any weight (last.pt holds the last finished epoch)")
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.sched.step()
        if self.teacher is not None:
            schedules.ema_update(self.teacher, self.student, schedules.ema_alpha(self.step, a.ema_alpha))
        self.step += 1
        parts = {k: float(v.detach()) for k, v in parts.items()}
        parts["loss"] = float(loss.detach())
        parts["w_cons"] = w_cons if unsup and a.cons else 0.0
        return parts

    def train_epoch(self):
        a, e = self.args, self.epoch
        seed = epoch_seed(a.seed, e, self.rank)
        torch.manual_seed(seed)  # dropout: each epoch's randomness depends only on (seed, epoch, rank)
        g = torch.Generator().manual_seed(seed)
        lab = IndexStream(self.d["labeled"], g)
        unl = IndexStream(self.d["unlabeled"], g) if self.semi else None
        unsup = self.semi and (e + 1) >= a.unsup_start_epoch
        self.student.train()
        sums, n = {}, 0
        bar = tqdm(range(self.iters), desc=f"epoch {e + 1}/{a.epochs}", leave=False,
                   disable=a.no_progress or not self.main, dynamic_ncols=True)
        for it in bar:
            parts = self.train_step(lab, unl, g, e + it / self.iters, unsup)
            n += 1
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v
            bar.set_postfix({k: f"{v / n:.3f}" for k, v in sums.items() if k in LOSS_TERMS})
        bar.close()
        return {k: all_mean(v / n, self.world) for k, v in sums.items()}

    def fit(self, log_path, tb, resumed=False):
        a = self.args
        fields = ["epoch", "step", "lr", "loss", "sup", "dice", "cons", "contr", "ent", "w_cons", "fdp_share",
                  "bdp_share", "query_share", "with_negative_share", "negatives_per_query", "val_dice", "seconds"]
        if self.main:
            start_log(log_path, fields, self.epoch if resumed else 0)
        stop = a.epochs if a.stop_after_epochs is None else min(a.epochs, self.epoch + a.stop_after_epochs)
        while self.epoch < stop:
            t0 = time.time()
            stats = self.train_epoch()
            self.epoch += 1
            validate = self.d["val"] and (self.epoch % a.val_every == 0 or self.epoch == a.epochs)
            dice = validation_dice(self.student, self.d["val"], a.inference, self.device) if validate else float("nan")
            row = {"epoch": self.epoch, "step": self.step, "lr": self.opt.param_groups[0]["lr"],
                   **stats, "val_dice": dice, "seconds": round(time.time() - t0, 2)}
            if self.main:
                with open(log_path, "a", newline="") as f:
                    csv.writer(f).writerow([row.get(k, "") for k in fields])
                msg = " ".join(f"{k}={row[k]:.4f}" for k in LOSS_TERMS if k in row)
                print(f"epoch {self.epoch}/{a.epochs} {msg} val_dice={dice:.4f} ({row['seconds']}s)", flush=True)
                if tb is not None:
                    for k, v in row.items():
                        if k not in ("epoch", "step"):
                            tb.add_scalar(k, v, self.epoch)
                    preview(tb, self.student, self.d["val"], a.inference, self.device, self.epoch)
            improved = not math.isnan(dice) and dice > self.best
            if improved:
                self.best = dice
            self.save("last.pt")
            if improved:
                self.save("best.pt")


def start_log(path, fields, epochs_done):
    """A fresh log, or the log of a resumed run cut to its checkpoint's epochs: a run killed between
    writing an epoch's row and its checkpoint redoes that epoch, which must not log it twice."""
    rows = []
    if epochs_done and os.path.exists(path):
        with open(path, newline="") as f:
            rows = [r for r in csv.DictReader(f) if r.get("epoch", "").isdigit() and int(r["epoch"]) <= epochs_done]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


@torch.no_grad()
def preview(tb, model, samples, cfg, device, epoch, n=4):
    """Overlays of the first validation images (prediction green, ground truth red, overlap yellow)."""
    for s in samples[:n]:
        pred = predict_probability(model, s.image, cfg, device) > cfg.threshold
        tb.add_image(f"val/{s.id}", overlay(s.image, pred, s.labels, stretch=True), epoch, dataformats="HWC")


def tensorboard_writer(out):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(os.path.join(out, "tb"))


def test_checkpoint(trainer, device) -> str:
    """Load this run's best.pt into the student for the test, and say which weights are tested.
    A best.pt written by another run (another run id) is refused, never silently reported."""
    best = os.path.join(trainer.args.out, "best.pt")
    if not os.path.exists(best):
        why = "no validation images" if not trainer.d["val"] else "no validation score was finite"
        return f"last epoch ({why}, so no best.pt)"
    st = load_checkpoint(best, device)
    if st.get("run_id") != trainer.run_id:
        raise CheckpointError(f"{best}: written by another run (run id {st.get('run_id')!r}, this run "
                              f"{trainer.run_id!r}); move it away or train in a fresh --out")
    load_into(trainer.student, st["student"], best, "student")
    return f"best.pt (epoch {st['epoch']}, validation Dice {100 * st['best_dice']:.2f})"


def main(argv=None):
    args = parse_args(argv)
    try:
        resolve(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    world, rank, device = setup_distributed(args.device)
    try:
        if rank == 0 and os.path.isdir(args.out):
            remove_stale_temporaries(args.out)
        trainer = Trainer(args, world, rank, device)
        if args.resume == "auto":
            last = os.path.join(args.out, "last.pt")
            args.resume = last if os.path.exists(last) else None
        if args.resume:
            trainer.resume(args.resume)
        if rank == 0:
            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, "config.json"), "w") as f:
                json.dump(run_config(args), f, indent=2)
            with open(os.path.join(args.out, "splits.json"), "w") as f:
                json.dump(trainer.d["split_ids"], f, indent=1)
            print(f"{args.method}: {len(trainer.d['labeled'])} labeled + {len(trainer.d['unlabeled'])} unlabeled "
                  f"training {'tiles' if trainer.d['tile'] else 'images'}, {len(trainer.d['val'])} val, "
                  f"{len(trainer.d['test_entries'])} test images{' (tiled)' if trainer.d['tile'] else ''}; "
                  f"{trainer.iters} iterations/epoch, {world} process(es) on {device}", flush=True)
            if trainer.d["val"]:
                print(f"validation: Otsu's threshold (no learning) scores Dice {100 * otsu_dice(trainer.d['val']):.2f} "
                      "over the set", flush=True)
        if rank == 0 and not args.resume:
            # a fresh run must never report a model left behind by an earlier run in the same folder
            for name in ("best.pt", "last.pt"):
                if os.path.exists(os.path.join(args.out, name)):
                    os.remove(os.path.join(args.out, name))
        tb = tensorboard_writer(args.out) if rank == 0 else None
        trainer.fit(os.path.join(args.out, "log.csv"), tb, resumed=bool(args.resume))
        if tb is not None:
            tb.close()
        finished = trainer.epoch >= args.epochs
        if rank == 0 and finished and not args.no_test and trainer.d["test_entries"]:
            model, tested = trainer.student, test_checkpoint(trainer, device)
            print(f"testing the model of {tested}", flush=True)
            samples = data.load_full(trainer.d["test_entries"], trainer.d["tile"])
            comp = evaluate_samples(model, samples, args.inference, device, args.out, args.overlays,
                                    progress=not args.no_progress)
            report = write_report(comp, args.out, "metrics",
                                  f"Test metrics ({args.method}, {args.labeled_fraction} labeled)",
                                  extra={"method": args.method, "labeled_fraction": args.labeled_fraction,
                                         "checkpoint": tested})
            print(f"test images -> {os.path.join(args.out, 'metrics.md')}", flush=True)
            for line in summary_lines(report):
                print(line, flush=True)
    except (CheckpointError, data.DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLoss as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
