"""Runs that cannot train the wrong thing or collide (issue 21): a resume on the run's own config, run names reserved
at the start, a SQLite store safe to create from two processes, stale MLflow tags cleared, errors found before Ray
and said in one line, divergence flagged."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from raysegtrain import resume, run_folder, run_health, study_tracking, tracking, train
from raysegtrain.checkpoint import load_checkpoint
from raysegtrain.cli import main
from raysegtrain.errors import ConfigError, UserError
from raysegtrain.hooks import Hook

from .conftest import TINY


@pytest.fixture
def no_ray(monkeypatch):
    """Fails the test if fit gets as far as starting Ray."""

    def start_ray(*args, **kwargs):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(train, "start_ray", start_ray)


def _one_error_line(capsys) -> str:
    err = [ln for ln in capsys.readouterr().err.strip().splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


# ------------------------------------------------------------------------------------------- 1. resume's config
@pytest.mark.parametrize("given, refused", [
    (["model.arch=fpn"], "model.arch cannot change"),
    (["train.epochs=3", "data.root=/elsewhere"], "data.root cannot change"),
    (["my.yaml"], "drop 'my.yaml'"),
])
def test_resume_refuses_what_it_may_not_change_before_ray(tmp_path, capsys, no_ray, given, refused):
    rc = main(["fit", "--resume", "some-run", f"run.storage_path={tmp_path}", *given, "--no-progress"])
    line = _one_error_line(capsys)
    assert rc == 2 and refused in line and "train.epochs" in line, line  # the allowed keys are named


def test_resume_changes_are_checked_against_the_saved_config(tiny_cfg):
    saved = tiny_cfg("run.name=r")
    assert resume.checked_changes(saved, tiny_cfg("run.name=r")) == {}
    longer = resume.checked_changes(saved, tiny_cfg("run.name=r", "train.epochs=5", "data.loader_workers=1"))
    assert longer == {"data.loader_workers": (0, 1), "train.epochs": (2, 5)}
    assert resume.describe(longer) == "data.loader_workers 0 -> 1, train.epochs 2 -> 5"
    with pytest.raises(ConfigError, match="model.encoder cannot change"):
        resume.checked_changes(saved, tiny_cfg("run.name=r", "model.encoder=resnet34"))


# ------------------------------------------------------------------------------------------ 2. names reserved
def test_a_run_name_is_reserved_by_the_first_fit_before_ray(tiny_cfg, tmp_path):
    cfg = tiny_cfg(f"run.storage_path={tmp_path}", "run.name=same", "tracking.enabled=false")
    first, folder, _, _ = train.prepare(cfg, None, None, False, None, None, custom_data=False)
    assert folder.name == "same" and (tmp_path / "same" / run_folder.RUN_CONFIG).is_file()
    with pytest.raises(UserError, match="a run named 'same' already exists"):
        train.prepare(cfg, None, None, False, None, None, custom_data=False)
    # the folder keeps the config the run trains, its name written in
    assert run_folder.RunFolder(str(tmp_path), "same").read_config() == first and first.run.name == "same"


def test_racing_reservations_of_one_name_give_it_to_exactly_one(tmp_path):
    won, lost = [], []
    start = threading.Barrier(8)

    def race():
        start.wait()
        try:
            won.append(run_folder.reserve(str(tmp_path), "contested"))
        except UserError:
            lost.append(1)

    threads = [threading.Thread(target=race) for _ in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert len(won) == 1 and len(lost) == 7


def test_default_names_differ_within_one_second(tmp_path):
    folders = [run_folder.reserve(str(tmp_path), None) for _ in range(30)]
    assert len({f.name for f in folders}) == 30 and all(f.name.startswith("fit-") for f in folders)


def test_a_failed_start_gives_the_name_back(tmp_path):
    folder = run_folder.reserve(str(tmp_path), "short-lived")
    folder.release()
    assert not (tmp_path / "short-lived").exists()
    assert run_folder.reserve(str(tmp_path), "short-lived").created


# -------------------------------------------------------------------------------------- 3. concurrent store
STORE_USER = """
import sys, pathlib
from raysegtrain import tracking
uri, go = sys.argv[1], pathlib.Path(sys.argv[2])
while not go.exists():  # all processes start creating the store together
    pass
