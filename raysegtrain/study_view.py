"""How a study reads in MLflow's UI: each trial run's name, one-line description and outcome; the saved runs-table
view that the printed link opens (the study's trials, best first, with the objective, foreground IoU, outcome,
architecture/encoder and every sampled key as columns); and the study run's markdown dashboard. Text only: the
writing is study_tracking.py's."""

from __future__ import annotations

import json
import math
from typing import Any

from . import mlflow_links as links

FG_IOU = "val_fg_iou"
TIE_TOLERANCE = 1e-4       # objective values closer than this are a tie
DEGENERATE_FG_IOU = 0.01   # a binary model below this foreground IoU predicts (almost) no foreground
OUTCOMES = ("completed", "pruned", "stopped", "failed", "running")


# ------------------------------------------------------------------------------------------------- one trial
def outcome(state: str) -> str:
    """The trial's end in one filterable word: completed | pruned (stopped by ASHA) | stopped (time budget,
    interrupted, or before its first epoch) | failed | running."""
    if state.startswith("completed"):
        return "completed"
    if state.startswith("stopped by ASHA"):
        return "pruned"
    if state.startswith("failed"):
        return "failed"
    if state.startswith("stopped"):
        return "stopped"
    return "running"


def short_number(v: Any) -> str:
    """1.1e-3, 0.52, 3: short, and as Python reads it back."""
    if isinstance(v, bool) or not isinstance(v, float):
        return str(v)
    if v != 0 and (abs(v) < 0.01 or abs(v) >= 1e4):
        mantissa, exponent = f"{v:.1e}".split("e")
        return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
    return f"{v:.3g}"


MAX_NAMED_PARAMS = 3


def trial_run_name(number: int, width: int, arch: str, encoder: str, sampled: dict[str, Any]) -> str:
    """`03 fpn/resnet18 lr=1.1e-3`: the trial's place, its model, then up to MAX_NAMED_PARAMS other sampled values
    (numbers as `name=value` by the key's last part, choices as the value)."""
    parts = [f"{number:0{width}d}", f"{arch}/{encoder}"]
    others = [(k, v) for k, v in sampled.items() if k not in ("model.arch", "model.encoder")]
    for key, value in others[:MAX_NAMED_PARAMS]:
        is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
        parts.append(f"{key.rsplit('.', 1)[-1]}={short_number(value)}" if is_number else str(value))
    return " ".join(parts)


def number_width(num_samples: int) -> int:
    return max(2, len(str(num_samples))) if num_samples > 0 else 3


def trial_description(state: str, metric: str, best: float | None, best_epoch: int | None, epochs: int,
                      fg_iou: float | None) -> str:
    """One line: `completed: val_iou 0.712 (best at epoch 3 of 3), foreground IoU 0.655`."""
    line = state if state.startswith(outcome(state)) else f"{outcome(state)}: {state}"
    if best is not None:
        line += f"; {metric} {best:.4f}"
        if best_epoch:
            line += f" (best at epoch {best_epoch} of {epochs})"
    if fg_iou is not None and metric != FG_IOU:
        line += f", foreground IoU {fg_iou:.4f}"
    return line


# -------------------------------------------------------------------------------------------- the study's view
def sampled_keys(space) -> list[str]:
    """The config keys the space draws a value for (constants and branch labels left out), in the space's order."""
    from .search_space.nodes import Constant, iter_nodes

    keys = [node.key for node in iter_nodes(space.nodes) if not isinstance(node, Constant) and "." in node.key]
    return list(dict.fromkeys(keys))


def best_metric_name(metric: str) -> str:
    return f"best_{metric}"


def view_state(space, parent_run_id: str) -> dict[str, Any]:
    """The runs-table view of one study (MLflow's shared view state): its trials only (children of PARENT_RUN_ID),
    best first, with the columns that tell them apart."""
    metric = space.metric
    columns = [links.column("attributes", "Description"),
               links.column("metrics", best_metric_name(metric))]
    if metric != FG_IOU:
        columns.append(links.column("metrics", best_metric_name(FG_IOU)))
    columns += [links.column("tags", "outcome"), links.column("metrics", "epoch"),
                links.column("params", "model.arch"), links.column("params", "model.encoder")]
    columns += [links.column("params", k) for k in sampled_keys(space) if k not in ("model.arch", "model.encoder")]
    return {"searchFilter": f"tags.`mlflow.parentRunId` = '{parent_run_id}'",
            "orderByKey": links.column("metrics", best_metric_name(metric)),
            "orderByAsc": space.mode == "min",
            "selectedColumns": columns,
            "runsHiddenMode": "SHOW_ALL"}


