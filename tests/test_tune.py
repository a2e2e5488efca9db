"""`tune` on a real local Ray: OptunaSearch + ASHA over fit trials, MLflow parent/child runs, resume."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import yaml

from raysegtrain import config, tracking
from raysegtrain.errors import ConfigError, UserError
from raysegtrain.train import fit
from raysegtrain.study_tracking import STUDY_TAG, TRIAL_TAG
from raysegtrain.tune import run_study

SMOKE = Path(__file__).resolve().parents[1] / "search_spaces" / "smoke.yaml"


def _settings(tmp_path):
    return [f"run.storage_path={tmp_path / 'runs'}", f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"]


@pytest.fixture(scope="module")
def smoke_study(tmp_path_factory, ray_local):
    """The shipped smoke study, run once for the tests of this module that read what it recorded."""
    tmp_path = tmp_path_factory.mktemp("smoke")
    return run_study(SMOKE, _settings(tmp_path), live=False)


def test_smoke_study_asha_mlflow_and_best_config(smoke_study):
    result = smoke_study
    rows = result.leaderboard
    assert len(rows) >= 6 and not result.interrupted
    states = [r["state"] for r in rows]
    assert any(s.startswith("stopped by ASHA") for s in states), states
    assert any(s == "completed" for s in states), states
    # the binary objective is the foreground IoU (an all-background model cannot win it); every row says whether
    # its model is degenerate
    assert "val_fg_iou" in rows[0] and "val_iou" not in rows[0] and all("note" in r for r in rows)
    assert result.best_value == max(r["val_fg_iou"] for r in rows if r["val_fg_iou"] is not None)
    assert (Path(result.path) / "leaderboard.csv").read_text().count("\n") == len(rows) + 1

    c = tracking.client(result.tracking_uri)
    parent = c.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["best_trial_id"] == result.best_trial
    # the study run's params and tags are the study's, not its base config's
    assert parent.data.params["study.num_samples"] == "6" and "space.optim/lr" in parent.data.params
    assert "model.arch" not in parent.data.params and "architecture" not in parent.data.tags
    assert parent.data.tags["objective"] == "val_fg_iou (max)"
    assert c.get_experiment(parent.info.experiment_id).name == "raysegtrain/smoke"  # a study's own experiment
    names = {a.path for a in c.list_artifacts(result.parent_run_id)}
    assert {"leaderboard.csv", "best_config.yaml", "base_config.yaml", "study", "optuna"} <= names
    assert {"optuna/optimization_history.png", "optuna/parallel_coordinate.png"} <= \
        {a.path for a in c.list_artifacts(result.parent_run_id, "optuna")}
    children = c.search_runs([parent.info.experiment_id],
                             filter_string=f"tags.`mlflow.parentRunId` = '{result.parent_run_id}'")
    assert len(children) == len(rows)
    assert len({ch.data.tags[TRIAL_TAG] for ch in children}) == len(rows)
    by_trial = {ch.data.tags[TRIAL_TAG]: ch for ch in children}
    winner_run = by_trial[result.best_trial]
    assert parent.data.tags["best_trial"] == winner_run.info.run_name
    assert parent.data.tags["best_trial_run_id"] == winner_run.info.run_id
    assert winner_run.data.tags["study_rank"] == "1"
    assert winner_run.data.metrics["best_val_fg_iou"] == pytest.approx(result.best_value)
    dashboard = parent.data.tags["mlflow.note.content"]
    assert f"[{winner_run.info.run_name}](#/experiments/{parent.info.experiment_id}/runs/{winner_run.info.run_id}" \
           f"?workflowType=machine_learning)" in dashboard
    assert sum(ln.startswith("| ") for ln in dashboard.splitlines()) == len(rows) + 1
    for i, ch in enumerate(sorted(children, key=lambda ch: ch.info.start_time), 1):
        assert ch.info.status == "FINISHED"
        assert c.get_metric_history(ch.info.run_id, "val_fg_iou"), ch.data.tags[TRIAL_TAG]
        # `01 unet/resnet18 lr=1e-3 ...`: what the trial is; each sampled value logged once, as the config's param
        number, model = ch.info.run_name.split(" ")[:2]
        assert model == f"{ch.data.params['model.arch']}/{ch.data.params['model.encoder']}" and len(number) == 2
        assert not any(k.startswith("sampled.") for k in ch.data.params)
        assert ch.data.tags["outcome"] in ("completed", "pruned")
        assert ch.data.metrics["pruned"] == float(ch.data.tags["outcome"] == "pruned")
        assert ch.data.tags["mlflow.note.content"].startswith(ch.data.tags["outcome"])
        assert "system/trial_startup_s" in ch.data.metrics and "trial_startup_s" not in ch.data.metrics
    # checkpoints.mlflow: top (3): the three best trials' best weights, weights only, in their runs; on disk only
    # those three checkpoints are left once the study has finished
    from raysegtrain.checkpoint import load_checkpoint

    top = [r["trial_id"] for r in rows[:3]]
    logged = {ch.data.tags[TRIAL_TAG] for ch in children
              if any(a.path == "best_checkpoint" for a in c.list_artifacts(ch.info.run_id))}
    assert logged == set(top), (logged, top)
    winner = next(ch for ch in children if ch.data.tags[TRIAL_TAG] == result.best_trial)
    weights = load_checkpoint(c.download_artifacts(winner.info.run_id, "best_checkpoint"))
    assert "model" in weights and "optimizer" not in weights and weights["best_value"] == result.best_value
    assert len([p for p in Path(result.path).rglob("checkpoint_*") if p.is_dir()]) == 3
    stopped = [ch for ch in children if ch.data.tags["state"].startswith("stopped by ASHA")]
    assert stopped and all(len(c.get_metric_history(ch.info.run_id, "val_fg_iou")) < 3 for ch in stopped)
    # the smoke set has a test split: the chosen trial was evaluated on it once, after the study
    assert result.final_test["trial_id"] == result.best_trial and "test_fg_iou" in parent.data.metrics
    assert [ch.data.tags.get("study_rank") for ch in children].count("1") == 1

    # the best config is a fit config as it stands, and reruns to the same number (CPU, same seed)
    best_cfg = config.load(result.best_config_path, ["run.name=rerun"])
    rerun = fit(best_cfg)
    assert rerun.best_value == pytest.approx(result.best_value, abs=1e-4)


def test_ui_link_opens_the_study_in_a_real_mlflow_server(smoke_study, tmp_path):
    """`raysegtrain ui` against the smoke study's store: the study link it prints opens MLflow's training view on a
    saved view that the real server holds (the study's trials, best first, with their columns), checked over HTTP
    the way the UI's page reads it."""
    import json
    import socket
    import subprocess
    import sys
    import urllib.request
    from urllib.parse import parse_qs, urlsplit

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "raysegtrain", "ui", "--port", str(port), "--tracking-uri",
                             smoke_study.tracking_uri], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        line, seen = "", []
        while "/#/" not in line and proc.poll() is None:  # MLflow's own lines come first, then `runs: LINK`
            line = proc.stdout.readline()
            seen.append(line)
        line = proc.stdout.readline()  # then `study NAME: LINK` (a server's access-log line may come between)
        while "HTTP/1.1" in line:
            line = proc.stdout.readline()
        assert line.strip().startswith("study smoke: "), "".join(seen[-30:]) + line
        link = line.split(": ", 1)[1].strip()
        base = f"http://127.0.0.1:{port}"
        assert link.startswith(f"{base}/#/experiments/")
        # printed only once the server answers: one request, no waiting
        assert urllib.request.urlopen(f"{base}/health", timeout=10).status == 200
        route = urlsplit(urlsplit(link).fragment)
        query = parse_qs(route.query)
        assert query["workflowType"] == ["machine_learning"]
        experiment_id, key = route.path.split("/")[2], query["viewStateShareKey"][0]

        # the UI build that this server ships reads both parameters (a canary for MLflow upgrades)
        index = urllib.request.urlopen(f"{base}/", timeout=10).read().decode()
        main_js = next(p for p in index.split('"') if "static/js/main." in p and p.endswith(".js"))
        bundle = urllib.request.urlopen(f"{base}/{main_js}", timeout=30).read().decode()
        assert 'get("workflowType")' in bundle and "mlflow.sharedViewState." in bundle

        def api(path, body=None):
            data = json.dumps(body).encode() if body is not None else None
            req = urllib.request.Request(f"{base}/ajax-api/2.0/mlflow/{path}", data=data,
                                         headers={"Content-Type": "application/json"})
            return json.loads(urllib.request.urlopen(req, timeout=30).read())

        tags = {t["key"]: t["value"] for t in
                api(f"experiments/get?experiment_id={experiment_id}")["experiment"].get("tags", [])}
        view = json.loads(tags[f"mlflow.sharedViewState.{key}"])
        for column in ("metrics.`best_val_fg_iou`", "tags.`outcome`",
                       "params.`model.arch`", "params.`model.encoder`", "params.`optim.lr`"):
            assert column in view["selectedColumns"], column
        # the view's search, as the runs table sends it: the study's trials only, best first
        found = api("runs/search", {"experiment_ids": [experiment_id], "filter": view["searchFilter"],
                                    "order_by": [view["orderByKey"] + " DESC"], "max_results": 100})["runs"]
        assert len(found) == len(smoke_study.leaderboard)
        first = found[0]["data"]
        assert view["orderByKey"] == "metrics.`best_val_fg_iou`"  # the smoke study's objective
        best = {m["key"]: m["value"] for m in first["metrics"]}["best_val_fg_iou"]
        assert best == pytest.approx(smoke_study.best_value)  # the winner, or a trial tied with it
        assert {"model.arch", "model.encoder", "optim.lr"} <= {p["key"] for p in first["params"]}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_bad_space_fails_before_ray(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"base": {}, "space": {"model.arch": {"choice": []}}}))
    with pytest.raises(ConfigError, match="model.arch"):
        run_study(bad, _settings(tmp_path))
    assert not (tmp_path / "mlflow.db").exists()  # nothing was started or written


