"""The training run (docs/training.md): set-up, one step, an epoch, validation, checkpoints and
resume, the loop over epochs, and the final test evaluation with Otsu's threshold beside the model.

`run_training` is what `cdcl-train` (train.py) runs once the settings are checked and the process
group is up; `Trainer` holds the state of one process of it.
"""
from __future__ import annotations

import copy
import csv
import json
import math
import os
import time
import uuid
from dataclasses import replace

import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import augment, crops, data, instances, losses, models, schedules, targets
from .checkpoint import (
    CheckpointError,
    check_compatible,
    load_checkpoint,
    load_into,
    remove_stale_temporaries,
    save_checkpoint,
)
from .config import TrainRun, before_settings, renamed, resume_checked
from .distributed import all_mean
from .evaluate import (
    evaluate_samples,
    otsu_dice,
    overlay,
    predict_probability,
    summary_lines,
    validation_dice,
    write_report,
)
from .pseudo_labels import LOG_FIELDS as PSEUDO_FIELDS
from .pseudo_labels import PseudoLabelStats, image_kind
from .streams import IndexStream, epoch_seed

LOSS_TERMS = ("loss", "sup", "dice", "cons", "contr", "ent")
LOG_FIELDS = ("epoch", "step", "lr", "loss", "sup", "dice", "cons", "contr", "ent", "w_cons", "fdp_share",
              "bdp_share", "query_share", "with_negative_share", "negatives_per_query", "val_dice",
              "teacher_val_dice", "cons_kept", *PSEUDO_FIELDS, "seconds")
# CutMix boxes are whole cells of this many pixels: a multiple of every stride the model outputs at
# (logits 1, logits_low 2 or 4, projector features 8) and a divisor of the 32 inputs must divide
CUTMIX_CELL = 16
# the teacher confidence at which the pseudo-label log counts a pixel as confident, whatever the run's
# --cons-threshold, so that runs compare
REPORT_CONFIDENCE = 0.95


class NonFiniteLoss(RuntimeError):
    """A loss term became NaN or infinite: the run stops before the step changes any weight."""


def load_data(s, input_size, rank, names):
    """The split of the settings `s`: training samples (labeled and unlabeled indices), validation
    samples, the test entries (read at the end), the ids of each part and how many labeled images were
    held out for validation (the user's own images without --val)."""
    show, resize, held_out = rank == 0 and not s.no_progress, input_size if s.resize else None, 0
    if s.labeled is None:  # the benchmark protocol: a labeled set, part of whose labels the run hides
        splits = data.dataset_splits(s.dataset, s.data, seed=s.split_seed, fmt=s.format, max_images=s.max_images,
                                     channel=s.channel)
        tile = 250 if s.dataset == "monuseg" else None
        train = data.training_samples(splits["train"], tile, resize, "train images", show)
        labeled = data.labeled_indices(len(train), s.labeled_fraction, s.seed)
    else:  # the user's own images: the unlabeled ones come without labels
        splits, tile = data.own_splits(s.labeled, s.unlabeled or (), s.val or (), s.test or (), s.channel), None
        if s.val is None:
            try:
                splits["train"], splits["val"] = data.hold_out_validation(splits["train"], s.split_seed)
            except ValueError as e:  # its message starts with the parameter's name
                raise renamed(e, names) from None
            held_out = len(splits["val"])
        train = data.training_samples(splits["train"] + splits["unlabeled"], None, resize, "train images", show)
        labeled = list(range(len(splits["train"])))
    lab_set = set(labeled)
    unlabeled = [i for i in range(len(train)) if i not in lab_set]
    split_ids = {"train_labeled": [train[i].id for i in labeled],
                 "train_unlabeled": [train[i].id for i in unlabeled],
                 "val": [e.id for e in splits["val"]], "test": [e.id for e in splits["test"]]}
    return dict(train=train, labeled=labeled, unlabeled=unlabeled, val=data.load_full(splits["val"], tile),
                test_entries=splits["test"], tile=tile, split_ids=split_ids, held_out=held_out)


