"""A study's output on stderr: the live status table, one row per trial (parameters, epoch, latest and best value,
state), printed at most every few seconds while trials report, and at once when one ends; and one line per failed
trial, whose traceback stays in its error file (Tune's own printing of it is turned off in tune.run_study)."""

from __future__ import annotations

import sys
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
        from .terminal import console

        console().print(status_table(self, trials))


class FailedTrialLines(TrialProgressCallback):
    """A Tune callback (in the driver): one line on stderr per failed trial, its reason and where the details are."""

    def on_trial_error(self, iteration, trials, trial, **info):
        super().on_trial_error(iteration, trials, trial, **info)
        from .study_trials import trial_error

        where = getattr(trial, "error_file", None) or getattr(trial, "path", None) or "its trial folder"
        print(f"trial {trial.trial_id} failed: {trial_error(trial)} (details: {where})", file=sys.stderr, flush=True)


def status_table(status: TrialProgressCallback, trials) -> Any:
    from rich.table import Table

    progress = [status.trials.get(trial.trial_id, TrialProgress()) for trial in trials]
    keys = varying_keys([st.params for st in progress])
    t = Table(title=f"study {status.study}", show_lines=False)
    for col in ("trial", *column_names(keys), "epoch", status.space.metric, "best", "state"):
        t.add_column(col, overflow="fold")
    for trial, st in zip(trials, progress):
        state = st.state if st.state != "running" else str(trial.status).lower()
        t.add_row(trial.trial_id, *(short_value(st.params.get(k)) for k in keys), str(st.epoch), short_value(st.value),
                  short_value(st.best), state)
    return t


MAX_PARAM_COLUMNS = 8


def varying_keys(params: list[dict[str, Any]]) -> list[str]:
    """The sampled keys whose values differ between trials (a key some trials lack counts), in first-seen order, at
    most MAX_PARAM_COLUMNS: the columns that tell trials apart."""
    seen: dict[str, set] = {}
    for p in params:
        for k, v in p.items():
            seen.setdefault(k, set()).add(repr(v))
    keys = [k for k, values in seen.items() if len(values) > 1 or any(k not in p for p in params)]
    return keys[:MAX_PARAM_COLUMNS]


def column_names(keys: list[str]) -> list[str]:
    """Each key's last part (optim.lr -> lr), the whole key where two last parts collide."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return [short if last.count(short) == 1 else key for key, short in zip(keys, last)]


def short_value(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