def test_existing_study_name_needs_resume(tmp_path, ray_local):
    (tmp_path / "runs" / "smoke").mkdir(parents=True)
    with pytest.raises(UserError, match="already exists"):
        run_study(SMOKE, _settings(tmp_path), live=False)
    with pytest.raises(UserError, match="no study named 'other'"):
        run_study(SMOKE, _settings(tmp_path), name="other", resume=True, live=False)


def _completed_trials(db: Path) -> int:
    import sqlite3

    if not db.exists():
        return 0
    try:
        with sqlite3.connect(db) as con:
            return con.execute("select count(*) from runs r join tags t on r.run_uuid = t.run_uuid "
                               f"where t.key = '{TRIAL_TAG}' and r.status = 'FINISHED'").fetchone()[0]
    except sqlite3.Error:
        return 0


def test_interrupt_then_resume_completes_without_duplicates(tmp_path, ray_local):
    """Ctrl-C (SIGINT to this process) once two trials have finished, then --resume."""
    import threading

    db, finished = tmp_path / "mlflow.db", threading.Event()

    def interrupt_after_two_trials():
        while not finished.is_set():
            if _completed_trials(db) >= 2:  # an observable condition, polled; bounded by the study itself
                os.kill(os.getpid(), signal.SIGINT)
                return
            finished.wait(1)

    threading.Thread(target=interrupt_after_two_trials, daemon=True).start()
    try:
        first = run_study(SMOKE, _settings(tmp_path), live=False)
    finally:
        finished.set()
    assert first.interrupted and first.leaderboard == []
    c = tracking.client(f"sqlite:///{db}")
    cut = c.search_runs([c.get_experiment_by_name("raysegtrain/smoke").experiment_id],
                        filter_string=f"tags.`{TRIAL_TAG}` != ''")
    assert cut and all(r.info.status in ("FINISHED", "KILLED") for r in cut)  # none left RUNNING
    assert all(r.data.tags["state"].startswith("stopped: interrupted at epoch ")
               for r in cut if r.info.status == "KILLED")

    second = run_study(SMOKE, _settings(tmp_path), resume=True, live=False)
    assert not second.interrupted and len(second.leaderboard) == 6
    c = tracking.client(f"sqlite:///{db}")
    exp = c.get_experiment_by_name("raysegtrain/smoke").experiment_id
    parents = c.search_runs([exp], filter_string=f"tags.`{STUDY_TAG}` = 'smoke' and tags.`raysegtrain.kind` = 'study'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = c.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{parents[0].info.run_id}'")
    trial_ids = [ch.data.tags[TRIAL_TAG] for ch in children]
    assert len(trial_ids) == len(set(trial_ids)) == 6
    assert all(ch.info.status == "FINISHED" for ch in children)


