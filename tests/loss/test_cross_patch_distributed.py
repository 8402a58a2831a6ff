"""Two CPU processes (gloo): each rank's loss and gradients equal the single-process loss of its
own queries over the bank of every rank's pixels (current and previous batch), computed by the
float64 transcriptions of tests/transcriptions.py."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import cdcl_ops
from cdcl_ops import CrossPatchOptions
from transcriptions import TOL, make_batch, official_loop, paper_loop

WORLD = 2
STEPS = 3
SEMANTICS = ("paper", "official")
SHAPE = (2, 4, 4, 6, 2)  # B, D, H, W, grid


def data(step, rank):
    b, d, h, w, grid = SHAPE
    return make_batch(b, d, h, w, grid, torch.Generator().manual_seed(1000 * step + rank))


def _worker(rank, port, out_dir):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        for semantics in SEMANTICS:
            module = cdcl_ops.CrossPatchInfoNCE(CrossPatchOptions(grid=SHAPE[4], memory=1, semantics=semantics,
                                                                  backend="reference"))
            results = []
            for step in range(STEPS):
                batch = data(step, rank)
                fs = batch["fs"].clone().requires_grad_(True)
                loss = module(fs, batch["ft"], batch["ys"], batch["yt"])
                loss.backward()
                results.append((loss.detach(), fs.grad))
            torch.save({"results": results, "bank": module.bank.state_dict()},
                       os.path.join(out_dir, f"{semantics}-rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def expected(semantics, step, rank):
    """The transcription with the bank made of all ranks' current and previous batches."""
    grid = SHAPE[4]
    mine = data(step, rank)
    fs = mine["fs"].clone().requires_grad_(True)
    others = [data(step, r) for r in range(WORLD) if r != rank]
    previous = [data(step - 1, r) for r in range(WORLD)] if step > 0 else []
    if semantics == "paper":
        history = [(o["ft"], o["yt"]) for o in others + previous]
        loss = paper_loop(fs, mine["ft"], mine["ys"], mine["yt"], history, grid)
    else:
        history = [pair for o in others + previous for pair in ((o["fs"], o["ys"]), (o["ft"], o["yt"]))]
        loss = official_loop(fs, mine["ft"], mine["ys"], mine["yt"], history, grid)
    (grad,) = torch.autograd.grad(loss, fs)
    return loss.detach(), grad


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo backend")
def test_two_ranks_match_single_process_over_gathered_bank(tmp_path):
    # one spawn for both semantics: starting the processes is most of the cost
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    for semantics in SEMANTICS:
        check_ranks(semantics, [torch.load(tmp_path / f"{semantics}-rank{r}.pt") for r in range(WORLD)])


def check_ranks(semantics, saved):
    for rank in range(WORLD):
        for step, (loss, grad) in enumerate(saved[rank]["results"]):
            ref, ref_grad = expected(semantics, step, rank)
            torch.testing.assert_close(loss, ref, **TOL[semantics], msg=f"rank {rank} step {step}")
            torch.testing.assert_close(grad, ref_grad, **TOL[semantics], msg=f"rank {rank} step {step}")
    # every rank holds the same global bank
    for key, value in saved[0]["bank"].items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, saved[1]["bank"][key]), key
