"""The worker side of a run: what each Ray Train worker runs (`train_loop_per_worker`) and the hooks it adds to the
shared loop: reporting every epoch with a checkpoint to Ray Train, and progress to the driver's display.

Everything here is pickled to, and runs in, the workers; the driver side is `train.py`, the Ray set-up both `fit` and
`tune` share is `ray_support.py`.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

from .checkpoint import load_checkpoint, save_checkpoint
from .config import Config
from .engine import SegmentationTrainer
from .hooks import Hook, StartupTimingHook, StepInfo

import ray
import ray.train
from ray.train import Checkpoint


class RayReportHook(Hook):
    """Every epoch: REPORT (`ray.train.report`, or `ray.tune.report` in a warm trial) on every rank, with the epoch's
    metrics, `checkpoint_score` (what checkpoint retention ranks by), `early_stopped`, `worker_pid` and the
    FIRST_REPORT extras on the first report; rank 0 attaches the checkpoint (and figure data)."""

    def __init__(self, num_overlays: int, report: Callable | None = None, first_report: dict | None = None):
        self.num_overlays = num_overlays
        self.report = report or ray.train.report
        self.first_report = dict(first_report or {})

    def after_epoch(self, metrics: dict[str, float]) -> None:
        t = self.trainer
        report = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        worst = -math.inf if t.monitor_mode == "max" else math.inf
        score = report.get(t.monitor, worst)
        report["checkpoint_score"] = score if math.isfinite(score) else worst
        report["early_stopped"] = float(bool(t.stop_reason and t.stop_reason.startswith("early stopping")))
        report["worker_pid"] = float(os.getpid())
        report.update(self.first_report)
        self.first_report = {}
        if not t.is_main or not self.wants_checkpoint(metrics):
            self.report(report, checkpoint=None)
            return
        with tempfile.TemporaryDirectory(prefix="raysegtrain-ckpt-") as d:
            save_checkpoint(t.state_dict(), d)
            if "val_loss" in metrics and self.num_overlays:
                from .plots import VIZ_FILE

                np.savez_compressed(Path(d) / VIZ_FILE, **t.visual_samples(self.num_overlays))
            self.report(report, checkpoint=Checkpoint.from_directory(d))


    def wants_checkpoint(self, metrics: dict[str, float]) -> bool:
        """Every `run.checkpoint_every` epochs, and whenever the monitored metric improved or the run ends here."""
        t = self.trainer
        every = t.cfg.run.checkpoint_every
        return (bool(metrics.get("is_best")) or t.epoch >= t.epochs or t.stop_reason is not None
                or (every > 0 and t.epoch % every == 0))


class ProgressHook(Hook):
    """Rank 0 sends step and epoch progress to the driver through a Ray queue (at most every 0.5 s per step)."""

    def __init__(self, queue, interval_s: float = 0.5):
        self.queue = queue
        self.interval_s = interval_s
        self._last = 0.0
        self._copy = None  # (pinned host scalar, CUDA event) of the loss copy in flight
        self._shown = float("nan")  # the latest loss that has landed on the host

    def _send(self, item) -> None:
        try:
            self.queue.put_nowait(item)
        except Exception:  # the driver's display is best-effort: never fail training over it
            pass

    def before_train(self) -> None:
        t = self.trainer
        if t.is_main:
            import torch

            name = torch.cuda.get_device_name(t.device) if t.device.type == "cuda" else "CPU"
            amp = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[t.amp_dtype]
            self._send(("start", f"{t.device} ({name}) x {t.world_size} worker(s), {amp}"
                                 f"{', channels_last' if t.channels_last else ''}"
                                 f"{compile_words(t)}, "
                                 f"{t.loader_workers()} loader worker(s) per worker"))

    def notice(self, message: str) -> None:
        if self.trainer.is_main:
            self._send(("notice", message))

    def before_epoch(self) -> None:
        if self.trainer.is_main:
            t = self.trainer
            self._send(("epoch_start", t.epoch, t.epochs, t.batches_this_epoch()))

    def after_step(self, info: StepInfo) -> None:
        import time

        now = time.monotonic()
        if self.trainer.is_main and (now - self._last >= self.interval_s or info.step == info.steps):
            self._last = now
            loss = float(info.loss) if info.step == info.steps else self._loss_without_waiting(info.loss)
            self._send(("step", info.epoch, info.step, info.steps, loss, info.lr))

    def _loss_without_waiting(self, loss) -> float:
        """A recent loss without stalling the GPU queue: reading this step's loss would make the host wait for the
        GPU to drain (then idle while the host queues the next step). It starts a copy of this one and returns the
        one started last time (nan until a copy has landed)."""
        import torch

        if loss.device.type != "cuda":
            return float(loss)
        previous = self._copy
        host = torch.empty((), dtype=loss.dtype, pin_memory=True)
        host.copy_(loss, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        self._copy = (host, done)
        if previous is not None and previous[1].query():
            self._shown = float(previous[0])
        return self._shown

    def after_epoch(self, metrics: dict[str, float]) -> None:
        if self.trainer.is_main:
            self._send(("epoch_end", dict(metrics)))


def train_loop_per_worker(loop_config: dict) -> dict:
    import ray.train.torch

    cfg = Config.model_validate(loop_config["config"])
    device = ray.train.torch.get_device()
    state = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = load_checkpoint(d, map_location="cpu")
    # the driver's start-up figures: made just before the trainer, whose launch and setup it times from here
    hooks: list[Hook] = [StartupTimingHook(loop_config.get("t0"), loop_config.get("t_submit"),
                                           loop_config.get("driver_stages")), *loop_config.get("hooks", ()),
                         RayReportHook(cfg.tracking.num_overlays)]
    if loop_config.get("progress") is not None:
        hooks.insert(1, ProgressHook(loop_config["progress"]))
    trainer = SegmentationTrainer(cfg, hooks, device=device, wrap_model=ray.train.torch.prepare_model,
                                  resume_state=state, datasets=loop_config.get("datasets"))
    return trainer.fit()


def compile_words(t) -> str:
    """The start line's word on torch.compile: its mode when compiling; on a GPU, why `auto` chose eager."""
    if t.compiled:
        return f", torch.compile ({t.compile_mode})"
    if t.device.type == "cuda" and t.compile == "auto" and t.compile_reason:
        return f", eager (train.compile {t.compile_reason})"
    return ""
