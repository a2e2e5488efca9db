"""`tune`: a Ray Tune study (OptunaSearch + ASHA) whose every trial is a `fit` (its own TorchTrainer), in MLflow.

The trainable is a plain function that builds a `TorchTrainer` from the trial's config and calls `fit()`; Ray's
`TuneReportCallback` carries each epoch's metrics from Train to Tune. `StudyTracker` (a Tune callback, so it runs in
the driver) is the one MLflow writer: a parent run for the study and a nested child run per trial.
"""

from __future__ import annotations

import math
import os
import signal
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY, TuneReportCallback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

from . import preflight, tracking
from .config import Config, flatten
from .errors import TrainingError, UserError
from .search_space import SearchSpace, load_space
from .train import build_trainer, init_ray, one_line, prestart_train_helpers, ray_scaling, root_cause, storage_root

TRIAL_TAG = "raysegtrain.trial_id"
STUDY_TAG = "raysegtrain.study"


# ----------------------------------------------------------------------------------------------- the trainable
def run_trial(config: dict, space: SearchSpace, trials_storage: str, hooks=()) -> None:
    """One trial = one `fit`: a TorchTrainer named after the trial, so a resumed study resumes its trials too."""
    cfg = space.trial_config(config)
    cfg = cfg.model_copy(update={
        "run": cfg.run.model_copy(update={"storage_path": trials_storage, "name": None}),
        "tracking": cfg.tracking.model_copy(update={"enabled": False}),
    })
    trial_id = tune.get_context().get_trial_id()
    trainer = build_trainer(cfg, f"trial-{trial_id}", callbacks=[TuneReportCallback()], hooks=hooks)
    try:
        trainer.fit()
    except Exception as e:
        raise TrainingError(one_line(root_cause(e))) from None


def trial_overrides(ray_config: dict) -> dict[str, Any]:
    """The sampled {dotted.key: value} overrides inside the config Ray gives a trial."""
    return dict(ray_config.get("overrides", {}))


def optuna_params(ray_config: dict) -> dict[str, Any]:
    """{optuna name: value} of a trial: Ray nests the searcher's `/`-separated names; join them back."""
    out: dict[str, Any] = {}

    def walk(d: dict, prefix: str) -> None:
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}/")
            else:
                out[prefix + k] = v

    walk({k: v for k, v in ray_config.items() if k != "overrides"}, "")
    return out


# ------------------------------------------------------------------------------------------ tracking + display
@dataclass
class TrialState:
    run_id: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    started: float = 0.0
    startup_s: float | None = None
    epoch: int = 0
    value: float | None = None
    best: float | None = None
    best_checkpoint: str | None = None
    state: str = "running"