class Trainer:
    def __init__(self, run: TrainRun, world, rank, device):
        s, names = run.settings, run.names
        self.world, self.rank, self.device = world, rank, device
        self.main = rank == 0
        for name in ("batch_size", "unlabeled_batch_size"):
            if getattr(s, name) % world:
                raise ValueError(f"{names[name]}: expected a multiple of the {world} processes, "
                                 f"got {getattr(s, name)}")
        self.bl, self.bu = s.batch_size // world, s.unlabeled_batch_size // world
        torch.manual_seed(s.seed)
        self.d = load_data(s, run.model.input_size, rank, names)
        self.kinds = [image_kind(x.image) for x in self.d["train"]]
        self.pseudo = PseudoLabelStats()
        self.semi = losses.METHODS[s.method].semi
        if self.semi and not self.d["unlabeled"]:
            if s.labeled is None:
                raise ValueError(f"{names['labeled_fraction']}: {s.labeled_fraction} leaves no unlabeled image "
                                 f"for {s.method}")
            raise ValueError(f"{names['unlabeled']}: every image named is also a labeled, validation or test image, "
                             f"so {s.method} has no unlabeled image")
        self.iters = s.iters_per_epoch or max(1, math.ceil(len(self.d["train"]) / s.batch_size))
        self.run = replace(run, settings=replace(s, iters_per_epoch=self.iters))
        self.cfg = self.run.settings
        self.student = models.build_model(run.model, s.pretrained).to(device)
        if s.channels_last:
            self.student = self.student.to(memory_format=torch.channels_last)
        for m in self.student.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.momentum = s.bn_momentum
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
        self.contr = losses.contrastive_loss(s).to(device) if s.contr else None
        self.opt = torch.optim.Adam(self.student.parameters(), lr=s.lr)
        self.sched = schedules.poly_scheduler(self.opt, s.epochs * self.iters, s.poly_power)
        self.aug = augment.AugmentConfig(scale=(0.7, 1.0) if s.resize else tuple(s.scale_range))
        self.epoch, self.step, self.best = 0, 0, -1.0
        self.run_id = uuid.uuid4().hex  # a resumed run takes its checkpoint's

    # -- checkpoints
    def state(self):
        return {"epoch": self.epoch, "step": self.step, "best_dice": self.best, "run_id": self.run_id,
                "config": self.run.stored(), "student": self.student.state_dict(),
                "teacher": self.teacher.state_dict() if self.teacher is not None else None,
                "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
                "loss": self.contr.state_dict() if self.contr is not None else None,
                "rng": {"torch": torch.get_rng_state(),
                        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}}

    def resume(self, path):
        st = load_checkpoint(path, map_location=self.device)
        check_compatible(path, {**before_settings(), **st["config"]}, self.run.stored(), resume_checked())
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
        if not 0 <= self.epoch <= self.cfg.epochs:
            raise CheckpointError(f"{path}: epoch {self.epoch} is outside this run's 0..{self.cfg.epochs}")

    def save(self, name):
        if self.main:
            save_checkpoint(os.path.join(self.cfg.out, name), self.state())

    # -- one step
    def batch(self, idx, g, labeled):
        x, labels = crops.random_crops(self.d["train"], idx, self.run.model.input_size, g)
        fmt = torch.channels_last if self.cfg.channels_last else torch.contiguous_format
        if labeled:
            xs, y = augment.labeled_view(x, labels, self.aug, g)
            # the target of the warped labels, so that its boundaries are those of the crop the model sees
            y = targets.make_target(y, self.cfg.target)
            return augment.normalize(xs).to(self.device, memory_format=fmt), y.to(self.device)
        # the hidden labels (None for the user's own unlabeled images) ride along for the pseudo-label log
        # only; nothing trains on them
        if labels is None:
            (weak, strong), hidden = augment.weak_strong_pair(x, self.aug, g), None
        else:
            weak, strong, hidden = augment.weak_strong_pair(x, self.aug, g, labels)
        if not self.cfg.strong_photometric:
            strong = weak  # drawn all the same, so every other random draw stays where it was
        return (augment.normalize(weak).to(self.device, memory_format=fmt),
                augment.normalize(strong).to(self.device, memory_format=fmt), hidden, [self.kinds[i] for i in idx])

    def teacher_forward(self, weak, features):
        if self.cfg.teacher_bn == "train":
            for m in self.teacher.modules():
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                    m.train()  # its running statistics are overwritten by the student's at the EMA update
        out = self.teacher(weak, features=features)
        self.teacher.eval()
        return out

    def train_step(self, lab_stream, unl_stream, g, t_epoch, unsup):
        s = self.cfg
        xl, yl = self.batch(lab_stream.take(self.bl), g, True)
        parts = {}
        cast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=s.autocast == "bf16")
        if unsup:
            weak, strong, hidden, kinds = self.batch(unl_stream.take(self.bu), g, False)
            if s.strong_cutmix:
                boxes = augment.cutmix_masks(self.bu, *strong.shape[-2:], CUTMIX_CELL, g)
                strong = augment.cutmix(strong, boxes)
            with cast:
                out = self.net(torch.cat([xl, strong]), features=s.contr)
        else:
            with cast:
                out = self.net(xl, features=False)
        logits = out["logits"]
        loss = parts["sup"] = F.cross_entropy(logits[:self.bl].float(), yl)
        if s.w_dice:
            parts["dice"] = losses.soft_dice_loss(logits[:self.bl], yl)
            loss = loss + s.w_dice * parts["dice"]
        w_cons = s.w_cons * schedules.sigmoid_rampup(t_epoch, s.rampup_epochs)
        if unsup:
            s_logits = logits[self.bl:]
            with torch.no_grad(), cast:
                t_out = self.teacher_forward(weak, s.contr)
                # the log judges nucleus against background, whatever the target's classes
                t_fg = targets.foreground_logits(t_out["logits"]).float()
                confident = t_fg.softmax(dim=1).amax(dim=1) >= REPORT_CONFIDENCE
                self.pseudo.update(t_fg, hidden, kinds, confident)
                if s.strong_cutmix:  # the targets of the mixed strong view; the log above judged the unmixed ones
                    t_out = {k: augment.cutmix(v, boxes) for k, v in t_out.items()}
            if s.cons:
                parts["cons"], kept = losses.consistency(s_logits, t_out["logits"], s.cons_threshold, s.cons_target)
                parts["cons_kept"] = kept.float().mean()
                loss = loss + w_cons * parts["cons"]
            if s.ent:
                parts["ent"] = losses.entropy(s_logits)
                loss = loss + s.w_ent * parts["ent"]
            if s.contr:
                # nucleus against background pseudo labels: interior and boundary pixels of the boundary
                # target are one class here, never each other's negatives
                parts["contr"], st = self.contr(out["proj"][self.bl:], t_out["proj"],
                                                targets.foreground_logits(out["logits_low"][self.bl:]),
                                                targets.foreground_logits(t_out["logits_low"]), return_stats=True)
                loss = loss + s.w_contr * parts["contr"]
                parts.update(losses.contrast_shares(st, out["proj"][self.bl:], s.grid))
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
            schedules.ema_update(self.teacher, self.student, schedules.ema_alpha(self.step, s.ema_alpha),
                                 buffers="ema" if s.teacher_bn == "ema" else "copy")
        self.step += 1
        parts = {k: float(v.detach()) for k, v in parts.items()}
        parts["loss"] = float(loss.detach())
        parts["w_cons"] = w_cons if unsup and s.cons else 0.0
        return parts

    def train_epoch(self):
        s, e = self.cfg, self.epoch
        seed = epoch_seed(s.seed, e, self.rank)
        torch.manual_seed(seed)  # dropout: each epoch's randomness depends only on (seed, epoch, rank)
        g = torch.Generator().manual_seed(seed)
        lab = IndexStream(self.d["labeled"], g)
        unl = IndexStream(self.d["unlabeled"], g) if self.semi else None
        unsup = self.semi and (e + 1) >= s.unsup_start_epoch
        self.pseudo = PseudoLabelStats()
        self.student.train()
        sums, n = {}, 0
        bar = tqdm(range(self.iters), desc=f"epoch {e + 1}/{s.epochs}", leave=False,
                   disable=s.no_progress or not self.main, dynamic_ncols=True)
        for it in bar:
            parts = self.train_step(lab, unl, g, e + it / self.iters, unsup)
            n += 1
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v
            bar.set_postfix({k: f"{v / n:.3f}" for k, v in sums.items() if k in LOSS_TERMS})
        bar.close()
        out = {k: all_mean(v / n, self.world) for k, v in sums.items()}
        out.update(self.pseudo.summary())  # rank 0's share of the pixels (the log is written there)
        return out

    def validate(self) -> tuple[float, float]:
        """The student's and the teacher's Dice over the validation set (NaN when this epoch does not
        validate; the teacher's NaN without a teacher)."""
        s, nan = self.cfg, float("nan")
        if not self.d["val"] or not (self.epoch % s.val_every == 0 or self.epoch == s.epochs):
            return nan, nan
        dice = validation_dice(self.student, self.d["val"], self.run.inference, self.device)
        if self.teacher is None:
            return dice, nan
        return dice, validation_dice(self.teacher, self.d["val"], self.run.inference, self.device)

    def fit(self, log_path, tb, resumed=False):
        s = self.cfg
        if self.main:
            start_log(log_path, LOG_FIELDS, self.epoch if resumed else 0)
        stop = s.epochs if s.stop_after_epochs is None else min(s.epochs, self.epoch + s.stop_after_epochs)
        while self.epoch < stop:
            t0 = time.time()
            stats = self.train_epoch()
            self.epoch += 1
            dice, t_dice = self.validate()
            row = {"epoch": self.epoch, "step": self.step, "lr": self.opt.param_groups[0]["lr"],
                   **stats, "val_dice": dice, "teacher_val_dice": t_dice, "seconds": round(time.time() - t0, 2)}
            if self.main:
                with open(log_path, "a", newline="") as f:
                    csv.writer(f).writerow([row.get(k, "") for k in LOG_FIELDS])
                msg = " ".join(f"{k}={row[k]:.4f}" for k in LOSS_TERMS if k in row)
                pl = f" pl_acc={row['pl_acc']:.4f}" if "pl_acc" in row else ""
                teacher = f" teacher={t_dice:.4f}" if self.teacher is not None else ""
                print(f"epoch {self.epoch}/{s.epochs} {msg}{pl} val_dice={dice:.4f}{teacher} ({row['seconds']}s)",
                      flush=True)
                if tb is not None:
                    for k, v in row.items():
                        if k not in ("epoch", "step"):
                            tb.add_scalar(k, v, self.epoch)
                    preview(tb, self.student, self.d["val"], self.run.inference, self.device, self.epoch)
            improved = not math.isnan(dice) and dice > self.best
            if improved:
                self.best = dice
            self.save("last.pt")
            if improved:
                self.save("best.pt")

    # -- the end
    def test_checkpoint(self) -> str:
        """Load this run's best.pt into the student for the test, and say which weights are tested.
        A best.pt written by another run (another run id) is refused, never silently reported."""
        best = os.path.join(self.cfg.out, "best.pt")
        if not os.path.exists(best):
            why = "no validation images" if not self.d["val"] else "no validation score was finite"
            return f"last epoch ({why}, so no best.pt)"
        st = load_checkpoint(best, self.device)
        if st.get("run_id") != self.run_id:
            raise CheckpointError(f"{best}: written by another run (run id {st.get('run_id')!r}, this run "
                                  f"{self.run_id!r}); move it away or train in a fresh --out")
        load_into(self.student, st["student"], best, "student")
        return f"best.pt (epoch {st['epoch']}, validation Dice {100 * st['best_dice']:.2f})"

    def test(self):
        """The test images at native resolution, the model's nuclei (--instances) beside the classical
        pipeline's (--otsu-side): metrics.json / .md, overlays."""
        s = self.cfg
        tested = self.test_checkpoint()
        print(f"testing the model of {tested}", flush=True)
        samples = data.load_full(self.d["test_entries"], self.d["tile"])
        comp = evaluate_samples(self.student, samples, self.run.inference, self.device, s.out, s.overlays,
                                progress=not s.no_progress, decoding=instances.for_target(s.instances, s.target),
                                otsu_side=s.otsu_side)
        labeled = (f"{s.labeled_fraction} labeled" if s.labeled is None else
                   f"{len(self.d['labeled'])} labeled + {len(self.d['unlabeled'])} unlabeled images")
        report = write_report(comp, s.out, "metrics", f"Test metrics ({s.method}, {labeled})",
                              extra={"method": s.method, "labeled_fraction": s.labeled_fraction,
                                     "checkpoint": tested})
        print(f"test images -> {os.path.join(s.out, 'metrics.md')}", flush=True)
        for line in summary_lines(report):
            print(line, flush=True)


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


