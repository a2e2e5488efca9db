"""MLflow, behind one door: the only module that imports it. Callers say what they want done (open a run, log
metrics, download an artifact, register a model, serve the UI) and never use MLflow's API themselves.

One writer per run, on the driver's node. For `fit`, the driver opens the run (params, tags, resolved config) before
Ray Train starts; `MLflowEpochLogger` (train.py) runs in Ray Train's controller (an actor pinned to the driver's
node) and logs each epoch's metrics; the driver closes the run with the best checkpoint, plots and final status. For
a study, `MLflowTrialLogger` (study_tracking.py), a Tune callback in the driver, writes one child run per trial.
Workers never talk to the tracking store.

Every param, tag and text artifact goes out with credentials redacted (redaction.py): the tracking URI's own
password, a storage URL's keys, a token in the environment never reach the store, which others read.
"""

from __future__ import annotations

import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .config import Config
from .redaction import redact_text, redact_uri, redact_value

DEFAULT_DB = "mlflow.db"
NON_METRIC_KEYS = {"is_best", "checkpoint_score", "early_stopped", "done", "training_iteration", "time_this_iter_s",
                   "time_total_s", "timestamp", "pid", "worker_pid", "first_batch_time",
                   "time_since_restore", "iterations_since_restore"}
# Start-up and throughput figures: logged under `system/`, where MLflow's run page keeps them in its "System
# metrics" tab and every metric list shows them after the model's quality metrics (train_*, val_*)
SYSTEM_METRICS = {"epoch_time_s", "epoch_wall_s", "images_per_s", "data_wait_share", "peak_gpu_gib", "first_step_s",
                  "trial_startup_s"}
SYSTEM_PREFIX = "system/"
DESCRIPTION_TAG = "mlflow.note.content"  # a run's description in the UI (markdown)


def metric_name(key: str) -> str:
    """The name KEY is logged under in MLflow: start-up and throughput figures under `system/`."""
    return SYSTEM_PREFIX + key if key in SYSTEM_METRICS or key.startswith("startup_") else key


# ---------------------------------------------------------------------------------------- the store, experiments
def resolve_tracking_uri(uri: str | None = None) -> str:
    """Config value, else $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db; relative sqlite/file paths are made
    absolute so that processes with another working directory (Ray actors) write to the same store."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{DEFAULT_DB}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    if "://" not in uri:  # a plain folder = file store
        return Path(uri).resolve().as_uri()
    return uri


def check_store(uri: str, timeout_s: float = 5.0) -> None:
    """A UserError, before anything starts, when the store at URI cannot be used: a tracking server that does not
    answer (MLflow's client would retry for minutes, then fail mid-run), or a SQLite file whose folder cannot be
    created or written. Any HTTP answer, even an error status, counts as reachable: the server is there."""
    import urllib.error
    import urllib.request

    from .errors import UserError

    fix = "start it, fix tracking.tracking_uri / MLFLOW_TRACKING_URI, or run with tracking.enabled=false"
    if uri.startswith(("http://", "https://")):
        try:
            urllib.request.urlopen(_without_userinfo(uri).rstrip("/") + "/health", timeout=timeout_s).close()
        except urllib.error.HTTPError:
            return
        except (urllib.error.URLError, OSError, ValueError) as e:
            reason = getattr(e, "reason", e)
            raise UserError(f"MLflow tracking server {redact_uri(uri)} is not reachable ({reason}): {fix}") from None
    elif uri.startswith("sqlite:///"):
        folder = Path(uri[len("sqlite:///"):]).parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"MLflow store {uri}: cannot create {folder} ({e.strerror}): {fix}") from None
        if not os.access(folder, os.W_OK):
            raise UserError(f"MLflow store {uri}: {folder} is not writable: {fix}")


def _without_userinfo(uri: str) -> str:
    """URI without `user:password@` (urllib takes it for part of the host name; the health probe needs no login,
    and any answer, a 401 too, says the server is there)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(uri)
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[-1]))


