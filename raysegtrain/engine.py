"""The shared segmentation loop: data → model → loss → optimizer → metrics → checkpoint.

`SegmentationTrainer` knows nothing of Ray, Tune, MLflow or the CLI. Hyperparameters come from the typed config and
are plain attributes; each stage is a small method a subclass may override (nnU-Net's style). Construction is
cheap: `setup` builds, and `fit` calls it when it has not run, so attributes set in between count. Timing, best-metric
tracking, early stopping, reporting and checkpointing attach as `Hook`s (Detectron2's style; hooks.py). Distribution
is torch's own: when a process group is initialised the trainer shards data by rank and all-reduces validation
statistics; the caller may pass `wrap_model` (e.g. Ray's `prepare_model`) to wrap the model in DDP.
"""

from __future__ import annotations

import math
import os
import time
from contextlib import nullcontext
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler

from . import compiling, validation
from .checkpoint import load_checkpoint
from .config import Config
from .data.loading import SeededSampler, ShardSampler, iterate, seed_loader_worker
from .data.statistics import Normalizer, input_normalizer, model_input, uses_dataset_stats
from .errors import TrainingError
from .hooks import (BestMetricHook, EpochTimingHook, Hook, LocalCheckpointHook, StartupTimingHook, StepInfo,
                    StopTraining)
from .runtime import (CudaWarmUp, Stopwatch, all_reduce_mean, autocast, default_device, rank_and_world,
                      resolve_amp, seed_everything, usable_cpus)


