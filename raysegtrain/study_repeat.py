"""Repeat-best: the top configs of a finished search trained again with several seeds, ranked by their mean.

A search ranks configs by one run each, and seed-to-seed spread is often as large as the differences it ranks
(issue 16: 0.24-0.35 foreground IoU over three seeds of one config). So after the search, the `repeat.top` best
configs each train `repeat.seeds` times (train.seed, train.seed+1, ...) for the full asha.max_epochs, in parallel
like trials (a second Tuner over the grid config x seed, no searcher, no early stopping); each config gets the mean,
the sample standard deviation and a 95 % Student-t interval of its runs' best objective values, and the best config
is the one with the best mean. The statistics are plain functions (`summarise`, `rank_by_mean`), the Tuner is
`make_repeat_tuner`, the files `write_repeat_report`.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .search_space.keys import RAY_RESULT_KEY

REPEAT_CSV = "repeat_leaderboard.csv"
REPEAT_PLOT = "repeat.png"
# two-sided 95 % Student-t quantiles t(0.975, df) for df = 1..30; above 30 the normal's 1.96 is within 2 %
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t975(df: int) -> float:
    return _T975[df - 1] if df <= len(_T975) else 1.96


@dataclass
class RepeatSummary:
    trial_id: str  # the search trial whose config this is
    overrides: dict[str, Any]  # the config's sampled overrides (without the seed)
    values: list[float]  # each seed's best objective value, in seed order (failed runs left out)
    seeds: list[int] = field(default_factory=list)
    mean: float | None = None
    std: float | None = None
    ci95: tuple[float, float] | None = None

    def row(self, metric: str) -> dict[str, Any]:
        return {"config_of_trial": self.trial_id, f"mean_{metric}": self.mean, "std": self.std,
                "ci95_low": self.ci95[0] if self.ci95 else None, "ci95_high": self.ci95[1] if self.ci95 else None,
                "runs": len(self.values), "values": " ".join(f"{v:.4f}" for v in self.values),
                "seeds": " ".join(map(str, self.seeds)),
                **{f"param.{k}": v for k, v in self.overrides.items()}}


def summarise(values: Sequence[float]) -> tuple[float | None, float | None, tuple[float, float] | None]:
    """(mean, sample std, 95 % interval of the mean) of VALUES; std and interval need two values."""
    vals = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return None, None, None
    mean = sum(vals) / len(vals)
    if len(vals) < 2:
        return mean, None, None
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))
    half = t975(len(vals) - 1) * std / math.sqrt(len(vals))
    return mean, std, (mean - half, mean + half)


def rank_by_mean(summaries: list[RepeatSummary], mode: str) -> list[RepeatSummary]:
    """SUMMARIES with their statistics filled in, best mean first (those without any value last)."""
    for s in summaries:
        s.mean, s.std, s.ci95 = summarise(s.values)
    sign = -1 if mode == "max" else 1
    return sorted(summaries, key=lambda s: (s.mean is None, sign * (s.mean or 0)))


def without_seed(overrides: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in overrides.items() if k != "train.seed"}


def config_key(overrides: dict[str, Any]) -> str:
    """What identifies a config across its seeds: its overrides without train.seed."""
    return repr(sorted(without_seed(overrides).items()))


def repeat_grid(rows: list[dict], metric: str, top: int, seeds: int, base_seed: int) -> tuple[list[dict], dict]:
    """The repeat trials' overrides: for each of the TOP best distinct configs among ROWS (a search may sample one
    config twice), SEEDS copies that differ in train.seed only; and {config_key: the best search trial of it}."""
    grid: list[dict] = []
    origin: dict[str, str] = {}
    for row in rows:
        if len(origin) == top:
            break
        overrides = without_seed(row["_config"][RAY_RESULT_KEY])
        key = config_key(overrides)
        if row.get(metric) is None or key in origin:
            continue
        origin[key] = row["trial_id"]
        grid.extend({**overrides, "train.seed": base_seed + i} for i in range(seeds))
    return grid, origin


def collect(results, origin: dict[str, str], metric: str, mode: str) -> list[RepeatSummary]:
    """The repeat runs of RESULTS (a Tune ResultGrid) grouped by the search trial they repeat (ORIGIN, from
    `repeat_grid`), ranked by `rank_by_mean`."""
    groups = {trial_id: None for trial_id in origin.values()}
    for r in results:
        overrides = dict((r.config or {}).get(RAY_RESULT_KEY) or {})
        trial_of = origin.get(config_key(overrides))
        if trial_of is None:
            continue
        seed = overrides.get("train.seed")
        s = groups[trial_of] = groups[trial_of] or RepeatSummary(trial_of, without_seed(overrides), [])
        df = r.metrics_dataframe
        if r.error is None and df is not None and metric in df and df[metric].notna().any():
            col = df[metric].dropna()
            s.values.append(float(col.max() if mode == "max" else col.min()))
            s.seeds.append(seed)
    return rank_by_mean([s for s in groups.values() if s is not None], mode)


def write_repeat_report(summaries: list[RepeatSummary], metric: str, folder: Path) -> dict[str, Path]:
    """The repeat table (CSV) and a plot of each config's runs with its mean and 95 % interval."""
    rows = [s.row(metric) for s in summaries]
    keys = list(dict.fromkeys(k for row in rows for k in row))
    paths = {"csv": folder / REPEAT_CSV, "plot": folder / REPEAT_PLOT}
    with open(paths["csv"], "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    from .plots import repeat_plot

    repeat_plot([s.trial_id for s in summaries], [s.values for s in summaries], [s.mean for s in summaries],
                [s.ci95 for s in summaries], metric, paths["plot"])
    return paths


def describe(s: RepeatSummary) -> str:
    """'0.8123 ± 0.0150 (95 % CI 0.7750-0.8496, 3 seeds)'."""
    if s.mean is None:
        return "no finished run"
    if s.std is None:
        return f"{s.mean:.4f} (1 run)"
    return f"{s.mean:.4f} ± {s.std:.4f} (95 % CI {s.ci95[0]:.4f}-{s.ci95[1]:.4f}, {len(s.values)} seeds)"
