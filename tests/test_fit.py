"""`fit` on a real local Ray cluster: 2 CPU workers (gloo DDP), real MLflow store, real checkpoints."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from raysegtrain import tracking
from raysegtrain.checkpoint import load_checkpoint
from raysegtrain.errors import TrainingError, UserError
from raysegtrain.evaluate import evaluate_checkpoint
from raysegtrain.hooks import Hook
from raysegtrain.train import fit

TWO_WORKERS = ["scaling.num_workers=2", "scaling.use_gpu=false", "data.synthetic.num_val=7"]


def _cfg(tiny_cfg, tmp_path, *extra):
    return tiny_cfg(*TWO_WORKERS, f"run.storage_path={tmp_path / 'runs'}",
                    f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", *extra)


def test_fit_two_workers_tracks_everything_and_ddp_val_equals_single_process(tiny_cfg, tmp_path, ray_local, capsys):
    cfg = _cfg(tiny_cfg, tmp_path, "run.name=two")
    result = fit(cfg)
    # data.augment: auto, said and recorded as the preset it chose for the tiny set's 12 training images
    assert "data.augment=auto: light (12 training images, fewer than 64)" in capsys.readouterr().err
    assert result.run_name == "two" and result.best_checkpoint and result.mlflow_run_id
    assert [h["epoch"] for h in result.history] == [1, 2]
    # the first epoch says where the start-up went; the parts add up to the whole
    first = result.history[0]
    parts = ("startup_driver_s", "startup_workers_s", "startup_setup_s", "startup_first_batch_s")
    assert all(first[k] >= 0 for k in parts)
    assert sum(first[k] for k in parts) == pytest.approx(first["first_step_s"], abs=1e-6)
    stages = {k: first[f"startup_driver_{k}_s"] for k in ("imports", "checks", "ray", "tracking", "trainer")}
    assert all(v >= 0 for v in stages.values()) and stages["checks"] > 0  # the model check builds a model
    assert sum(stages.values()) == pytest.approx(first["startup_driver_s"], abs=1e-6)
    assert "first_step_s" not in result.history[1]
    assert all(0 <= h["data_wait_share"] <= 1 for h in result.history)

    c = tracking.client(result.tracking_uri)
    run = c.get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["model.encoder"] == "resnet18" and run.data.params["scaling.num_workers"] == "2"
    assert run.data.params["data.augment"] == "light"
    assert run.data.tags["architecture"] == "unet" and "torch_version" in run.data.tags
    iou = c.get_metric_history(result.mlflow_run_id, "val_iou")
    assert sorted(m.step for m in iou) == [1, 2]
    for key in ("train_loss", "val_loss", "val_dice", "val_precision", "val_recall", "lr", "system/images_per_s",
                "system/epoch_time_s", "val_iou_defect", "system/data_wait_share", "system/first_step_s",
                "system/startup_workers_s"):
        assert c.get_metric_history(result.mlflow_run_id, key), key
    assert not any(k.startswith(("startup_", "epoch_time")) for k in run.data.metrics)  # only under system/
    artifacts = {a.path for a in c.list_artifacts(result.mlflow_run_id)}
    artifacts |= {a.path for a in c.list_artifacts(result.mlflow_run_id, "plots")}
    artifacts |= {a.path for a in c.list_artifacts(result.mlflow_run_id, "best_checkpoint")}
    assert {"config.yaml", "plots/curves.png", "plots/confusion_matrix.png", "plots/overlays.png",
            "best_checkpoint/checkpoint.pt"} <= artifacts

    # the best checkpoint, evaluated by one process, reproduces the val IoU that 2 DDP workers logged
    state = load_checkpoint(result.best_checkpoint)
    logged = {m.step: m.value for m in iou}[state["epoch"]]
    single = evaluate_checkpoint(result.best_checkpoint)
    assert single["val_iou"] == pytest.approx(logged, abs=1e-6)
    fg = {m.step: m.value for m in c.get_metric_history(result.mlflow_run_id, "val_fg_iou")}[state["epoch"]]
    assert result.best_value == pytest.approx(fg, abs=1e-6) == pytest.approx(single["val_fg_iou"], abs=1e-6)

    # the artifact copy in MLflow loads too, weights-only: the resumable state stays in the run's own storage
    local = c.download_artifacts(result.mlflow_run_id, "best_checkpoint", str(tmp_path / "dl"))
    logged_state = load_checkpoint(local)
    assert logged_state["epoch"] == state["epoch"] and "optimizer" in state and "optimizer" not in logged_state
    assert all(torch.equal(logged_state["model"][k], v) for k, v in state["model"].items())
    assert os.path.getsize(Path(local) / "checkpoint.pt") < 0.5 * os.path.getsize(Path(result.best_checkpoint) /
                                                                                  "checkpoint.pt")


class KillOnce(Hook):
    """Kill this worker process (SIGKILL, no cleanup) in epoch EPOCH on rank RANK, the first time only."""

    def __init__(self, marker: str, epoch: int = 1, rank: int = 1):
        self.marker, self.epoch, self.rank = marker, epoch, rank

    def after_step(self, info):
        if info.epoch == self.epoch and self.trainer.rank == self.rank and not os.path.exists(self.marker):
            Path(self.marker).write_text("killed")
            os.kill(os.getpid(), signal.SIGKILL)


def test_killed_worker_restarts_from_last_checkpoint(tiny_cfg, tmp_path, ray_local):
    cfg = _cfg(tiny_cfg, tmp_path, "run.name=kill", "run.max_failures=1", "train.epochs=3")
    marker = tmp_path / "killed"
    result = fit(cfg, hooks=[KillOnce(str(marker), epoch=1)])
    assert marker.exists()
    assert [h["epoch"] for h in result.history] == [1, 2, 3]
    assert load_checkpoint(result.last_checkpoint)["epoch"] == 3


def test_interrupted_run_resumes_by_name_and_new_runs_never_reuse_it(tiny_cfg, tmp_path, ray_local):
    cfg = _cfg(tiny_cfg, tmp_path, "run.name=resumable", "train.epochs=2")
    marker = tmp_path / "killed"
    with pytest.raises(TrainingError):
        fit(cfg, hooks=[KillOnce(str(marker), epoch=1)])
    with pytest.raises(UserError, match="already exists"):
        fit(cfg)
    result = fit(cfg, resume="resumable")
    assert [h["epoch"] for h in result.history] == [1, 2]
    c = tracking.client(result.tracking_uri)
    runs = c.search_runs([c.get_experiment_by_name("raysegtrain").experiment_id],
                         filter_string="attributes.run_name = 'resumable'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert sorted(m.step for m in c.get_metric_history(result.mlflow_run_id, "val_iou")) == [1, 2]
    with pytest.raises(UserError, match="no run named 'nope'"):
        fit(cfg, resume="nope")


def test_worker_exception_surfaces_as_one_line(tiny_cfg, tmp_path, ray_local):
    class Boom(Hook):
        def after_step(self, info):
            raise ValueError("boom in the worker")

    with pytest.raises(TrainingError, match="ValueError: boom in the worker"):
        fit(_cfg(tiny_cfg, tmp_path, "run.name=boom"), hooks=[Boom()])
    c = tracking.client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = c.search_runs([c.get_experiment_by_name("raysegtrain").experiment_id])
    assert runs[0].info.status == "FAILED" and "boom" in runs[0].data.tags["error"]


def _cli(*args, cwd, env_extra=None):
    # Ray's socket paths must stay under 107 bytes: a short temp dir per call, linked from CWD for the assertions
    import tempfile

    raytmp = tempfile.mkdtemp(prefix="rst")
    os.rmdir(raytmp)
    (cwd / "raytmp").symlink_to(raytmp)
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # the default store is the subject
    env = {**env, "RAY_TMPDIR": raytmp, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "raysegtrain", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.parametrize("args, message", [
    (["model.encoder=resnet1000"], "resnet1000"),
    (["model.archh=unet"], "unknown key 'model.archh'"),
    (["data.root=/does/not/exist"], "/does/not/exist"),
    (["scaling.use_gpu=true"], "no GPU"),
    (["optim.lr=0"], "optim.lr"),
])
def test_bad_input_exits_2_with_one_line_before_any_worker(args, message, tmp_path):
    p = _cli("fit", *args, "--no-progress", cwd=tmp_path)
    assert p.returncode == 2, p.stderr
    # the GPU check comes after the data check, which may generate the synthetic set first: a progress line
    progress = "generating the synthetic dataset "
    lines = [ln for ln in p.stderr.strip().splitlines() if ln.strip() and not ln.startswith(progress)]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], p.stderr
    assert "Traceback" not in p.stderr
    if "use_gpu" not in args[0]:  # only the GPU check needs to ask Ray what the cluster has
        assert not (tmp_path / "raytmp").resolve().exists(), "Ray was started for a mistake found before it"


def test_cli_fit_runs_end_to_end(tmp_path, tiny_cfg):
    from tests.conftest import TINY

    p = _cli("fit", *TINY, "scaling.num_workers=2", "scaling.use_gpu=false", "run.name=cli", cwd=tmp_path,
             env_extra={"RAYSEGTRAIN_CACHE": os.environ["RAYSEGTRAIN_CACHE"]})
    assert p.returncode == 0, p.stderr[-3000:]
    assert "best val_fg_iou" in p.stderr and "MLflow run" in p.stderr
    assert "on cpu (CPU) x 2 worker(s), fp32" in p.stderr and "epoch 2/2" in p.stderr
    assert (tmp_path / "mlflow.db").exists() and (tmp_path / "runs" / "cli").is_dir()


def test_resources_are_checked_unless_the_autoscaler_is_to_add_them(tiny_cfg, ray_local):
    from raysegtrain.errors import ResourceError
    from raysegtrain.ray_support import ray_scaling

    with pytest.raises(ResourceError, match="no GPU"):
        ray_scaling(tiny_cfg("scaling.use_gpu=true"))
    with pytest.raises(ResourceError, match="need 64 CPUs"):
        ray_scaling(tiny_cfg("scaling.num_workers=64"))
    waiting = ray_scaling(tiny_cfg("scaling.num_workers=64", "scaling.wait_for_resources=true"))
    assert waiting.num_workers == 64 and waiting.use_gpu and waiting.resources_per_worker == {"CPU": 1.0, "GPU": 1.0}
