"""The warm trial runtime: a single-worker trial trains inside its own Ray Tune actor, and Tune hands that actor to
the next trial (`TuneConfig(reuse_actors=True)`), so imported modules, the CUDA context, cuDNN's autotune cache and
the decoded dataset (`data.cache=memory`) stay warm. A TorchTrainer per trial would start three fresh processes
(the trial, Train's controller, the worker), each importing torch, before the first step.

The loop and its hooks are the ones `fit` runs; only reporting differs (`ray.tune.report` instead of
`ray.train.report`, same metrics, same checkpoints). Tune ends a trial that ASHA stops by raising SystemExit in that
trial's `report`; the loop unwinds through its `after_train` hooks and `run_warm_trial` releases what the trial held
before the actor takes the next one. A trial that fails is not reused: Tune discards its actor (a CUDA error can leave
the context unusable), so the next trial starts cold.
"""

from __future__ import annotations

import copy
import gc
import json
import os
import threading
from dataclasses import dataclass, field
from typing import Any

import torch

from .checkpoint import load_checkpoint
from .engine import SegmentationTrainer
from .errors import TrainingError, one_line
from .hooks import StartupTimingHook
from .lr_finder import resolve_trial_lr, run_range_test
from .train_worker import RayReportHook

# Tune waits this long in `reset_config` for the previous trial's thread to end before giving the actor to the next
# trial, and fails that next trial if it has not (its default is 2 s): unwinding a stopped trial (its hooks, loader
# workers) may take longer on a busy host.
THREAD_TIMEOUT_ENV = "TUNE_FUNCTION_THREAD_TIMEOUT_S"
THREAD_TIMEOUT_S = "120"
# decoded datasets an actor keeps for the trials after it (different data settings: different keys)
MAX_DECODED_SETS = 4
# data settings that change only what happens after decoding: trials that differ in them share decoded images
_AFTER_DECODE = {"augment", "augment_p", "loader_workers", "cache", "image_size", "normalize", "mean", "std",
                 "class_weights"}


@dataclass
class ActorState:
    """What one Tune actor process keeps from trial to trial."""

    trials: int = 0  # trials this actor has run
    decoded: dict[str, dict] = field(default_factory=dict)  # data key -> a dataset's decoded-item cache

    def share_decoded(self, dataset) -> None:
        """Point DATASET (a SegmentationDataset with cache=True) at the decoded items an earlier trial of this actor
        left for the same files and reading settings, and decode the rest now, before any loader worker forks."""
        if not getattr(dataset, "cache", False) or not hasattr(dataset, "_decoded"):
            return
        reading = dataset.cfg.model_dump(mode="json", exclude=_AFTER_DECODE)
        key = json.dumps([reading, [[str(a), str(b)] for a, b in dataset.pairs]], sort_keys=True)
        if key not in self.decoded:
            while len(self.decoded) >= MAX_DECODED_SETS:
                self.decoded.pop(next(iter(self.decoded)))
            self.decoded[key] = dataset._decoded
        dataset._decoded = self.decoded[key]
        dataset.preload()


ACTOR = ActorState()


class WarmTrialTrainer(SegmentationTrainer):
    """The shared trainer, with its datasets' decoded items kept by the actor for the trials after this one."""

    def build_datasets(self):
        train, val = super().build_datasets()
        for dataset in (train, val):
            ACTOR.share_decoded(dataset)
        return train, val


def run_warm_trial(config: dict, space, use_gpu: bool, concurrent: int, hooks=()) -> None:
    """One trial in this (possibly reused) Tune actor: the trial's config, resumed from Tune's checkpoint when Tune
    restores the trial, trained by the shared loop, reported to Tune every epoch. USE_GPU: the driver's resolved
    scaling (the actor holds the trial's GPU share); CONCURRENT: trials that share the node's CPUs (loader workers)."""
    from ray import tune

    os.environ.setdefault(THREAD_TIMEOUT_ENV, THREAD_TIMEOUT_S)
    startup = StartupTimingHook()  # t0 = now: the trial's own start-up, from entering the trainable
    cfg = space.trial_config(config)
    cfg = cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"enabled": False})})
    device = torch.device("cuda", 0) if use_gpu and torch.cuda.is_available() else torch.device("cpu")
    state = resume_state(tune.get_checkpoint())
    cfg, found_lr = resolve_trial_lr(cfg, state, lambda c: run_range_test(c, device=str(device)))
    first = {"warm_runtime": 1.0, **actor_snapshot(device), **({"lr_found": found_lr} if found_lr else {})}
    report = RayReportHook(cfg.tracking.num_overlays, report=tune.report, first_report=first)
    trainer = WarmTrialTrainer(cfg, [startup, *copy.deepcopy(list(hooks)), report], device=device,
                               resume_state=state)
    trainer.cpu_sharers = max(1, concurrent)
    try:
        trainer.fit()
    except TrainingError:
        raise
    except Exception as e:  # the reason in one line, as a TorchTrainer trial gives it
        raise TrainingError(one_line(e)) from None
    finally:
        release(trainer, device)
        ACTOR.trials += 1


def resume_state(checkpoint) -> dict | None:
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as d:
        return load_checkpoint(d, map_location="cpu")


def release(trainer: SegmentationTrainer, device: torch.device) -> None:
    """Let go of everything the trial held: the trainer (model, optimizer, loaders, whose worker processes end when
    their iterators are collected), the hooks' references to it, and the memory the CUDA allocator cached."""
    trainer._pending_batches = None
    for hook in trainer.hooks:
        hook.trainer = None
    trainer.hooks = []
    for name in ("model", "module", "optimizer", "train_loader", "val_loader", "train_set", "val_set", "loss_fn",
                 "schedule", "scaler", "meter"):
        trainer.__dict__.pop(name, None)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def actor_snapshot(device: torch.device) -> dict[str, float]:
    """What this actor holds as a trial starts, reported with its first epoch: the proof that a trial's leftovers do
    not reach the next one (the figures stay flat from trial to trial on one actor)."""
    snap: dict[str, Any] = {"actor_trials_before": ACTOR.trials, "actor_threads": threading.active_count()}
    try:
        snap["actor_open_files"] = len(os.listdir("/proc/self/fd"))
    except OSError:  # not Linux
        pass
    try:
        import psutil

        snap["actor_child_processes"] = len(psutil.Process().children())
    except Exception:
        pass
    if device.type == "cuda":
        snap["actor_gpu_mib"] = torch.cuda.memory_allocated(device) / 2**20
    return {k: float(v) for k, v in snap.items()}