def import_in_background() -> threading.Thread:
    """Import MLflow's client and SQL store in a thread (about 2 s of imports), so that they load while Ray starts
    instead of after it. Imports only: nothing is written until a run is opened."""

    def load():
        import importlib

        try:
            for module in ("mlflow.entities", "mlflow.tracking", "mlflow.store.tracking.sqlalchemy_store"):
                importlib.import_module(module)
        except Exception:  # a broken install is reported where MLflow is used, with its own message
            pass

    thread = threading.Thread(target=load, name="import-mlflow", daemon=True)
    thread.start()
    return thread


_READY_STORES: set[str] = set()  # SQLite stores this process has seen created and migrated


def client(uri: str):
    """The client of the store at URI: the handle that the functions below taking `c` write through. A SQLite store
    is created (or migrated) under a file lock the first time this process opens it: two runs started at once on a
    fresh mlflow.db would otherwise both run MLflow's schema migration, and one dies in SQLAlchemy."""
    from mlflow.tracking import MlflowClient

    if not uri.startswith("sqlite:///") or uri in _READY_STORES:
        return MlflowClient(tracking_uri=uri)
    with store_lock(Path(uri[len("sqlite:///"):])):
        c = MlflowClient(tracking_uri=uri)
        c.search_experiments(max_results=1)  # opens the store: creates the tables or migrates them
    _READY_STORES.add(uri)
    return c


@contextmanager
def store_lock(db: Path):
    """An exclusive lock on DB's creation, held through a lock file beside it (`mlflow.db.lock`)."""
    import fcntl

    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure_experiment(c, name: str) -> str:
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            c.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    try:
        return c.create_experiment(name, artifact_location=default_artifact_location(c.tracking_uri, name))
    except Exception:  # another process created it since the lookup (two runs started at once)
        exp = c.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def experiment_id(uri: str, name: str) -> str | None:
    """The id of experiment NAME in the store at URI; None when it has none of that name."""
    exp = client(uri).get_experiment_by_name(name)
    return exp.experiment_id if exp else None


def default_artifact_location(uri: str, experiment: str) -> str | None:
    """For a SQLite store, artifacts next to the database (MLflow's default is ./mlruns of whatever process creates
    the experiment); other stores keep their own default."""
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        return (db.parent / "mlartifacts" / experiment).as_uri()
    return None


# ----------------------------------------------------------------------------------------- runs: open, find, close
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

    from .version import __version__

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


def start_run(cfg: Config, run_name: str, *, uri: str, tags: dict[str, str] | None = None,
              parent_run_id: str | None = None, experiment: str | None = None) -> str:
    """Open a run with the flattened config as params and the resolved config as an artifact; returns its id."""
    c = client(uri)
    exp_id = ensure_experiment(c, experiment or cfg.tracking.experiment)
    all_tags = run_tags(cfg, tags)
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = c.create_run(exp_id, run_name=run_name, tags=redacted_tags(all_tags))
    run_id = run.info.run_id
    log_params(c, run_id, cfg.flat())
    with tempfile.TemporaryDirectory() as d:
        cfg.to_yaml(Path(d) / "config.yaml")
        c.log_artifact(run_id, str(Path(d) / "config.yaml"))
    return run_id


def create_run(uri: str, experiment: str, run_name: str, tags: dict[str, str] | None = None) -> str:
    """Open a bare run (these tags only: no config, unlike `start_run`) in EXPERIMENT; returns its id."""
    c = client(uri)
    return c.create_run(ensure_experiment(c, experiment), run_name=run_name,
                        tags=redacted_tags(tags or {})).info.run_id


def find_run(uri: str, experiment: str, run_name: str) -> str | None:
    """The newest run of EXPERIMENT with this name (for `--resume`: continue logging into the same run)."""
    c = client(uri)
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = c.search_runs([exp.experiment_id], filter_string=f"attributes.run_name = '{run_name}'",
                         order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0].info.run_id if runs else None


