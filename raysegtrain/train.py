"""`fit`: the shared loop in a Ray Train `TorchTrainer` (DDP over N workers), tracked in MLflow from the driver's node.

Driver side: validate everything the user gave (before any worker starts), pick the run name, open the MLflow run,
start Ray Train, show progress, close the run with its artifacts. Worker side (`train_loop_per_worker`): build the
`SegmentationTrainer` with Ray's device and DDP wrapper and report every epoch with a checkpoint.
"""

from __future__ import annotations

import math
import os
import signal
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from . import preflight, presets, tracking
from .checkpoint import load_checkpoint, save_checkpoint
from .config import Config
from .engine import SegmentationTrainer
from .errors import ConfigError, ResourceError, TrainingError, UserError
from .hooks import Hook, StartupTimingHook, StepInfo
from .interrupt import Interrupted, StopOnSignal, signal_name
from .runtime import Stopwatch

import ray
import ray.train
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, UserCallback
from ray.train import RunConfig as RayRunConfig
from ray.train import ScalingConfig as RayScalingConfig
from ray.train.torch import TorchTrainer


@dataclass
class FitResult:
    run_name: str
    monitor: str
    best_value: float | None
    best_checkpoint: str | None
    last_checkpoint: str | None
    mlflow_run_id: str | None
    tracking_uri: str | None
    metrics: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    path: str | None = None


# ------------------------------------------------------------------------------------------------- worker side
class RayReportHook(Hook):
    """Every epoch: `ray.train.report` on every rank; rank 0 attaches the checkpoint (and figure data)."""

    def __init__(self, num_overlays: int):
        self.num_overlays = num_overlays

    def after_epoch(self, metrics: dict[str, float]) -> None:
        t = self.trainer
        report = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        worst = -math.inf if t.monitor_mode == "max" else math.inf
        score = report.get(t.monitor, worst)
        report["checkpoint_score"] = score if math.isfinite(score) else worst
        report["early_stopped"] = float(bool(t.stop_reason and t.stop_reason.startswith("early stopping")))
        if not t.is_main:
            ray.train.report(report, checkpoint=None)
            return
        with tempfile.TemporaryDirectory(prefix="raysegtrain-ckpt-") as d:
            save_checkpoint(t.state_dict(), d)
            if "val_loss" in metrics and self.num_overlays:
                from .plots import VIZ_FILE

                np.savez_compressed(Path(d) / VIZ_FILE, **t.visual_samples(self.num_overlays))
            ray.train.report(report, checkpoint=Checkpoint.from_directory(d))


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
                                 f"{', channels_last' if t.channels_last else ''}, "
                                 f"{t.loader_workers()} loader worker(s) per worker"))

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


# ------------------------------------------------------------------------------------------------- driver side
class MLflowEpochLogger(UserCallback):
    """Runs in Ray Train's controller, which Ray pins to the driver's node: each epoch's metrics into one MLflow run."""

    def __init__(self, uri: str, run_id: str):
        self.uri = uri
        self.run_id = run_id

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        if metrics:
            m = metrics[0]
            tracking.log_metrics(tracking.client(self.uri), self.run_id, m, step=int(m.get("epoch", 0)))


def with_absolute_paths(cfg: Config) -> Config:
    """Workers run in another working directory: make the user's relative paths absolute on the driver."""
    data, model = cfg.data, cfg.model
    if data.root is not None and not data.root.is_absolute():
        data = data.model_copy(update={"root": data.root.expanduser().resolve()})
    w = model.encoder_weights
    if w and w != "imagenet" and Path(w).expanduser().exists():
        model = model.model_copy(update={"encoder_weights": str(Path(w).expanduser().resolve())})
    return cfg.model_copy(update={"data": data, "model": model})


def new_run_name() -> str:
    return "fit-" + datetime.now().strftime("%Y%m%d-%H%M%S")


def storage_root(cfg: Config) -> str:
    s = cfg.run.storage_path
    return s if "://" in s else str(Path(s).expanduser().resolve())


