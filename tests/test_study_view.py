"""What a study looks like in MLflow's UI, as text: the links we print, trial names and descriptions, the saved view,
the dashboard; and the `ui` command's links and server."""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from raysegtrain import mlflow_links, study_view, tracking
from raysegtrain.search_space import load_space

SMOKE = Path(__file__).resolve().parents[1] / "search_spaces" / "smoke.yaml"


def _route_query(link: str) -> dict[str, list[str]]:
    """The query of a hash route (`…/#/experiments/1/runs?a=b`): what MLflow's router reads."""
    return parse_qs(urlsplit(urlsplit(link).fragment).query)


def test_every_link_opens_the_training_view():
    base = mlflow_links.ui_base()
    links = [mlflow_links.url(base, mlflow_links.runs_route("3")),
             mlflow_links.url(base, mlflow_links.runs_route("3", "abc")),
             mlflow_links.url(base, mlflow_links.run_route("3", "r1")),
             mlflow_links.url(base, mlflow_links.compare_route("3", ["r1", "r2"])),
             mlflow_links.url(base, mlflow_links.home_route())]
    for link in links:
        assert _route_query(link)["workflowType"] == ["machine_learning"], link
    assert _route_query(links[1])["viewStateShareKey"] == ["abc"]
    compare = _route_query(links[3])
    assert json.loads(compare["runs"][0]) == ["r1", "r2"] and json.loads(compare["experiments"][0]) == ["3"]
    assert mlflow_links.ui_base("http://mlflow.example:8080/") == "http://mlflow.example:8080"
    assert mlflow_links.ui_base("sqlite:///x.db") == "http://127.0.0.1:5000"


def test_trial_names_descriptions_and_outcomes():
    name = study_view.trial_run_name(3, 2, "fpn", "resnet18", {"model.arch": "fpn", "optim.lr": 0.0011,
                                                               "schedule.name": "cosine"})
    assert name == "03 fpn/resnet18 lr=1.1e-3 cosine"
    assert study_view.outcome("stopped by ASHA at epoch 1") == "pruned"
    assert study_view.outcome("stopped: time budget at epoch 2") == "stopped"
    assert study_view.outcome("completed (early stopping at epoch 2)") == "completed"
    assert study_view.outcome("failed: boom") == "failed"
    line = study_view.trial_description("stopped by ASHA at epoch 1", "val_iou", 0.41, 1, 1, 0.05)
    assert line == "pruned: stopped by ASHA at epoch 1; val_iou 0.4100 (best at epoch 1 of 1), foreground IoU 0.0500"


def test_study_view_state_has_the_studys_columns_and_order():
    space = load_space(SMOKE, [])
    state = study_view.view_state(space, "p1")
    assert state["searchFilter"] == "tags.`mlflow.parentRunId` = 'p1'"
    # the smoke study's objective is the foreground IoU (binary data): it orders the view, once among the columns
    assert state["orderByKey"] == "metrics.`best_val_fg_iou`" and state["orderByAsc"] is False
    cols = state["selectedColumns"]
    for col in ("metrics.`best_val_fg_iou`", "tags.`outcome`", "params.`model.arch`",
                "params.`model.encoder`", "params.`optim.lr`", "params.`schedule.name`", "params.`loss.dice`",
                "params.`schedule.step_size`"):
        assert col in cols, col
    assert len(cols) == len(set(cols))


def test_dashboard_links_trials_names_ties_and_degenerate_models():
    space = load_space(SMOKE, ["train.monitor=val_iou"])  # a macro-mean objective: the foreground IoU shown beside
    rows = [{"trial_id": "a", "val_iou": 0.8, "fg_iou": 0.7, "epochs": 3, "state": "completed", "param.optim.lr": 1e-3},
            {"trial_id": "b", "val_iou": 0.79995, "fg_iou": 0.001, "epochs": 3, "state": "completed",
             "param.optim.lr": 2e-3},
            {"trial_id": "c", "val_iou": 0.5, "fg_iou": 0.3, "epochs": 1, "state": "stopped by ASHA at epoch 1",
             "param.optim.lr": 3e-3}]
    runs = {"a": ("ra", "01 unet/resnet18"), "b": ("rb", "02 fpn/resnet18"), "c": ("rc", "03 unet/resnet18")}
    md = study_view.dashboard("smoke", space, rows, runs, "7", "p1")
    assert "**Winner: [01 unet/resnet18](#/experiments/7/runs/ra?workflowType=machine_learning)**" in md
    assert "Tied with the winner" in md and "[02 fpn/resnet18]" in md.split("Tied with the winner")[1].split("\n")[0]
    assert "degenerate models" in md and "02 fpn/resnet18" in md.split("degenerate models")[1].split("\n")[0]
    table = [ln for ln in md.splitlines() if ln.startswith("| ")]
    assert len(table) == 1 + len(rows) and "pruned (stopped by ASHA at epoch 1)" in table[-1]
    assert mlflow_links.runs_route("7", "p1") in md and "#/compare-runs?runs=" in md


def test_ui_starts_one_worker():
    cmd = tracking.ui_command("sqlite:///x.db", "127.0.0.1", 5001)
    assert cmd[cmd.index("--workers") + 1] == "1"


def test_start_up_and_throughput_metrics_go_under_system():
    assert tracking.metric_name("startup_setup_s") == "system/startup_setup_s"
    assert tracking.metric_name("images_per_s") == "system/images_per_s"
    assert tracking.metric_name("val_iou") == "val_iou" and tracking.metric_name("train_loss") == "train_loss"


def test_optuna_plots_name_config_keys_and_mark_pruned_trials(tmp_path):
    import optuna

    from raysegtrain.study_report import optuna_plots, replayed_study

    space = load_space(SMOKE, ["train.monitor=val_iou"])
    sampler = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    rows = []
    for i in range(4):
        trial = sampler.ask()
        ray_config = dict(space.define_by_run(trial))
        for name, value in trial.params.items():  # Ray nests the searcher's names on `/`
            *parents, leaf = name.split("/")
            node = ray_config
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = value
        pruned = i % 2 == 0
        rows.append({"trial_id": f"t{i}", "val_iou": 0.1 * (i + 1), "_config": ray_config,
                     "state": "stopped by ASHA at epoch 1" if pruned else "completed",
                     "_curve": {1: 0.05 * (i + 1)} if pruned else {1: 0.05 * (i + 1), 2: 0.1 * (i + 1)}})
    study = replayed_study(rows, space)
    states = [t.state for t in study.trials]
    assert states == [optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.COMPLETE] * 2
    names = set().union(*(t.params for t in study.trials))
    assert {"optim.lr", "model.arch"} <= names and not any("/" in n for n in names)
    made = {p.name for p in optuna_plots(rows, space, tmp_path)}
    assert {"optimization_history.png", "intermediate_values.png", "plots.html"} <= made
    page = (tmp_path / "plots.html").read_text()
    assert page.count("plotly.js v") == 1 and "optim.lr" in page  # plotly inlined once; config-key names
