"""The shared segmentation loop: data → model → loss → optimizer → metrics → checkpoint.

`SegmentationTrainer` knows nothing of Ray, Tune, MLflow or the CLI. Hyperparameters come from the typed config and
are plain attributes; each stage is a small method a subclass may override (nnU-Net's style). Reporting,
checkpointing and tracking attach as `Hook`s (Detectron2's style). Distribution is torch's own: when a process group
is initialised the trainer shards data by rank and all-reduces validation statistics; the caller may pass
`wrap_model` (e.g. Ray's `prepare_model`) to wrap the model in DDP.
"""

from __future__ import annotations

import math
import os
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from .config import Config
from .data.normalize import Normalizer, input_normalizer, model_input
from .errors import TrainingError

CHECKPOINT_FILE = "checkpoint.pt"


# ---------------------------------------------------------------------------------------------------------- hooks
@dataclass
class StepInfo:
    epoch: int  # 0-based epoch in progress
    step: int  # 1-based batch index within the epoch
    steps: int  # batches in this epoch
    loss: torch.Tensor  # this batch's loss, still on the device (read it with .item() only when needed)
    images: int  # images this step, all ranks together
    lr: float


class Hook:
    """Behaviour attached to the loop. Every method runs on every rank; check `trainer.is_main` where it matters."""

    trainer: "SegmentationTrainer"

    def before_train(self) -> None: ...

    def before_epoch(self) -> None: ...

    def after_step(self, info: StepInfo) -> None: ...

    def after_epoch(self, metrics: dict[str, float]) -> None:
        """Called once per epoch after validation (when it ran) with everything reported for that epoch."""

    def after_train(self) -> None: ...


class StopTraining(Exception):
    """A hook may raise this to end training cleanly after the current epoch."""


# ---------------------------------------------------------------------------------------------------- distributed
def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class ShardSampler(Sampler[int]):
    """Every index exactly once across ranks (rank r takes r, r+W, ...): no padding, so distributed validation
    statistics equal single-process ones."""

    def __init__(self, length: int, rank: int, world: int):
        self.indices = list(range(rank, length, world))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class SeededSampler(Sampler):
    """Yields (index, seed) with seed = f(run seed, epoch, index): a dataset that accepts such keys seeds its
    augmentation per sample, so what an image gets depends on nothing else (not on the loader worker that draws it,
    nor on how long the workers have lived): persistent workers and an exact resume both hold."""

    def __init__(self, sampler: DistributedSampler, seed: int):
        self.sampler, self.seed, self.epoch = sampler, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.sampler.set_epoch(epoch)

    def __iter__(self):
        for i in self.sampler:
            yield i, int(np.random.SeedSequence([self.seed, self.epoch, i]).generate_state(1)[0])

    def __len__(self) -> int:
        return len(self.sampler)


def _seed_loader_worker(worker_id: int) -> None:
    info = torch.utils.data.get_worker_info()
    np.random.seed(info.seed % 2**32)
    random.seed(info.seed)


def iterate(loader: DataLoader):
    """iter(LOADER), with any worker processes it starts forked while OpenCV is single-threaded. OpenCV sizes its
    thread pool to the whole machine in every worker (16 workers x 64 threads on a 64-core host fight over the
    cores), and a forked worker must not resize the pool itself (it hangs), so the parent sets it around the fork.
    One loader worker is then one core, as torch's own threads already are in a worker."""
    if loader.num_workers == 0:
        return iter(loader)
    import cv2

    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        return iter(loader)
    finally:
        cv2.setNumThreads(threads)


