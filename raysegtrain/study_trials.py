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


@dataclass
class TrialProgress:
    params: dict[str, Any] = field(default_factory=dict)
    epoch: int = 0
    value: float | None = None
    best: float | None = None
    best_checkpoint: str | None = None
    state: str = "running"


class TrialProgressCallback(tune.Callback):
    """A Tune callback (in the driver) that keeps a `progress_type` record per trial id in `trials`; subclasses act on
    each event after calling this class's handler, so that the record is current."""

    progress_type = TrialProgress

    def __init__(self, space: SearchSpace, study: str):
        self.space, self.study = space, study
        self.trials: dict[str, TrialProgress] = {}

    def progress(self, trial) -> TrialProgress:
        return self.trials.setdefault(trial.trial_id, self.progress_type())

    def _better(self, a: float, b: float | None) -> bool:
        return b is None or (a > b if self.space.mode == "max" else a < b)

    def on_trial_start(self, iteration, trials, trial, **info):
        st = self.progress(trial)
        st.state = "running"
        st.params = trial_overrides(trial.config)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        st = self.progress(trial)
        st.epoch = int(result.get("epoch", st.epoch))
        value = result.get(self.space.metric)
        if isinstance(value, (int, float)) and math.isfinite(value):
            st.value = float(value)
            if self._better(st.value, st.best):
                st.best, st.best_checkpoint = st.value, result.get(CHECKPOINT_PATH_KEY)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.progress(trial).state = trial_state(trial.last_result or {}, None, self.space.max_epochs)

    def on_trial_error(self, iteration, trials, trial, **info):
        self.progress(trial).state = f"failed: {trial_error(trial)}"