class FailFocalTrials:
    """A worker hook that crashes every trial of the dice+focal loss mix in its first step."""

    trainer = None

    def before_train(self): ...

    def before_epoch(self): ...

    def after_epoch(self, metrics): ...

    def after_train(self): ...

    def after_step(self, info):
        if self.trainer.cfg.loss.focal > 0:
            raise ValueError("simulated crash in a focal trial")


def test_failed_trials_are_recorded_and_the_study_goes_on(tmp_path, ray_local, capfd):
    from raysegtrain.hooks import Hook

    hook = type("FailFocal", (FailFocalTrials, Hook), {})()
    result = run_study(SMOKE, _settings(tmp_path) + ["budget.num_samples=4", "asha.max_epochs=1",
                                                     "space.loss_mix={branch: {dice_focal: {loss.dice: 0.5, "
                                                     "loss.focal: 1.0}, dice_bce: {loss.dice: 0.5, loss.bce: 0.5}}}"],
                       live=False, hooks=[hook])
    rows = result.leaderboard
    failed = [r for r in rows if r["state"].startswith("failed")]
    ok = [r for r in rows if not r["state"].startswith("failed")]
    assert len(rows) == 4 and failed and ok, [r["state"] for r in rows]
    assert all("simulated crash in a focal trial" in r["state"] for r in failed)
    assert all(r["param.loss.focal"] == 1.0 for r in failed)
    # each failed trial is one line on stderr, naming where its details are; no traceback
    err = capfd.readouterr().err
    said = [ln for ln in err.splitlines() if " failed: " in ln]
    assert len(said) == len(failed) and "Traceback" not in err, err[-3000:]
    assert all("simulated crash in a focal trial" in ln and "(details: " in ln for ln in said), said
    c = tracking.client(result.tracking_uri)
    children = c.search_runs([c.get_run(result.parent_run_id).info.experiment_id],
                             filter_string=f"tags.`mlflow.parentRunId` = '{result.parent_run_id}'")
    by_status = {}
    for ch in children:
        by_status.setdefault(ch.info.status, []).append(ch)
    assert len(by_status["FAILED"]) == len(failed)
    assert all("simulated crash" in ch.data.tags["state"] for ch in by_status["FAILED"])
    study = c.get_run(result.parent_run_id)
    assert study.info.status == "FINISHED" and study.data.tags["state"] == "finished"


