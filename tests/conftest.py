"""Shared fixtures: a tiny config on a tiny synthetic dataset, one local Ray per test session, a private cache."""

from __future__ import annotations

import os

import pytest

from raysegtrain import config

TINY = [
    "data.synthetic.size=64", "data.synthetic.num_train=12", "data.synthetic.num_val=6", "data.synthetic.num_test=4",
    "data.image_size=64", "model.encoder=resnet18", "train.batch_size=4", "train.epochs=2", "optim.lr=1e-3",
    "data.loader_workers=0", "tracking.num_overlays=2", "train.early_stopping.patience=null",
]


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    """Synthetic data is generated into a per-session cache, never into the user's."""
    os.environ["RAYSEGTRAIN_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    yield


@pytest.fixture
def no_ray(monkeypatch):
    """Fails the test if fit gets as far as starting Ray."""

    def start_ray(*args, **kwargs):
        raise AssertionError("Ray was started")

    from raysegtrain import train

    monkeypatch.setattr(train, "start_ray", start_ray)


@pytest.fixture
def tiny_cfg():
    def make(*overrides: str, **kw):
        return config.load(None, [*TINY, *overrides])

    return make


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance (4 logical CPUs so 2 workers + a trial driver fit on a 2-core machine)."""
    import ray

    if not ray.is_initialized():
        # the dashboard stays on (Ray default): without its agent, workers of ASHA-stopped trials are not cleaned up
        ray.init(num_cpus=4, num_gpus=0, log_to_driver=False, logging_level="ERROR")
    yield ray
    ray.shutdown()


def interrupted_then_resumed(cfg, folder) -> None:
    """Train CFG (2 epochs or more) into FOLDER as a run "interrupted" after its first epoch (a hook stops it once
    that epoch's checkpoint is written), then resumed from that checkpoint to the end."""
    from raysegtrain.checkpoint import load_checkpoint
    from raysegtrain.engine import SegmentationTrainer, train_local
    from raysegtrain.hooks import Hook, LocalCheckpointHook, StopTraining

    class StopAfterOne(Hook):
        def after_epoch(self, metrics):
            raise StopTraining("simulated interruption")

    SegmentationTrainer(cfg, [LocalCheckpointHook(folder), StopAfterOne()]).fit()  # checkpoint, stop
    assert load_checkpoint(folder / "last")["epoch"] == 1
    train_local(cfg, folder, resume=True)
