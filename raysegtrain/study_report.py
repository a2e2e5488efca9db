"""A finished study's results as files: the leaderboard (rows, and a CSV), the best trial's config as a fit config,
and Optuna's plots of the search, replayed from the results."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .metrics import degenerate_note
from .redaction import redact_value
from .search_space import SearchSpace
from .study_trials import trial_overrides, trial_state

LEADERBOARD_CSV = "leaderboard.csv"
FG_IOU = "val_fg_iou"
BEST_CONFIG = "best_config.yaml"


@dataclass
class StudyReport:
    rows: list[dict[str, Any]]  # best first; `param.<key>` columns; the trial's Ray config under `_config`, its
    #                             objective per epoch under `_curve`
    best: dict[str, Any] | None  # the best row with a value
    folder: Path  # where the files below are
    leaderboard_csv: Path
    best_config_path: Path | None
    final_test: Any = None  # study_final.FinalTest, once the test split has been evaluated
    repeat: list | None = None  # study_repeat.RepeatSummary per repeated config, best mean first


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
        values = df[space.metric].dropna() if df is not None and space.metric in df else None
        best, note, fg_iou = None, None, None
        if values is not None and len(values):
            at = values.idxmax() if space.mode == "max" else values.idxmin()
            best, note = float(values[at]), degenerate_note(df.loc[at].to_dict())
            if FG_IOU in df and df.loc[at, FG_IOU] == df.loc[at, FG_IOU]:  # binary tasks report it; nan otherwise
                fg_iou = float(df.loc[at, FG_IOU])  # the foreground IoU at the epoch of the best value
        epoch = int((r.metrics or {}).get("epoch", 0) or 0)
        state = trial_state(r.metrics or {}, r.error, space.max_epochs)
        if r.error is None and (states or {}).get(trial_id, "").startswith("stopped:"):
            state = states[trial_id]
        curve = ({int(e): float(v) for e, v in zip(df["epoch"], df[space.metric]) if v == v}
                 if df is not None and space.metric in df and "epoch" in df else {})
        rows.append({"trial_id": trial_id, space.metric: best, "fg_iou": fg_iou, "epochs": epoch, "state": state,
                     "note": note or "", **{f"param.{k}": v for k, v in trial_overrides(r.config).items()},
                     "_config": r.config, "_curve": curve})
    rows.sort(key=lambda row: (row[space.metric] is None,
                               -(row[space.metric] or 0) if space.mode == "max" else (row[space.metric] or 0)))
    return rows


def apply_repeats(report: StudyReport, summaries: list, space: SearchSpace) -> None:
    """Repeat-best's statistics into REPORT: each repeated trial's row gains repeat_mean / repeat_std /
    repeat_ci95, the best mean's row becomes `best` (best_config.yaml rewritten from it), and the files are written."""
    from .study_repeat import write_repeat_report

    by_trial = {s.trial_id: s for s in summaries}
    for row in report.rows:
        s = by_trial.get(row["trial_id"])
        row["repeat_mean"] = s.mean if s else None
        row["repeat_std"] = s.std if s else None
        row["repeat_ci95"] = f"{s.ci95[0]:.4f}..{s.ci95[1]:.4f}" if s and s.ci95 else None
    write_leaderboard_csv(report.rows, report.leaderboard_csv)
    write_repeat_report(summaries, space.metric, report.folder)
    chosen = next((s for s in summaries if s.mean is not None), None)
    if chosen is not None:
        report.best = next(r for r in report.rows if r["trial_id"] == chosen.trial_id)
        report.best_config_path = write_best_config(report.best, space, report.folder / BEST_CONFIG)


def state_counts(rows: list[dict]) -> dict[str, int]:
    """{completed / stopped by ASHA / failed / ...: number of trials}, the epoch and the reason left out."""
    counts: dict[str, int] = {}
    for r in rows:
        key = r["state"].split(":")[0].split(" at ")[0]
        counts[key] = counts.get(key, 0) + 1
    return counts


def write_leaderboard_csv(rows: list[dict], path: Path) -> None:
    keys = list(dict.fromkeys(k for row in rows for k in row if not k.startswith("_")))
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


