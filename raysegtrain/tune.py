"""`tune`: a Ray Tune study (OptunaSearch + ASHA) whose every trial trains the shared loop, in MLflow.

How a trial runs (`trial.runtime`, resolved by the space): "warm", for one worker per trial, trains inside the
trial's Tune actor, which Tune reuses for the next trial (warm_trial.py); "trainer", for DDP trials, is a plain
function that builds a `TorchTrainer` from the trial's config and calls `fit()`, Ray's `TuneReportCallback` carrying
each epoch's metrics from Train to Tune. Around it, Tune callbacks in the driver, one
job each: `MLflowTrialLogger` (study_tracking.py) is the study's one MLflow writer (a parent run for the study and a
nested child run per trial), `StudyStatusTable` (study_status.py) prints the live status, and
`ReleaseOrphanedPlacementGroups` gives stopped trials' CPUs/GPUs back. study_report.py writes the leaderboard, the
best config and Optuna's plots.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import ray
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

from . import preflight
from .config import Config
from .errors import TrainingError, UserError, one_line
from .interrupt import StopTuneOnSignal
from .ray_internal import orphaned_placement_groups
from .lr_finder import resolve_trial_lr
from .ray_support import (build_trainer, init_ray, prestart_train_helpers, range_test_on_worker, ray_scaling,
                          root_cause, storage_root)
from .search_space import SearchSpace, load_space
from .search_space.keys import RAY_RESULT_KEY
from .study_final import FinalTest, final_test
from .study_repeat import collect, repeat_grid
from .study_report import StudyReport, apply_repeats, write_report
from .study_status import FailedTrialLines, StudyStatusTable
from .study_trials import TrialProgressCallback
from .study_tracking import (MLflowTrialLogger, StudyRun, close_interrupted_study, finish_study_run,
                             kept_trials, log_kept_checkpoints, open_study_run, prune_checkpoints)

__all__ = ["ReleaseOrphanedPlacementGroups", "StudyResult", "run_study", "run_trial"]


# ----------------------------------------------------------------------------------------------- the trainable
def run_trial(config: dict, space: SearchSpace, trials_storage: str, hooks=()) -> None:
    """One trial = one `fit`: a TorchTrainer named after the trial, so a resumed study resumes its trials too."""
    cfg = space.trial_config(config)
    cfg = cfg.model_copy(update={
        "run": cfg.run.model_copy(update={"storage_path": trials_storage, "name": None}),
        "tracking": cfg.tracking.model_copy(update={"enabled": False}),
    })
    trial_id = tune.get_context().get_trial_id()
    # optim.lr=auto: the range test on one worker's resources first (a restored trial runs it again)
    cfg, _ = resolve_trial_lr(cfg, None, lambda c: range_test_on_worker(c, ray_scaling(c)))
    trainer = build_trainer(cfg, f"trial-{trial_id}", callbacks=[TuneReportCallback()], hooks=hooks)
    try:
        trainer.fit()
    except Exception as e:
        raise TrainingError(one_line(root_cause(e))) from None


def make_trainable(space: SearchSpace, trials_storage: str, hooks) -> Any:
    """The trainable of SPACE's runtime. warm: the trial's Tune actor trains, so it reserves the worker's CPUs and GPU
    share itself. trainer: the trial driver only waits on its TorchTrainer, whose workers reserve their own CPUs/GPUs,
    so it asks for a little memory and no CPU, and N concurrent trials need exactly N x their workers' CPUs."""
    space = space.redacted()  # the trials use no credential of the base, and Ray keeps what they are given
    if space.runtime == "warm":
        from .warm_trial import run_warm_trial

        scaling = ray_scaling(space.base_config)
        trainable = tune.with_parameters(run_warm_trial, space=space, use_gpu=scaling.use_gpu,
                                         concurrent=space.max_concurrent_trials, hooks=list(hooks))
        bundle = {k: v for k, v in scaling.resources_per_worker.items() if v}
        return tune.with_resources(trainable, tune.PlacementGroupFactory([bundle]))
    trainable = tune.with_parameters(run_trial, space=space, trials_storage=trials_storage, hooks=list(hooks))
    return tune.with_resources(trainable, tune.PlacementGroupFactory([{"memory": 256 * 2**20}]))


