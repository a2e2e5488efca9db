"""A finished study's results as files: the leaderboard (rows, and a CSV), the best trial's config as a fit config,
and Optuna's plots of the search, replayed from the results."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .redaction import redact_value
from .search_space import SearchSpace
from .study_trials import trial_overrides, trial_state

LEADERBOARD_CSV = "leaderboard.csv"
BEST_CONFIG = "best_config.yaml"


@dataclass
class StudyReport:
    rows: list[dict[str, Any]]  # best first; `param.<key>` columns, and the trial's Ray config under `_config`
    best: dict[str, Any] | None  # the best row with a value
    folder: Path  # where the files below are
    leaderboard_csv: Path
    best_config_path: Path | None


def write_report(results, space: SearchSpace, out_dir: Path, states: dict[str, str] | None = None) -> StudyReport:
    """The leaderboard of RESULTS (a Tune ResultGrid) and the best config, written into OUT_DIR. STATES: what the
    study's callbacks saw of each trial's end ({trial id: state}), which results alone cannot tell (a trial cut by the
    time budget)."""
    rows = leaderboard(results, space, states or {})
    best = next((r for r in rows if r[space.metric] is not None), None)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_leaderboard_csv(rows, out_dir / LEADERBOARD_CSV)
    best_cfg_path = write_best_config(best, space, out_dir / BEST_CONFIG) if best is not None else None
    return StudyReport(rows, best, out_dir, out_dir / LEADERBOARD_CSV, best_cfg_path)


def leaderboard(results, space: SearchSpace, states: dict[str, str] | None = None) -> list[dict[str, Any]]:
    rows = []
    for r in results:
        trial_id = (r.metrics or {}).get("trial_id") or Path(r.path).name
        df = r.metrics_dataframe
        values = df[space.metric].dropna().tolist() if df is not None and space.metric in df else []
        best = (max if space.mode == "max" else min)(values) if values else None
        epoch = int((r.metrics or {}).get("epoch", 0) or 0)
        state = trial_state(r.metrics or {}, r.error, space.max_epochs)
        if r.error is None and (states or {}).get(trial_id, "").startswith("stopped:"):
            state = states[trial_id]
        rows.append({"trial_id": trial_id, space.metric: best, "epochs": epoch, "state": state,
                     **{f"param.{k}": v for k, v in trial_overrides(r.config).items()}, "_config": r.config})
    rows.sort(key=lambda row: (row[space.metric] is None,
                               -(row[space.metric] or 0) if space.mode == "max" else (row[space.metric] or 0)))
    return rows


def state_counts(rows: list[dict]) -> dict[str, int]:
    """{completed / stopped by ASHA / failed / ...: number of trials}, the epoch and the reason left out."""
    counts: dict[str, int] = {}
    for r in rows:
        key = r["state"].split(":")[0].split(" at ")[0]
        counts[key] = counts.get(key, 0) + 1
    return counts


def write_leaderboard_csv(rows: list[dict], path: Path) -> None:
    keys = list(dict.fromkeys(k for row in rows for k in row if k != "_config"))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for row in rows:
            w.writerow({k: redact_value(k, row.get(k)) for k in keys})


def write_best_config(best: dict, space: SearchSpace, path: Path) -> Path:
    """The config of row BEST as a fit config that `raysegtrain fit` takes as it stands (a fresh run name)."""
    cfg = space.trial_config(best["_config"])
    cfg = cfg.model_copy(update={"run": cfg.run.model_copy(update={"name": None})})
    cfg.to_yaml(path)
    return path


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