def run_exists(storage: str, name: str) -> bool:
    if "://" in storage:
        import pyarrow.fs

        fs, base = pyarrow.fs.FileSystem.from_uri(storage)
        return fs.get_file_info(f"{base}/{name}").type != pyarrow.fs.FileType.NotFound
    return (Path(storage) / name).exists()


def plan_run_name(cfg: Config, resume: str | None) -> str:
    """A new run never reuses an old name (Ray would silently resume it); `--resume NAME` must name one that exists."""
    storage = storage_root(cfg)
    if resume:
        if not run_exists(storage, resume):
            raise UserError(f"no run named {resume!r} under {storage} to resume")
        return resume
    name = cfg.run.name or new_run_name()
    if run_exists(storage, name):
        raise UserError(f"a run named {name!r} already exists under {storage}: use --resume {name} to continue it, "
                        f"or choose another run.name")
    return name


def init_ray(address: str | None = None, verbose: bool = False) -> None:
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    kwargs: dict[str, Any] = dict(log_to_driver=verbose, configure_logging=True,
                                  logging_level="INFO" if verbose else "ERROR")
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(include_dashboard=verbose or None, **kwargs)


def prestart_train_helpers() -> None:
    """Start the cluster's autoscaling-coordinator actor now, in the background. Each Ray Train controller registers
    its resource request with it (waiting up to 5 s) and creates it on first use, a process start that otherwise
    lies on the path to the first step (Ray 2.60; with it started here, request to placement group took 0.03-0.67 s
    on an H200 host, docs/benchmarks.md). It is detached: one per cluster, shared.
    Ray-internal, so best-effort: if it moves, Ray Train creates it itself as before."""
    try:
        from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
            get_or_create_autoscaling_coordinator,
        )

        get_or_create_autoscaling_coordinator()
    except Exception:
        pass


def ray_scaling(cfg: Config) -> RayScalingConfig:
    """Ray's ScalingConfig for CFG; a ResourceError when the cluster cannot hold it now (unless the config says to
    wait for an autoscaler to add the nodes)."""
    s = cfg.scaling
    use_gpu = s.use_gpu != "false" if s.wait_for_resources else _check_resources(s)
    resources: dict[str, float] = {"CPU": s.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = s.gpus_per_worker
    return RayScalingConfig(num_workers=s.num_workers, use_gpu=use_gpu, resources_per_worker=resources,
                            placement_strategy=s.placement_strategy)


def _check_resources(s) -> bool:
    """Whether the workers use GPUs, checked against what the cluster has now."""
    have = ray.cluster_resources()
    gpus = have.get("GPU", 0)
    if s.use_gpu == "true" and gpus == 0:
        raise ResourceError("scaling.use_gpu=true but the Ray cluster has no GPU (use scaling.use_gpu=auto or false)")
    use_gpu = s.use_gpu == "true" or (s.use_gpu == "auto" and gpus > 0)
    need_gpu = s.num_workers * s.gpus_per_worker
    if use_gpu and need_gpu > gpus:
        raise ResourceError(f"{s.num_workers} workers x {s.gpus_per_worker} GPU need {need_gpu:g} GPUs; the cluster "
                            f"has {gpus:g}")
    cpus = have.get("CPU", 0)
    if s.num_workers * s.cpus_per_worker > cpus:
        raise ResourceError(f"{s.num_workers} workers x {s.cpus_per_worker:g} CPU need "
                            f"{s.num_workers * s.cpus_per_worker:g} CPUs; the cluster has {cpus:g}")
    return use_gpu


def root_cause(err: BaseException) -> BaseException:
    """The user-level exception inside Ray's wrappers (WorkerGroupError → RayTaskError → ...)."""
    seen = set()
    while id(err) not in seen:
        seen.add(id(err))
        failures = getattr(err, "worker_failures", None)
        if failures:
            err = failures[min(failures)]
            continue
        inner = getattr(err, "cause", None) or getattr(err, "controller_failure", None) or err.__cause__
        if isinstance(inner, BaseException):
            err = inner
            continue
        break
    return err


def one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    msg = text[0] if text else ""
    if isinstance(err, (UserError, TrainingError)):
        return msg
    return f"{type(err).__name__}: {msg}" if msg else type(err).__name__


def build_trainer(cfg: Config, name: str, callbacks: list, progress=None, hooks=(), datasets=None,
                  t0: float | None = None, scaling: RayScalingConfig | None = None,
                  driver_stages: Stopwatch | None = None) -> TorchTrainer:
    """The TorchTrainer of one run. DRIVER_STAGES, the caller's stopwatch since T0, gets its last lap ("trainer")
    here, at the hand-over to Ray Train; its laps reach the first epoch's metrics as startup_driver_<stage>_s."""
    mode = cfg.train.monitor_mode
    t_submit = driver_stages("trainer") if driver_stages is not None else time.time()
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg.to_dict(), "progress": progress, "hooks": list(hooks), "datasets": datasets,
                           "t0": t0 if t0 is not None else t_submit, "t_submit": t_submit,
                           "driver_stages": dict(driver_stages.laps) if driver_stages is not None else {}},
        scaling_config=scaling or ray_scaling(cfg),
        run_config=RayRunConfig(
            name=name,
            storage_path=storage_root(cfg),
            failure_config=FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints,
                                               checkpoint_score_attribute="checkpoint_score",
                                               checkpoint_score_order=mode),
            callbacks=callbacks,
        ),
    )


