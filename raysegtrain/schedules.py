"""Learning-rate schedules from `ScheduleConfig`, built from torch's own schedulers.

Everything but plateau steps per optimizer step (so warm-up and cosine are smooth within an epoch); plateau steps
per validation on the monitored metric. Warm-up is torch's `LinearLR` chained in front with `SequentialLR`.
"""

from __future__ import annotations

from torch.optim import Optimizer
from torch.optim import lr_scheduler as sched

from .config import Config


class LRSchedule:
    """One object the loop calls: `step_batch()` after each optimizer step, `step_epoch(metric)` after validation."""

    def __init__(self, optimizer: Optimizer, cfg: Config, steps_per_epoch: int):
        s, epochs = cfg.schedule, cfg.train.epochs
        self.name = s.name
        total = max(1, epochs * steps_per_epoch)
        warmup = 0 if s.name == "onecycle" else min(total - 1, round(s.warmup_epochs * steps_per_epoch))
        base_lr = cfg.optim.lr
        main_steps = max(1, total - warmup)

        self.plateau: sched.ReduceLROnPlateau | None = None
        if s.name == "cosine":
            main = sched.CosineAnnealingLR(optimizer, T_max=main_steps, eta_min=s.min_lr)
        elif s.name == "step":
            main = sched.StepLR(optimizer, step_size=s.step_size * steps_per_epoch, gamma=s.gamma)
        elif s.name == "poly":
            floor = min(1.0, s.min_lr / base_lr)
            main = sched.LambdaLR(optimizer, lambda i: max(floor, (1 - min(i, main_steps) / main_steps) ** s.power))
        elif s.name == "onecycle":
            main = sched.OneCycleLR(optimizer, max_lr=[g["lr"] for g in optimizer.param_groups], total_steps=total,
                                    pct_start=s.pct_start)
        else:  # none / plateau: nothing per step but warm-up (plateau acts per epoch, below)
            main = None
            if s.name == "plateau":
                self.plateau = sched.ReduceLROnPlateau(optimizer, mode=cfg.train.monitor_mode, factor=s.gamma,
                                                       patience=s.patience, min_lr=s.min_lr)
        if warmup > 0:
            ramp = sched.LinearLR(optimizer, start_factor=s.warmup_start_factor, total_iters=warmup)
            # LinearLR leaves the lr alone after its ramp, so alone it is a warm-up in front of "constant"
            main = ramp if main is None else sched.SequentialLR(optimizer, [ramp, main], milestones=[warmup])
        self.per_step = main
        self._warmup = warmup
        self._steps = 0

    def step_batch(self) -> None:
        self._steps += 1
        if self.per_step is not None:
            self.per_step.step()

    def step_epoch(self, metric: float | None) -> None:
        if self.plateau is not None and metric is not None and self._steps >= self._warmup:
            self.plateau.step(metric)

    def state_dict(self) -> dict:
        return {"steps": self._steps, "per_step": self.per_step.state_dict() if self.per_step else None,
                "plateau": self.plateau.state_dict() if self.plateau else None}

    def load_state_dict(self, state: dict) -> None:
        self._steps = state["steps"]
        if self.per_step is not None:
            self.per_step.load_state_dict(state["per_step"])
        if self.plateau is not None and state.get("plateau"):
            self.plateau.load_state_dict(state["plateau"])
