import copy
import math

import pytest
import torch

from cdcl_nuclei.schedules import ema_alpha, ema_update, poly_factor, poly_scheduler, sigmoid_rampup


def test_ema_alpha_warmup():
    assert ema_alpha(0, 0.999) == 0.0
    assert ema_alpha(1, 0.999) == pytest.approx(0.5)
    assert ema_alpha(9, 0.999) == pytest.approx(0.9)
    assert ema_alpha(10 ** 6, 0.999) == 0.999
    with pytest.raises(ValueError, match="alpha"):
        ema_alpha(3, 1.5)


def test_ema_update_parameters_and_buffers():
    torch.manual_seed(0)
    student = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    teacher = copy.deepcopy(student)
    for p in student.parameters():
        p.data.add_(torch.randn_like(p))
    student.train()
    student(torch.randn(5, 3, 8, 8))  # moves the student's BN running statistics
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    ema_update(teacher, student, 0.9)
    for name, p in student.named_parameters():
        want = 0.9 * before[name] + 0.1 * p.detach()
        torch.testing.assert_close(dict(teacher.named_parameters())[name], want, rtol=1e-6, atol=1e-7)
    for name, b in student.named_buffers():
        assert torch.equal(dict(teacher.named_buffers())[name], b), name
    # alpha 0 (the first step of the warm-up) copies the student exactly
    ema_update(teacher, student, ema_alpha(0))
    for (_, a), (_, b) in zip(teacher.state_dict().items(), student.state_dict().items()):
        assert torch.equal(a, b)


def test_sigmoid_rampup():
    T = 40.0
    assert sigmoid_rampup(0, T) == pytest.approx(math.exp(-5))
    assert sigmoid_rampup(T, T) == 1.0
    assert sigmoid_rampup(2 * T, T) == 1.0
    assert sigmoid_rampup(T / 2, T) == pytest.approx(math.exp(-5 * 0.25))
    vals = [sigmoid_rampup(t, T) for t in range(0, 41)]
    assert all(a < b for a, b in zip(vals, vals[1:]))
    assert sigmoid_rampup(3, 0) == 1.0


def test_poly_scheduler_follows_formula():
    w = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.Adam([w], lr=1e-3)
    sched = poly_scheduler(opt, total_steps=7, power=0.9)
    for step in range(8):
        assert opt.param_groups[0]["lr"] == pytest.approx(1e-3 * (1 - step / 7) ** 0.9, abs=1e-15)
        opt.step()
        sched.step()
    assert poly_factor(9, 7) == 0.0
    with pytest.raises(ValueError, match="total"):
        poly_factor(0, 0)
