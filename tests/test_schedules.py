"""Each LR schedule against its definition, stepped the way the loop steps it."""

import math

import pytest
import torch

from raysegtrain import config
from raysegtrain.schedules import LRSchedule


def lrs(overrides, steps_per_epoch=10, epochs=10, metrics=None):
    cfg = config.load(None, [f"train.epochs={epochs}", "optim.lr=1.0", "schedule.min_lr=0.0", *overrides])
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = LRSchedule(opt, cfg, steps_per_epoch)
    out = []
    for epoch in range(epochs):
        for _ in range(steps_per_epoch):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step_batch()
        sched.step_epoch(metrics[epoch] if metrics else None)
    return out


def test_cosine_from_lr_to_min():
    out = lrs(["schedule.name=cosine"])
    assert out[0] == pytest.approx(1.0)
    assert out[50] == pytest.approx(0.5 * (1 + math.cos(math.pi * 50 / 100)))
    assert out[-1] < 0.001


def test_warmup_then_cosine():
    out = lrs(["schedule.name=cosine", "schedule.warmup_epochs=2", "schedule.warmup_start_factor=0.1"])
    assert out[0] == pytest.approx(0.1)
    assert out[10] == pytest.approx(0.1 + 0.9 * 10 / 20)
    assert out[20] == pytest.approx(1.0)
    assert out[-1] < 0.01


def test_step_decays_every_step_size_epochs():
    out = lrs(["schedule.name=step", "schedule.step_size=3", "schedule.gamma=0.5"])
    assert out[29] == pytest.approx(1.0) and out[30] == pytest.approx(0.5) and out[60] == pytest.approx(0.25)


def test_poly_with_floor():
    out = lrs(["schedule.name=poly", "schedule.power=1.0", "schedule.min_lr=0.05"])
    assert out[50] == pytest.approx(0.5)
    assert out[-1] == pytest.approx(0.05)


def test_onecycle_peaks_at_lr():
    out = lrs(["schedule.name=onecycle", "schedule.pct_start=0.3"])
    assert max(out) == pytest.approx(1.0, rel=1e-3)
    assert out.index(max(out)) == pytest.approx(30, abs=1)
    assert out[0] < 0.1 and out[-1] < 0.01


def test_plateau_decays_after_patience_and_warmup_keeps_working():
    out = lrs(["schedule.name=plateau", "schedule.patience=1", "schedule.gamma=0.1", "train.monitor=val_iou",
               "schedule.warmup_epochs=1"], metrics=[0.1, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2])
    assert out[0] == pytest.approx(0.1)  # warm-up start
    assert out[15] == pytest.approx(1.0)  # after warm-up, before any plateau
    # best 0.2 at epoch 2; epochs 3-4 don't improve -> x0.1 after epoch 4, then every 2 epochs
    assert out[39] == pytest.approx(1.0) and out[40] == pytest.approx(0.1)
    assert out[60] == pytest.approx(0.01) and out[-1] == pytest.approx(1e-3)


def test_none_is_constant():
    assert set(lrs(["schedule.name=none"])) == {1.0}


def test_state_round_trip_continues_identically():
    cfg = config.load(None, ["train.epochs=4", "schedule.name=cosine", "schedule.warmup_epochs=1"])
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=cfg.optim.lr)
    s = LRSchedule(opt, cfg, 5)
    for _ in range(7):
        opt.step(); s.step_batch()
    state, opt_state = s.state_dict(), opt.state_dict()
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.optim.lr)
    s2 = LRSchedule(opt2, cfg, 5)
    opt2.load_state_dict(opt_state); s2.load_state_dict(state)
    for _ in range(5):
        opt.step(); s.step_batch(); opt2.step(); s2.step_batch()
        assert opt.param_groups[0]["lr"] == pytest.approx(opt2.param_groups[0]["lr"])
