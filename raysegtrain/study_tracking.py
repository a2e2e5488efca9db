"""A study in MLflow, written through tracking.py: one parent run for the study (space file, settings, leaderboard,
best config, Optuna plots, trial counts) and one nested child run per trial (sampled params, per-epoch metrics, final
state, best checkpoint). Everything is written from the driver: `MLflowTrialLogger` is a Tune callback, so a study
has one writer, as a fit has."""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from . import tracking
from .config import flatten
from .search_space import SearchSpace
from .study_report import StudyReport, optuna_plots, state_counts
from .study_trials import TrialProgress, TrialProgressCallback, trial_number

TRIAL_TAG = "raysegtrain.trial_id"
STUDY_TAG = "raysegtrain.study"
RUNTIME_TAG = "raysegtrain.trial_runtime"


@dataclass(frozen=True)
class StudyRun:
    uri: str
    run_id: str


# ----------------------------------------------------------------------------------------------- the study's run
def open_study_run(space: SearchSpace, space_path: str | Path, name: str, resume: bool) -> StudyRun | None:
    """The study's parent run (None when the base config turns tracking off): on --resume the one of that name,
    reopened; else a new one with the study's settings as params and its space file as an artifact."""
    base = space.base_config
    if not base.tracking.enabled:
        return None
    uri = tracking.resolve_tracking_uri(base.tracking.tracking_uri)
    parent = tracking.find_run(uri, base.tracking.experiment, name) if resume else None
    if parent is None:
        parent = tracking.start_run(base, name, uri=uri, tags={STUDY_TAG: name, "raysegtrain.kind": "study"})
        c = tracking.client(uri)
        settings = {k: v for k, v in space.to_dict()["resolved"].items() if k != "parameters"}
        tracking.log_params(c, parent, flatten(settings, "study."))
        tracking.log_artifact(c, parent, Path(space_path).resolve(), "study")
    else:
        tracking.reopen_run(tracking.client(uri), parent)
    return StudyRun(uri, parent)


def close_interrupted_study(run: StudyRun, trial_runs: MLflowTrialLogger) -> None:
    trial_runs.close_unfinished()
    tracking.end_run(run.uri, run.run_id, "KILLED", {"state": "interrupted: resume with --resume"})


def kept_trials(report: StudyReport, space: SearchSpace) -> list[str]:
    """The trials whose checkpoints outlive the study (`checkpoints.mlflow`): the best first."""
    ranked = [row["trial_id"] for row in report.rows if row[space.metric] is not None]
    kept = space.settings.checkpoints.kept
    return ranked if kept is None else ranked[:kept]


def log_kept_checkpoints(report: StudyReport, space: SearchSpace, trial_runs: MLflowTrialLogger) -> None:
    """Top/best policies: the kept trials' best checkpoints go to their runs once the ranking is known."""
    if space.settings.checkpoints.mlflow in ("top", "best"):
        for trial_id in kept_trials(report, space):
            trial_runs.log_best_checkpoint(trial_id)


def prune_checkpoints(folder: Path | None, keep: set[str]) -> int:
    """Deletes every checkpoint folder (checkpoint_*) under the study's FOLDER except those in KEEP; returns how
    many. A study in remote storage (s3://, gs://) is left alone."""
    if folder is None or not folder.is_dir():
        return 0
    keep = {str(Path(p).resolve()) for p in keep}
    removed = 0
    for path in sorted(folder.rglob("checkpoint_*")):
        if path.is_dir() and str(path.resolve()) not in keep and not any(k.startswith(f"{path.resolve()}/")
                                                                          for k in keep):
            shutil.rmtree(path, ignore_errors=True)
            removed += 1
    return removed


def finish_study_run(run: StudyRun, report: StudyReport, space: SearchSpace) -> None:
    """Leaderboard, best config and Optuna plots as artifacts, trial counts and the best value as metrics, the best
    trial's run tagged; then the run ends FINISHED."""
    c = tracking.client(run.uri)
    tracking.log_artifact(c, run.run_id, report.leaderboard_csv)
    if report.best_config_path:
        tracking.log_artifact(c, run.run_id, report.best_config_path)
    with tempfile.TemporaryDirectory() as d:
        for p in optuna_plots(report.rows, space, Path(d)):
            tracking.log_artifact(c, run.run_id, p, "optuna")
    metrics = {f"trials_{k.replace(' ', '_')}": v for k, v in state_counts(report.rows).items()}
    best = report.best
    if best is not None:
        metrics[f"best_{space.metric}"] = best[space.metric]
        child = tracking.find_child_run(c, run.run_id, TRIAL_TAG, best["trial_id"])
        if child:
            tracking.set_tag(c, child, "best_trial", "true")
    tracking.log_metrics(c, run.run_id, metrics, step=0)
    tracking.end_run(run.uri, run.run_id, "FINISHED",
                     {"state": "finished", **({"best_trial": best["trial_id"]} if best else {})})