class ReleaseOrphanedPlacementGroups(tune.Callback):
    """Removes the placement groups of dead trial controllers (see `ray_internal.orphaned_placement_groups`) at most
    every INTERVAL_S seconds while the study runs, so stopped trials give their CPUs/GPUs back at once."""

    def __init__(self, interval_s: float = 2.0):
        self.interval_s = interval_s
        self._last = 0.0
        self.released = 0

    def on_step_begin(self, iteration, trials, **info):
        now = time.monotonic()
        if now - self._last < self.interval_s:
            return
        self._last = now
        for pg in orphaned_placement_groups():
            try:
                ray.util.remove_placement_group(pg)
                self.released += 1
            except Exception:  # removed meanwhile by Train's own cleaner
                pass


# ------------------------------------------------------------------------------------------------------ driver
@dataclass
class StudyResult:
    name: str
    path: str
    best_trial: str | None
    best_value: float | None
    best_config_path: str | None
    leaderboard: list[dict[str, Any]]
    parent_run_id: str | None
    tracking_uri: str | None
    interrupted: bool = False
    final_test: dict[str, Any] | None = None  # study_final.FinalTest.to_dict(): the test split, once, after selection
    repeat: list[dict[str, Any]] | None = None  # repeat-best rows (study_repeat.RepeatSummary.row), best mean first
    view_route: str | None = None  # the MLflow UI's route to the study's trials (mlflow_links)


@dataclass(frozen=True)
class StudyPlace:
    """Where study NAME keeps its Tune state and trials: STORAGE/NAME, a local folder or under a URI (s3://, gs://)."""
    name: str
    storage: str

    @property
    def folder(self) -> Path | None:
        return Path(self.storage) / self.name if "://" not in self.storage else None

    @property
    def experiment_path(self) -> str:
        return str(self.folder) if self.folder else f"{self.storage}/{self.name}"

    @property
    def trials_storage(self) -> str:
        return str(self.folder / "trials") if self.folder else f"{self.storage}/{self.name}/trials"


def run_study(space_path: str | Path, overrides: list[str] = (), *, name: str | None = None, resume: bool = False,
              address: str | None = None, verbose: bool = False, live: bool = True, hooks=()) -> StudyResult:
    """Run (or with RESUME continue) the study of SPACE_PATH. HOOKS (picklable engine Hooks) run in every worker of
    every trial. User mistakes raise before Ray starts."""
    space = load_space(space_path, list(overrides))
    check_study(space)
    place = study_place(space.base_config, study_name(space_path, name), resume)
    start_ray(space.base_config, address, verbose)
    # a failed trial is one line (FailedTrialLines); Tune would print its whole traceback, which stays in its log
    os.environ.setdefault("TUNE_PRINT_ALL_TRIAL_ERRORS", "0")
    print(study_header(space, place.name), file=sys.stderr)
    study_run = open_study_run(space, space_path, place.name, resume)
    trial_runs = MLflowTrialLogger(space, place.name, study_run)
    callbacks = study_callbacks(space, place.name, trial_runs, live)
    TrialProgressCallback.live.clear()
    results = fit_until_stopped(lambda: make_tuner(space, place, resume, hooks, callbacks))
    trial_runs = MLflowTrialLogger.running_instance(trial_runs)  # on --resume, the one Tune restored
    if results is None:
        if study_run:
            close_interrupted_study(study_run, trial_runs)
        return interrupted_result(place, study_run)
    report = write_report(results, space, place.folder or Path(tempfile.mkdtemp()), trial_runs.states())
    if space.settings.repeat.top > 0 and report.best is not None:
        report.repeat = run_repeats(space, place, report, hooks)
    report.final_test = run_final_test(report, space, trial_runs)
    if study_run:
        log_kept_checkpoints(report, space, trial_runs)
        finish_study_run(study_run, report, space, trial_runs)
    if space.settings.checkpoints.prune:
        keep = {trial_runs.best_checkpoint(trial_id) for trial_id in kept_trials(report, space)}
        prune_checkpoints(place.folder, {p for p in keep if p})
    return finished_result(place, report, study_run, space.metric)


