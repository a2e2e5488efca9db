"""`fit`: the shared loop in a Ray Train `TorchTrainer` (DDP over N workers), tracked in MLflow from the driver's node.

This is the driver side: validate everything the user gave (before any worker starts), pick the run name, start Ray,
open the MLflow run, run Ray Train while showing progress, close the run with its artifacts. The workers' side is
`train_worker.py`; the Ray set-up shared with studies is `ray_support.py`.
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import preflight, presets, ray_internal, resume as resuming, run_folder, run_health, tracking
from .checkpoint import load_checkpoint
from .config import Config
from .errors import TrainingError, UserError, one_line
from .interrupt import Interrupted, StopOnSignal, signal_name
from .metrics import degenerate_note
from .ray_support import (build_trainer, init_ray, prestart_train_helpers, range_test_on_worker, ray_scaling,
                          root_cause, storage_root)
from .runtime import Stopwatch

import ray.train
from ray.train import Checkpoint, UserCallback
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
    degenerate: str | None = None  # why the best epoch's model is degenerate (metrics.degenerate_note), or None
    resume_changes: dict[str, tuple[Any, Any]] = field(default_factory=dict)  # keys a resume changed: (was, now)
    warnings: list[str] = field(default_factory=list)  # e.g. a run that diverged without a non-finite loss


def fit(cfg: Config, *, resume: str | None = None, address: str | None = None, verbose: bool = False,
        progress: str | None = None, console=None, hooks=(), on_ready=None, datasets=None) -> FitResult:
    """Train CFG with Ray Train; returns the best metric, checkpoint paths and the MLflow run id.

    User mistakes raise `UserError` before any worker starts; a failure inside training raises `TrainingError`
    with its root cause on one line (the MLflow run is then marked FAILED); Ctrl-C or SIGTERM while it trains stops
    the workers, keeps the checkpoints, marks the MLflow run KILLED and raises `interrupt.Interrupted`.
    RESUME=NAME continues run NAME on the config it was started with (kept in its folder): CFG may differ from it only
    in `config.RESUME_SAFE_KEYS` (else a ConfigError before Ray starts); those changes are printed and tagged. HOOKS
    (picklable `engine.Hook`s) run in every worker, before the reporting hook. ON_READY(cfg, name) is called once
    the inputs passed every check.
    DATASETS, a picklable (cfg) -> (train, val) callable, replaces the configured data source (benchmarks, custom
    sources); its items are dicts with image (float CxHxW) and mask (long HxW).
    """
    t0 = float(os.environ.get("RAYSEGTRAIN_T0", time.time()))
    stages = Stopwatch(t0)  # the driver's part of the start-up: where a slow first step went
    stages("imports")  # the command's own start: interpreter, torch, Ray
    augment_auto = cfg.data.augment == "auto" and datasets is None and not resume  # said after the start line
    cfg, folder, changed, console = prepare(cfg, resume, address, verbose, progress, console,
                                            custom_data=datasets is not None)
    name = folder.name
    stages("checks")
    mlflow_loading = tracking.import_in_background() if cfg.tracking.enabled else None  # loads while Ray starts
    try:
        scaling = start_ray(cfg, address, verbose)
        stages("ray")
        if on_ready is not None:
            on_ready(cfg, name)
        if augment_auto:
            say(console, preflight.augment_note(cfg))
        run = open_tracking(cfg, name, resume, mlflow_loading, changed)
    except BaseException:
        folder.release()  # nothing was trained: the name is free again
        raise
    stages("tracking")
    if cfg.optim.lr == "auto":
        cfg = choose_lr(cfg, name, run, scaling, console, datasets)
    result = train(cfg, name, run, scaling, t0, stages, progress=progress, console=console, hooks=hooks,
                   datasets=datasets)
    fitted = finish(cfg, name, run, result)
    fitted.resume_changes = changed
    return fitted


# ------------------------------------------------------------------------------------------------ fit's phases
def prepare(cfg: Config, resume: str | None, address: str | None, verbose: bool, progress: str | None, console,
            custom_data: bool) -> tuple[Config, run_folder.RunFolder, dict, Any]:
    """Everything the user gave, resolved and checked before anything starts: the preset (announced when someone
    watches), absolute paths for the workers, the run folder (a new run's name reserved by creating it; on resume the
    run's own config, changed only in safe keys), then the store, data and model checks, and `data.augment: auto`
    resolved from the train split's size (fit says which once Ray has started). Returns the config, the
    folder, the keys a resume changed ({key: (was, now)}) and the console for the rest of the run."""
    cfg, preset_note = presets.resolve(cfg, lambda: presets.probe(address, verbose), custom_data)
    generation = None
    if progress is not None:  # someone watches: the preset auto chose, the synthetic set being generated
        from .progress import driver_output

        console, generation = driver_output(preset_note, progress, console)
    cfg = with_absolute_paths(cfg)
    changed = {}
    if resume:
        folder = run_folder.existing(storage_root(cfg), resume)
        if cfg.run.name is None:
            cfg = cfg.model_copy(update={"run": cfg.run.model_copy(update={"name": resume})})
        saved = resuming.run_config(folder)
        if cfg.data.augment == "auto":  # the run resolved it when it started (preflight.resolve_augment): its choice
            cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"augment": saved.data.augment})})
        changed = resuming.checked_changes(saved, cfg)
        if console is not None:
            console.print(f"resuming run {resume} on the config it was started with; changed: "
                          f"{resuming.describe(changed)}")
    else:  # the name is this run's from here on: a second fit given it is refused at once
        folder = run_folder.reserve(storage_root(cfg), cfg.run.name)
        cfg = cfg.model_copy(update={"run": cfg.run.model_copy(update={"name": folder.name})})
    try:
        if cfg.tracking.enabled:  # a store that cannot be used would fail the run after Ray and the data are ready
            tracking.check_store(tracking.resolve_tracking_uri(cfg.tracking.tracking_uri))
        if custom_data:
            preflight.check_augment(cfg), preflight.check_compile(cfg), preflight.check_model(cfg)
        else:
            preflight.check_fit(cfg, generation)
            cfg = preflight.resolve_augment(cfg)  # data.augment: auto, from the train split's size
        try:
            folder.write_config(cfg)  # what a later --resume trains
        except OSError as e:
            raise UserError(f"cannot write into {folder.path} ({e.strerror or e})") from None
    except BaseException:
        folder.release()  # a mistake found here leaves nothing behind
        raise
    return cfg, folder, changed, console


def start_ray(cfg: Config, address: str | None, verbose: bool) -> RayScalingConfig:
    """Ray started (or joined at ADDRESS) with Ray Train's helpers starting ahead, and the workers' resources
    checked against the cluster: resource errors come before anything is written."""
    init_ray(address, verbose)
    prestart_train_helpers()
    return ray_scaling(cfg)


def lr_find(cfg: Config, *, address: str | None = None, verbose: bool = False, console=None):
    """`raysegtrain lr-find`: the LR range test of CFG alone, on one worker; its plot, curve and summary under
    run.storage_path/lr-find-<time>/lr_find/ and in an MLflow run of that name. Returns (RangeTest, files, run id)."""
    from .lr_finder import write_outputs

    if cfg.run.name is None:
        cfg = cfg.model_copy(update={"run": cfg.run.model_copy(update={"name": "lr-find-" + run_folder.new_run_name()[4:]})})
    cfg, folder, _, console = prepare(cfg, None, address, verbose, None, console, custom_data=False)
    name = folder.name
    try:
        scaling = start_ray(cfg, address, verbose)
    except BaseException:
        folder.release()
        raise
    result = range_test_on_worker(cfg, scaling)
    files = write_outputs(result, _lr_find_folder(cfg, name))
    run_id = None
    if cfg.tracking.enabled:
        uri = tracking.resolve_tracking_uri(cfg.tracking.tracking_uri)
        run_id = tracking.start_run(cfg, name, uri=uri, tags={"kind": "lr-find"})
        tracking.log_lr_find(uri, run_id, result, files)
        tracking.end_run(uri, run_id, "FINISHED")
    return result, files, run_id


def _lr_find_folder(cfg: Config, name: str) -> Path:
    root = storage_root(cfg)
    return Path(root) / name / "lr_find" if "://" not in root else Path(tempfile.mkdtemp(prefix="lr_find-"))


def choose_lr(cfg: Config, name: str, run: "TrackedRun", scaling: RayScalingConfig, console, datasets=None) -> Config:
    """`optim.lr: auto`: the LR range test on one worker, its files beside the run's checkpoints and in its MLflow
    run, a console line; CFG with the suggested lr."""
    from .lr_finder import with_lr, write_outputs

    try:
        result = range_test_on_worker(cfg, scaling, datasets)
    except Exception as e:
        cause = root_cause(e)
        run.end("FAILED", {"error": f"LR range test: {one_line(cause)}"[:4000]})
        raise TrainingError(f"LR range test (optim.lr=auto): {one_line(cause)}") from None
    files = write_outputs(result, _lr_find_folder(cfg, name))
    if run.run_id:
        tracking.log_lr_find(run.uri, run.run_id, result, files)
    say(console, f"optim.lr=auto: LR range test {result.summary()}; training with lr {result.suggestion:.3g} "
                 f"(plot: {files['plot']})")
    return with_lr(cfg, result.suggestion)


def say(console, line: str) -> None:
    """A line for whoever watches: the console when there is one, else stderr."""
    if console is not None:
        console.print(line, markup=False, highlight=False)
    else:
        print(line, file=sys.stderr, flush=True)


@dataclass
class TrackedRun:
    """The MLflow run a fit writes to; both None when tracking is off."""

    uri: str | None = None
    run_id: str | None = None

    def end(self, status: str, tags: dict[str, str]) -> None:
        if self.run_id:
            tracking.end_run(self.uri, self.run_id, status, tags)


def open_tracking(cfg: Config, name: str, resume: str | None, mlflow_loading: threading.Thread | None,
                  changed: dict | None = None) -> TrackedRun:
    """The run's MLflow run: the one a resumed run already has, back to RUNNING without the tags of its previous end
    and tagged with what the resume changed; else a new one."""
    if not cfg.tracking.enabled:
        return TrackedRun()
    mlflow_loading.join()
    uri = tracking.resolve_tracking_uri(cfg.tracking.tracking_uri)
    run_id = tracking.find_run(uri, cfg.tracking.experiment, name) if resume else None
    if run_id:
        tracking.reopen_run(tracking.client(uri), run_id,
                            {"resume_changes": resuming.describe(changed)} if changed else {})
    else:
        run_id = tracking.start_run(cfg, name, uri=uri, tags={"storage_path": storage_root(cfg)})
    return TrackedRun(uri, run_id)


def train(cfg: Config, name: str, run: TrackedRun, scaling: RayScalingConfig, t0: float, stages: Stopwatch, *,
          progress: str | None, console, hooks, datasets) -> ray.train.Result:
    """Ray Train runs the workers while the driver shows their progress. Ctrl-C or SIGTERM: `Interrupted` (MLflow
    run KILLED); a failure: its root cause, a `UserError` as it stands or else a `TrainingError` (MLflow run FAILED).
    The stopwatch's last lap, "trainer", ends at the hand-over to Ray Train."""
    from .progress import ProgressDisplay

    display = ProgressDisplay(cfg, mode=progress, console=console)
    callbacks = [MLflowEpochLogger(run.uri, run.run_id, cfg.train.monitor)] if run.run_id else []
    trainer = build_trainer(cfg, name, callbacks, progress=display.queue, hooks=hooks, datasets=datasets, t0=t0,
                            scaling=scaling, driver_stages=stages)
    stop = abort_on_signal(trainer)
    try:
        with stop, display:
            return trainer.fit()
    except KeyboardInterrupt:  # a second signal while stopping, or Ctrl-C where no handler could be installed
        raise _interrupted(stop.signum or signal.SIGINT, name, run) from None
    except Exception as e:  # Ray's TrainingFailedError and friends
        if stop.signum is not None:  # the aborted controller's end reaches us as an error of Ray's
            raise _interrupted(stop.signum, name, run) from None
        cause = root_cause(e)
        run.end("FAILED", {"error": one_line(cause)[:4000]})
        if isinstance(cause, UserError):
            raise cause from None
        raise TrainingError(one_line(cause)) from e


def finish(cfg: Config, name: str, run: TrackedRun, result: ray.train.Result) -> FitResult:
    """The best checkpoint and the metric history into the MLflow run, which is closed FINISHED; the FitResult."""
    best = result.get_best_checkpoint("checkpoint_score", cfg.train.monitor_mode) if result.best_checkpoints else None
    summary = result.return_value if isinstance(result.return_value, dict) else {}
    history = _history(result.checkpoint)
    best_path = best.path if best else None
    diverged = run_health.divergence(cfg, history)
    if run.run_id:
        if best is not None:
            with best.as_directory() as local_best:
                tracking.log_final_artifacts(run.uri, run.run_id, cfg, history, local_best)
        else:
            tracking.log_final_artifacts(run.uri, run.run_id, cfg, history, None)
        run.end("FINISHED", {"stop_reason": str(summary.get("stop_reason", "completed")),
                             "best_checkpoint": str(best_path), **({"diverged": diverged} if diverged else {})})
    best_value = summary.get("best_value")
    if best_value is None and history:
        best_value = history[-1].get(f"best_{cfg.train.monitor}")
    return FitResult(run_name=name, monitor=cfg.train.monitor, best_value=best_value, best_checkpoint=best_path,
                     last_checkpoint=result.checkpoint.path if result.checkpoint else None, mlflow_run_id=run.run_id,
                     tracking_uri=run.uri, metrics=result.metrics or {}, history=history,
                     path=getattr(result, "path", None), degenerate=degenerate_note(best_epoch_metrics(history)),
                     warnings=[f"diverged: {diverged}"] if diverged else [])


def best_epoch_metrics(history: list[dict]) -> dict:
    """The metrics of the best epoch of HISTORY (the last epoch's `best_epoch`), or {} when none is known."""
    if not history or history[-1].get("best_epoch") is None:
        return {}
    best = int(history[-1]["best_epoch"])
    return next((h for h in history if int(h.get("epoch", -1)) == best), {})


# ------------------------------------------------------------------------------------------------- helpers
class MLflowEpochLogger(UserCallback):
    """Runs in Ray Train's controller, which Ray pins to the driver's node: each epoch's metrics into one MLflow run."""

    def __init__(self, uri: str, run_id: str, monitor: str | None = None):
        self.uri = uri
        self.run_id = run_id
        self.monitor = monitor  # logged first: the metric the UI lists and compares first

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        if metrics:
            m = metrics[0]
            tracking.log_metrics(tracking.client(self.uri), self.run_id, m, step=int(m.get("epoch", 0)),
                                 first=self.monitor)


def with_absolute_paths(cfg: Config) -> Config:
    """Workers run in another working directory: make the user's relative paths absolute on the driver."""
    data, model = cfg.data, cfg.model
    if data.root is not None and not data.root.is_absolute():
        data = data.model_copy(update={"root": data.root.expanduser().resolve()})
    w = model.encoder_weights
    if w and w != "imagenet" and Path(w).expanduser().exists():
        model = model.model_copy(update={"encoder_weights": str(Path(w).expanduser().resolve())})
    return cfg.model_copy(update={"data": data, "model": model})


def abort_on_signal(trainer: TorchTrainer) -> StopOnSignal:
    """A context for `trainer.fit()`: the first Ctrl-C or SIGTERM aborts the run through its controller, which stops
    the workers and leaves the checkpoints written so far, after which fit() raises `Interrupted`; a second signal
    interrupts at once. Ray Train's own SIGINT handler is not installed: it would end the driver with exit 1 before
    fit() could mark the MLflow run or say how to resume (`ray_internal.take_over_sigint_handler`)."""
    controllers = []

    def abort(signum: int) -> None:
        if not controllers:  # no run started yet: nothing to stop but ourselves
            raise KeyboardInterrupt
        ray_internal.abort_controller(controllers[0])

    ray_internal.take_over_sigint_handler(trainer, controllers.append)
    return StopOnSignal(abort)


def _interrupted(signum: int, name: str, run: TrackedRun) -> Interrupted:
    run.end("KILLED", {"stop_reason": f"interrupted ({signal_name(signum)}): resume with --resume {name}"})
    return Interrupted(signum, name)


def _history(checkpoint: Checkpoint | None) -> list[dict]:
    """The per-epoch metrics the newest checkpoint carries (local storage; remote storage is downloaded)."""
    if checkpoint is None:
        return []
    try:
        with checkpoint.as_directory() as d:
            return list(load_checkpoint(d).get("history", []))
    except UserError:
        return []
