"""A study in MLflow, written through tracking.py: one parent run for the study (space file, settings, leaderboard,
best config, Optuna plots, trial counts) and one nested child run per trial (sampled params, per-epoch metrics, final
state, best checkpoint). Everything is written from the driver: `MLflowTrialLogger` is a Tune callback, so a study
has one writer, as a fit has."""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import mlflow_links, preflight, study_view, tracking
from .config import flatten
from .errors import UserError
from .redaction import redact_uri
from .search_space import SearchSpace
from .study_final import FINAL_TEST_FILE
from .study_report import StudyReport, optuna_plots, state_counts
from .study_trials import TrialProgress, TrialProgressCallback, trial_number

TRIAL_TAG = "raysegtrain.trial_id"
STUDY_TAG = "raysegtrain.study"
RUNTIME_TAG = "raysegtrain.trial_runtime"
KIND_TAG = "raysegtrain.kind"
CURVE_KEYS = ("epoch", "train_loss", "val_loss", "val_iou", "val_dice")
BASE_CONFIG = "base_config.yaml"
# run_tags that describe one model; a study's run describes a search over them
_MODEL_TAGS = ("architecture", "encoder", "num_workers")


@dataclass(frozen=True)
class StudyRun:
    uri: str
    run_id: str
    experiment_id: str
    experiment: str  # its name: the trials' runs go there too

    def view_route(self) -> str:
        """The runs table showing this study's trials, best first, with their columns (the saved view)."""
        return mlflow_links.runs_route(self.experiment_id, self.run_id)


# ----------------------------------------------------------------------------------------------- the study's run
def open_study_run(space: SearchSpace, space_path: str | Path, name: str, resume: bool) -> StudyRun | None:
    """The study's parent run (None when the base config turns tracking off): on --resume the one of that name,
    reopened; else a new one that carries the study's own params and tags (settings, objective, budget, the space's
    distributions; not the base config's, which is an artifact), and the saved runs-table view of its trials."""
    base = space.base_config
    if not base.tracking.enabled:
        return None
    uri = tracking.resolve_tracking_uri(base.tracking.tracking_uri)
    experiment = study_experiment(base, name)
    parent = tracking.find_run(uri, experiment, name) if resume else None
    c = tracking.client(uri)
    if parent is None:
        tags = {k: v for k, v in tracking.run_tags(base).items() if k not in _MODEL_TAGS}
        tags.update({STUDY_TAG: name, KIND_TAG: "study", "objective": f"{space.metric} ({space.mode})"})
        parent = tracking.create_run(uri, experiment, name, tags)
        settings = {k: v for k, v in space.to_dict()["resolved"].items() if k != "parameters"}
        tracking.log_params(c, parent, {**flatten(settings, "study."),
                                        **{f"space.{k}": v for k, v in space.parameters.items()}})
        tracking.log_artifact(c, parent, Path(space_path).resolve(), "study")
        with tempfile.TemporaryDirectory() as d:
            base.to_yaml(Path(d) / BASE_CONFIG)
            tracking.log_artifact(c, parent, Path(d) / BASE_CONFIG)
        tracking.set_description(c, parent, f"Study `{name}` running: objective {space.metric} ({space.mode}); "
                                            f"its trials are the nested runs below. This text becomes the study's "
                                            f"leaderboard when it ends.")
    else:
        tracking.reopen_run(c, parent)
    run = StudyRun(uri, parent, tracking.experiment_of(c, parent), experiment)
    tracking.set_experiment_tag(c, run.experiment_id, mlflow_links.shared_view_tag(parent),
                                study_view.view_state_json(space, parent))
    return run


def study_experiment(base, study: str) -> str:
    """The experiment of study STUDY's runs: `tracking.study_experiment`, else its own, `<experiment>/<study>`."""
    return base.tracking.study_experiment or f"{base.tracking.experiment}/{study}"


def close_interrupted_study(run: StudyRun, trial_runs: MLflowTrialLogger) -> None:
    trial_runs.close_unfinished()
    tracking.end_run(run.uri, run.run_id, "KILLED", {"state": "interrupted: resume with --resume"})


def kept_trials(report: StudyReport, space: SearchSpace) -> list[str]:
    """The trials whose checkpoints outlive the study (`checkpoints.mlflow`): the best first."""
    ranked = [row["trial_id"] for row in report.rows if row[space.metric] is not None]
    kept = space.settings.checkpoints.kept
    return ranked if kept is None else ranked[:kept]