class StudyTracker(tune.Callback):
    """Parent run + nested child runs in MLflow, and a live status table. Runs in the driver."""

    def __init__(self, uri: str | None, parent_run_id: str | None, space: SearchSpace, study: str,
                 live: bool = True):
        self.uri, self.parent_run_id, self.space, self.study, self.live = uri, parent_run_id, space, study, live
        self.trials: dict[str, TrialState] = {}
        self._client = None
        self._shown = 0.0

    def __getstate__(self):  # Tune pickles its callbacks with the experiment state
        state = self.__dict__.copy()
        state["_client"] = None
        return state

    @property
    def client(self):
        if self._client is None and self.uri:
            self._client = tracking.client(self.uri)
        return self._client

    def _better(self, a: float, b: float | None) -> bool:
        return b is None or (a > b if self.space.mode == "max" else a < b)

    # -- Tune callback hooks -------------------------------------------------------------------------------------
    def on_trial_start(self, iteration, trials, trial, **info):
        st = self.trials.setdefault(trial.trial_id, TrialState())
        st.started = time.time()
        st.state = "running"
        st.params = trial_overrides(trial.config)
        if self.client and st.run_id is None:
            st.run_id = self._find_child(trial.trial_id) or self._open_child(trial)
        elif self.client:
            self.client.update_run(st.run_id, status="RUNNING")
        self._show(trials)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        st = self.trials.setdefault(trial.trial_id, TrialState())
        if st.startup_s is None and st.started:
            st.startup_s = time.time() - st.started
            if self.client and st.run_id:
                tracking.log_metrics(self.client, st.run_id, {"startup_s": st.startup_s}, step=0)
        st.epoch = int(result.get("epoch", st.epoch))
        value = result.get(self.space.metric)
        if isinstance(value, (int, float)) and math.isfinite(value):
            st.value = float(value)
            if self._better(st.value, st.best):
                st.best, st.best_checkpoint = st.value, result.get(CHECKPOINT_PATH_KEY)
        if self.client and st.run_id:
            tracking.log_metrics(self.client, st.run_id, result, step=st.epoch)
        self._show(trials)

    def on_trial_complete(self, iteration, trials, trial, **info):
        st = self.trials.setdefault(trial.trial_id, TrialState())
        st.state = trial_state(trial.last_result or {}, None, self.space.max_epochs)
        self._close_child(st, "FINISHED")
        self._show(trials, force=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        st = self.trials.setdefault(trial.trial_id, TrialState())
        st.state = f"failed: {trial_error(trial)}"
        self._close_child(st, "FAILED")
        self._show(trials, force=True)

    def close_unfinished(self, status: str) -> None:
        """Runs of trials that were still going when the study stopped (a resume reopens them)."""
        for st in self.trials.values():
            if st.state == "running" and self.client and st.run_id:
                tracking.end_run(self.uri, st.run_id, status, {"state": "interrupted"})

    # -- MLflow ------------------------------------------------------------------------------------------------
    def _find_child(self, trial_id: str) -> str | None:
        exp = self.client.get_run(self.parent_run_id).info.experiment_id
        runs = self.client.search_runs([exp], filter_string=f"tags.`{TRIAL_TAG}` = '{trial_id}' and "
                                                            f"tags.`mlflow.parentRunId` = '{self.parent_run_id}'")
        return runs[0].info.run_id if runs else None

    def _open_child(self, trial) -> str:
        cfg = self.space.trial_config(trial.config)
        st = self.trials[trial.trial_id]
        run_id = tracking.start_run(cfg, f"{self.study}/{trial.trial_id}", uri=self.uri,
                                    parent_run_id=self.parent_run_id,
                                    tags={TRIAL_TAG: trial.trial_id, STUDY_TAG: self.study})
        tracking.log_params(self.client, run_id, {f"sampled.{k}": v for k, v in st.params.items()})
        return run_id

    def _close_child(self, st: TrialState, status: str) -> None:
        if not (self.client and st.run_id):
            return
        if st.best_checkpoint and Path(st.best_checkpoint).is_dir() and status == "FINISHED":
            tracking.log_checkpoint(self.client, st.run_id, st.best_checkpoint)
        tags = {"state": st.state}
        if st.best is not None:
            tags[f"best_{self.space.metric}"] = f"{st.best:.6g}"
        tracking.end_run(self.uri, st.run_id, status, tags)

    # -- display -----------------------------------------------------------------------------------------------
    def _show(self, trials, force: bool = False) -> None:
        if not self.live or (not force and time.time() - self._shown < 5):
            return
        self._shown = time.time()
        from rich.console import Console

        Console(stderr=True).print(status_table(self, trials))


def orphaned_placement_groups() -> list:
    """This job's placement groups whose creating actor has died: those of a trial's Train controller, killed with
    its trial when ASHA stops it. GCS keeps such a group until the job ends; Ray Train's own cleaner removes it by
    polling the state API, which lags on a small loaded machine, and meanwhile the next trial waits for CPUs that
    nothing uses (Train's 60 s worker-group start timeout then fails it). Groups made by the driver (Tune's own)
    have no creating actor and are never listed. Reads GCS's table through Ray's private accessor: if that moves in a
    later Ray, this finds nothing and Train's cleaner does the work alone."""
    from ray._private.state import state as gcs_state
    from ray.core.generated import gcs_pb2
    from ray.util.placement_group import PlacementGroup

    try:
        job = ray.get_runtime_context().get_job_id()
        table = gcs_state._connect_and_get_accessor().get_placement_group_table()
    except Exception:
        return []
    found = []
    for raw in table:
        pg = gcs_pb2.PlacementGroupTableData.FromString(raw)
        made_by_actor = not ray.ActorID(pg.creator_actor_id).is_nil()  # a driver's groups carry the nil id
        if (made_by_actor and pg.creator_actor_dead and not pg.is_detached and pg.creator_job_id.hex() == job
                and pg.state != gcs_pb2.PlacementGroupTableData.REMOVED):
            found.append(PlacementGroup(ray.PlacementGroupID(pg.placement_group_id)))
    return found


class ReleaseOrphanedPlacementGroups(tune.Callback):
    """Removes the placement groups of dead trial controllers (see `orphaned_placement_groups`) at most every
    INTERVAL_S seconds while the study runs, so stopped trials give their CPUs/GPUs back at once."""

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


def trial_state(last: dict, error, max_epochs: int) -> str:
    """completed / completed (early stopping at epoch k) / stopped by ASHA at epoch k / failed: reason."""
    epoch = int(last.get("epoch", 0) or 0)
    if error is not None:
        return f"failed: {one_line(root_cause(error))[:200]}"
    if epoch >= max_epochs:
        return "completed"
    if last.get("early_stopped"):
        return f"completed (early stopping at epoch {epoch})"
    return f"stopped by ASHA at epoch {epoch}"


def trial_error(trial) -> str:
    path = getattr(trial, "error_file", None)
    if path and Path(path).is_file():
        lines = [ln.strip() for ln in Path(path).read_text().splitlines() if ln.strip()]
        for ln in reversed(lines):
            if "TrainingError" in ln or "Error" in ln:
                return ln.split("TrainingError: ", 1)[-1][:300]
        return lines[-1][:300] if lines else "unknown error"
    return "unknown error"


def status_table(tracker: StudyTracker, trials) -> Any:
    from rich.table import Table

    t = Table(title=f"study {tracker.study}", show_lines=False)
    for col in ("trial", "params", "epoch", tracker.space.metric, "best", "state"):
        t.add_column(col)
    for trial in trials:
        st = tracker.trials.get(trial.trial_id, TrialState())
        state = st.state if st.state != "running" else str(trial.status).lower()
        t.add_row(trial.trial_id, ", ".join(f"{k}={_short(v)}" for k, v in st.params.items()), str(st.epoch),
                  _short(st.value), _short(st.best), state)
    return t


def _short(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


# ---------------------------------------------------------------------------------------------------- results
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


def leaderboard(results, space: SearchSpace) -> list[dict[str, Any]]:
    rows = []
    for r in results:
        trial_id = (r.metrics or {}).get("trial_id") or Path(r.path).name
        df = r.metrics_dataframe
        values = df[space.metric].dropna().tolist() if df is not None and space.metric in df else []
        best = (max if space.mode == "max" else min)(values) if values else None
        epoch = int((r.metrics or {}).get("epoch", 0) or 0)
        state = trial_state(r.metrics or {}, r.error, space.max_epochs)
        rows.append({"trial_id": trial_id, space.metric: best, "epochs": epoch, "state": state,
                     **{f"param.{k}": v for k, v in trial_overrides(r.config).items()}, "_config": r.config})
    rows.sort(key=lambda row: (row[space.metric] is None,
                               -(row[space.metric] or 0) if space.mode == "max" else (row[space.metric] or 0)))
    return rows


def write_leaderboard_csv(rows: list[dict], path: Path) -> None:
    import csv

    keys = list(dict.fromkeys(k for row in rows for k in row if k != "_config"))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for row in rows:
            w.writerow({k: row.get(k) for k in keys})


def optuna_plots(rows: list[dict], space: SearchSpace, out: Path) -> list[Path]:
    """Optimisation history, parameter importances and parallel coordinates, from a study rebuilt from the results."""
    import warnings

    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.create_study(direction="maximize" if space.mode == "max" else "minimize")
    for row in sorted(rows, key=lambda r: r["trial_id"]):
        if row[space.metric] is None:
            continue
        # replay the trial through the space itself: Optuna records each parameter with its distribution
        study.enqueue_trial(optuna_params(row["_config"]))
        trial = study.ask()
        space.define_by_run(trial)
        study.tell(trial, row[space.metric])
    made = []
    from optuna.visualization import matplotlib as vis

    for name, fn in (("optimization_history", vis.plot_optimization_history),
                     ("param_importances", vis.plot_param_importances),
                     ("parallel_coordinate", vis.plot_parallel_coordinate)):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ax = fn(study)
            fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
            path = out / f"{name}.png"
            fig.savefig(path, dpi=90, bbox_inches="tight")
            import matplotlib.pyplot as plt

            plt.close(fig)
            made.append(path)
        except Exception:  # e.g. importances need >= 2 finished trials with varying params
            continue
    return made


# ------------------------------------------------------------------------------------------------------ driver
def study_name(space_path: str | Path, name: str | None) -> str:
    return name or Path(space_path).stem


def check_study(space: SearchSpace) -> None:
    """User errors before Ray starts: data of the base config, every reachable model, augmentation."""
    preflight.check_augment(space.base_config)
    preflight.check_data(space.base_config)
    seen = set()
    for _, cfg in space.example_configs():
        key = (cfg.model.arch, cfg.model.encoder, cfg.model.encoder_weights, cfg.data.image_size)
        if key not in seen:
            seen.add(key)
            preflight.check_model(cfg)


def run_study(space_path: str | Path, overrides: list[str] = (), *, name: str | None = None, resume: bool = False,
              address: str | None = None, verbose: bool = False, live: bool = True, hooks=()) -> StudyResult:
    """Run (or with RESUME continue) the study of SPACE_PATH. HOOKS (picklable engine Hooks) run in every worker of
    every trial. User mistakes raise before Ray starts."""
    space = load_space(space_path, list(overrides))
    check_study(space)
    name = study_name(space_path, name)
    base = space.base_config
    storage = storage_root(base)
    study_dir = Path(storage) / name if "://" not in storage else None
    exists = study_dir.exists() if study_dir else False
    if exists and not resume:
        raise UserError(f"a study named {name!r} already exists under {storage}: use --resume to continue it, or "
                        f"--name for a new one")
    if resume and study_dir and not (study_dir / "tuner.pkl").exists():
        raise UserError(f"no study named {name!r} under {storage} to resume")

    init_ray(address, verbose)
    prestart_train_helpers()
    ray_scaling(base)
    uri = parent = None
    if base.tracking.enabled:
        uri = tracking.resolve_tracking_uri(base.tracking.tracking_uri)
        parent = tracking.find_run(uri, base.tracking.experiment, name) if resume else None
        if parent is None:
            parent = tracking.start_run(base, name, uri=uri, tags={STUDY_TAG: name, "raysegtrain.kind": "study"})
            c = tracking.client(uri)
            settings = {k: v for k, v in space.to_dict()["resolved"].items() if k != "parameters"}
            tracking.log_params(c, parent, flatten(settings, "study."))
            c.log_artifact(parent, str(Path(space_path).resolve()), "study")
        else:
            tracking.client(uri).update_run(parent, status="RUNNING")

    trials_storage = str(Path(storage) / name / "trials") if study_dir else f"{storage}/{name}/trials"
    trainable = tune.with_parameters(run_trial, space=space, trials_storage=trials_storage, hooks=list(hooks))
    # The trial driver only waits on its TorchTrainer, whose workers reserve their own CPUs/GPUs: it asks for a little
    # memory and no CPU, so N concurrent trials need exactly N x their workers' CPUs.
    trainable = tune.with_resources(trainable, tune.PlacementGroupFactory([{"memory": 256 * 2**20}]))
    tracker = StudyTracker(uri, parent, space, name, live=live)
    stop = GracefulStop()
    try:
        if resume:
            tuner = tune.Tuner.restore(str(study_dir) if study_dir else f"{storage}/{name}", trainable=trainable,
                                       resume_unfinished=True, resume_errored=False)
        else:
            searcher = OptunaSearch(space=space.define_by_run, metric=space.metric, mode=space.mode,
                                    sampler=space.make_sampler(), points_to_evaluate=space.points_to_evaluate or None)
            scheduler = ASHAScheduler(**space.asha)
            tuner = tune.Tuner(
                trainable,
                tune_config=tune.TuneConfig(metric=space.metric, mode=space.mode, num_samples=space.num_samples,
                                            max_concurrent_trials=space.max_concurrent_trials, search_alg=searcher,
                                            scheduler=scheduler, time_budget_s=space.time_budget_s),
                run_config=tune.RunConfig(name=name, storage_path=storage,
                                          callbacks=[tracker, ReleaseOrphanedPlacementGroups()],
                                          failure_config=tune.FailureConfig(max_failures=0), verbose=0))
        with stop:
            results = tuner.fit()
    except KeyboardInterrupt:  # a second Ctrl-C: no graceful stop wanted
        results = None
    interrupted = stop.requested

    if results is None or interrupted:
        if parent:
            tracker.close_unfinished("KILLED")
            tracking.end_run(uri, parent, "KILLED", {"state": "interrupted: resume with --resume"})
        return StudyResult(name, str(study_dir or storage), None, None, None, [], parent, uri, interrupted=True)

    rows = leaderboard(results, space)
    best = next((r for r in rows if r[space.metric] is not None), None)
    best_cfg_path = None
    out_dir = Path(study_dir) if study_dir else Path(tempfile.mkdtemp())
    out_dir.mkdir(parents=True, exist_ok=True)
    write_leaderboard_csv(rows, out_dir / "leaderboard.csv")
    if best is not None:
        best_cfg = space.trial_config(best["_config"])
        best_cfg = best_cfg.model_copy(update={"run": best_cfg.run.model_copy(update={"name": None})})
        best_cfg_path = out_dir / "best_config.yaml"
        best_cfg.to_yaml(best_cfg_path)
    if parent:
        _finish_parent(uri, parent, rows, best, best_cfg_path, out_dir, space, name)
    return StudyResult(name, str(out_dir), best["trial_id"] if best else None, best[space.metric] if best else None,
                       str(best_cfg_path) if best_cfg_path else None, rows, parent, uri, interrupted=interrupted)


def _finish_parent(uri, parent, rows, best, best_cfg_path, out_dir: Path, space: SearchSpace, name: str) -> None:
    c = tracking.client(uri)
    c.log_artifact(parent, str(out_dir / "leaderboard.csv"))
    if best_cfg_path:
        c.log_artifact(parent, str(best_cfg_path))
    with tempfile.TemporaryDirectory() as d:
        for p in optuna_plots(rows, space, Path(d)):
            c.log_artifact(parent, str(p), "optuna")
    counts: dict[str, int] = {}
    for r in rows:
        key = r["state"].split(":")[0].split(" at ")[0]
        counts[key] = counts.get(key, 0) + 1
    metrics = {f"trials_{k.replace(' ', '_')}": v for k, v in counts.items()}
    if best is not None:
        metrics[f"best_{space.metric}"] = best[space.metric]
        child = _child_run(c, parent, best["trial_id"])
        if child:
            c.set_tag(child, "best_trial", "true")
    tracking.log_metrics(c, parent, metrics, step=0)
    tags = {"best_trial": best["trial_id"]} if best else {}
    tracking.end_run(uri, parent, "FINISHED", tags)


def _child_run(c, parent: str, trial_id: str) -> str | None:
    exp = c.get_run(parent).info.experiment_id
    runs = c.search_runs([exp], filter_string=f"tags.`{TRIAL_TAG}` = '{trial_id}' and "
                                              f"tags.`mlflow.parentRunId` = '{parent}'")
    return runs[0].info.run_id if runs else None


class GracefulStop:
    """Ctrl-C or SIGTERM: ask Tune to stop and save its state (Tune stops on SIGUSR1), and remember that we did, so
    the study is reported as interrupted (resumable) rather than finished. A second Ctrl-C interrupts at once."""

    def __init__(self):
        self.requested = False

    def _handler(self, signum, frame):
        self.requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)
        os.kill(os.getpid(), signal.SIGUSR1)

    def __enter__(self):
        self._env = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER")
        os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
        self._previous = {sig: signal.signal(sig, self._handler) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        if self._env is None:
            os.environ.pop("TUNE_DISABLE_SIGINT_HANDLER", None)
        else:
            os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = self._env
        return False