def abort_on_signal(trainer: TorchTrainer) -> StopOnSignal:
    """A context for `trainer.fit()`: the first Ctrl-C or SIGTERM aborts the run through its controller, which stops
    the workers and leaves the checkpoints written so far, after which fit() raises `Interrupted`; a second signal
    interrupts at once.

    Ray Train (2.60, `DataParallelTrainer._initialize_and_run_controller`) installs its own SIGINT handler with the
    controller's handle before it waits for the run. That handler aborts the controller too, but then calls
    sys.exit(0) inside ray.get, which Ray's core worker turns into SystemExit(1) before any of our code runs (no
    message, MLflow run left RUNNING, exit 1); it ignores a second Ctrl-C and does not handle SIGTERM at all. So the
    trainer hands the controller to us instead (its `_register_sigint_handler(controller)` hook, called only in the
    main thread, as signal handlers must be), and ours does the same abort and leaves the outcome to fit()."""
    controllers = []

    def abort(signum: int) -> None:
        if not controllers:  # no run started yet: nothing to stop but ourselves
            raise KeyboardInterrupt
        try:
            ray.get(controllers[0].abort.remote())
        except ray.exceptions.RayActorError:
            pass  # abort ends the controller's actor: the expected outcome

    trainer._register_sigint_handler = controllers.append
    return StopOnSignal(abort)


def _interrupted(signum: int, name: str, uri: str | None, run_id: str | None) -> Interrupted:
    if run_id:
        tracking.end_run(uri, run_id, "KILLED", {"stop_reason": f"interrupted ({signal_name(signum)}): resume with "
                                                                f"--resume {name} and the same config"})
    return Interrupted(signum, name)