def log_kept_checkpoints(report: StudyReport, space: SearchSpace, trial_runs: MLflowTrialLogger) -> None:
    """Top/best policies: the kept trials' best checkpoints go to their runs once the ranking is known; the top
    `checkpoints.top` trials get their pictures (curves, confusion matrix, overlays), to compare side by side."""
    if space.settings.checkpoints.mlflow in ("top", "best"):
        for trial_id in kept_trials(report, space):
            trial_runs.log_best_checkpoint(trial_id)
    ranked = [row["trial_id"] for row in report.rows if row[space.metric] is not None]
    for trial_id in ranked[:space.settings.checkpoints.top]:
        trial_runs.log_plots(trial_id)


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


def finish_study_run(run: StudyRun, report: StudyReport, space: SearchSpace, trial_runs: "MLflowTrialLogger") -> None:
    """Leaderboard, best config and Optuna plots as artifacts; trial counts and the best value as metrics; each
    ranked trial's run tagged with its rank; the winner named on the study's run (its run name and id); the study's
    description the markdown dashboard; then the run ends FINISHED."""
    c = tracking.client(run.uri)
    tracking.log_artifact(c, run.run_id, report.leaderboard_csv)
    if report.best_config_path:
        tracking.log_artifact(c, run.run_id, report.best_config_path)
    with tempfile.TemporaryDirectory() as d:
        for p in optuna_plots(report.rows, space, Path(d)):
            tracking.log_artifact(c, run.run_id, p, "optuna")
    metrics = {f"trials_{k.replace(' ', '_')}": v for k, v in state_counts(report.rows).items()}
    runs = trial_runs.run_names()
    rank = 0
    for row in report.rows:
        if row[space.metric] is not None and row["trial_id"] in runs:
            rank += 1
            tracking.set_tag(c, runs[row["trial_id"]][0], "study_rank", str(rank))
    tags = {}
    best = report.best
    if best is not None:
        metrics[study_view.best_metric_name(space.metric)] = best[space.metric]
        tags["best_trial_id"] = best["trial_id"]
        if best["trial_id"] in runs:
            tags["best_trial"], tags["best_trial_run_id"] = runs[best["trial_id"]][1], runs[best["trial_id"]][0]
        tags["winner"] = " ".join(f"{k[6:]}={study_view.short_number(v)}" for k, v in best.items()
                                  if k.startswith("param.") and v is not None)
    if report.repeat:  # repeat-best: the table and its plot; the best mean chose best_config.yaml
        from .study_repeat import REPEAT_CSV, REPEAT_PLOT

        for name in (REPEAT_CSV, REPEAT_PLOT):
            tracking.log_artifact(c, run.run_id, report.folder / name, "repeat")
        top = report.repeat[0]
        if top.mean is not None:
            metrics[f"repeat_best_mean_{space.metric}"] = top.mean
            if top.std is not None:
                metrics[f"repeat_best_std_{space.metric}"] = top.std
            tags["repeat_best_config_of_trial"] = top.trial_id
    final = report.final_test
    if final is not None:  # apart from the validation figures: test_* metrics, its file, and what chose it
        metrics.update(final.metrics)
        tracking.log_artifact(c, run.run_id, report.folder / FINAL_TEST_FILE)
        tags["final_test"] = final.note
    tracking.log_metrics(c, run.run_id, metrics, step=0)
    tracking.set_description(c, run.run_id, study_view.dashboard(run_name(c, run.run_id), space, report.rows, runs,
                                                                 run.experiment_id, run.run_id))
    tracking.end_run(run.uri, run.run_id, "FINISHED", {"state": "finished", **tags})


def run_name(c, run_id: str) -> str:
    return c.get_run(run_id).info.run_name


# ----------------------------------------------------------------------------------------------- the trials' runs
@dataclass
class TrialRun(TrialProgress):
    run_id: str | None = None
    name: str | None = None
    started: float = 0.0
    startup_s: float | None = None
    fg_iou_at_best: float | None = None  # the foreground IoU of the epoch with the best objective
    history: list = field(default_factory=list)  # per epoch: the figures the curves plot


def logged_config(cfg):
    """CFG as a trial's run records it: `data.augment: auto` as the preset the trial's dataset resolves it to (its
    train split's size, as fit records it), so that runs compare by what they trained. The split was listed before
    the study started (tune.check_study); if it cannot be listed now, the run records `auto`."""
    try:
        return preflight.resolve_augment(cfg)
    except (OSError, UserError):
        return cfg


