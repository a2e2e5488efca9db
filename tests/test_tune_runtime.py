"""How study trials run (`trial.runtime`): warm trials share reused Tune actors and give the results a TorchTrainer
per trial gives; a trial that fails does not reach the next; trials cut by the study's end say so, in MLflow too."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml

from raysegtrain import tracking
from raysegtrain.errors import ConfigError
from raysegtrain.hooks import Hook
from raysegtrain.search_space import load_space
from raysegtrain.study_tracking import RUNTIME_TAG, TRIAL_TAG
from raysegtrain.tune import run_study

BASE = {
    "data": {"synthetic": {"size": 64, "num_train": 12, "num_val": 6, "num_test": 4}, "image_size": 64,
             "loader_workers": 0},
    "model": {"encoder": "resnet18"},
    "train": {"batch_size": 4, "deterministic": True, "early_stopping": {"patience": None}},
    "tracking": {"num_overlays": 0},
}
GOOD_A, GOOD_B, DIVERGES, GOOD_C = 0.001, 0.002, 0.005, 0.0015  # the learning rates of the trials, in order


def write_space(tmp_path: Path, lrs: list[float], **settings) -> Path:
    space = {"base": BASE, "objective": {"metric": "val_iou"}, "budget": {"num_samples": len(lrs)},
             "max_concurrent_trials": 1, "trial": {"num_workers": 1, "use_gpu": False, "cpus_per_worker": 1},
             "asha": {"max_epochs": 2, "grace_period": 2}, "searcher": {"algorithm": "random", "seed": 0,
             "points_to_evaluate": [{"optim.lr": lr} for lr in lrs]},
             "space": {"optim.lr": {"loguniform": [1.0e-4, 1.0e-2]}}}
    for key, value in settings.items():
        space.setdefault(key, {}).update(value) if isinstance(value, dict) else space.update({key: value})
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    return path


def settings(tmp_path: Path, study: str) -> list[str]:
    return [f"run.storage_path={tmp_path / 'runs'}", f"tracking.tracking_uri=sqlite:///{tmp_path / study}.db"]


class DivergeFastTrials(Hook):
    """Turns the weights of trials with lr >= 0.004 into NaN before training: their loss goes non-finite at once."""

    def before_train(self):
        if self.trainer.cfg.optim.lr >= 0.004:
            with torch.no_grad():
                for p in self.trainer.module.parameters():
                    p.fill_(math.nan)


def trials_by_lr(result, uri: str) -> dict[float, dict]:
    """{lr: {status, state, runtime, val_iou per epoch, val_loss per epoch, the first epoch's figures}}."""
    c = tracking.client(uri)
    exp = c.get_run(result.parent_run_id).info.experiment_id
    out = {}
    for ch in c.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{result.parent_run_id}'"):
        run_id = ch.info.run_id
        history = {k: [m.value for m in sorted(c.get_metric_history(run_id, k), key=lambda m: m.step)]
                   for k in ("val_iou", "val_loss", "actor_trials_before", "actor_open_files", "actor_threads",
                             "actor_child_processes")}
        out[float(ch.data.params["optim.lr"])] = {  # the sampled value, logged once as the trial config's param
            "status": ch.info.status, "state": ch.data.tags["state"], "runtime": ch.data.tags[RUNTIME_TAG],
            "name": ch.info.run_name, "trial": ch.data.tags[TRIAL_TAG], "augment": ch.data.params["data.augment"],
            **history}
    return out


def worker_pids(result, trials: dict[float, dict]) -> dict[float, set[int]]:
    """{lr: the process ids that trained it} of the trials that reported, from the results Tune kept per trial."""
    import pandas as pd

    lr_of = {t["trial"]: lr for lr, t in trials.items()}
    out = {}
    for csv in Path(result.path).glob("*/progress.csv"):
        df = pd.read_csv(csv, dtype={"trial_id": str})  # 8 hex digits may read as a number
        if len(df):
            out[lr_of[df["trial_id"].iloc[0]]] = set(df["worker_pid"].astype(int))
    return out


def test_warm_trials_share_actors_match_a_trainer_per_trial_and_survive_a_diverged_trial(tmp_path, ray_local):
    warm = run_study(write_space(tmp_path, [GOOD_A, GOOD_B, DIVERGES, GOOD_C]), settings(tmp_path, "warm"),
                     name="warm", live=False, hooks=[DivergeFastTrials()])
    cold = run_study(write_space(tmp_path, [GOOD_A, GOOD_B, GOOD_C], trial={"runtime": "trainer"}),
                     settings(tmp_path, "cold"), name="cold", live=False)
    w, c = trials_by_lr(warm, warm.tracking_uri), trials_by_lr(cold, cold.tracking_uri)

    assert {t["runtime"] for t in w.values()} == {"warm"} and {t["runtime"] for t in c.values()} == {"trainer"}
    # data.augment: auto (the base leaves it unset), recorded as what the 12 training images resolve it to
    assert {t["augment"] for t in (*w.values(), *c.values())} == {"light"}
    # trials A and B ran in one process, one after the other; the diverging trial came next, and failed
    pids = worker_pids(warm, w)
    assert pids[GOOD_A] == pids[GOOD_B] and len(pids[GOOD_A]) == 1
    assert w[GOOD_B]["actor_trials_before"] == [1.0] and w[DIVERGES]["status"] == "FAILED"
    assert "non-finite loss" in w[DIVERGES]["state"]
    # ... the trial after it (on a fresh actor: Tune does not reuse a failed trial's) is untouched by it
    assert w[GOOD_C]["actor_trials_before"] == [0.0] and pids[GOOD_C].isdisjoint(pids[GOOD_A])
    # nothing the first trial held (threads, open files, loader processes) is still held when the second starts
    for key in ("actor_threads", "actor_open_files", "actor_child_processes"):
        assert w[GOOD_B][key][0] <= w[GOOD_A][key][0] + 2, key
    # a TorchTrainer per trial: each trial its own worker process
    cold_pids = worker_pids(cold, c)
    assert len(set().union(*cold_pids.values())) == 3
    # the same trials give the same numbers either way (deterministic CPU settings, same seed)
    for lr in (GOOD_A, GOOD_B, GOOD_C):
        assert w[lr]["status"] == c[lr]["status"] == "FINISHED" and len(w[lr]["val_iou"]) == 2
        assert w[lr]["val_iou"] == pytest.approx(c[lr]["val_iou"], abs=1e-5), lr
        assert w[lr]["val_loss"] == pytest.approx(c[lr]["val_loss"], abs=1e-5), lr
    # child runs are named by what they are
    from raysegtrain.study_view import short_number

    names = sorted(t["name"] for t in w.values())
    assert [(int(n.split(" ")[0]), n.split(" ")[1]) for n in names] == [(i, "unet/resnet18") for i in range(1, 5)]
    assert all(f"lr={short_number(lr)}" in t["name"] for lr, t in w.items())


def test_trials_cut_by_the_time_budget_end_killed_with_their_epoch(tmp_path, ray_local):
    """Trials of 500 epochs cannot end inside a 15 s budget: the budget cuts them."""
    space = write_space(tmp_path, [GOOD_A, GOOD_B], budget={"time_budget_s": 15}, max_concurrent_trials=2,
                        asha={"max_epochs": 500, "grace_period": 500})
    result = run_study(space, settings(tmp_path, "budget"), name="budget", live=False)
    states = [r["state"] for r in result.leaderboard]
    assert len(states) == 2 and all(s.startswith("stopped: time budget at epoch ") for s in states), states
    trials = trials_by_lr(result, result.tracking_uri)
    for t in trials.values():
        assert t["status"] == "KILLED" and t["state"].startswith("stopped: time budget at epoch ")
        assert t["state"] == f"stopped: time budget at epoch {len(t['val_iou'])}"


def test_runtime_setting_resolves_and_rejects_warm_ddp(tmp_path):
    assert load_space(write_space(tmp_path, [GOOD_A])).runtime == "warm"
    assert load_space(write_space(tmp_path, [GOOD_A], trial={"num_workers": 2})).runtime == "trainer"
    assert load_space(write_space(tmp_path, [GOOD_A], trial={"runtime": "trainer"})).runtime == "trainer"
    with pytest.raises(ConfigError, match="trial.runtime=warm trains each trial in one process"):
        load_space(write_space(tmp_path, [GOOD_A], trial={"runtime": "warm", "num_workers": 2}))
    with pytest.raises(ConfigError, match="trial.runtime"):
        load_space(write_space(tmp_path, [GOOD_A], trial={"runtime": "hot"}))


def test_a_trials_best_checkpoint_is_the_best_one_left_and_never_lost_silently(tmp_path, capsys):
    """Retention may remove the first of two equal best checkpoints: the equal one left is logged. With none left
    the run is tagged `best_checkpoint: missing` and a warning says so."""
    from types import SimpleNamespace

    from raysegtrain.checkpoint import load_checkpoint, save_checkpoint
    from raysegtrain.study_tracking import MLflowTrialLogger, StudyRun

    space = load_space(write_space(tmp_path, [GOOD_A]))
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    parent = tracking.start_run(space.base_config, "study", uri=uri)
    exp = tracking.experiment_of(tracking.client(uri), parent)
    logger = MLflowTrialLogger(space, "study", StudyRun(uri, parent, exp, space.base_config.tracking.experiment))
    trial = SimpleNamespace(trial_id="t1", config={"overrides": {"optim.lr": GOOD_A}}, experiment_tag="1_lr=0.001")
    logger.on_trial_start(0, [trial], trial)
    folders = {}
    for epoch, value in ((1, 0.4), (2, 0.6), (3, 0.6), (4, 0.5)):
        folders[epoch] = tmp_path / f"checkpoint_{epoch:06d}"
        save_checkpoint({"format": 1, "model": {"w": torch.full((1,), float(epoch))}, "optimizer": {}, "epoch": epoch,
                         "config": space.base_config.to_dict()}, folders[epoch])
        logger.progress(trial).checkpoints[epoch] = (str(folders[epoch]), value)
    import shutil

    shutil.rmtree(folders[2])  # retention removed the first of the tied best
    assert logger.best_checkpoint("t1") == str(folders[3])
    assert logger.log_best_checkpoint("t1")
    c = tracking.client(uri)
    run_id = logger.progress(trial).run_id
    logged = load_checkpoint(c.download_artifacts(run_id, "best_checkpoint", str(tmp_path / "dl")))
    assert logged["model"]["w"].item() == 3.0 and "optimizer" not in logged
    for epoch in (1, 3, 4):
        shutil.rmtree(folders[epoch])
    assert not logger.log_best_checkpoint("t1")
    assert c.get_run(run_id).data.tags["best_checkpoint"] == "missing"
    assert "trial t1 has no checkpoint left" in capsys.readouterr().err


def test_pruning_keeps_only_the_kept_trials_best_checkpoints(tmp_path):
    from raysegtrain.study_tracking import prune_checkpoints

    made = [tmp_path / trial / f"checkpoint_{e:06d}" for trial in ("a", "b") for e in (1, 2)]
    for folder in made:
        folder.mkdir(parents=True)
        (folder / "checkpoint.pt").write_bytes(b"x")
    (tmp_path / "a" / "checkpoint_manager_snapshot.json").write_text("{}")
    assert prune_checkpoints(tmp_path, {str(made[1])}) == 3
    assert [p for p in made if p.exists()] == [made[1]]
    assert (tmp_path / "a" / "checkpoint_manager_snapshot.json").exists()
