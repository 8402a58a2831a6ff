"""GPU test (marker `gpu`): the benchmark's `flex` contender, compiled FlexAttention forward and
backward, against the reference on the same device, before benchmarks/gpu_lease.sh times it.
One contender (fp32 features, IEEE products, bank with gradient) keeps the compilation short;
the benchmark compares every flex row with `reference` again (its max rel err column)."""
import pytest
import torch

from benchmarks.contenders import _flex_api, flex_loss, make_inputs, reference_eager

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(_flex_api() is None, reason="no FlexAttention in this torch")]


def _loss_and_grads(fn, inp):
    leaves = [inp[k].detach().clone().requires_grad_() for k in ("query", "positive", "bank")]
    args = dict(inp, query=leaves[0], positive=leaves[1], bank=leaves[2])
    loss = fn(args)
    loss.backward()
    return [loss.detach()] + [t.grad for t in leaves]


def test_flex_fp32_forward_backward_matches_reference():
    inp = make_inputs(1000, 3000, 128, 25, "cuda")
    flex = flex_loss(compiled=True)
    got, ref = _loss_and_grads(flex, inp), _loss_and_grads(reference_eager, inp)
    for name, g, r in zip(("loss", "dq", "dp", "dk"), got, ref):
        err = ((g - r).abs().max() / r.abs().max()).item()
        assert err < 1e-4, f"{name}: max rel err {err:.1e}"
    # rows without any negative: LSE = -inf in the kernel, loss and gradients 0, no NaN
    inp["bank_labels"] = torch.full_like(inp["bank_labels"], -1)
    got = _loss_and_grads(flex, inp)
    assert got[0].item() == 0.0
    assert all(torch.isfinite(g).all() for g in got[1:])
    assert all((g == 0).all() for g in got[1:])
