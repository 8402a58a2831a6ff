"""FeatureBank: ring-buffer contents over many pushes, sizing, state_dict round trips, bad input."""
import io

import pytest
import torch

import cdcl_ops
from cdcl_ops import CrossPatchOptions, FeatureBank


def rows_as_set(feats, labels, groups):
    """The active rows as a multiset of (features, label, group) tuples (storage order is free)."""
    keep = labels >= 0
    return sorted(zip(map(tuple, feats[keep].tolist()), labels[keep].tolist(), groups[keep].tolist()))


def batch(n, d, gen):
    return (torch.randn(n, d, generator=gen), torch.randint(0, 3, (n,), generator=gen),
            torch.randint(-1, 2, (n,), generator=gen))


@pytest.mark.parametrize("memory", [0, 1, 3])
def test_holds_exactly_the_last_memory_plus_one_batches(memory):
    gen = torch.Generator().manual_seed(memory)
    bank = FeatureBank(dim=5, memory=memory)
    pushed = []
    for step in range(2 * memory + 4):
        n = 7 - (step % 3)  # smaller batches leave inactive rows in their slot
        b = batch(n, 5, gen)
        bank.push(*b)
        pushed.append(b)
        feats, labels, groups = bank.tensors()
        assert feats.shape == (7 * (memory + 1), 5) and labels.shape == groups.shape == (7 * (memory + 1),)
        expected = [torch.cat(parts) for parts in zip(*pushed[-(memory + 1):])]
        assert rows_as_set(feats, labels, groups) == rows_as_set(*expected)
        # inactive rows are exactly the padding of short batches
        assert int((labels < 0).sum()) == sum(7 - int(b[0].shape[0]) for b in pushed[-(memory + 1):]) \
            + 7 * max(0, memory + 1 - len(pushed)) + int((expected[1] < 0).sum())


def test_lazy_sizing_and_fixed_sizing():
    bank = FeatureBank(memory=2)
    assert bank.capacity is None and bank.dim is None
    bank.push(torch.randn(6, 3, dtype=torch.float64), torch.zeros(6, dtype=torch.long))
    assert bank.capacity == 6 and bank.dim == 3 and bank.feats.dtype == torch.float64
    assert bank.feats.shape == (18, 3)
    with pytest.raises(ValueError, match="feats"):
        bank.push(torch.randn(7, 3, dtype=torch.float64), torch.zeros(7, dtype=torch.long))
    fixed = FeatureBank(dim=4, capacity=10, memory=1, dtype=torch.bfloat16)
    assert fixed.feats.shape == (20, 4) and (fixed.labels == -1).all()
    fixed.push(torch.randn(3, 4), torch.ones(3, dtype=torch.long))
    assert fixed.feats.dtype == torch.bfloat16 and int((fixed.labels == 1).sum()) == 3


def test_stored_rows_are_detached_and_groups_default_to_zero():
    bank = FeatureBank(dim=2, memory=0)
    x = torch.randn(4, 2, requires_grad=True)
    bank.push(x * 2, torch.arange(4))
    feats, labels, groups = bank.tensors()
    assert not feats.requires_grad
    torch.testing.assert_close(feats, (x * 2).detach())
    assert groups.tolist() == [0, 0, 0, 0]


def test_unique_ids_when_labels_are_omitted():
    bank = FeatureBank(dim=2, capacity=4, memory=2)
    seen = []
    for step in range(5):
        rows = bank.push(torch.full((3, 2), float(step)))
        feats, labels, _ = bank.tensors()
        assert torch.equal(labels[rows], rows)                  # a row's label is its storage index
        assert (feats[rows] == step).all()
        active = labels[labels >= 0]
        assert active.unique().numel() == active.numel() == 3 * min(step + 1, 3)
        seen.append(rows)
    assert torch.equal(seen[0], seen[3])                        # the ring wrapped onto slot 0


def test_reset_empties_the_bank():
    bank = FeatureBank(dim=3, memory=1)
    bank.push(*batch(5, 3, torch.Generator().manual_seed(0)))
    bank.reset()
    feats, labels, groups = bank.tensors()
    assert (labels == -1).all() and (groups == -1).all() and not feats.any()
    assert int(bank.cursor) == 0


def test_state_dict_round_trip_continues_identically():
    gen = torch.Generator().manual_seed(3)
    a = FeatureBank(memory=2)
    for _ in range(4):
        a.push(*batch(6, 4, gen))
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = FeatureBank(memory=2)                                   # lazily sized: takes the stored size
    b.load_state_dict(torch.load(buf))
    assert b.capacity == 6 and b.dim == 4
    for t, u in zip(a.tensors(), b.tensors()):
        assert torch.equal(t, u)
    nxt = batch(6, 4, gen)
    a.push(*nxt)
    b.push(*nxt)
    for t, u in zip(a.tensors(), b.tensors()):
        assert torch.equal(t, u)                                # the cursor came along
    with pytest.raises(RuntimeError, match="feats"):
        FeatureBank(dim=4, capacity=5, memory=2).load_state_dict(a.state_dict())
    for memory in (4, 5):  # 18 rows: not a multiple of 5 slots; a multiple of 6 but saved with 3
        with pytest.raises(RuntimeError, match="memory"):
            FeatureBank(memory=memory).load_state_dict(a.state_dict())


def test_module_state_dict_includes_the_bank():
    gen = torch.Generator().manual_seed(5)

    def step():
        return (torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 4, 8, 8, generator=gen),
                torch.randint(0, 2, (2, 8, 8), generator=gen), torch.randint(0, 2, (2, 8, 8), generator=gen))

    a = cdcl_ops.CrossPatchInfoNCE(CrossPatchOptions(grid=4, memory=1))
    for _ in range(3):
        a(*step())
    assert {"bank.feats", "bank.labels", "bank.groups", "bank.cursor"} <= set(a.state_dict())
    b = cdcl_ops.CrossPatchInfoNCE(CrossPatchOptions(grid=4, memory=1))
    b.load_state_dict(a.state_dict())
    nxt = step()
    loss = a(*nxt)
    torch.testing.assert_close(b(*nxt), loss, rtol=0, atol=0)
    fresh = cdcl_ops.CrossPatchInfoNCE(CrossPatchOptions(grid=4, memory=1))
    assert not torch.equal(fresh(*nxt), loss)                   # the restored history mattered


def test_bad_input_names_the_argument():
    bank = FeatureBank(dim=3, memory=1)
    with pytest.raises(ValueError, match="feats"):
        bank.push(torch.randn(4, 5), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="feats"):
        bank.push(torch.randn(4, 3, 1), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="labels"):
        bank.push(torch.randn(4, 3), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="groups"):
        bank.push(torch.randn(4, 3), torch.zeros(4, dtype=torch.long), torch.zeros(4))
    meta = FeatureBank(dim=3, capacity=4, device="meta")
    with pytest.raises(ValueError, match="feats"):
        meta.push(torch.randn(4, 3), torch.zeros(4, dtype=torch.long))
    for kwargs, name in ((dict(dim=0), "dim"), (dict(capacity=0), "capacity"), (dict(memory=-1), "memory"),
                         (dict(dtype=torch.int32), "dtype")):
        with pytest.raises(ValueError, match=name):
            FeatureBank(**kwargs)
