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
from raysegtrain.train import fit

from .conftest import TINY


def _one_error_line(capsys) -> str:
    err = [ln for ln in capsys.readouterr().err.strip().splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


# ------------------------------------------------------------------------------------------- 1. resume's config
@pytest.mark.parametrize("given, refused", [
    (["model.arch=fpn"], "model.arch cannot change"),
    (["train.epochs=3", "data.root=/elsewhere"], "data.root cannot change"),
    (["my.yaml"], "drop 'my.yaml'"),
    (["train.epoch=3"], "unknown config key 'train.epoch' (did you mean 'train.epochs'?)"),
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
    folder = run_folder.reserve(str(tmp_path / "runs"), "short-lived")
    folder.release()
    assert not (tmp_path / "runs").exists()  # nor the storage folder made for it
    kept = run_folder.reserve(str(tmp_path / "runs"), "kept")
    (Path(kept.path) / "checkpoint_000").mkdir()  # a run that trained keeps its folder
    kept.release()
    assert (tmp_path / "runs" / "kept").is_dir()


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
    assert "refused by the safe loader" in msg and "posix.system" in msg and "\n" not in msg, msg
    assert "weights_only=False" not in msg and "weights_only` set to `False" not in msg, msg


def test_divergence_is_flagged_from_the_history(tiny_cfg):
    cfg = tiny_cfg()
    recall = f"val_recall_{cfg.data.names()[1]}"  # the synthetic set's foreground class
    sane = [{"epoch": 1, "val_loss": 0.9, recall: 0.0}, {"epoch": 2, "val_loss": 0.6}]
    assert run_health.divergence(cfg, sane) is None and run_health.divergence(cfg, []) is None
    blown = sane + [{"epoch": 3, "val_loss": 9.9e12, recall: 0.0}]
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


def test_hub_weights_unreachable_and_not_cached_are_one_line_before_ray(tmp_path, capsys, no_ray, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing answers
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    rc = main(["fit", *TINY, "model.encoder_weights=imagenet", f"run.storage_path={tmp_path}",
               "tracking.enabled=false", "--no-progress"])
    line = _one_error_line(capsys)
    assert rc == 2 and "model.encoder_weights='imagenet'" in line and "cannot be reached" in line, line
    assert not list(tmp_path.glob("fit-*")), "a run folder was left for a run that never started"


# ----------------------------------------------------------------------------------------- end to end (Ray)
class Diverge(Hook):
    """Makes every validation read like a run whose logits ran away (a huge loss, finite)."""

    def after_epoch(self, metrics):
        if "val_loss" in metrics:
            metrics["val_loss"] = 9.9e12


def test_resume_trains_the_runs_own_config_and_records_what_changed(tiny_cfg, tmp_path, ray_local, capsys):
    storage, uri = tmp_path / "runs", f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = tiny_cfg("scaling.use_gpu=false", "train.epochs=1", "run.name=own", f"run.storage_path={storage}",
                   f"tracking.tracking_uri={uri}", "data.synthetic.num_train=8", "tracking.num_overlays=0")
    first = fit(cfg, hooks=[Diverge()])
    assert first.warnings and "val_loss 9.9e+12 at epoch 1" in first.warnings[0], first.warnings
    c = tracking.client(uri)
    assert "val_loss 9.9e+12" in c.get_run(first.mlflow_run_id).data.tags["diverged"]
    capsys.readouterr()

    # the command line names nothing of the run's config: the run's own comes back, with the one safe change
    rc = main(["fit", "--resume", "own", f"run.storage_path={storage}", "train.epochs=2", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 0, err[-3000:]
    assert "changed: train.epochs 1 -> 2" in err and "Traceback" not in err
    run = c.get_run(first.mlflow_run_id)
    assert run.info.status == "FINISHED" and run.data.tags["resume_changes"] == "train.epochs 1 -> 2"
    assert "diverged" not in run.data.tags  # the end of the first attempt no longer describes the run
    assert sorted(m.step for m in c.get_metric_history(first.mlflow_run_id, "val_iou")) == [1, 2]
    state = load_checkpoint(sorted((storage / "own").glob("checkpoint_*/checkpoint.pt"))[-1])
    trained = state["config"]
    assert state["epoch"] == 2 and trained["model"]["encoder"] == "resnet18"
    assert trained["data"]["synthetic"]["num_train"] == 8 and trained["data"]["image_size"] == 64
    # data.augment: auto was resolved when the run started (8 training images: light); the resume trains that
    assert trained["data"]["augment"] == "light" and "data.augment=auto" not in err
    assert run_folder.RunFolder(str(storage), "own").read_config().train.epochs == 2  # a later resume goes on


LISTENING = """
import json, os, sys
from pathlib import Path

import psutil

from raysegtrain import config
from raysegtrain.hooks import Hook
from raysegtrain.train import fit


class ListListening(Hook):
    # in the worker, while the run trains: every listening socket of the driver's Ray processes
    def __init__(self, driver, out):
        self.driver, self.out = driver, out

    def after_epoch(self, metrics):
        found = []
        for p in psutil.Process(self.driver).children(recursive=True):
            try:
                found += [[p.name(), c.laddr.ip, c.laddr.port] for c in p.net_connections(kind="inet")
                          if c.status == psutil.CONN_LISTEN]
            except psutil.Error:
                pass
        Path(self.out).write_text(json.dumps({"listening": found, "master_port": os.environ.get("MASTER_PORT")}))


fit(config.load(None, sys.argv[2:]), hooks=[ListListening(os.getpid(), sys.argv[1])])
"""


def test_a_local_fit_listens_on_loopback_only(tiny_cfg, tmp_path):
    import ipaddress
    import json
    import tempfile

    out = tmp_path / "listening.json"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
           "RAY_TMPDIR": tempfile.mkdtemp(prefix="rst")}  # Ray's socket paths must stay under 107 bytes
    env.pop("RAY_ADDRESS", None)
    p = subprocess.run([sys.executable, "-c", LISTENING, str(out), *TINY, "train.epochs=1", "scaling.use_gpu=false",
                        f"run.storage_path={tmp_path / 'runs'}", "tracking.enabled=false"],
                       env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    seen = json.loads(out.read_text())
    listening = seen["listening"]
    names = {name for name, _, _ in listening}
    assert "gcs_server" in names and "raylet" in names, listening
    # PyTorch's rendezvous store (rank 0's TCPStore on MASTER_PORT, for the run's process group) binds every
    # interface whatever the address it is given: it is PyTorch's, not Ray's, and lives while the workers train
    ray_own = [s for s in listening if str(s[2]) != seen["master_port"]]
    exposed = [s for s in ray_own if not ipaddress.ip_address(s[1].removeprefix("::ffff:")).is_loopback]
    assert not exposed, exposed


def test_a_local_ray_that_cannot_start_is_one_line_naming_its_logs(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "RAY_TMPDIR": str(blocker)}
    env.pop("RAY_ADDRESS", None)
    p = subprocess.run([sys.executable, "-m", "raysegtrain", "fit", *TINY, f"run.storage_path={tmp_path / 'runs'}",
                        "tracking.enabled=false", "--no-progress"], env=env, cwd=tmp_path, capture_output=True,
                       text=True, timeout=600)
    lines = [ln for ln in p.stderr.strip().splitlines()
             if ln.strip() and not ln.startswith("generating the synthetic dataset ")]
    assert p.returncode == 1 and len(lines) == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert lines[0].startswith("error: Ray could not start on this machine"), lines
    assert f"its logs are in {blocker}/ray/session_latest/logs" in lines[0], lines
    assert not (tmp_path / "runs").exists(), "a run that never started left its folder"