def find_child_run(c, parent_run_id: str, tag: str, value: str) -> str | None:
    """The child run of PARENT_RUN_ID whose tag TAG is VALUE (a study's run of one trial), if any."""
    exp = c.get_run(parent_run_id).info.experiment_id
    runs = c.search_runs([exp], filter_string=f"tags.`{tag}` = '{value}' and "
                                              f"tags.`mlflow.parentRunId` = '{parent_run_id}'")
    return runs[0].info.run_id if runs else None


# tags that describe how a run ended: a resumed run (running again) drops them, and a run that FINISHES drops an
# error of an earlier attempt
END_TAGS = ("error", "state", "stop_reason", "diverged", "resume_changes")
STALE_WHEN_FINISHED = ("error",)


def reopen_run(c, run_id: str, tags: dict[str, str] | None = None) -> None:
    """Reopen a run that a resumed study or fit continues to log into: RUNNING again, without the tags of its
    previous end (END_TAGS), with TAGS."""
    c.update_run(run_id, status="RUNNING")
    drop_tags(c, run_id, END_TAGS)
    for k, v in (tags or {}).items():
        c.set_tag(run_id, k, v)


def drop_tags(c, run_id: str, keys) -> None:
    present = c.get_run(run_id).data.tags
    for k in keys:
        if k in present:
            c.delete_tag(run_id, k)


def end_run(uri: str, run_id: str, status: str, tags: dict[str, str] | None = None) -> None:
    """Close the run with STATUS and TAGS; a FINISHED run loses the error tag of an earlier failed attempt."""
    c = client(uri)
    tags = tags or {}
    if status == "FINISHED":
        drop_tags(c, run_id, [k for k in STALE_WHEN_FINISHED if k not in tags])
    for k, v in redacted_tags(tags).items():
        c.set_tag(run_id, k, v)
    c.set_terminated(run_id, status=status)