def display_names(space: SearchSpace) -> dict[str, str]:
    """{Optuna name: the name a plot shows}: the config key (`model.encoder`), with the enclosing options where the
    same key is searched under several (`model.encoder (model.arch=unet)`)."""
    from .search_space.nodes import Constant, iter_nodes

    nodes = [n for n in iter_nodes(space.nodes) if not isinstance(n, Constant)]
    count: dict[str, int] = {}
    for n in nodes:
        count[n.key] = count.get(n.key, 0) + 1
    return {n.name: n.key if count[n.key] == 1 else
            f"{n.key} ({', '.join(f'{c.parent}={c.label}' for c in n.conditions)})" for n in nodes}


def replayed_study(rows: list[dict], space: SearchSpace):
    """An Optuna study of the results, with config-key names. Trials ASHA stopped are PRUNED there, as Optuna has
    them: their last value is not a final one, so the plots of finished trials leave them out, and the
    intermediate-values plot draws every trial's curve, the pruned ones ending early."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    direction = "maximize" if space.mode == "max" else "minimize"
    replay = optuna.create_study(direction=direction)
    study = optuna.create_study(direction=direction)
    names = display_names(space)
    for row in sorted(rows, key=lambda r: r["trial_id"]):
        if row[space.metric] is None:
            continue
        # replay the trial through the space itself: Optuna records each parameter with its distribution
        replay.enqueue_trial(optuna_params(row["_config"]))
        trial = replay.ask()
        space.define_by_run(trial)
        replay.tell(trial, row[space.metric])
        done = replay.trials[-1]
        pruned = row["state"].startswith("stopped by ASHA")
        study.add_trial(optuna.trial.create_trial(
            params={names.get(k, k): v for k, v in done.params.items()},
            distributions={names.get(k, k): d for k, d in done.distributions.items()},
            value=None if pruned else row[space.metric],
            state=optuna.trial.TrialState.PRUNED if pruned else optuna.trial.TrialState.COMPLETE,
            intermediate_values=row.get("_curve") or {}))
    return study


def optuna_plots(rows: list[dict], space: SearchSpace, out: Path) -> list[Path]:
    """Optimisation history, parameter importances, parallel coordinates and intermediate values (each trial's
    objective per epoch) of `replayed_study`, as PNG files in OUT."""
    import warnings

    study = replayed_study(rows, space)
    made = []
    from optuna.visualization import matplotlib as vis

    for name, fn in (("optimization_history", vis.plot_optimization_history),
                     ("param_importances", vis.plot_param_importances),
                     ("parallel_coordinate", vis.plot_parallel_coordinate),
                     ("intermediate_values", vis.plot_intermediate_values)):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ax = fn(study)
            fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
            if name == "parallel_coordinate":
                fig.set_size_inches(max(8, 1.6 * len(study.best_trial.params)), 5)
            path = out / f"{name}.png"
            fig.savefig(path, dpi=100, bbox_inches="tight")
            import matplotlib.pyplot as plt

            plt.close(fig)
            made.append(path)
        except Exception:  # e.g. importances need >= 2 finished trials with varying params
            continue
    interactive = interactive_plots(study, out / INTERACTIVE_PLOTS)
    return made + ([interactive] if interactive else [])


INTERACTIVE_PLOTS = "plots.html"


def interactive_plots(study, path: Path) -> Path | None:
    """The same plots as one interactive page (plotly; MLflow previews HTML artifacts): hover a point for its trial's
    parameters. plotly's script is written in once, so the page opens without a network."""
    try:
        from optuna import visualization as vis
    except ImportError:
        return None
    import warnings

    parts = []
    for fn in (vis.plot_optimization_history, vis.plot_param_importances, vis.plot_parallel_coordinate,
               vis.plot_intermediate_values, vis.plot_slice):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fig = fn(study)
            parts.append(fig.to_html(full_html=False, include_plotlyjs=not parts))
        except Exception:  # plotly missing, or a plot the study's trials cannot make
            continue
    if not parts:
        return None
    path.write_text("<html><head><meta charset='utf-8'></head><body>" + "\n".join(parts) + "</body></html>")
    return path