def test_placement_groups_of_dead_trial_controllers_are_released(ray_local):
    """A trial stopped by ASHA dies with its Train controller, whose placement group GCS keeps until the job ends.
    The study's callback releases exactly those groups: not a live actor's, not the driver's own."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    from raysegtrain.ray_internal import orphaned_placement_groups
    from raysegtrain.tune import ReleaseOrphanedPlacementGroups

    @ray.remote(num_cpus=0)
    class Controller:
        def reserve(self):
            pg = placement_group([{"CPU": 0.25}])
            ray.get(pg.ready())
            return pg.id.hex()

    dead, alive = Controller.remote(), Controller.remote()
    dead_pg, alive_pg = ray.get([dead.reserve.remote(), alive.reserve.remote()])
    drivers = placement_group([{"CPU": 0.25}])
    ray.get(drivers.ready())
    assert orphaned_placement_groups() == []
    ray.kill(dead)
    deadline = time.monotonic() + 60
    while not orphaned_placement_groups() and time.monotonic() < deadline:  # GCS learns of the death
        time.sleep(0.05)
    assert [pg.id.hex() for pg in orphaned_placement_groups()] == [dead_pg]

    release = ReleaseOrphanedPlacementGroups(interval_s=0)
    release.on_step_begin(0, [])
    table = ray.util.placement_group_table()
    assert release.released == 1 and table[dead_pg]["state"] == "REMOVED"
    assert table[alive_pg]["state"] == "CREATED" and table[drivers.id.hex()]["state"] == "CREATED"
    remove_placement_group(drivers)
    ray.kill(alive)
