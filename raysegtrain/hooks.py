"""Behaviour attached to the training loop (Detectron2's hooks): the `Hook` interface and the standard hooks.

`SegmentationTrainer` installs `EpochTimingHook`, `StartupTimingHook` and `BestMetricHook` ahead of the caller's
hooks, so every caller's `after_epoch` sees the figures they add. Every hook method runs on every rank.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .checkpoint import save_checkpoint

if TYPE_CHECKING:
    from .engine import SegmentationTrainer


@dataclass
class StepInfo:
    epoch: int  # 0-based epoch in progress
    step: int  # 1-based batch index within the epoch
    steps: int  # batches in this epoch
    loss: torch.Tensor  # this batch's loss, still on the device (read it with .item() only when needed)
    images: int  # images this step, all ranks together
    lr: float
    data_wait_s: float = 0.0  # seconds the loop stood waiting for this batch (the input pipeline's share)
    batch_ready: float = 0.0  # time.time() when the batch was in hand, before its step ran


class Hook:
    """Behaviour attached to the loop. Every method runs on every rank; check `trainer.is_main` where it matters."""

    trainer: "SegmentationTrainer"

    def before_train(self) -> None:
        """After `setup`: the model, loaders and optimizer exist."""

    def before_epoch(self) -> None: ...

    def after_step(self, info: StepInfo) -> None: ...

    def after_epoch(self, metrics: dict[str, float]) -> None:
        """Called once per epoch after validation (when it ran) with everything reported for that epoch; a hook may
        add its own figures to METRICS (the dict the trainer keeps in its history)."""

    def after_train(self) -> None: ...

    def notice(self, message: str) -> None:
        """A one-line message for the user from the loop (e.g. that compiling failed and the run went on eager)."""


class StopTraining(Exception):
    """A hook may raise this to end training cleanly after the current epoch (the hooks after it are skipped for
    that epoch)."""


# ---------------------------------------------------------------------------------------------------- timing
class EpochTimingHook(Hook):
    """Each epoch's training part (validation excluded): epoch_time_s, images_per_s, data_wait_share (the share of
    it spent waiting for the input pipeline) and, on CUDA, peak_gpu_gib; and epoch_wall_s, the whole epoch with
    validation (what a study's "time inside epochs" adds up)."""

    def before_epoch(self) -> None:
        t = self.trainer
        if t.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(t.device)
        self.images, self.waited = 0, 0.0
        self.trained: float | None = None  # when the epoch's last step had finished on the device
        self.peak_gib: float | None = None
        self.start = time.perf_counter()

    def after_step(self, info: StepInfo) -> None:
        self.images += info.images
        self.waited += info.data_wait_s
        if info.step == info.steps:  # training ends here; validation follows
            self._end_training()

    def _end_training(self) -> None:
        device = self.trainer.device
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the steps are queued: the time is when the device has done them
            self.peak_gib = torch.cuda.max_memory_allocated(device) / 2**30
        self.trained = time.perf_counter()

    def after_epoch(self, metrics: dict[str, float]) -> None:
        if self.trained is None:  # the loader ran out before the planned last step
            self._end_training()
        elapsed = self.trained - self.start
        metrics.update(epoch_wall_s=time.perf_counter() - self.start, epoch_time_s=elapsed, images_per_s=self.images / elapsed if elapsed > 0 else float("nan"),
                       data_wait_share=self.waited / elapsed if elapsed > 0 else float("nan"))
        if self.peak_gib is not None:
            metrics["peak_gpu_gib"] = self.peak_gib


class StartupTimingHook(Hook):
    """The first epoch's start-up split, when this process trains a run from its start (not on resume):
    first_step_s, from T0 (when the command started) to the first training batch in hand (first_step_done_s: to the
    host's return from that step, which includes compiling a compiled step), =
    startup_launch_s (T0 to this hook's creation, just before the trainer's: the caller's preparation and the launch
    of this process) + startup_setup_s (building data, model, optimizer) + startup_first_batch_s (the loader's first
    batch). With SUBMITTED (when the caller handed the job to its launcher, e.g. Ray) the launch is split again into
    startup_driver_s and startup_workers_s, and DRIVER_STAGES (the caller's preparation, seconds a stage, summing to
    startup_driver_s) become startup_driver_<stage>_s.

    The trainer installs one with T0 = its creation when the caller gives none; a caller that knows when the command
    started (train.py's worker loop) makes its own just before the trainer."""

    def __init__(self, t0: float | None = None, submitted: float | None = None,
                 driver_stages: dict[str, float] | None = None):
        self.created = time.time()
        self.t0 = self.created if t0 is None else t0
        self.submitted = submitted
        self.driver_stages = dict(driver_stages or {})
        self.set_up: float | None = None
        self.first_batch: float | None = None
        self.first_step_done: float | None = None

    def before_train(self) -> None:
        self.set_up = time.time()

    def after_step(self, info: StepInfo) -> None:
        if self.first_batch is None:
            self.first_batch = info.batch_ready
            self.first_step_done = time.time()  # the host is past the step (a compiled one has compiled)

    def after_epoch(self, metrics: dict[str, float]) -> None:
        if self.first_batch is not None and metrics is self.trainer.history[0]:  # a run's first epoch
            metrics.update(self.figures())

    def figures(self) -> dict[str, float]:
        out = {"first_step_s": self.first_batch - self.t0, "first_step_done_s": self.first_step_done - self.t0,
               "startup_launch_s": self.created - self.t0,
               "startup_setup_s": self.set_up - self.created, "startup_first_batch_s": self.first_batch - self.set_up,
               "first_batch_time": self.first_batch}
        if self.submitted is not None:  # launch = the caller's own preparation + starting this process
            out.update(startup_driver_s=self.submitted - self.t0, startup_workers_s=self.created - self.submitted)
            out.update({f"startup_driver_{stage}_s": s for stage, s in self.driver_stages.items()})
        return out


# ------------------------------------------------------------------------------------------ best / stopping
class BestMetricHook(Hook):
    """Tracks the monitored metric (the trainer's `monitor`, `monitor_mode`, `min_delta`) in the trainer's
    checkpointed state (best_value, best_epoch, bad_epochs); adds is_best to each validated epoch's metrics and
    best_<monitor>, best_epoch once a best exists. After `patience` validated epochs without improvement it ends the
    run by setting the trainer's stop_reason, not by raising StopTraining: the epoch's remaining hooks (reporting,
    checkpoints) still run and see the reason."""

    def is_improvement(self, value: float | None) -> bool:
        t = self.trainer
        if value is None or not math.isfinite(value):
            return False
        if t.best_value is None:
            return True
        if t.monitor_mode == "max":
            return value > t.best_value + t.min_delta
        return value < t.best_value - t.min_delta

    def after_epoch(self, metrics: dict[str, float]) -> None:
        t = self.trainer
        if t.monitor in metrics:  # a validated epoch
            self.update(metrics)
        if t.best_value is not None:
            metrics.update({f"best_{t.monitor}": t.best_value, "best_epoch": float(t.best_epoch)})

    def update(self, metrics: dict[str, float]) -> None:
        t = self.trainer
        value = metrics[t.monitor]
        metrics["is_best"] = float(self.is_improvement(value))
        if metrics["is_best"]:
            t.best_value, t.best_epoch, t.bad_epochs = float(value), t.epoch, 0
            return
        t.bad_epochs += 1
        if t.patience is not None and t.bad_epochs >= max(t.patience, 0) and t.epoch < t.epochs:
            t.stop_reason = (f"early stopping: {t.monitor} did not improve for {t.bad_epochs} "
                             f"epoch(s) (best {t.best_value} at epoch {t.best_epoch})")


# ------------------------------------------------------------------------------------------------ checkpoints
class LocalCheckpointHook(Hook):
    """Checkpoints for in-process training: DIRECTORY/last and DIRECTORY/best (by the monitored metric)."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)

    def after_epoch(self, metrics: dict[str, float]) -> None:
        if not self.trainer.is_main:
            return
        state = self.trainer.state_dict()
        save_checkpoint(state, self.directory / "last")
        if metrics.get("is_best"):
            save_checkpoint(state, self.directory / "best")