# ------------------------------------------------------------------------------ logging: params, metrics, files
def log_params(c, run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param

    items = [Param(k, redact_value(k, str(v))[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):
        c.log_batch(run_id, params=items[i:i + 100])


def _metric_order(first: str | None):
    """Quality first (FIRST, then val_*, train_*), then the rest, start-up/throughput last: MLflow's pages list a
    run's metrics, and pick a compare page's default metric, in the order they were first logged."""
    def rank(key: str) -> tuple[int, str]:
        group = (0 if key == first else 1 if key.startswith("val_") else 2 if key.startswith("train_")
                 else 4 if metric_name(key) != key else 3)
        return group, key
    return rank


def log_metrics(c, run_id: str, metrics: dict[str, Any], step: int, first: str | None = None) -> None:
    import math
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    keys = sorted(metrics, key=_metric_order(first))
    items = [Metric(metric_name(k), float(metrics[k]), now, step) for k in keys
             if k not in NON_METRIC_KEYS and isinstance(metrics[k], (int, float)) and math.isfinite(float(metrics[k]))]
    for i in range(0, len(items), 500):
        c.log_batch(run_id, metrics=items[i:i + 500])


def set_tag(c, run_id: str, key: str, value: str) -> None:
    c.set_tag(run_id, key, redact_value(key, str(value)))


def redacted_tags(tags: dict[str, Any]) -> dict[str, str]:
    return {k: redact_value(k, str(v)) for k, v in tags.items()}


TEXT_ARTIFACTS = (".yaml", ".yml", ".csv", ".json", ".txt", ".md")
_YAML_ENTRY = re.compile(r"^(\s*-?\s*([\w.\-]+)\s*:\s*)(\S.*?)(\s+#.*)?$")


def redact_file_text(text: str) -> str:
    """A text file's contents with credentials redacted: URIs and environment secrets anywhere, and the value of a
    `name: value` line whose name is credential-like (a YAML key), comments and layout kept."""
    lines = []
    for line in redact_text(text).splitlines(keepends=True):
        m = _YAML_ENTRY.match(line.rstrip("\n"))
        if m and redact_value(m.group(2), m.group(3)) != m.group(3):
            line = f"{m.group(1)}{redact_value(m.group(2), m.group(3))}{m.group(4) or ''}" + line[len(line.rstrip("\n")):]
        lines.append(line)
    return "".join(lines)


def set_description(c, run_id: str, markdown: str) -> None:
    """The run's description: the text MLflow's run page shows (markdown) and its runs table's Description column."""
    c.set_tag(run_id, DESCRIPTION_TAG, markdown)


def set_experiment_tag(c, experiment_id: str, key: str, value: str) -> None:
    c.set_experiment_tag(experiment_id, key, value)


def experiment_of(c, run_id: str) -> str:
    return c.get_run(run_id).info.experiment_id


def log_artifact(c, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
    """The file at PATH into the run's artifacts, under ARTIFACT_PATH (a folder) when given; a text file (a space
    file, a leaderboard, a config) goes as a copy with its credentials redacted."""
    path = Path(path)
    if path.suffix.lower() in TEXT_ARTIFACTS and path.is_file():
        text = path.read_text(errors="replace")
        redacted = redact_file_text(text)
        if redacted != text:
            with tempfile.TemporaryDirectory() as d:
                copy = Path(d) / path.name
                copy.write_text(redacted)
                c.log_artifact(run_id, str(copy), artifact_path)
            return
    c.log_artifact(run_id, str(path), artifact_path)


def log_lr_find(uri: str, run_id: str, result, files: dict[str, Path]) -> None:
    """An LR range test (lr_finder.RangeTest) into a run: its choice as params, the curve as metrics by step, the
    plot, curve and summary as artifacts under lr_find/."""
    c = client(uri)
    log_params(c, run_id, {"lr_find.suggestion": f"{result.suggestion:.6g}",
                           "lr_find.min_loss_lr": f"{result.min_loss_lr:.6g}",
                           "lr_find.steepest_lr": f"{result.steepest_lr:.6g}", "lr_find.stop": result.stop,
                           "lr_find.rule": "lr at the smoothed loss's minimum / 10"})
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = [Metric(key, value, now, step) for step, (lr, loss, sm) in
               enumerate(zip(result.lrs, result.losses, result.smoothed), 1)
               for key, value in (("lr_find_lr", lr), ("lr_find_loss", loss), ("lr_find_smoothed_loss", sm))
               if math.isfinite(value)]
    for i in range(0, len(metrics), 900):
        c.log_batch(run_id, metrics=metrics[i:i + 900])
    for path in files.values():
        c.log_artifact(run_id, str(path), "lr_find")


def log_checkpoint(c, run_id: str, checkpoint_dir: str | Path, artifact_path: str = "best_checkpoint") -> None:
    """The checkpoint in CHECKPOINT_DIR as an artifact, weights-only: the resumable state (optimizer, schedule)
    stays in the run's own storage, and MLflow keeps what predict, evaluate and export need."""
    from .checkpoint import inference_state, load_checkpoint, save_checkpoint

    with tempfile.TemporaryDirectory() as d:
        save_checkpoint(inference_state(load_checkpoint(checkpoint_dir)), d)
        c.log_artifacts(run_id, d, artifact_path)


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


# ------------------------------------------------------------------------------------- reading a run's artifacts
class RunReadError(Exception):
    """A run could not be read from the store; `str()` is the first line of MLflow's message."""


class NoSuchRun(RunReadError):
    pass


class NoSuchArtifact(RunReadError):
    pass


def download_artifact(uri: str, run_id: str, artifact: str, dest: str | Path) -> str:
    """Download ARTIFACT (a file or folder) of run RUN_ID into DEST; returns its local path. Raises NoSuchRun,
    NoSuchArtifact, or RunReadError when the store cannot say."""
    from mlflow.exceptions import MlflowException

    c = client(uri)
    try:
        c.get_run(run_id)
    except MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise NoSuchRun(_first_line(e)) from None
        raise RunReadError(_first_line(e)) from None
    with _no_download_progress_bars():
        try:
            return c.download_artifacts(run_id, artifact, str(dest))
        except Exception as e:
            raise NoSuchArtifact(_first_line(e)) from None


def _first_line(err: BaseException) -> str:
    return redact_text((str(err).splitlines() or [""])[0])


@contextmanager
def _no_download_progress_bars():
    """No tqdm bar per download (ours is the only progress display)."""
    name = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    previous = os.environ.get(name)
    os.environ[name] = "false"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous


# ----------------------------------------------------------------------------------------------- model registry
def register_model(uri: str, run_id: str, model, fmt: str, name: str, metadata: dict[str, Any]) -> str:
    """Log MODEL into run RUN_ID as an MLflow model and register it as NAME; returns the registered version. FMT
    "onnx": MODEL is an `onnx.ModelProto` (onnx flavour); "torchscript": a TorchScript module (pytorch flavour)."""
    import logging

    import mlflow

    previous = mlflow.get_tracking_uri()
    previous_env = os.environ.get("MLFLOW_TRACKING_URI")  # set_tracking_uri also sets it: restore it exactly
    mlflow.set_tracking_uri(uri)
    quiet = logging.getLogger("mlflow")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # registration chatter and a pickle warning that does not apply to TorchScript
    try:
        with mlflow.start_run(run_id=run_id):
            if fmt == "onnx":
                info = mlflow.onnx.log_model(model, name="onnx_model", registered_model_name=name,
                                             pip_requirements=["onnxruntime", "numpy"], metadata=metadata,
                                             save_as_external_data=False)
            else:
                info = mlflow.pytorch.log_model(model, name="torchscript_model", registered_model_name=name,
                                                pip_requirements=["torch", "numpy"], metadata=metadata,
                                                serialization_format="pickle")
    finally:
        quiet.setLevel(level)
        mlflow.set_tracking_uri(previous)
        if previous_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = previous_env
    return str(info.registered_model_version)


# ----------------------------------------------------------------------------------------------------- the UI
def ui_command(uri: str, host: str, port: int, workers: int = 1) -> list[str]:
    """The command that serves MLflow's UI for the store at URI on HOST:PORT with WORKERS server processes (MLflow's
    default, 4, is for a shared server; one local user needs one), with this interpreter."""
    return [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", host, "--port", str(port),
            "--workers", str(workers)]


def ui_env() -> dict[str, str]:
    """The UI server's environment: without MLflow's job runner (its GenAI jobs: a consumer process per core), which
    a training runs UI does not use, unless the user asked for it."""
    return {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": os.environ.get("MLFLOW_SERVER_ENABLE_JOB_EXECUTION",
                                                                               "false")}


def ui_answers(base: str, timeout_s: float = 2.0) -> bool:
    """Whether the UI server at BASE answers (its /health endpoint)."""
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(base.rstrip("/") + "/health", timeout=timeout_s).close()
        return True
    except urllib.error.HTTPError:
        return True
    except (urllib.error.URLError, OSError, ValueError):
        return False


def run_link(uri: str, run_id: str) -> str:
    """The UI's page of run RUN_ID (training view), at the UI that serves the store at URI (mlflow_links.ui_base)."""
    from . import mlflow_links

    route = mlflow_links.run_route(experiment_of(client(uri), run_id), run_id)
    return mlflow_links.url(mlflow_links.ui_base(uri), route)


def study_views(uri: str) -> list[tuple[str, str, str]]:
    """(study name, experiment id, share key) of the saved study views in the store, newest study first: the
    studies `tune` recorded (runs tagged `raysegtrain.kind=study`) whose experiment holds their view."""
    from .mlflow_links import shared_view_tag

    c = client(uri)
    experiments = {e.experiment_id: e for e in c.search_experiments()}
    if not experiments:
        return []
    runs = c.search_runs(list(experiments), filter_string="tags.`raysegtrain.kind` = 'study'",
                         order_by=["attributes.start_time DESC"], max_results=20)
    return [(r.info.run_name, r.info.experiment_id, r.info.run_id) for r in runs
            if shared_view_tag(r.info.run_id) in experiments[r.info.experiment_id].tags]