# --------------------------------------------------------------------------------------------------------- trainer
class SegmentationTrainer:
    def __init__(self, cfg: Config, hooks: Sequence[Hook] = (), *, device: torch.device | str | None = None,
                 wrap_model: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
                 resume_state: dict | None = None, datasets: Callable[[Config], tuple] | None = None,
                 t0: float | None = None):
        self.cfg = cfg
        self._datasets_fn = datasets  # (cfg) -> (train, val): a custom source instead of the configured folders
        self._t0 = t0 if t0 is not None else time.time()  # when the command started: for the first-step latency
        self._created = time.time()  # start-up, split: t0 -> here (launching this process) -> setup -> first batch
        self._first_step_s: float | None = None
        self.submitted: float | None = None  # when the caller handed the job to its launcher (e.g. Ray), if it did
        self.driver_stages: dict[str, float] = {}  # the caller's preparation, split (seconds a stage; sums to it)
        self._pending_batches: tuple | None = None  # (epoch, train iterator started ahead of that epoch)
        self.rank, self.world_size = rank_and_world()
        self.is_main = self.rank == 0
        self.device = torch.device(device) if device is not None else _default_device()
        self._wrap_model = wrap_model or (lambda m: m)
        self.hooks: list[Hook] = []
        for h in hooks:
            self.register(h)

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
        # copy + normalise batch i+1 on a side CUDA stream during step i: a gain on one GPU; beside DDP's all-reduce
        # the copy on the compute stream did better (2 H200s, U-Net/ResNet-34: scaling efficiency 0.948 with
        # the side stream, 0.968 without, in a run whose raw records were lost with its machine; see
        # docs/benchmarks.md, `--only ...,variants` of scripts/benchmark.py measures it again)
        self.copy_on_side_stream = self.device.type == "cuda" and self.world_size == 1

        # state that a checkpoint carries
        self.epoch = 0  # epochs completed
        self.best_value: float | None = None
        self.best_epoch: int | None = None
        self.bad_epochs = 0
        self.history: list[dict[str, float]] = []
        self.stop_reason: str | None = None

        if resume_state is not None:
            self.epoch = int(resume_state["epoch"])  # known before setup: the loader starts on that epoch
        self.setup()
        if resume_state is not None:
            self.load_state_dict(resume_state)
        self._set_up = time.time()

    def register(self, hook: Hook) -> None:
        hook.trainer = self
        self.hooks.append(hook)

    # ------------------------------------------------------------------------------------------------ building
    def setup(self) -> None:
        mark = Stopwatch()
        seed_everything(self.seed, deterministic=self.cfg.train.deterministic)
        self.train_set, self.val_set = self.build_datasets()
        mark("datasets")
        self.normalizer = input_normalizer(self.train_set, self.cfg.data)  # uint8 batches -> model input, on device
        mark("normalizer")
        self.train_loader, self.val_loader = self.build_loaders()
        if self.epoch < self.epochs:
            # loader workers fork now, before CUDA and the model exist, and decode the first batches meanwhile
            self._prefetch_train_batches(self.epoch)
        mark("loader_start")
        self.model = self.build_model()
        mark("model")
        self.encoder_frozen = False
        self.optimizer = self.build_optimizer()
        self.steps_per_epoch = self.batches_per_epoch()
        self.schedule = self.build_schedule()
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.loss_fn = self.build_loss().to(self.device)
        self.meter = self.build_meter()
        mark("optimizer_loss_metrics")
        self.set_encoder_frozen(self.cfg.model.freeze_encoder_epochs > 0)
        mark("wrap")
        self.setup_times = mark.laps  # seconds per setup stage, for start-up diagnosis (scripts/benchmark.py)

    def build_datasets(self):
        if self._datasets_fn is not None:
            return self._datasets_fn(self.cfg)
        from .data.dataset import build_dataset

        return build_dataset(self.cfg.data, self.cfg.data.train_split, train=True), \
            build_dataset(self.cfg.data, self.cfg.data.val_split, train=False)

    def loader_workers(self) -> int:
        w = self.cfg.data.loader_workers
        if w != "auto":
            return int(w)
        if self.device.type != "cuda":
            return 0
        local = int(os.environ.get("LOCAL_WORLD_SIZE", torch.cuda.device_count() or 1))
        return max(2, min(16, usable_cpus() // max(1, local) - 1))

    def build_loaders(self) -> tuple[DataLoader, DataLoader]:
        workers = self.loader_workers()
        self._loader_gen = torch.Generator()
        drop_last = len(self.train_set) >= self.batch_size * self.world_size * 2
        self.train_sampler = DistributedSampler(self.train_set, num_replicas=self.world_size, rank=self.rank,
                                                shuffle=True, seed=self.seed, drop_last=drop_last)
        if getattr(self.train_set, "accepts_seeded_index", False):
            self.train_sampler = SeededSampler(self.train_sampler, self.seed)
        common = dict(num_workers=workers, pin_memory=self.device.type == "cuda",
                      worker_init_fn=_seed_loader_worker if workers else None, persistent_workers=workers > 0,
                      prefetch_factor=4 if workers else None, generator=self._loader_gen)
        train = DataLoader(self.train_set, batch_size=self.batch_size, sampler=self.train_sampler,
                           drop_last=drop_last, **common)
        val = DataLoader(self.val_set, batch_size=self.cfg.train.val_batch_size or self.batch_size,
                         sampler=ShardSampler(len(self.val_set), self.rank, self.world_size), **common)
        return train, val

    def batches_per_epoch(self) -> int:
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
        if o.name == "sgd":
            return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov,
                                   weight_decay=o.weight_decay)
        cls = torch.optim.AdamW if o.name == "adamw" else torch.optim.Adam
        return cls(groups, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)

    def build_schedule(self):
        from .schedules import LRSchedule

        return LRSchedule(self.optimizer, self.cfg, self.steps_per_epoch)

    def build_loss(self) -> torch.nn.Module:
        from .data.dataset import class_weights
        from .losses import build_loss

        return build_loss(self.cfg, class_weights(self.cfg.data))

    def build_meter(self):
        from .metrics import ConfusionMeter

        d = self.cfg.data
        return ConfusionMeter(d.num_classes, ignore_index=d.ignore_index, binary=d.binary,
                              threshold=self.cfg.train.threshold, class_names=d.names())

    # -------------------------------------------------------------------------------------------- encoder freeze
    def set_encoder_frozen(self, frozen: bool) -> None:
        """Freeze or unfreeze the encoder. DDP registers only trainable parameters when it is built, so the model is
        (re)wrapped after every change."""
        from .model import set_encoder_trainable

        if frozen != self.encoder_frozen or not hasattr(self, "_wrapped"):
            set_encoder_trainable(self.module, not frozen)
            self.encoder_frozen = frozen
            self.model = self._wrap_model(self.module)
            self._wrapped = True

    # ------------------------------------------------------------------------------------------------- the loop
    def fit(self) -> dict[str, Any]:
        self._call("before_train")
        try:
            while self.epoch < self.epochs and self.stop_reason is None:
                self.set_encoder_frozen(self.epoch < self.cfg.model.freeze_encoder_epochs)
                self._call("before_epoch")
                metrics = self.train_epoch()
                if (self.epoch + 1) % self.cfg.train.val_every == 0 or self.epoch + 1 == self.epochs:
                    metrics.update(self.validate())
                self.epoch += 1
                metrics["epoch"] = self.epoch
                self.update_best(metrics)
                metrics.update(self.best_metrics())
                self.history.append(metrics)
                try:
                    self._call("after_epoch", metrics)
                except StopTraining as stop:
                    self.stop_reason = str(stop) or "stopped by a hook"
            if self.stop_reason is None:
                self.stop_reason = "completed"
        finally:
            self._call("after_train")
        return self.summary()

    def train_epoch(self) -> dict[str, float]:
        self.model.train()
        if self.encoder_frozen:
            self._encoder_eval()
        torch.manual_seed(self._epoch_seed(self.epoch))  # dropout etc.: depends only on (seed, epoch, rank)
        max_batches = min(self.steps_per_epoch * self.grad_accum, len(self.train_loader))
        batches_iter = self.device_batches(islice(self._train_batches(self.epoch), max_batches))
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

        loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        first_bad = torch.full((), -1, device=self.device, dtype=torch.int64)
        batches = images = 0
        waited = 0.0  # seconds the loop stood waiting for the loader: the input pipeline's share of the epoch
        start = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        for i in range(max_batches):
            t = time.perf_counter()
            pair = next(batches_iter, None)
            waited += time.perf_counter() - t
            if pair is None:
                break
            x, y = pair
            if self._first_step_s is None:
                self._first_step_s = time.time() - self._t0
            stepping = (i + 1) % self.grad_accum == 0 or i + 1 == max_batches
            sync = nullcontext() if stepping or not hasattr(self.model, "no_sync") else self.model.no_sync()
            with sync:
                loss = self.training_step(x, y)
                self.scaler.scale(loss / self.grad_accum).backward()
            if stepping:
                self.optimizer_step()
            loss = loss.detach()
            loss_sum += loss
            first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), i + 1, first_bad)
            batches += 1
            images += x.shape[0] * self.world_size
            if batches % self.nan_check_every == 0:
                self._raise_if_bad(first_bad)
            self._call("after_step", StepInfo(self.epoch, batches, max_batches, loss, x.shape[0] * self.world_size,
                                              self.current_lr()))
        if self.epoch + 1 < self.epochs:
            self._prefetch_train_batches(self.epoch + 1)  # the loader works through validation and reporting
        self._raise_if_bad(first_bad)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elapsed = time.perf_counter() - start
        train_loss = self._all_reduce_mean(loss_sum, batches)
        out = {"train_loss": train_loss, "lr": self.current_lr(), "epoch_time_s": elapsed,
               "images_per_s": images / elapsed if elapsed > 0 else float("nan"),
               "data_wait_share": waited / elapsed if elapsed > 0 else float("nan")}
        if self.device.type == "cuda":
            out["peak_gpu_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        if self._first_step_s is not None and not self.history:  # the first epoch this process ran
            out.update(self.startup_times())
        return out

    def startup_times(self) -> dict[str, float]:
        """Seconds from the command to the first training step, and its parts: launching the process that runs
        this trainer (Ray, imports), building data/model/optimizer, and the first batch from the loader."""
        first = self._t0 + self._first_step_s
        out = {"first_step_s": self._first_step_s, "startup_launch_s": self._created - self._t0,
               "startup_setup_s": self._set_up - self._created, "startup_first_batch_s": first - self._set_up}
        if self.submitted is not None:  # launch = the caller's own preparation + starting this process
            out.update(startup_driver_s=self.submitted - self._t0, startup_workers_s=self._created - self.submitted)
            out.update({f"startup_driver_{stage}_s": s for stage, s in self.driver_stages.items()})
        return out

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

    def training_step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            logits = self.model(x)
        loss, _ = self.loss_fn(logits.float(), y)
        return loss

    def optimizer_step(self) -> None:
        if self.grad_clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.schedule.step_batch()

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        self.model.eval()
        self.meter.reset()
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        count = 0
        for x, y in self.device_batches(iterate(self.val_loader)):
            with self.autocast():
                logits = self.model(x)
            logits = logits.float()
            loss, _ = self.loss_fn(logits, y)
            loss_sum += loss.double() * x.shape[0]
            count += x.shape[0]
            self.meter.update(logits, y)
        self.meter.all_reduce()
        metrics = {"val_loss": self._all_reduce_mean(loss_sum, count)}
        metrics.update(self.meter.compute())
        self.schedule.step_epoch(metrics.get(self.monitor))
        return metrics

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

    # ------------------------------------------------------------------------------------------------- helpers
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

    def autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def current_lr(self) -> float:
        return float(self.optimizer.param_groups[-1]["lr"])

    def _encoder_eval(self) -> None:
        encoder = getattr(self.module, "encoder", None)
        if encoder is not None:
            encoder.eval()  # frozen BatchNorm keeps its running statistics

    def _all_reduce_mean(self, total: torch.Tensor, count: int) -> float:
        t = torch.stack([total.double(), torch.tensor(float(count), device=total.device, dtype=torch.float64)])
        if self.world_size > 1:
            dist.all_reduce(t)
        return float(t[0] / t[1]) if t[1] > 0 else float("nan")

    def _raise_if_bad(self, first_bad: torch.Tensor) -> None:
        step = int(first_bad)
        if step >= 0:
            raise TrainingError(f"non-finite loss at epoch {self.epoch + 1}, step {step} (lower optim.lr, set "
                                f"train.grad_clip, or train.amp=off)")

    def _call(self, name: str, *args) -> None:
        for h in self.hooks:
            getattr(h, name)(*args)

    # ----------------------------------------------------------------------------------------- best / stopping
    def is_improvement(self, value: float | None) -> bool:
        if value is None or not math.isfinite(value):
            return False
        if self.best_value is None:
            return True
        if self.monitor_mode == "max":
            return value > self.best_value + self.min_delta
        return value < self.best_value - self.min_delta

    def update_best(self, metrics: dict[str, float]) -> None:
        """Track the monitored metric; sets `stop_reason` when early stopping triggers."""
        if self.monitor not in metrics:
            return  # no validation this epoch
        value = metrics[self.monitor]
        metrics["is_best"] = float(self.is_improvement(value))
        if metrics["is_best"]:
            self.best_value, self.best_epoch, self.bad_epochs = float(value), self.epoch, 0
            return
        self.bad_epochs += 1
        if self.patience is not None and self.bad_epochs >= max(self.patience, 0) and self.epoch < self.epochs:
            self.stop_reason = (f"early stopping: {self.monitor} did not improve for {self.bad_epochs} "
                                f"epoch(s) (best {self.best_value} at epoch {self.best_epoch})")

    def best_metrics(self) -> dict[str, float]:
        if self.best_value is None:
            return {}
        return {f"best_{self.monitor}": self.best_value, "best_epoch": float(self.best_epoch)}

    def summary(self) -> dict[str, Any]:
        return {"epochs": self.epoch, "best_value": self.best_value, "best_epoch": self.best_epoch,
                "monitor": self.monitor, "stop_reason": self.stop_reason,
                "last": self.history[-1] if self.history else {}}

    # ------------------------------------------------------------------------------------------------ state
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
        if d.normalize != "dataset" or (d.mean is not None and d.std is not None) or not isinstance(norm, Normalizer):
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


# ------------------------------------------------------------------------------------------------ checkpoints
def save_checkpoint(state: dict[str, Any], directory: str | Path) -> Path:
    """Write `state` to DIRECTORY/checkpoint.pt atomically (tmp file, then rename)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / CHECKPOINT_FILE
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


TRAINING_ONLY_KEYS = ("optimizer", "schedule", "scaler")


def inference_state(state: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint without what only resuming needs (the optimizer state is twice the weights for Adam): what
    predict, evaluate and export load, at a third of the size."""
    return {k: v for k, v in state.items() if k not in TRAINING_ONLY_KEYS}


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint file, or DIRECTORY/checkpoint.pt, with `weights_only=True` (safe for untrusted files)."""
    from .errors import UserError

    p = Path(path)
    if p.is_dir():
        p = p / CHECKPOINT_FILE
    if not p.is_file():
        raise UserError(f"checkpoint not found: {p}")
    try:
        state = torch.load(p, map_location=map_location, weights_only=True)
    except Exception as e:  # corrupt file, or pickled objects that weights_only refuses
        raise UserError(f"cannot load checkpoint {p}: {str(e).splitlines()[0]}") from None
    if not isinstance(state, dict) or "model" not in state:
        raise UserError(f"{p} is not a raysegtrain checkpoint (no 'model' entry)")
    return state


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


# --------------------------------------------------------------------------------------------------- utilities
class Stopwatch:
    """Calling it with a name records the seconds since the previous call (or since START, a time.time()) under that
    name in `laps`, and returns the time of the call."""

    def __init__(self, start: float | None = None):
        self.laps: dict[str, float] = {}
        self._last = time.time() if start is None else start

    def __call__(self, name: str) -> float:
        now = time.time()
        self.laps[name] = now - self._last
        self._last = now
        return now


def usable_cpus() -> int:
    """CPUs this process may run on (a container's or Slurm's CPU set), not the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 2


def _default_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def resolve_amp(setting: str, device: torch.device) -> torch.dtype | None:
    if device.type != "cuda" or setting == "off":
        return None
    if setting == "fp16":
        return torch.float16
    if setting == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True


def train_local(cfg: Config, out_dir: str | Path, hooks: Iterable[Hook] = (), resume: bool = False,
                device: str | None = None, datasets=None) -> dict[str, Any]:
    """Train in this process (no Ray): checkpoints in OUT_DIR/{best,last}. Used by tests and as the simplest API."""
    out_dir = Path(out_dir)
    state = load_checkpoint(out_dir / "last") if resume else None
    trainer = SegmentationTrainer(cfg, [*hooks, LocalCheckpointHook(out_dir)], device=device, resume_state=state,
                                  datasets=datasets)
    return trainer.fit()
