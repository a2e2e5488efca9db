"""The live status table of a study on stderr: one row per trial (parameters, epoch, latest and best value, state),
printed at most every few seconds while trials report, and at once when one ends."""

from __future__ import annotations

import time
from typing import Any

from .search_space import SearchSpace
from .study_trials import TrialProgress, TrialProgressCallback

MIN_INTERVAL_S = 5.0


class StudyStatusTable(TrialProgressCallback):
    """A Tune callback (in the driver) that prints the study's status table."""

    def __init__(self, space: SearchSpace, study: str):
        super().__init__(space, study)
        self._shown = 0.0

    def on_trial_start(self, iteration, trials, trial, **info):
        super().on_trial_start(iteration, trials, trial, **info)
        self._show(trials)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        super().on_trial_result(iteration, trials, trial, result, **info)
        self._show(trials)

    def on_trial_complete(self, iteration, trials, trial, **info):
        super().on_trial_complete(iteration, trials, trial, **info)
        self._show(trials, force=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        super().on_trial_error(iteration, trials, trial, **info)
        self._show(trials, force=True)

    def _show(self, trials, force: bool = False) -> None:
        if not force and time.time() - self._shown < MIN_INTERVAL_S:
            return
        self._shown = time.time()
        from rich.console import Console

        Console(stderr=True).print(status_table(self, trials))


def status_table(status: TrialProgressCallback, trials) -> Any:
    from rich.table import Table

    t = Table(title=f"study {status.study}", show_lines=False)
    for col in ("trial", "params", "epoch", status.space.metric, "best", "state"):
        t.add_column(col)
    for trial in trials:
        st = status.trials.get(trial.trial_id, TrialProgress())
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