# ---------------------------------------------------------------------------------------------- run_study's phases
def run_repeats(space: SearchSpace, place: StudyPlace, report: StudyReport, hooks) -> list | None:
    """Repeat-best (study_repeat.py): the top configs again over seeds, in parallel like trials; the best config by
    the mean becomes best_config.yaml and the chosen row. None when stopped by Ctrl-C/SIGTERM."""
    r = space.settings.repeat
    grid, origin = repeat_grid(report.rows, space.metric, r.top, r.seeds, space.base_config.train.seed)
    print(f"repeat-best: the top {len(origin)} config(s) x {r.seeds} seeds = {len(grid)} runs of "
          f"{space.max_epochs} epochs", file=sys.stderr)
    results = fit_until_stopped(lambda: make_repeat_tuner(space, place, grid, hooks))
    if results is None:
        return None
    summaries = collect(results, origin, space.metric, space.mode)
    apply_repeats(report, summaries, space)
    return summaries


def make_repeat_tuner(space: SearchSpace, place: StudyPlace, grid: list[dict], hooks) -> tune.Tuner:
    """A Tuner over GRID (config x seed overrides), under the study's folder: no searcher, no early stopping."""
    warm = space.runtime == "warm"
    checkpoints = tune.CheckpointConfig(num_to_keep=1, checkpoint_score_attribute="checkpoint_score",
                                        checkpoint_score_order=space.mode) if warm else None
    return tune.Tuner(
        make_trainable(space, place.trials_storage, hooks),
        param_space={RAY_RESULT_KEY: tune.grid_search(grid)},
        tune_config=tune.TuneConfig(metric=space.metric, mode=space.mode, num_samples=1,
                                    max_concurrent_trials=space.max_concurrent_trials, reuse_actors=warm),
        run_config=tune.RunConfig(name="repeat", storage_path=place.experiment_path,
                                  callbacks=[ReleaseOrphanedPlacementGroups()],
                                  failure_config=tune.FailureConfig(max_failures=0), checkpoint_config=checkpoints,
                                  verbose=0))


def run_final_test(report: StudyReport, space: SearchSpace, trial_runs: MLflowTrialLogger) -> FinalTest | None:
    """The chosen trial's best checkpoint on the test split, once, after the selection (study_final.py); its file
    beside the leaderboard."""
    best = report.best
    if best is None:
        return None
    final = final_test(best["trial_id"], space.trial_config(best["_config"]), trial_runs.best_checkpoint(
        best["trial_id"]), space.metric, best[space.metric], ray_scaling(space.base_config))
    if final is not None:
        final.write(report.folder)
    return final



def study_name(space_path: str | Path, name: str | None) -> str:
    return name or Path(space_path).stem


def check_study(space: SearchSpace) -> None:
    """User errors before Ray starts: the MLflow store, data of the base config, every reachable model,
    augmentation."""
    if space.base_config.tracking.enabled:
        from . import tracking

        tracking.check_store(tracking.resolve_tracking_uri(space.base_config.tracking.tracking_uri))
    preflight.check_augment(space.base_config)
    preflight.check_compile(space.base_config)
    preflight.check_data(space.base_config)
    seen = set()
    for _, cfg in space.example_configs():
        key = (cfg.model.arch, cfg.model.encoder, cfg.model.encoder_weights, cfg.data.image_size)
        if key not in seen:
            seen.add(key)
            preflight.check_model(cfg)


def study_place(base: Config, name: str, resume: bool) -> StudyPlace:
    """Where the study lives; a UserError for a new study whose name is taken, or a resume of none."""
    place = StudyPlace(name, storage_root(base))
    exists = place.folder.exists() if place.folder else False
    if exists and not resume:
        raise UserError(f"a study named {name!r} already exists under {place.storage}: use --resume to continue it, "
                        f"or --name for a new one")
    if resume and place.folder and not (place.folder / "tuner.pkl").exists():
        raise UserError(f"no study named {name!r} under {place.storage} to resume")
    return place


def start_ray(base: Config, address: str | None, verbose: bool) -> None:
    """Connect to (or start) Ray, and check that it can hold one trial's workers."""
    init_ray(address, verbose)
    prestart_train_helpers()
    ray_scaling(base)