def fit(cfg: Config, *, resume: str | None = None, address: str | None = None, verbose: bool = False,
        progress: str | None = None, console=None, hooks=(), on_ready=None, datasets=None) -> FitResult:
    """Train CFG with Ray Train; returns the best metric, checkpoint paths and the MLflow run id.

    User mistakes raise `UserError` before any worker starts; a failure inside training raises `TrainingError`
    with its root cause on one line (the MLflow run is then marked FAILED); Ctrl-C or SIGTERM while it trains stops
    the workers, keeps the checkpoints, marks the MLflow run KILLED and raises `interrupt.Interrupted`. HOOKS
    (picklable `engine.Hook`s) run in every worker, before the reporting hook. ON_READY(cfg, name) is called once
    the inputs passed every check.
    DATASETS, a picklable (cfg) -> (train, val) callable, replaces the configured data source (benchmarks, custom
    sources); its items are dicts with image (float CxHxW) and mask (long HxW).
    """
    t0 = float(os.environ.get("RAYSEGTRAIN_T0", time.time()))
    stages = Stopwatch(t0)  # the driver's part of the start-up: where a slow first step went
    stages("imports")  # the command's own start: interpreter, torch, Ray
    cfg, preset_note = presets.resolve(cfg, lambda: presets.probe(address, verbose), datasets is not None)
    generation = None
    if progress is not None:  # someone watches: the preset auto chose, the synthetic set being generated
        from .progress import driver_output

        console, generation = driver_output(preset_note, progress, console)
    cfg = with_absolute_paths(cfg)
    if datasets is None:
        preflight.check_fit(cfg, generation)
    else:
        preflight.check_augment(cfg), preflight.check_model(cfg)
    name = plan_run_name(cfg, resume)
    stages("checks")
    mlflow_loading = tracking.import_in_background() if cfg.tracking.enabled else None
    init_ray(address, verbose)
    prestart_train_helpers()
    scaling = ray_scaling(cfg)  # resource errors before anything is written
    stages("ray")
    if on_ready is not None:
        on_ready(cfg, name)

    uri = run_id = None
    if cfg.tracking.enabled:
        mlflow_loading.join()
        uri = tracking.resolve_tracking_uri(cfg.tracking.tracking_uri)
        run_id = tracking.find_run(uri, cfg.tracking.experiment, name) if resume else None
        run_id = run_id or tracking.start_run(cfg, name, uri=uri, tags={"storage_path": storage_root(cfg)})
    callbacks = [MLflowEpochLogger(uri, run_id)] if run_id else []
    stages("tracking")

    from .progress import ProgressDisplay

    display = ProgressDisplay(cfg, mode=progress, console=console)
    trainer = build_trainer(cfg, name, callbacks, progress=display.queue, hooks=hooks, datasets=datasets, t0=t0,
                            scaling=scaling, driver_stages=stages)
    stop = abort_on_signal(trainer)
    try:
        with stop, display:
            result = trainer.fit()
    except KeyboardInterrupt:  # a second signal while stopping, or Ctrl-C where no handler could be installed
        raise _interrupted(stop.signum or signal.SIGINT, name, uri, run_id) from None
    except Exception as e:  # Ray's TrainingFailedError and friends
        if stop.signum is not None:  # the aborted controller's end reaches us as an error of Ray's
            raise _interrupted(stop.signum, name, uri, run_id) from None
        cause = root_cause(e)
        if run_id:
            tracking.end_run(uri, run_id, "FAILED", {"error": one_line(cause)[:4000]})
        if isinstance(cause, UserError):
            raise cause from None
        raise TrainingError(one_line(cause)) from e

    best = result.get_best_checkpoint("checkpoint_score", cfg.train.monitor_mode) if result.best_checkpoints else None
    summary = result.return_value if isinstance(result.return_value, dict) else {}
    history = _history(result.checkpoint)
    best_path = best.path if best else None
    if run_id:
        if best is not None:
            with best.as_directory() as local_best:
                tracking.log_final_artifacts(uri, run_id, cfg, history, local_best)
        else:
            tracking.log_final_artifacts(uri, run_id, cfg, history, None)
        tracking.end_run(uri, run_id, "FINISHED", {"stop_reason": str(summary.get("stop_reason", "completed")),
                                                     "best_checkpoint": str(best_path)})
    best_value = summary.get("best_value")
    if best_value is None and history:
        best_value = history[-1].get(f"best_{cfg.train.monitor}")
    return FitResult(run_name=name, monitor=cfg.train.monitor, best_value=best_value, best_checkpoint=best_path,
                     last_checkpoint=result.checkpoint.path if result.checkpoint else None, mlflow_run_id=run_id,
                     tracking_uri=uri, metrics=result.metrics or {}, history=history,
                     path=getattr(result, "path", None))


def _history(checkpoint: Checkpoint | None) -> list[dict]:
    """The per-epoch metrics the newest checkpoint carries (local storage; remote storage is downloaded)."""
    if checkpoint is None:
        return []
    try:
        with checkpoint.as_directory() as d:
            return list(load_checkpoint(d).get("history", []))
    except UserError:
        return []