class SegmentationTrainer:
    def __init__(self, cfg: Config, hooks: Sequence[Hook] = (), *, device: torch.device | str | None = None,
                 wrap_model: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
                 resume_state: dict | None = None, datasets: Callable[[Config], tuple] | None = None):
        self.cfg = cfg
        self._datasets_fn = datasets  # (cfg) -> (train, val): a custom source instead of the configured folders
        self._resume_state = resume_state  # applied by setup
        self._loader_gen = torch.Generator()  # the loaders' worker seeds (set per epoch for training)
        self._pending_batches: tuple | None = None  # (epoch, train iterator started ahead of that epoch)
        self.rank, self.world_size = rank_and_world()
        self.is_main = self.rank == 0
        self.device = torch.device(device) if device is not None else default_device()
        self._wrap_model = wrap_model or (lambda m: m)
        self.built: str | None = None  # "training" once setup() ran, "validation" once setup_validation() did
        self.encoder_frozen: bool | None = None  # None: the model is not built (and wrapped) yet

        # hyperparameters as plain attributes (override in a subclass or set before `fit`)
        t = cfg.train
        self.epochs = t.epochs
        self.batch_size = t.batch_size
        self.grad_accum = t.grad_accum
        self.grad_clip = t.grad_clip
        self.monitor = t.monitor
        self.monitor_mode = t.monitor_mode
        self.patience = t.early_stopping.patience
        self.min_delta = t.early_stopping.min_delta
        self.seed = t.seed
        self.amp_dtype = resolve_amp(t.amp, self.device)
        self.channels_last = t.channels_last == "on" or (t.channels_last == "auto" and self.device.type == "cuda")
        self.nan_check_every = 1 if self.device.type == "cpu" else 25
        self.compile = t.compile  # auto / on / off (compiling.compile_decision); the mode, backend, cache below
        self.compile_mode = t.compile_mode
        self.compile_backend = t.compile_backend
        self.fused_optimizer = cfg.optim.fused == "on" or (cfg.optim.fused == "auto" and self.device.type == "cuda")
        self.step_runner: compiling.CompiledOrEager | None = None  # set by setup_compile when compiling
        self.eval_runner: compiling.CompiledOrEager | None = None
        self.compile_watch: compiling.CompileWatch | None = None
        self.compile_reason: str | None = None
        # copy + normalise batch i+1 on a side CUDA stream during step i: a gain on one GPU; beside DDP's all-reduce
        # the copy on the compute stream scaled better (docs/benchmarks.md; `--only ...,variants` of
        # scripts/benchmark.py measures both)
        self.copy_on_side_stream = self.device.type == "cuda" and self.world_size == 1
        # training processes that share this node's CPUs, for `data.loader_workers: auto` (None: the GPUs' ranks)
        self.cpu_sharers: int | None = None

        # state that a checkpoint carries (BestMetricHook keeps best_value, best_epoch, bad_epochs and may set
        # stop_reason)
        self.epoch = 0  # epochs completed
        self.best_value: float | None = None
        self.best_epoch: int | None = None
        self.bad_epochs = 0
        self.history: list[dict[str, float]] = []
        self.stop_reason: str | None = None

        self.hooks: list[Hook] = []
        for h in [*self.default_hooks(hooks), *hooks]:
            self.register(h)

    def default_hooks(self, given: Sequence[Hook]) -> list[Hook]:
        """The standard figures and best-metric tracking, installed ahead of the caller's hooks so that theirs see
        them. A `StartupTimingHook` among the GIVEN hooks (one that knows when the command started) stands in for
        the default one."""
        startup = [] if any(isinstance(h, StartupTimingHook) for h in given) else [StartupTimingHook()]
        return [EpochTimingHook(), *startup, BestMetricHook()]

    def register(self, hook: Hook) -> None:
        hook.trainer = self
        self.hooks.append(hook)

    # ------------------------------------------------------------------------------------------------ building
    def setup(self) -> None:
        """Build everything training needs, then apply the resume state given to the constructor."""
        mark = Stopwatch()
        seed_everything(self.seed, self.cfg.train.deterministic, self.cfg.train.cudnn_benchmark)
        self.train_set, self.val_set = self.build_datasets()
        mark("datasets")
        self.normalizer = input_normalizer(self.train_set, self.cfg.data)  # uint8 batches -> model input, on device
        mark("normalizer")
        self.train_loader, self.val_loader = self.build_train_loader(), self.build_val_loader()
        if self._resume_state is not None:
            self.epoch = int(self._resume_state["epoch"])  # before the prefetch: the loader starts on that epoch
        if self.epoch < self.epochs:
            # loader workers fork now, before CUDA and the model exist, and decode the first batches meanwhile
            self._prefetch_train_batches(self.epoch)
        mark("loader_start")
        # the CUDA context and cuBLAS/cuDNN load while the model is built on the CPU (after the loader's workers
        # have forked: a fork never copies a half-made CUDA state)
        warm_up = CudaWarmUp(self.device) if self.device.type == "cuda" else None
        if warm_up is not None:
            warm_up.start()
        self.model = self.build_model()
        mark("model")
        self.optimizer = self.build_optimizer()
        self.steps_per_epoch = self.batches_per_epoch()
        self.schedule = self.build_schedule()
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.loss_fn = self.build_loss().to(self.device)
        self.meter = self.build_meter()
        mark("optimizer_loss_metrics")
        self.encoder_frozen = None  # a new model: wrap it whatever it is set to
        self.set_encoder_frozen(self.cfg.model.freeze_encoder_epochs > 0)
        mark("wrap")
        self.setup_compile(self.planned_training_images())
        self.setup_times = mark.laps  # seconds per setup stage, for start-up diagnosis (scripts/benchmark.py)
        if warm_up is not None and warm_up.seconds is not None:
            self.setup_times["cuda_warm_up_thread"] = warm_up.seconds  # overlapped: not a stage of its own
        if self._resume_state is not None:
            self.load_state_dict(self._resume_state)
            self._resume_state = None  # applied; it holds a copy of the weights and optimizer state
        self.built = "training"

    def setup_validation(self) -> None:
        """Only what validation needs, to score a trained model (`evaluate`): the validation set and loader, model,
        loss and meter; no training set, optimizer or schedule."""
        seed_everything(self.seed, self.cfg.train.deterministic, self.cfg.train.cudnn_benchmark)
        self.val_set = self.build_val_set()
        self.normalizer = input_normalizer(self.val_set, self.cfg.data)
        self.val_loader = self.build_val_loader()
        self.model = self.build_model()
        self.loss_fn = self.build_loss().to(self.device)
        self.meter = self.build_meter()
        self.encoder_frozen = None
        self.set_encoder_frozen(False)
        self.setup_compile(0)
        self.built = "validation"

    def build_datasets(self):
        """(train, val): the `datasets` source given to the constructor, else the configured folders."""
        if self._datasets_fn is not None:
            return self._datasets_fn(self.cfg)
        from .data.dataset import build_dataset

        return build_dataset(self.cfg.data, self.cfg.data.train_split, train=True), self.build_val_set()

    def build_val_set(self):
        if self._datasets_fn is not None:
            return self._datasets_fn(self.cfg)[1]
        from .data.dataset import build_dataset

        return build_dataset(self.cfg.data, self.cfg.data.val_split, train=False)

    def loader_workers(self) -> int:
        w = self.cfg.data.loader_workers
        if w != "auto":
            return int(w)
        if self.device.type != "cuda":
            return 0
        local = self.cpu_sharers or int(os.environ.get("LOCAL_WORLD_SIZE", torch.cuda.device_count() or 1))
        return max(2, min(16, usable_cpus() // max(1, local) - 1))

    def _loader_options(self) -> dict[str, Any]:
        workers = self.loader_workers()
        return dict(num_workers=workers, pin_memory=self.device.type == "cuda",
                    worker_init_fn=seed_loader_worker if workers else None, persistent_workers=workers > 0,
                    prefetch_factor=4 if workers else None, generator=self._loader_gen)

    def build_train_loader(self) -> DataLoader:
        drop_last = len(self.train_set) >= self.batch_size * self.world_size * 2
        self.train_sampler = DistributedSampler(self.train_set, num_replicas=self.world_size, rank=self.rank,
                                                shuffle=True, seed=self.seed, drop_last=drop_last)
        if getattr(self.train_set, "accepts_seeded_index", False):
            self.train_sampler = SeededSampler(self.train_sampler, self.seed)
        return DataLoader(self.train_set, batch_size=self.batch_size, sampler=self.train_sampler,
                          drop_last=drop_last, **self._loader_options())

    def build_val_loader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.cfg.train.val_batch_size or self.batch_size,
                          sampler=ShardSampler(len(self.val_set), self.rank, self.world_size), **self._loader_options())

    def batches_per_epoch(self) -> int:
        """Optimizer steps per epoch."""
        n = len(self.train_loader)
        cap = self.cfg.train.max_steps_per_epoch
        n = min(n, cap * self.grad_accum) if cap else n
        return max(1, math.ceil(n / self.grad_accum))

    def build_model(self) -> torch.nn.Module:
        from .model import build_model

        model = build_model(self.cfg)
        if self.cfg.scaling.sync_batchnorm and self.device.type == "cuda" and self.world_size > 1:
            # gloo (CPU) has no SyncBatchNorm; on GPUs it must be converted before DDP wraps the model
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = model.to(self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.module = model  # the bare model; self.model may be a DDP wrapper around it
        return model

    def build_optimizer(self) -> torch.optim.Optimizer:
        from .model import param_groups

        o = self.cfg.optim
        groups = param_groups(self.module, o.lr, o.encoder_lr_mult)
        fused = {"fused": True} if self.fused_optimizer else {}
        if o.name == "sgd":
            return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov,
                                   weight_decay=o.weight_decay, **fused)
        cls = torch.optim.AdamW if o.name == "adamw" else torch.optim.Adam
        return cls(groups, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay, **fused)

    def build_schedule(self):
        from .schedules import LRSchedule

        cfg = self.cfg  # the schedule spans `self.epochs`, which may have been set after construction
        if self.epochs != cfg.train.epochs:
            cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"epochs": self.epochs})})
        return LRSchedule(self.optimizer, cfg, self.steps_per_epoch)

    def build_loss(self) -> torch.nn.Module:
        from .data.statistics import class_weights
        from .losses import build_loss

        return build_loss(self.cfg, class_weights(self.cfg.data))

    def build_meter(self):
        from .metrics import ConfusionMeter

        d = self.cfg.data
        return ConfusionMeter(d.num_classes, ignore_index=d.ignore_index, binary=d.binary,
                              threshold=self.cfg.train.threshold, class_names=d.names())

    # ------------------------------------------------------------------------------------------------ compiling
    def planned_training_images(self) -> int:
        """Training images this run will see from here (all ranks), for `compile: auto`'s rule."""
        return ((self.epochs - self.epoch) * self.batches_this_epoch() * self.batch_size * self.world_size)

    def setup_compile(self, planned_images: int) -> None:
        """The compiled training step and validation forward when `compile` says so (compiling.compile_decision);
        `compile_reason` says what was decided and why."""
        self.step_runner = self.eval_runner = self.compile_watch = None
        on, self.compile_reason = compiling.compile_decision(self.compile, self.device, planned_images)
        if not on:
            return
        self.compile_watch = compiling.CompileWatch()
        compiling.use_cache_folder(compiling.cache_folder(self.cfg.train.compile_cache))
        # dynamo keeps compiled code per function and a bounded number of variants of it: a process that trains
        # one run after another (a warm study's trials) starts each from a clean slate; the disk cache keeps them fast
        torch._dynamo.reset()
        options = dict(mode=self.compile_mode, backend=self.compile_backend, watch=self.compile_watch,
                       on_fallback=self.notice)
        self.step_runner = compiling.CompiledOrEager(self.training_step, "training step", **options)
        self.eval_runner = compiling.CompiledOrEager(self.eval_forward, "validation forward", **options)

    @property
    def compiled(self) -> bool:
        return self.step_runner is not None and self.step_runner.active

    def notice(self, message: str) -> None:
        """A one-line message for the user (the hooks pass it on: the driver prints it), also in this process's
        log."""
        print(message, flush=True)
        self._call("notice", message)

    # -------------------------------------------------------------------------------------------- encoder freeze
    def set_encoder_frozen(self, frozen: bool) -> None:
        """Freeze or unfreeze the encoder. DDP registers only trainable parameters when it is built, so the model is
        (re)wrapped after every change."""
        from .model import set_encoder_trainable

        if frozen != self.encoder_frozen:
            set_encoder_trainable(self.module, not frozen)
            self.encoder_frozen = frozen
            self.model = self._wrap_model(self.module)

    # ------------------------------------------------------------------------------------------------- the loop
    def fit(self) -> dict[str, Any]:
        """Train from `epoch` to `epochs` (fewer if early stopping or a hook ends the run); returns `summary()`."""
        if self.built != "training":
            self.setup()
        self._call("before_train")
        try:
            while self.epoch < self.epochs and self.stop_reason is None:
                self.set_encoder_frozen(self.epoch < self.cfg.model.freeze_encoder_epochs)
                self._call("before_epoch")
                metrics = self.train_epoch()
                if (self.epoch + 1) % self.cfg.train.val_every == 0 or self.epoch + 1 == self.epochs:
                    metrics.update(self.validate())
                    self.schedule.step_epoch(metrics.get(self.monitor))  # plateau: once per validation
                self.end_epoch(metrics)
            self.stop_reason = self.stop_reason or "completed"
        finally:
            self._call("after_train")
        return self.summary()

    def train_epoch(self) -> dict[str, float]:
        """One pass over this epoch's training batches: the loss (mean over batches and ranks) and the lr."""
        self.train_mode()
        steps = self.batches_this_epoch()
        batches = self.device_batches(islice(self._train_batches(self.epoch), steps))
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        finite = FiniteLossCheck(self.device, self.nan_check_every, self.epoch)
        self.optimizer.zero_grad(set_to_none=True)
        step = 0
        for step, (x, y), waited, ready in timed_steps(batches):
            loss = self.accumulate(x, y, stepping=step % self.grad_accum == 0 or step == steps)
            loss_sum += loss
            finite.check(loss, step)
            self._call("after_step", StepInfo(self.epoch, step, steps, loss, x.shape[0] * self.world_size,
                                              self.current_lr(), waited, ready))
        if self.epoch + 1 < self.epochs:
            self._prefetch_train_batches(self.epoch + 1)  # the loader works through validation and reporting
        finite.raise_if_bad()
        return {"train_loss": all_reduce_mean(loss_sum, step), "lr": self.current_lr()}

    def end_epoch(self, metrics: dict[str, float]) -> None:
        """Count the epoch, keep its metrics and hand them to the hooks, which add their figures; one may end the
        run."""
        self.epoch += 1
        metrics["epoch"] = self.epoch
        if self.compile_watch is not None:
            metrics.update(self.compile_watch.take())
            metrics["compiled"] = float(self.compiled)
        self.history.append(metrics)
        try:
            self._call("after_epoch", metrics)
        except StopTraining as stop:
            self.stop_reason = str(stop) or "stopped by a hook"

    def train_mode(self) -> None:
        """The model in training mode, a frozen encoder in eval (its BatchNorm keeps its running statistics), and
        torch's seed for dropout and the like, which depends only on (seed, epoch, rank)."""
        self.model.train()
        encoder = getattr(self.module, "encoder", None)
        if self.encoder_frozen and encoder is not None:
            encoder.eval()
        torch.manual_seed(self._epoch_seed(self.epoch))

    def batches_this_epoch(self) -> int:
        return min(self.steps_per_epoch * self.grad_accum, len(self.train_loader))

    def accumulate(self, x: torch.Tensor, y: torch.Tensor, stepping: bool) -> torch.Tensor:
        """Forward and backward of one batch, its gradient a 1/grad_accum share; the optimizer steps when STEPPING.
        Under DDP, gradients are all-reduced on stepping batches only. Returns the batch's loss, detached."""
        sync = nullcontext() if stepping or not hasattr(self.model, "no_sync") else self.model.no_sync()

        def forward_backward(step: Callable) -> torch.Tensor:
            loss = step(x, y)
            self.scaler.scale(loss / self.grad_accum).backward()
            return loss

        with sync:
            if self.step_runner is None:
                loss = forward_backward(self.training_step)
            else:
                loss = self.step_runner.run(forward_backward)
        if stepping:
            self.optimizer_step()
        return loss.detach()

    def training_step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The batch's loss (forward and loss mix); what `compile` compiles, backward included."""
        with self.autocast():
            logits = self.model(x)
        loss, _ = self.loss_fn(logits.float(), y)
        return loss

    def eval_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The model's output for validation (under the caller's autocast and no_grad); compiled with `compile`."""
        return self.model(x)

    def optimizer_step(self, step_schedule: bool = True) -> None:
        """Clip, step (through the AMP scaler), clear the gradients and, unless told not to (an LR range test sets
        the lr itself), step the schedule."""
        if self.grad_clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if step_schedule:
            self.schedule.step_batch()

    def validate(self) -> dict[str, float]:
        """Loss and metrics on the validation split, all ranks together (validation.validate). With nothing built
        yet, builds only what validation needs."""
        if self.built is None:
            self.setup_validation()
        forward = None
        if self.eval_runner is not None:
            runner = self.eval_runner

            def forward(x):
                return runner.run(lambda f: f(x))

        return validation.validate(self.model, self.device_batches(iterate(self.val_loader)), self.loss_fn,
                                   self.meter, self.device, self.amp_dtype, forward=forward)

    @torch.no_grad()
    def visual_samples(self, n: int) -> dict[str, np.ndarray]:
        """The first N validation images with masks and predictions, plus the split's confusion matrix (from the
        last `validate`), for the figures a tracker draws."""
        from .plots import to_display

        self.model.eval()
        images, masks, preds = [], [], []
        for i in range(min(n, len(self.val_set))):
            item = self.val_set[i]
            x = model_input(item["image"].unsqueeze(0).to(self.device), self.normalizer)
            with self.autocast():
                logits = self.model(x).float()
            preds.append(self.meter.predict(logits)[0].cpu().numpy())
            images.append(to_display(item["image"].unsqueeze(0).numpy())[0])  # uint8 as is; float stretched
            masks.append(item["mask"].long().numpy())
        return {"images": np.stack(images) if images else np.zeros((0, 1, 1, 3), np.uint8),
                "masks": np.stack(masks) if masks else np.zeros((0, 1, 1), np.int64),
                "preds": np.stack(preds) if preds else np.zeros((0, 1, 1), np.int64),
                "confusion": self.meter.confusion_matrix()}

    # ---------------------------------------------------------------------------------------------- batches
    def _epoch_seed(self, epoch: int) -> int:
        return self.seed * 100_003 + epoch * 1009 + self.rank

    def _train_batches(self, epoch: int):
        """The train loader's iterator for EPOCH: the one started ahead (in setup, or at the end of the previous
        epoch), else a new one."""
        pending, self._pending_batches = self._pending_batches, None
        if pending is not None and pending[0] == epoch:
            return pending[1]
        return self._start_train_batches(epoch)

    def _start_train_batches(self, epoch: int):
        self.train_sampler.set_epoch(epoch)
        self._loader_gen.manual_seed(self._epoch_seed(epoch))  # worker seeds (drawn when the workers start)
        return iterate(self.train_loader)

    def _prefetch_train_batches(self, epoch: int) -> None:
        """Start EPOCH's iterator now: loader workers fill their queues while the model builds (first epoch) or this
        epoch validates, checkpoints and reports, so the epoch opens on ready batches. What each sample gets does not
        depend on when it is drawn (SeededSampler), so this changes no result. Nothing to gain without workers."""
        if self.train_loader.num_workers == 0:
            return
        self._pending_batches = (epoch, self._start_train_batches(epoch))

    def device_batches(self, batches: Iterable[dict]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(model input, mask) pairs on the device. With `copy_on_side_stream`, batch i+1 is copied and normalised on
        a side stream while step i computes (on the compute stream the copy waits for the step and the step for the
        copy); otherwise the non-blocking copy is queued on the compute stream."""
        if not self.copy_on_side_stream:
            yield from (self.to_device(b) for b in batches)
            return
        side, main = torch.cuda.Stream(self.device), torch.cuda.current_stream(self.device)

        def start(batch):
            with torch.cuda.stream(side):
                return self.to_device(batch)

        batches = iter(batches)
        ahead = next(batches, None)
        ahead = start(ahead) if ahead is not None else None
        while ahead is not None:
            main.wait_stream(side)
            x, y = ahead
            x.record_stream(main)  # made on the side stream, freed on the main one: tell the allocator
            y.record_stream(main)
            following = next(batches, None)
            ahead = start(following) if following is not None else None
            yield x, y

    def to_device(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(model input, long mask) on the device. uint8 images and compact masks cross as they are (a quarter and
        an eighth of float32/int64's bytes) and are normalised / widened there; float images are model input."""
        x = batch["image"].to(self.device, non_blocking=True)
        y = batch["mask"].to(self.device, non_blocking=True).long()
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)  # on uint8: the cheap place for the reorder
        return model_input(x, self.normalizer), y

    # ------------------------------------------------------------------------------------------------- helpers
    def autocast(self):
        return autocast(self.device, self.amp_dtype)

    def current_lr(self) -> float:
        return float(self.optimizer.param_groups[-1]["lr"])

    def _call(self, name: str, *args) -> None:
        for h in self.hooks:
            getattr(h, name)(*args)

    # ------------------------------------------------------------------------------------------------ state
    def summary(self) -> dict[str, Any]:
        return {"epochs": self.epoch, "best_value": self.best_value, "best_epoch": self.best_epoch,
                "monitor": self.monitor, "stop_reason": self.stop_reason,
                "last": self.history[-1] if self.history else {}}

    def state_dict(self) -> dict[str, Any]:
        return {
            "format": 1,
            "model": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch,
            "best_value": self.best_value,
            "best_epoch": self.best_epoch,
            "bad_epochs": self.bad_epochs,
            "metrics": self.history[-1] if self.history else {},
            "history": self.history,
            "config": self.trained_config().to_dict(),
        }

    def trained_config(self) -> Config:
        """The config as trained, for checkpoints: `normalize: dataset` statistics are written in as data.mean/std,
        so that predict, evaluate and export of a checkpoint need no copy of the training set."""
        d, norm = self.cfg.data, self.normalizer
        if not uses_dataset_stats(d) or not isinstance(norm, Normalizer):
            return self.cfg
        return self.cfg.model_copy(update={"data": d.model_copy(update={"mean": list(norm.mean), "std": list(norm.std)})})

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.epoch = int(state["epoch"])
        self.best_value = state.get("best_value")
        self.best_epoch = state.get("best_epoch")
        self.bad_epochs = int(state.get("bad_epochs", 0))
        self.history = list(state.get("history", []))


# ------------------------------------------------------------------------------------------------ loop helpers
def timed_steps(batches: Iterable) -> Iterator[tuple[int, Any, float, float]]:
    """(step from 1, batch, seconds spent waiting for it, time.time() when it came) for each of BATCHES."""
    batches = iter(batches)
    step = 0
    while True:
        start = time.perf_counter()
        batch = next(batches, None)
        if batch is None:
            return
        step += 1
        yield step, batch, time.perf_counter() - start, time.time()


class FiniteLossCheck:
    """Remembers an epoch's first step with a non-finite loss on the device (reading the loss every step would make
    the host wait for the GPU); looks every EVERY steps, and at the end (`raise_if_bad`)."""

    def __init__(self, device: torch.device, every: int, epoch: int):
        self.first_bad = torch.full((), -1, device=device, dtype=torch.int64)
        self.every, self.epoch = every, epoch

    def check(self, loss: torch.Tensor, step: int) -> None:
        self.first_bad = torch.where((self.first_bad < 0) & ~torch.isfinite(loss), step, self.first_bad)
        if step % self.every == 0:
            self.raise_if_bad()

    def raise_if_bad(self) -> None:
        step = int(self.first_bad)
        if step >= 0:
            raise TrainingError(f"non-finite loss at epoch {self.epoch + 1}, step {step} (lower optim.lr, set "
                                f"train.grad_clip, or train.amp=off)")


def train_local(cfg: Config, out_dir: str | Path, hooks: Iterable[Hook] = (), resume: bool = False,
                device: str | None = None, datasets=None) -> dict[str, Any]:
    """Train in this process (no Ray): checkpoints in OUT_DIR/{best,last}. Used by tests and as the simplest API."""
    out_dir = Path(out_dir)
    state = load_checkpoint(out_dir / "last") if resume else None
    trainer = SegmentationTrainer(cfg, [*hooks, LocalCheckpointHook(out_dir)], device=device, resume_state=state,
                                  datasets=datasets)
    return trainer.fit()