def view_state_json(space, parent_run_id: str) -> str:
    return json.dumps(view_state(space, parent_run_id))


# ------------------------------------------------------------------------------------------------ the dashboard
def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def dashboard(study: str, space, rows: list[dict], runs: dict[str, tuple[str, str]], experiment_id: str,
              parent_run_id: str, top_k: int = 3) -> str:
    """The study run's description, markdown: the winner, ties, warnings, a leaderboard of linked trial runs, and
    links to the study's view and to the compare page of the top K. ROWS: the leaderboard (best first); RUNS:
    {trial id: (run id, run name)}."""
    metric = space.metric
    scored = [r for r in rows if _finite(r.get(metric))]

    def name(row) -> str:
        run_id, run_name = runs.get(row["trial_id"], (None, row["trial_id"]))
        return f"[{run_name}]({links.run_route(experiment_id, run_id)})" if run_id else run_name

    lines = [f"## Study `{study}`: {len(rows)} trials, objective {metric} ({space.mode})", ""]
    if scored:
        best = scored[0]
        lines.append(f"**Winner: {name(best)}** with {metric} **{best[metric]:.4f}**"
                     + (f", foreground IoU {best['fg_iou']:.4f}" if _finite(best.get("fg_iou")) and metric != FG_IOU
                        else "") + f" ({best['state']}).")
        ties = [r for r in scored[1:] if abs(r[metric] - best[metric]) <= TIE_TOLERANCE]
        if ties:
            lines.append(f"Tied with the winner (within {TIE_TOLERANCE:g}): " + ", ".join(name(r) for r in ties)
                         + ": the order among them is chance; repeat them over seeds before choosing.")
    else:
        lines.append("**No trial reported a value**: see the trials' states below.")
    degenerate = [r for r in scored if _finite(r.get("fg_iou")) and r["fg_iou"] < DEGENERATE_FG_IOU]
    if degenerate:
        lines.append("")
        lines.append(f"> **Warning: degenerate models** (foreground IoU < {DEGENERATE_FG_IOU:g}: they predict "
                     f"almost no foreground, whatever their {metric}): " + ", ".join(name(r) for r in degenerate))
    keys = list(dict.fromkeys(k[6:] for r in rows for k in r if k.startswith("param.")))
    lines += ["", "| rank | trial | " + metric + " | fg IoU | epochs | outcome | "
              + " | ".join(k.rsplit(".", 1)[-1] for k in keys) + " |",
              "|" + "---|" * (6 + len(keys))]
    for i, r in enumerate(rows, 1):
        cells = [str(i) if _finite(r.get(metric)) else "-", name(r),
                 f"{r[metric]:.4f}" if _finite(r.get(metric)) else "-",
                 f"{r['fg_iou']:.4f}" if _finite(r.get("fg_iou")) else "-", str(r.get("epochs", "")),
                 outcome(r["state"]) + ("" if outcome(r["state"]) == "completed" else f" ({r['state']})")]
        cells += [short_number(r.get(f"param.{k}")) if r.get(f"param.{k}") is not None else "" for k in keys]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    top = [runs[r["trial_id"]][0] for r in scored[:top_k] if r["trial_id"] in runs]
    lines += ["", f"[All trials as a table]({links.runs_route(experiment_id, parent_run_id)})"
              + (f" · [compare the top {len(top)}]({links.compare_route(experiment_id, top)})" if len(top) > 1 else ""),
              "", "Artifacts: `leaderboard.csv`, `best_config.yaml` (`raysegtrain fit best_config.yaml`), "
              "`optuna/` (plots of the search), `study/` (the space file), `base_config.yaml`."]
    return "\n".join(lines)
