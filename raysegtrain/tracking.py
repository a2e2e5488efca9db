"""MLflow: one writer per run, on the driver's node.

The driver opens the run (params, tags, resolved config) before Ray Train starts; `MLflowTrainCallback` runs in Ray
Train's controller (an actor pinned to the driver's node) and logs each epoch's metrics; the driver closes the run with
the best checkpoint, plots and final status. Workers never talk to the tracking store.
"""

from __future__ import annotations

import os
import platform
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any

from .config import Config

DEFAULT_DB = "mlflow.db"
NON_METRIC_KEYS = {"is_best", "checkpoint_score", "early_stopped", "done", "training_iteration", "time_this_iter_s",
                   "time_total_s", "timestamp", "pid", "time_since_restore", "iterations_since_restore"}


def resolve_tracking_uri(uri: str | None = None) -> str:
    """Config value, else $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db; relative sqlite/file paths are made
    absolute so that processes with another working directory (Ray actors) write to the same store."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{DEFAULT_DB}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    if "://" not in uri:  # a plain folder = file store
        return Path(uri).resolve().as_uri()
    return uri


def import_in_background() -> threading.Thread:
    """Import MLflow's client and SQL store in a thread (about 2 s of imports), so that they load while Ray starts
    instead of after it. Imports only: nothing is written until a run is opened."""

    def load():
        try:
            import mlflow.entities  # noqa: F401
            import mlflow.store.tracking.sqlalchemy_store  # noqa: F401
            import mlflow.tracking  # noqa: F401
        except Exception:  # a broken install is reported where MLflow is used, with its own message
            pass

    thread = threading.Thread(target=load, name="import-mlflow", daemon=True)
    thread.start()
    return thread


def client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def ensure_experiment(c, name: str) -> str:
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            c.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    return c.create_experiment(name, artifact_location=default_artifact_location(c.tracking_uri, name))


def default_artifact_location(uri: str, experiment: str) -> str | None:
    """For a SQLite store, artifacts next to the database (MLflow's default is ./mlruns of whatever process creates
    the experiment); other stores keep their own default."""
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        return (db.parent / "mlartifacts" / experiment).as_uri()
    return None


def runs_table_url(host: str, port: int, experiment_id: str) -> str:
    return f"http://{host}:{port}/#/experiments/{experiment_id}/runs"


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired):
        return None


def run_tags(cfg: Config, extra: dict[str, str] | None = None) -> dict[str, str]:
    import ray
    import segmentation_models_pytorch as smp
    import torch

    from . import __version__

    tags = {
        "architecture": cfg.model.arch,
        "encoder": cfg.model.encoder,
        "dataset": str(cfg.data.root) if cfg.data.root else f"synthetic-{cfg.data.synthetic.variant}",
        "raysegtrain_version": __version__,
        "torch_version": torch.__version__,
        "ray_version": ray.__version__,
        "smp_version": smp.__version__,
        "python_version": platform.python_version(),
        "num_workers": str(cfg.scaling.num_workers),
    }
    commit = git_commit()
    if commit:
        tags["git_commit"] = commit
    tags.update(extra or {})
    return tags


def log_params(c, run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param

    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):
        c.log_batch(run_id, params=items[i:i + 100])


def log_metrics(c, run_id: str, metrics: dict[str, Any], step: int) -> None:
    import math
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, step) for k, v in metrics.items()
             if k not in NON_METRIC_KEYS and isinstance(v, (int, float)) and math.isfinite(float(v))]
    for i in range(0, len(items), 500):
        c.log_batch(run_id, metrics=items[i:i + 500])


def start_run(cfg: Config, run_name: str, *, uri: str, tags: dict[str, str] | None = None,
              parent_run_id: str | None = None, experiment: str | None = None) -> str:
    """Open a run with the flattened config as params and the resolved config as an artifact; returns its id."""
    c = client(uri)
    exp_id = ensure_experiment(c, experiment or cfg.tracking.experiment)
    all_tags = run_tags(cfg, tags)
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = c.create_run(exp_id, run_name=run_name, tags=all_tags)
    run_id = run.info.run_id
    log_params(c, run_id, cfg.flat())
    with tempfile.TemporaryDirectory() as d:
        cfg.to_yaml(Path(d) / "config.yaml")
        c.log_artifact(run_id, str(Path(d) / "config.yaml"))
    return run_id


def find_run(uri: str, experiment: str, run_name: str) -> str | None:
    """The newest run of EXPERIMENT with this name (for `--resume`: continue logging into the same run)."""
    c = client(uri)
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = c.search_runs([exp.experiment_id], filter_string=f"attributes.run_name = '{run_name}'",
                         order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0].info.run_id if runs else None


def end_run(uri: str, run_id: str, status: str, tags: dict[str, str] | None = None) -> None:
    c = client(uri)
    for k, v in (tags or {}).items():
        c.set_tag(run_id, k, v)
    c.set_terminated(run_id, status=status)


def log_final_artifacts(uri: str, run_id: str, cfg: Config, history: list[dict], best_checkpoint: str | None) -> None:
    """Curves, confusion matrix, overlays and the best checkpoint."""
    from . import plots

    c = client(uri)
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        if history:
            plots.curves(history, cfg.train.monitor, d / "curves.png")
            c.log_artifact(run_id, str(d / "curves.png"), "plots")
        if best_checkpoint:
            viz = Path(best_checkpoint) / plots.VIZ_FILE
            if viz.is_file():
                plots.from_viz_file(viz, cfg.data.names(), d)
                for name in ("confusion_matrix.png", "overlays.png"):
                    if (d / name).is_file():
                        c.log_artifact(run_id, str(d / name), "plots")
            if cfg.tracking.log_checkpoint:
                log_checkpoint(c, run_id, best_checkpoint)


def log_checkpoint(c, run_id: str, checkpoint_dir: str | Path, artifact_path: str = "best_checkpoint") -> None:
    """The checkpoint in CHECKPOINT_DIR as an artifact, weights-only: the resumable state (optimizer, schedule)
    stays in the run's own storage, and MLflow keeps what predict, evaluate and export need."""
    from .checkpoint import inference_state, load_checkpoint, save_checkpoint

    with tempfile.TemporaryDirectory() as d:
        save_checkpoint(inference_state(load_checkpoint(checkpoint_dir)), d)
        c.log_artifacts(run_id, d, artifact_path)