run = tracking.create_run(uri, "raysegtrain", sys.argv[3])
tracking.end_run(uri, run, "FINISHED")
print("ok")
"""


def test_processes_creating_one_fresh_sqlite_store_at_once_all_succeed(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    go = tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    procs = [subprocess.Popen([sys.executable, "-c", STORE_USER, uri, str(go), f"run-{i}"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(3)]
    ready = tmp_path / "ready"
    ready.touch()
    go.touch()
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0 and out.strip() == "ok", err[-3000:]
        assert "Traceback" not in err
    c = tracking.client(uri)
    runs = c.search_runs([c.get_experiment_by_name("raysegtrain").experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["run-0", "run-1", "run-2"]


# -------------------------------------------------------------------------------------------- 5. said early/well
def test_unwritable_storage_path_is_one_line_before_ray(tmp_path, capsys, no_ray):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    rc = main(["fit", *TINY, f"run.storage_path={blocker}/runs", "tracking.enabled=false", "--no-progress"])
    line = _one_error_line(capsys)
    assert rc == 2 and f"run.storage_path {blocker}/runs cannot be written" in line, line


def test_a_refused_checkpoint_says_why_and_never_suggests_unsafe_loading(tmp_path):
    torch.save({"model": {}, "payload": os.system}, tmp_path / "checkpoint.pt")
    with pytest.raises(UserError) as e:
        load_checkpoint(tmp_path)
    msg = str(e.value)
    assert "posix.system" in msg and "\n" not in msg, msg
    assert "weights_only=False" not in msg and "weights_only` set to `False" not in msg, msg


def test_divergence_is_flagged_from_the_history(tiny_cfg):
    cfg = tiny_cfg()
    sane = [{"epoch": 1, "val_loss": 0.9, "val_recall_class_1": 0.0}, {"epoch": 2, "val_loss": 0.6}]
    assert run_health.divergence(cfg, sane) is None and run_health.divergence(cfg, []) is None
    blown = sane + [{"epoch": 3, "val_loss": 9.9e12, "val_recall_class_1": 0.0}]
    reason = run_health.divergence(cfg, blown)
    assert "val_loss 9.9e+12 at epoch 3" in reason and "background only" in reason


# ---------------------------------------------------------------------------------------------- 6. stale tags
def test_a_run_that_finishes_loses_the_error_of_an_earlier_attempt(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = tracking.create_run(uri, "raysegtrain", "retried")
    tracking.end_run(uri, run, "FAILED", {"error": "RuntimeError: worker died"})
    c = tracking.client(uri)
    tracking.reopen_run(c, run, {"resume_changes": "train.epochs 2 -> 3"})
    reopened = c.get_run(run)
    assert reopened.info.status == "RUNNING" and "error" not in reopened.data.tags
    assert reopened.data.tags["resume_changes"] == "train.epochs 2 -> 3"
    c.set_tag(run, "error", "a later hiccup")  # an error logged by an attempt that went on to finish
    tracking.end_run(uri, run, "FINISHED", {"stop_reason": "completed"})
    finished = c.get_run(run)
    assert finished.info.status == "FINISHED" and "error" not in finished.data.tags


def test_a_resumed_study_run_drops_its_interrupted_state(tmp_path):
    from raysegtrain.search_space.loading import load_space

    space_file = Path(__file__).resolve().parents[1] / "search_spaces" / "smoke.yaml"
    space = load_space(space_file, [f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"])
    first = study_tracking.open_study_run(space, space_file, "study", resume=False)
    tracking.end_run(first.uri, first.run_id, "KILLED", {"state": "interrupted: resume with --resume"})
    again = study_tracking.open_study_run(space, space_file, "study", resume=True)
    assert again.run_id == first.run_id
    run = tracking.client(again.uri).get_run(again.run_id)
    assert run.info.status == "RUNNING" and "state" not in run.data.tags
