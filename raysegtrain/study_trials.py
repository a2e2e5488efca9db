"""What a study knows of each trial, from Ray Tune's events: its sampled parameters, epoch, latest and best value of
the study's metric, best checkpoint, and final state in words. Shared by the study's callbacks (the MLflow writer in
study_tracking.py, the status table in study_status.py) and by the leaderboard (study_report.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray import tune
from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY

from .errors import one_line
from .ray_support import root_cause
from .search_space import SearchSpace


def trial_overrides(ray_config: dict) -> dict[str, Any]:
    """The sampled {dotted.key: value} overrides inside the config Ray gives a trial."""
    return dict(ray_config.get("overrides", {}))


def trial_state(last: dict, error, max_epochs: int) -> str:
    """completed / completed (early stopping at epoch k) / stopped by ASHA at epoch k / failed: reason."""
    epoch = int(last.get("epoch", 0) or 0)
    if error is not None:
        return f"failed: {one_line(root_cause(error))[:200]}"
    if epoch >= max_epochs:
        return "completed"
    if epoch == 0:
        return "stopped before its first epoch"
    if last.get("early_stopped"):
        return f"completed (early stopping at epoch {epoch})"
    return f"stopped by ASHA at epoch {epoch}"


def trial_error(trial) -> str:
    """The reason a failed trial gives in its error file (Tune keeps the traceback there, not the exception)."""
    path = getattr(trial, "error_file", None)
    if path and Path(path).is_file():
        lines = [ln.strip() for ln in Path(path).read_text().splitlines() if ln.strip()]
        for ln in reversed(lines):
            if "TrainingError" in ln or "Error" in ln:
                return ln.split("TrainingError: ", 1)[-1][:300]
        return lines[-1][:300] if lines else "unknown error"
    return "unknown error"


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def trial_number(trial) -> int:
    """The trial's place in the study, 1, 2, ...: Tune's experiment tag starts with it (`3_lr=0.001,...`)."""
    head = str(getattr(trial, "experiment_tag", "") or "").split("_", 1)[0]
    return int(head) if head.isdigit() else 0


@dataclass
class TrialProgress:
    params: dict[str, Any] = field(default_factory=dict)
    epoch: int = 0
    value: float | None = None
    best: float | None = None
    best_epoch: int | None = None
    checkpoints: dict[int, tuple[str, float | None]] = field(default_factory=dict)  # epoch -> (path, value)
    state: str = "running"
    ended: bool = False  # completed, stopped by ASHA, failed, or cut when the study stopped


class TrialProgressCallback(tune.Callback):
    """A Tune callback (in the driver) that keeps a `progress_type` record per trial id in `trials`; subclasses act on
    each event after calling this class's handler, so that the record is current.

    On `--resume` Tune brings back the callbacks it saved with the study, not the ones the driver built this time:
    each instance registers itself in `live` when the experiment starts, for the driver to read after `fit`."""

    progress_type = TrialProgress
    live: dict[type, "TrialProgressCallback"] = {}

    def __init__(self, space: SearchSpace, study: str):
        self.space, self.study = space, study
        self.trials: dict[str, TrialProgress] = {}

    def __getstate__(self):  # Tune saves its callbacks in the study folder: no credential of the base goes there
        state = self.__dict__.copy()
        state["space"] = self.space.redacted()
        return state

    @classmethod
    def running_instance(cls, fallback: "TrialProgressCallback") -> "TrialProgressCallback":
        """The instance of this class that the last experiment ran with (FALLBACK when none ran)."""
        return cls.live.get(cls, fallback)

    def setup(self, **info):
        TrialProgressCallback.live[type(self)] = self

    def progress(self, trial) -> TrialProgress:
        return self.trials.setdefault(trial.trial_id, self.progress_type())

    def states(self) -> dict[str, str]:
        return {trial_id: st.state for trial_id, st in self.trials.items()}

    def _better(self, a: float, b: float | None) -> bool:
        return b is None or (a > b if self.space.mode == "max" else a < b)

    def on_trial_start(self, iteration, trials, trial, **info):
        st = self.progress(trial)
        st.state, st.ended = "running", False
        st.params = trial_overrides(trial.config)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        st = self.progress(trial)
        st.epoch = int(result.get("epoch", st.epoch))
        value = result.get(self.space.metric)
        if isinstance(value, (int, float)) and math.isfinite(value):
            st.value = float(value)
            if self._better(st.value, st.best):
                st.best, st.best_epoch = st.value, st.epoch
        if result.get(CHECKPOINT_PATH_KEY):  # a TorchTrainer trial's checkpoint, persisted by Ray Train
            st.checkpoints[st.epoch] = (result[CHECKPOINT_PATH_KEY], st.value)

    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info):
        """A warm trial's checkpoint, persisted by Tune after the result it came with."""
        st = self.progress(trial)
        last = trial.last_result or {}
        value = last.get(self.space.metric)
        st.checkpoints[int(last.get("epoch", st.epoch))] = (checkpoint.path, value if _finite(value) else None)

    def best_checkpoint(self, trial_id: str) -> str | None:
        """The trial's best checkpoint that still exists: by the objective's value, the latest of equal ones (Ray's
        retention may have removed the first of a tie, or any but the kept few)."""
        st = self.trials.get(trial_id)
        if st is None:
            return None
        there = [(value, epoch, path) for epoch, (path, value) in st.checkpoints.items() if Path(path).is_dir()]
        if not there:
            return None
        sign = 1 if self.space.mode == "max" else -1
        return max(there, key=lambda c: (c[0] is not None, sign * (c[0] or 0), c[1]))[2]

    def on_trial_complete(self, iteration, trials, trial, **info):
        st = self.progress(trial)
        st.state, st.ended = trial_state(trial.last_result or {}, None, self.space.max_epochs), True

    def on_trial_error(self, iteration, trials, trial, **info):
        st = self.progress(trial)
        st.state, st.ended = f"failed: {trial_error(trial)}", True

    def on_experiment_end(self, trials, **info):
        """Trials the study's end cut short (its time budget, or Ctrl-C/SIGTERM) say so, with their epoch."""
        from .interrupt import study_stop_signal

        cause = "interrupted" if study_stop_signal() is not None else "time budget"
        for trial in trials:
            st = self.trials.get(trial.trial_id)
            if st is not None and not st.ended:
                st.state, st.ended = f"stopped: {cause} at epoch {st.epoch}", True
                self.on_trial_cut(trial, st)

    def on_trial_cut(self, trial, st: TrialProgress) -> None:
        """A running trial the study's end cut short (its state says how); for subclasses."""
