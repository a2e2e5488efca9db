"""Repeat-best and the final test number: the statistics without Ray, then one small real study (Optuna search, the
top configs again over seeds in a second Tuner, ranked by the mean; the chosen config evaluated once on the test
split, after selection, and reported apart)."""

from __future__ import annotations

import csv
import math

import pytest
import yaml

from raysegtrain import config, tracking
from raysegtrain.study_repeat import RepeatSummary, rank_by_mean, repeat_grid, summarise, t975


def test_summary_is_mean_sample_std_and_a_student_t_interval():
    mean, std, (lo, hi) = summarise([0.80, 0.85, 0.83])
    assert mean == pytest.approx(0.8266667) and std == pytest.approx(0.0251661, rel=1e-4)
    assert hi - mean == pytest.approx(mean - lo) == pytest.approx(4.303 * std / math.sqrt(3))
    assert summarise([0.5]) == (0.5, None, None) and summarise([]) == (None, None, None)
    assert summarise([0.5, math.nan, 0.7])[0] == pytest.approx(0.6)
    assert t975(1) == 12.706 and t975(100) == 1.96


def test_ranking_is_by_the_mean_not_by_the_best_single_run():
    lucky = RepeatSummary("lucky", {"optim.lr": 1e-2}, [0.90, 0.40, 0.45])  # best single run, poor mean
    steady = RepeatSummary("steady", {"optim.lr": 1e-3}, [0.70, 0.72, 0.71])
    empty = RepeatSummary("failed", {"optim.lr": 1.0}, [])
    assert [s.trial_id for s in rank_by_mean([lucky, empty, steady], "max")] == ["steady", "lucky", "failed"]
    assert [s.trial_id for s in rank_by_mean([lucky, steady], "min")] == ["lucky", "steady"]


def test_the_grid_is_the_top_configs_times_the_seeds():
    rows = [{"trial_id": t, "val_fg_iou": v, "_config": {"overrides": {"optim.lr": lr, "train.seed": 7}}}
            for t, v, lr in (("a", 0.9, 1e-3), ("a2", 0.85, 1e-3), ("b", 0.8, 2e-3), ("c", None, 3e-3),
                             ("d", 0.7, 4e-3))]
    grid, origin = repeat_grid(rows, "val_fg_iou", top=2, seeds=3, base_seed=42)
    assert [(g["optim.lr"], g["train.seed"]) for g in grid] == [(1e-3, 42), (1e-3, 43), (1e-3, 44),
                                                                (2e-3, 42), (2e-3, 43), (2e-3, 44)]
    assert sorted(origin.values()) == ["a", "b"]  # a config sampled twice is repeated once, from its best trial


def test_a_study_repeats_the_top_configs_over_seeds_and_tests_the_chosen_one_once(tmp_path, ray_local):
    from raysegtrain.tune import run_study

    space = {
        "base": {"data": {"synthetic": {"size": 64, "num_train": 8, "num_val": 4, "num_test": 4}, "image_size": 64,
                          "loader_workers": 0, "augment": "light"},
                 "model": {"encoder": "resnet18"}, "train": {"batch_size": 4, "early_stopping": {"patience": None}},
                 "run": {"storage_path": str(tmp_path / "runs")},
                 "tracking": {"tracking_uri": f"sqlite:///{tmp_path / 'm.db'}", "num_overlays": 0}},
        "budget": {"num_samples": 3}, "max_concurrent_trials": 2, "asha": {"max_epochs": 1},
        "searcher": {"points_to_evaluate": [{"optim.lr": 3.0e-4}, {"optim.lr": 3.0e-3}]},  # two configs for sure
        "trial": {"num_workers": 1, "use_gpu": False, "cpus_per_worker": 1},
        "repeat": {"top": 2, "seeds": 2},
        "space": {"optim.lr": {"choice": [3.0e-4, 1.0e-3, 3.0e-3]}},
    }
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    result = run_study(path, live=False)
    metric = "val_fg_iou"  # the binary default objective

    # two configs x two seeds, ranked by the mean; best_config.yaml is the mean-best config
    assert result.repeat and len(result.repeat) == 2
    assert all(row["runs"] == 2 and len(row["seeds"].split()) == 2 for row in result.repeat)
    means = [row[f"mean_{metric}"] for row in result.repeat]
    assert means == sorted(means, reverse=True)
    assert all(row[f"mean_{metric}"] == pytest.approx(sum(map(float, row["values"].split())) / 2, abs=1e-4)
               for row in result.repeat)
    assert result.best_trial == result.repeat[0]["config_of_trial"]
    best_cfg = config.load(result.best_config_path)
    assert best_cfg.optim.lr == result.repeat[0]["param.optim.lr"] and best_cfg.train.seed == 42
    with open(f"{result.path}/leaderboard.csv") as fh:
        board = list(csv.DictReader(fh))
    assert {"note", "repeat_mean", "repeat_std", "repeat_ci95"} <= set(board[0])
    assert sum(1 for r in board if r["repeat_mean"]) == 2

    # the test split: once, after selection, for the chosen config only, and apart from the validation figures
    final = result.final_test
    assert final["trial_id"] == result.best_trial and final["split"] == "test"
    assert "selected this config" in final["note"] and isinstance(final["test_fg_iou"], float)
    c = tracking.client(result.tracking_uri)
    parent = c.get_run(result.parent_run_id)
    assert parent.data.metrics["test_fg_iou"] == pytest.approx(final["test_fg_iou"])
    assert "selected this config" in parent.data.tags["final_test"]
    assert f"repeat_best_mean_{metric}" in parent.data.metrics
    artifacts = {a.path for a in c.list_artifacts(result.parent_run_id)}
    assert {"final_test.yaml", "leaderboard.csv", "best_config.yaml"} <= artifacts
    assert {"repeat/repeat_leaderboard.csv", "repeat/repeat.png"} <= \
        {a.path for a in c.list_artifacts(result.parent_run_id, "repeat")}
    children = c.search_runs([parent.info.experiment_id],
                             filter_string=f"tags.`mlflow.parentRunId` = '{result.parent_run_id}'")
    assert children and not any(k.startswith("test_") for ch in children for k in ch.data.metrics)
