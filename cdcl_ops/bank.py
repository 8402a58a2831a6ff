"""`FeatureBank`: a fixed-size ring buffer of detached teacher features, their pseudo labels and
group ids (patch kinds) over the current batch and the previous `memory` batches.

Storage is `memory + 1` slots of `capacity` rows each. A push writes one whole slot (the slot of
the oldest batch): its rows first, then empty rows flagged inactive (label and group -1). Shapes
never depend on the data and the write position is a device tensor, so pushing needs no host
synchronisation and the banks' tensors keep one shape for the whole run (CUDA graphs and
torch.compile see static shapes).

`capacity` is the number of rows of one batch after gathering across ranks (B * H * W * world size
for the paper's banks). Left as None it is set by the first push; a later push with more rows is an
error, a smaller one leaves the rest of its slot inactive. The FDB and BDB of the paper live in one
bank: a row's group id says which of the two it belongs to.

Under torch.distributed (initialised, world size > 1) each push all_gathers the rows of every rank
first, so every rank holds the same global bank; all ranks must push the same number of rows.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from ._validate import INT_DTYPES
from .options import CrossPatchOptions


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def _gather(t: Tensor, world: int) -> Tensor:
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


class FeatureBank(torch.nn.Module):
    """Ring buffer of detached features with labels and group ids; see the module docstring.

    Args:
        dim: feature dimension D, or None to take it from the first push.
        capacity: rows per batch slot (after gathering across ranks), or None for the first
            push's row count.
        memory: previous batches kept besides the current one (default: the paper's,
            CrossPatchOptions.memory).
        device, dtype: where and how the features are stored (default: the first push's device
            and dtype). Labels and groups are int64.
    """

    def __init__(self, dim: int | None = None, capacity: int | None = None,
                 memory: int = CrossPatchOptions.memory, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if dim is not None and (isinstance(dim, bool) or not isinstance(dim, int) or dim < 1):
            raise ValueError(f"dim: expected an int >= 1 or None, got {dim!r}")
        if capacity is not None and (isinstance(capacity, bool) or not isinstance(capacity, int)
                                     or capacity < 1):
            raise ValueError(f"capacity: expected an int >= 1 or None, got {capacity!r}")
        if isinstance(memory, bool) or not isinstance(memory, int) or memory < 0:
            raise ValueError(f"memory: expected an int >= 0, got {memory!r}")
        if dtype is not None and dtype not in (torch.float16, torch.bfloat16, torch.float32,
                                               torch.float64):
            raise ValueError(f"dtype: expected a floating dtype or None, got {dtype!r}")
        self.dim = dim
        self.memory = memory
        self.slots = memory + 1
        self._dtype_fixed = dtype is not None
        self._device_fixed = device is not None
        device = torch.device(device) if device is not None else torch.device("cpu")
        self.register_buffer("feats", torch.zeros(0, dim or 0, dtype=dtype or torch.float32,
                                                   device=device))
        self.register_buffer("labels", torch.zeros(0, dtype=torch.int64, device=device))
        self.register_buffer("groups", torch.zeros(0, dtype=torch.int64, device=device))
        self.register_buffer("cursor", torch.zeros((), dtype=torch.int64, device=device))
        if dim is not None and capacity is not None:
            self._allocate(capacity, dim, device)

    @property
    def capacity(self) -> int | None:
        """Rows per batch slot, or None before the first push of a lazily sized bank."""
        return self.labels.shape[0] // self.slots if self.labels.shape[0] else None

    def _allocate(self, capacity, dim, device, dtype=None):
        rows = capacity * self.slots
        self.dim = dim
        dtype = self.feats.dtype if self._dtype_fixed or dtype is None else dtype
        self.feats = torch.zeros(rows, dim, dtype=dtype, device=device)
        self.labels = torch.full((rows,), -1, dtype=torch.int64, device=device)
        self.groups = torch.full((rows,), -1, dtype=torch.int64, device=device)
        self.cursor = torch.zeros((), dtype=torch.int64, device=device)

    def check_compatible(self, dim: int, device: torch.device | str, name: str = "feats") -> None:
        """Raise ValueError unless rows of dimension `dim` on `device` can go into this bank."""
        if self.dim is not None and dim != self.dim:
            raise ValueError(f"{name}: expected feature dim D={self.dim} (the bank's), got D={dim}")
        if (self.capacity is not None or self._device_fixed) and torch.device(device) != self.feats.device:
            raise ValueError(f"{name}: expected a tensor on {self.feats.device} (the bank's device), "
                             f"got {device}")

    def _check_push(self, feats, labels, groups):
        if not isinstance(feats, torch.Tensor) or feats.dim() != 2 or not feats.is_floating_point():
            got = tuple(feats.shape) if isinstance(feats, torch.Tensor) else type(feats).__name__
            raise ValueError(f"feats: expected a floating (n, D) tensor, got {got}")
        self.check_compatible(feats.shape[1], feats.device)
        n = feats.shape[0]
        for name, t in (("labels", labels), ("groups", groups)):
            if t is None:
                continue
            if not isinstance(t, torch.Tensor) or t.dtype not in INT_DTYPES or t.shape != (n,):
                got = (t.dtype, tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"{name}: expected an integer tensor of shape ({n},), got {got}")
            if t.device != feats.device:
                raise ValueError(f"{name}: expected a tensor on {feats.device} (as feats), got {t.device}")

    @torch.no_grad()
    def push(self, feats: Tensor, labels: Tensor | None = None, groups: Tensor | None = None) -> Tensor:
        """Write one batch into the oldest slot; with torch.distributed, the batch of every rank.

        Args:
            feats: (n, D) features (stored detached, in the bank's dtype).
            labels: (n,) pseudo labels (< 0: inactive), or None to label every row with its own
                storage row index (unique ids: every row differs from every other row).
            groups: (n,) group ids (< 0: inactive), or None for group 0.

        Returns:
            (n,) int64 storage row indices of this rank's rows in `tensors()`.
        """
        self._check_push(feats, labels, groups)
        world, rank = _world()
        n, d = feats.shape
        if self.capacity is None:
            self._allocate(n * world, d, feats.device, feats.dtype)
        cap = self.capacity
        if cap is None:  # an empty first batch fixes D, device and dtype; the size waits for rows
            return torch.zeros(0, dtype=torch.int64, device=self.feats.device)
        if n * world > cap:
            raise ValueError(f"feats: expected at most {cap} rows per batch in all (the bank's capacity"
                             f" per slot{', over ' + str(world) + ' ranks' if world > 1 else ''}), "
                             f"got {n * world}")
        dev = self.feats.device
        base = self.cursor * cap
        rows = base + rank * n + torch.arange(n, device=dev)
        labels = rows if labels is None else labels.to(torch.int64)
        groups = torch.zeros(n, dtype=torch.int64, device=dev) if groups is None else groups.to(torch.int64)
        feats = feats.detach().to(self.feats.dtype)
        if world > 1:
            feats, labels, groups = (_gather(t, world) for t in (feats, labels, groups))
        pad = cap - n * world
        if pad:
            feats = torch.cat([feats, feats.new_zeros(pad, d)])
            labels = torch.cat([labels, labels.new_full((pad,), -1)])
            groups = torch.cat([groups, groups.new_full((pad,), -1)])
        slot = base + torch.arange(cap, device=dev)
        self.feats.index_copy_(0, slot, feats)
        self.labels.index_copy_(0, slot, labels)
        self.groups.index_copy_(0, slot, groups)
        self.cursor.add_(1).remainder_(self.slots)
        return rows

    def tensors(self) -> tuple[Tensor, Tensor, Tensor]:
        """(feats (R, D), labels (R,), groups (R,)) of the whole storage, R = (memory+1) * capacity.

        Empty rows have label and group -1. Slot order is storage order, not age order.
        """
        return self.feats, self.labels, self.groups

    @torch.no_grad()
    def reset(self) -> None:
        """Forget every stored batch (the storage keeps its size)."""
        self.feats.zero_()
        self.labels.fill_(-1)
        self.groups.fill_(-1)
        self.cursor.zero_()

    def _check_state(self, state_dict, prefix):
        """ValueError for stored values a push or a loss would only trip over later."""
        feats, cursor = state_dict.get(prefix + "feats"), state_dict.get(prefix + "cursor")
        rows = None
        if isinstance(feats, torch.Tensor):
            if not feats.is_floating_point():
                raise ValueError(f"{prefix}feats: expected a floating tensor, got {feats.dtype}")
            if feats.numel() and not bool(torch.isfinite(feats).all()):
                raise ValueError(f"{prefix}feats: expected finite values, got NaN or infinity")
            rows = feats.shape[0] if feats.dim() == 2 else None
        for name in ("labels", "groups"):
            t = state_dict.get(prefix + name)
            if t is None:
                continue
            if not isinstance(t, torch.Tensor) or t.dtype not in INT_DTYPES or t.dim() != 1 \
                    or (rows is not None and t.shape[0] != rows):
                got = (t.dtype, tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"{prefix}{name}: expected an integer tensor of shape "
                                 f"({'rows' if rows is None else rows},) (one per row of feats), got {got}")
        if cursor is not None:
            if not isinstance(cursor, torch.Tensor) or cursor.dim() != 0 or cursor.dtype not in INT_DTYPES:
                got = (cursor.dtype, tuple(cursor.shape)) if isinstance(cursor, torch.Tensor) \
                    else type(cursor).__name__
                raise ValueError(f"{prefix}cursor: expected an integer scalar tensor, got {got}")
            if not 0 <= int(cursor) < self.slots:
                raise ValueError(f"{prefix}cursor: expected a slot index in [0, {self.slots}) "
                                 f"(memory + 1 slots), got {int(cursor)}")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # a lazily sized bank takes the stored size; a sized one must match it
        extra = state_dict.get(prefix + "_extra_state")
        if isinstance(extra, dict) and extra.get("memory", self.memory) != self.memory:
            error_msgs.append(f"{prefix}memory: expected a saved bank of memory={self.memory}, got "
                              f"memory={extra['memory']}")
            return
        self._check_state(state_dict, prefix)
        feats = state_dict.get(prefix + "feats")
        if isinstance(feats, torch.Tensor):
            if feats.dim() != 2 or feats.shape[0] % self.slots:
                error_msgs.append(f"{prefix}feats: expected (rows, D) with rows a multiple of "
                                  f"memory + 1 = {self.slots}, got {tuple(feats.shape)}")
                return
            if feats.shape != self.feats.shape:
                if self.capacity is not None:
                    error_msgs.append(f"{prefix}feats: expected shape {tuple(self.feats.shape)} (this "
                                      f"bank's size), got {tuple(feats.shape)}")
                    return
                if self.dim is not None and feats.shape[1] != self.dim:
                    error_msgs.append(f"{prefix}feats: expected feature dim {self.dim}, got {feats.shape[1]}")
                    return
                self._allocate(feats.shape[0] // self.slots, feats.shape[1], self.feats.device, feats.dtype)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def get_extra_state(self) -> dict[str, int]:
        return {"memory": self.memory}

    def set_extra_state(self, state: object) -> None:
        pass  # checked in _load_from_state_dict, before the buffers are resized

    def extra_repr(self) -> str:
        return f"dim={self.dim}, capacity={self.capacity}, memory={self.memory}, dtype={self.feats.dtype}"