def run_training(run: TrainRun, world, rank, device) -> None:
    """One process of a training run, from the data to the test report (rank 0 writes the files)."""
    s = run.settings
    if rank == 0 and os.path.isdir(s.out):
        remove_stale_temporaries(s.out)
    trainer = Trainer(run, world, rank, device)
    resume = s.resume
    if resume == "auto":
        last = os.path.join(s.out, "last.pt")
        resume = last if os.path.exists(last) else None
    if resume:
        trainer.resume(resume)
    if rank == 0:
        os.makedirs(s.out, exist_ok=True)
        with open(os.path.join(s.out, "config.json"), "w") as f:
            json.dump(trainer.run.stored(), f, indent=2)
        with open(os.path.join(s.out, "splits.json"), "w") as f:
            json.dump(trainer.d["split_ids"], f, indent=1)
        d = trainer.d
        print(f"{s.method}: {len(d['labeled'])} labeled + {len(d['unlabeled'])} unlabeled "
              f"training {'tiles' if d['tile'] else 'images'}, {len(d['val'])} val, "
              f"{len(d['test_entries'])} test images{' (tiled)' if d['tile'] else ''}; "
              f"{trainer.iters} iterations/epoch, {world} process(es) on {device}", flush=True)
        if d["held_out"]:
            print(f"validation: {d['held_out']} of the {d['held_out'] + len(d['labeled'])} labeled images held out "
                  f"({data.VAL_SHARE}, at least one, seeded by {run.names['split_seed']} {s.split_seed}; "
                  f"{run.names['val']} names validation images of their own)", flush=True)
        if d["val"]:
            print(f"validation: Otsu's threshold ({s.otsu_side} side, no learning) scores Dice "
                  f"{100 * otsu_dice(d['val'], s.otsu_side):.2f} over the set", flush=True)
    if rank == 0 and not resume:
        # a fresh run must never report a model left behind by an earlier run in the same folder
        for name in ("best.pt", "last.pt"):
            if os.path.exists(os.path.join(s.out, name)):
                os.remove(os.path.join(s.out, name))
    tb = tensorboard_writer(s.out) if rank == 0 else None
    trainer.fit(os.path.join(s.out, "log.csv"), tb, resumed=bool(resume))
    if tb is not None:
        tb.close()
    if rank == 0 and trainer.epoch >= s.epochs and not s.no_test:
        if trainer.d["test_entries"]:
            trainer.test()
        else:
            model = "best.pt" if os.path.exists(os.path.join(s.out, "best.pt")) else "last.pt"
            hint = f" ({run.names['test']} names them)" if s.labeled is not None else ""
            print(f"no test images{hint}: the run ends after training; its model is "
                  f"{os.path.join(s.out, model)}", flush=True)