class MLflowTrialLogger(TrialProgressCallback):
    """A Tune callback (in the driver) that writes each trial's child run under STUDY_RUN: opened (or, when a resumed
    study restarts the trial, found and reopened) as the trial starts, its metrics per report (and `startup_s`, from
    start to first report), closed with its final state when it ends. Does nothing without a study run."""

    progress_type = TrialRun
    # the tracking URIs this driver was given, by their redacted form: a logger that Tune restores on --resume was
    # saved with its URI redacted and takes the credential from here, i.e. from this command's config/environment
    driver_uris: dict[str, str] = {}

    def __init__(self, space: SearchSpace, study: str, study_run: StudyRun | None):
        super().__init__(space, study)
        self.uri = study_run.uri if study_run else None
        self.parent_run_id = study_run.run_id if study_run else None
        self.experiment = study_run.experiment if study_run else None
        self._client = None
        if self.uri:
            MLflowTrialLogger.driver_uris[redact_uri(self.uri)] = self.uri

    def __getstate__(self):  # Tune pickles its callbacks with the experiment state: no client, no credential
        state = super().__getstate__()
        state["_client"] = None
        state["uri"] = redact_uri(self.uri) if self.uri else None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.uri = MLflowTrialLogger.driver_uris.get(self.uri, self.uri) if self.uri else None

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
        super().on_trial_result(iteration, trials, trial, result, **info)
        if st.best_epoch == st.epoch and isinstance(result.get(study_view.FG_IOU), (int, float)):
            st.fg_iou_at_best = float(result[study_view.FG_IOU])
        st.history.append({k: v for k, v in result.items()
                           if k in CURVE_KEYS + (self.space.metric,) and isinstance(v, (int, float))})
        if self.client and st.run_id:
            tracking.log_metrics(self.client, st.run_id, result, step=st.epoch, first=self.space.metric)
        if st.startup_s is None and st.started and result.get("first_batch_time"):
            # from the trial's start (its actor up, or reused) to its first training batch in hand
            st.startup_s = float(result["first_batch_time"]) - st.started
            if self.client and st.run_id:
                tracking.log_metrics(self.client, st.run_id, {"trial_startup_s": st.startup_s}, step=0)

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

    def log_plots(self, trial_id: str) -> None:
        """Curves, confusion matrix and overlays of the trial's best checkpoint into its run, as a fit has them."""
        st = self.trials.get(trial_id)
        if not (self.client and st and st.run_id):
            return
        cfg = self.space.trial_config(st.params)
        cfg = cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"log_checkpoint": False})})
        tracking.log_final_artifacts(self.uri, st.run_id, cfg, st.history, self.best_checkpoint(trial_id))

    def run_names(self) -> dict[str, tuple[str, str]]:
        """{trial id: (run id, run name)} of the trials with a run."""
        return {trial_id: (st.run_id, st.name or trial_id) for trial_id, st in self.trials.items() if st.run_id}

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
        cfg = logged_config(self.space.trial_config(trial.config))
        drawn = {k: st.params[k] for k in study_view.sampled_keys(self.space) if k in st.params}
        st.name = study_view.trial_run_name(trial_number(trial), study_view.number_width(self.space.num_samples),
                                            cfg.model.arch, cfg.model.encoder, drawn)
        # the sampled values are the trial config's own params (logged once); `sampled` names which they are
        return tracking.start_run(cfg, st.name, uri=self.uri, parent_run_id=self.parent_run_id,
                                  experiment=self.experiment,
                                  tags={TRIAL_TAG: trial.trial_id, STUDY_TAG: self.study, KIND_TAG: "trial",
                                        RUNTIME_TAG: self.space.runtime, "outcome": "running",
                                        "sampled": ", ".join(st.params)})

    def _close_child(self, st: TrialRun, status: str) -> None:
        if not (self.client and st.run_id):
            return
        if self.space.settings.checkpoints.mlflow == "all" and status != "FAILED":
            self.log_best_checkpoint(self._trial_id(st))
        outcome = study_view.outcome(st.state)
        metric = self.space.metric
        # what the trial reached (a run's latest value is its last epoch's, not its best), and a 0/1 marker of
        # the trials ASHA pruned, to sort and filter on
        final = {"pruned": float(outcome == "pruned")}
        if st.best is not None:
            final[study_view.best_metric_name(metric)] = st.best
        if st.fg_iou_at_best is not None and metric != study_view.FG_IOU:
            final[study_view.best_metric_name(study_view.FG_IOU)] = st.fg_iou_at_best
        tracking.log_metrics(self.client, st.run_id, final, step=st.epoch)
        tracking.set_description(self.client, st.run_id, study_view.trial_description(
            st.state, metric, st.best, st.best_epoch, st.epoch, st.fg_iou_at_best))
        tracking.end_run(self.uri, st.run_id, status, {"state": st.state, "outcome": outcome})