def study_header(space: SearchSpace, name: str) -> str:
    """The study's set-up in one line, with how its trials run (the resolved trial.runtime)."""
    s, workers = space.base_config.scaling, space.base_config.scaling.num_workers
    how = ("warm: each trial trains in its Tune actor, reused by the next trial" if space.runtime == "warm"
           else f"trainer: a TorchTrainer of {workers} worker(s) per trial")
    budget = f"{space.num_samples} trials" if space.num_samples > 0 else "trials"
    if space.time_budget_s:
        budget += f" within {space.time_budget_s:g} s"
    return (f"study {name}: {budget}, {space.max_concurrent_trials} at a time, {s.cpus_per_worker:g} CPU"
            f"{f' + {s.gpus_per_worker:g} GPU' if s.use_gpu != 'false' else ''} per worker; trial runtime {how}")


def study_callbacks(space: SearchSpace, name: str, trial_runs: MLflowTrialLogger, live: bool) -> list:
    """Tune callbacks, run in the driver in this order: MLflow, the live status table (LIVE), one line per failed
    trial, placement groups."""
    return [trial_runs, *([StudyStatusTable(space, name)] if live else []), FailedTrialLines(space, name),
            ReleaseOrphanedPlacementGroups()]


def make_tuner(space: SearchSpace, place: StudyPlace, resume: bool, hooks, callbacks: list) -> tune.Tuner:
    """A new study's Tuner; or, on resume, the saved one (which keeps the callbacks it was saved with)."""
    trainable = make_trainable(space, place.trials_storage, hooks)
    if resume:
        return tune.Tuner.restore(place.experiment_path, trainable=trainable, resume_unfinished=True,
                                  resume_errored=False)
    searcher = OptunaSearch(space=space.define_by_run, metric=space.metric, mode=space.mode,
                            sampler=space.make_sampler(), points_to_evaluate=space.points_to_evaluate or None)
    warm, base = space.runtime == "warm", space.base_config
    # warm trials report checkpoints to Tune, which keeps the best `keep_checkpoints` by score (and the latest, to
    # resume from); a TorchTrainer trial keeps its own the same way
    checkpoints = tune.CheckpointConfig(num_to_keep=base.run.keep_checkpoints,
                                        checkpoint_score_attribute="checkpoint_score",
                                        checkpoint_score_order=space.mode) if warm else None
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(metric=space.metric, mode=space.mode, num_samples=space.num_samples,
                                    max_concurrent_trials=space.max_concurrent_trials, search_alg=searcher,
                                    scheduler=ASHAScheduler(**space.asha), time_budget_s=space.time_budget_s,
                                    reuse_actors=warm),
        run_config=tune.RunConfig(name=place.name, storage_path=place.storage, callbacks=callbacks,
                                  failure_config=tune.FailureConfig(max_failures=0), checkpoint_config=checkpoints,
                                  verbose=0))


def fit_until_stopped(make: Callable[[], tune.Tuner]):
    """The results of the Tuner that MAKE builds, or None when Ctrl-C/SIGTERM stopped the study (Tune then saves its
    state: resumable). A Ctrl-C while the Tuner is being built or restored counts as a stop too."""
    stop = StopTuneOnSignal()
    try:
        tuner = make()
        with stop:
            results = tuner.fit()
    except KeyboardInterrupt:  # a second Ctrl-C: no graceful stop wanted
        return None
    return None if stop.requested else results


def interrupted_result(place: StudyPlace, study_run: StudyRun | None) -> StudyResult:
    return StudyResult(place.name, str(place.folder or place.storage), None, None, None, [], *_run_ids(study_run),
                       interrupted=True, view_route=study_run.view_route() if study_run else None)


def finished_result(place: StudyPlace, report: StudyReport, study_run: StudyRun | None, metric: str) -> StudyResult:
    best = report.best
    return StudyResult(place.name, str(report.folder), best["trial_id"] if best else None,
                       best[metric] if best else None,
                       str(report.best_config_path) if report.best_config_path else None, report.rows,
                       *_run_ids(study_run),
                       final_test=report.final_test.to_dict() if report.final_test is not None else None,
                       repeat=[s.row(metric) for s in report.repeat] if report.repeat else None,
                       view_route=study_run.view_route() if study_run else None)


def _run_ids(study_run: StudyRun | None) -> tuple[str | None, str | None]:
    """(parent run id, tracking URI) of a StudyResult."""
    return (study_run.run_id, study_run.uri) if study_run else (None, None)