# ----------------------------------------------------------------------------------------------- the trials' runs
@dataclass
class TrialRun(TrialProgress):
    run_id: str | None = None
    started: float = 0.0
    startup_s: float | None = None


class MLflowTrialLogger(TrialProgressCallback):
    """A Tune callback (in the driver) that writes each trial's child run under STUDY_RUN: opened (or, when a resumed
    study restarts the trial, found and reopened) as the trial starts, its metrics per report (and `startup_s`, from
    start to first report), closed with its final state when it ends. Does nothing without a study run."""

    progress_type = TrialRun

    def __init__(self, space: SearchSpace, study: str, study_run: StudyRun | None):
        super().__init__(space, study)
        self.uri = study_run.uri if study_run else None
        self.parent_run_id = study_run.run_id if study_run else None
        self._client = None

    def __getstate__(self):  # Tune pickles its callbacks with the experiment state; a client does not pickle
        state = self.__dict__.copy()
        state["_client"] = None
        return state

    @property
    def client(self):
        if self._client is None and self.uri:
            self._client = tracking.client(self.uri)
        return self._client

    def on_trial_start(self, iteration, trials, trial, **info):
        st = self.progress(trial)
        st.started = time.time()
        super().on_trial_start(iteration, trials, trial, **info)
        if self.client and st.run_id is None:
            st.run_id = (tracking.find_child_run(self.client, self.parent_run_id, TRIAL_TAG, trial.trial_id)
                         or self._open_child(trial, st))
        elif self.client:
            tracking.reopen_run(self.client, st.run_id)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        st = self.progress(trial)
        if st.startup_s is None and st.started and result.get("first_batch_time"):
            # from the trial's start (its actor up, or reused) to its first training batch in hand
            st.startup_s = float(result["first_batch_time"]) - st.started
            if self.client and st.run_id:
                tracking.log_metrics(self.client, st.run_id, {"trial_startup_s": st.startup_s}, step=0)
        super().on_trial_result(iteration, trials, trial, result, **info)
        if self.client and st.run_id:
            tracking.log_metrics(self.client, st.run_id, result, step=st.epoch)

    def on_trial_complete(self, iteration, trials, trial, **info):
        super().on_trial_complete(iteration, trials, trial, **info)
        self._close_child(self.progress(trial), "FINISHED")

    def on_trial_error(self, iteration, trials, trial, **info):
        super().on_trial_error(iteration, trials, trial, **info)
        self._close_child(self.progress(trial), "FAILED")

    def log_best_checkpoint(self, trial_id: str) -> bool:
        """The trial's best checkpoint (weights only) into its run; when none is left, the run is tagged so and a
        warning printed: a trial never loses its checkpoint silently."""
        st = self.trials.get(trial_id)
        if not (self.client and st and st.run_id):
            return False
        path = self.best_checkpoint(trial_id)
        if path is None:
            tracking.set_tag(self.client, st.run_id, "best_checkpoint", "missing")
            print(f"warning: trial {trial_id} has no checkpoint left to log to MLflow", file=sys.stderr)
            return False
        tracking.log_checkpoint(self.client, st.run_id, path)
        tracking.set_tag(self.client, st.run_id, "best_checkpoint", "logged")
        return True

    def _trial_id(self, st: TrialRun) -> str:
        return next(trial_id for trial_id, other in self.trials.items() if other is st)

    def on_trial_cut(self, trial, st: TrialRun) -> None:
        self._close_child(st, "KILLED")

    def close_unfinished(self) -> None:
        """Runs of trials still open when the study stopped without ending its experiment (a second Ctrl-C): KILLED,
        as a resume reopens them."""
        for st in self.trials.values():
            if not st.ended and self.client and st.run_id:
                st.state, st.ended = f"stopped: interrupted at epoch {st.epoch}", True
                self._close_child(st, "KILLED")

    def _open_child(self, trial, st: TrialRun) -> str:
        cfg = self.space.trial_config(trial.config)
        run_id = tracking.start_run(cfg, child_run_name(trial, cfg), uri=self.uri,
                                    parent_run_id=self.parent_run_id,
                                    tags={TRIAL_TAG: trial.trial_id, STUDY_TAG: self.study,
                                          RUNTIME_TAG: self.space.runtime})
        tracking.log_params(self.client, run_id, {f"sampled.{k}": v for k, v in st.params.items()})
        return run_id

    def _close_child(self, st: TrialRun, status: str) -> None:
        if not (self.client and st.run_id):
            return
        if self.space.settings.checkpoints.mlflow == "all" and status != "FAILED":
            self.log_best_checkpoint(self._trial_id(st))
        tags = {"state": st.state}
        if st.best is not None:
            tags[f"best_{self.space.metric}"] = f"{st.best:.6g}"
        tracking.end_run(self.uri, st.run_id, status, tags)


def child_run_name(trial, cfg) -> str:
    """What a trial is, for the MLflow runs table: `0007 deeplabv3plus/resnet18`."""
    return f"{trial_number(trial):04d} {cfg.model.arch}/{cfg.model.encoder}"
