"""The process group of a `torchrun` run: one process per rank, gloo on the CPU and nccl on CUDA.
A plain `python train.py` is a world of one and never starts a group."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def setup(device_name: str) -> tuple[int, int, torch.device]:
    """(world size, rank, this process's device) from torchrun's environment; joins the group when
    there is more than one process. `device_name` has been checked already (cli.device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device_name == "auto":
        device_name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device_name)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return world, rank, device


def all_mean(x: float, world: int) -> float:
    """The mean of `x` over the ranks (every rank gets it)."""
    if world == 1:
        return x
    t = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t) / world


def teardown(world: int) -> None:
    if world > 1 and dist.is_initialized():
        dist.destroy_process_group()
