"""The shared loop in one process (no Ray): learning, checkpoints, exact resume, NaN stop, early stop, freezing."""

import math

import pytest
import torch

from raysegtrain.engine import (Hook, SegmentationTrainer, load_checkpoint, save_checkpoint, train_local)
from raysegtrain.errors import TrainingError, UserError


class Record(Hook):
    def __init__(self):
        self.epochs, self.steps = [], 0

    def after_step(self, info):
        self.steps += 1

    def after_epoch(self, metrics):
        self.epochs.append(dict(metrics))


def test_two_epochs_lower_the_loss_and_write_checkpoints(tiny_cfg, tmp_path):
    rec = Record()
    cfg = tiny_cfg("train.epochs=3", "optim.lr=3e-3")
    summary = train_local(cfg, tmp_path, hooks=[rec])
    assert summary["epochs"] == 3 and summary["stop_reason"] == "completed"
    losses = [m["train_loss"] for m in rec.epochs]
    assert losses[-1] < losses[0]
    assert all(0.0 <= m["val_iou"] <= 1.0 for m in rec.epochs)
    assert rec.steps == 3 * 3  # 12 images / batch 4
    best, last = load_checkpoint(tmp_path / "best"), load_checkpoint(tmp_path / "last")
    assert last["epoch"] == 3 and 1 <= best["epoch"] <= 3
    assert best["best_value"] == pytest.approx(max(m["val_iou"] for m in rec.epochs))
    assert last["config"]["model"]["encoder"] == "resnet18"


@pytest.mark.parametrize("workers", [0, 2])
def test_two_epochs_equal_one_plus_resume(tiny_cfg, tmp_path, workers):
    # with loader workers, epoch 2's batches are prefetched during epoch 1's validation in the straight run
    cfg = tiny_cfg("train.epochs=2", "schedule.name=cosine", "schedule.warmup_epochs=0.5",
                   f"data.loader_workers={workers}")
    train_local(cfg, tmp_path / "straight")
    # "interrupted" after one epoch: a run whose config says 2 epochs, stopped by a hook after the first
    from raysegtrain.engine import StopTraining

    class StopAfterOne(Hook):
        def after_epoch(self, metrics):
            raise StopTraining("simulated interruption")

    trainer = SegmentationTrainer(cfg, [StopAfterOne()])
    from raysegtrain.engine import LocalCheckpointHook

    trainer.register(LocalCheckpointHook(tmp_path / "split"))
    trainer.hooks.reverse()  # checkpoint first, then stop
    trainer.fit()
    assert load_checkpoint(tmp_path / "split" / "last")["epoch"] == 1
    train_local(cfg, tmp_path / "split", resume=True)

    a = load_checkpoint(tmp_path / "straight" / "last")
    b = load_checkpoint(tmp_path / "split" / "last")
    assert b["epoch"] == 2
    for k, v in a["model"].items():
        if v.is_floating_point():
            torch.testing.assert_close(b["model"][k], v, rtol=1e-5, atol=1e-6, msg=k)
    assert a["history"][-1]["val_iou"] == pytest.approx(b["history"][-1]["val_iou"], abs=1e-6)


def test_loader_workers_and_prefetching_change_no_result(tiny_cfg, tmp_path):
    """Augmentation is seeded per sample, so 2 persistent workers that start each epoch's batches during the
    previous epoch's validation train exactly what the main process alone trains."""
    runs = {}
    for workers in (0, 2):
        rec = Record()
        train_local(tiny_cfg("train.epochs=3", f"data.loader_workers={workers}"), tmp_path / str(workers),
                    hooks=[rec])
        runs[workers] = (load_checkpoint(tmp_path / str(workers) / "last"), rec.epochs)
    (a, ea), (b, eb) = runs[0], runs[2]
    for k, v in a["model"].items():
        if v.is_floating_point():
            torch.testing.assert_close(b["model"][k], v, rtol=1e-5, atol=1e-6, msg=k)
    assert [m["train_loss"] for m in ea] == pytest.approx([m["train_loss"] for m in eb], rel=1e-5)
    assert all(0.0 <= m["data_wait_share"] <= 1.0 for m in ea + eb)


def test_non_finite_loss_names_epoch_and_step(tiny_cfg):
    class Exploding(SegmentationTrainer):
        calls = 0

        def training_step(self, x, y):
            loss = super().training_step(x, y)
            Exploding.calls += 1
            return loss * float("nan") if Exploding.calls == 2 else loss

    with pytest.raises(TrainingError, match=r"non-finite loss at epoch 1, step 2"):
        Exploding(tiny_cfg()).fit()


def test_early_stopping_stops_when_nothing_improves(tiny_cfg):
    rec = Record()
    cfg = tiny_cfg("train.epochs=5", "train.early_stopping.patience=1", "train.early_stopping.min_delta=2.0")
    summary = SegmentationTrainer(cfg, [rec]).fit()
    # epoch 1 sets the best; no later value can beat it by 2.0, so epoch 2 exhausts patience 1
    assert summary["epochs"] == 2 and summary["stop_reason"].startswith("early stopping")
    assert len(rec.epochs) == 2


def test_encoder_frozen_for_first_epochs(tiny_cfg):
    snapshots = []

    class Snap(Hook):
        def after_epoch(self, metrics):
            enc = self.trainer.module.encoder
            snapshots.append({k: v.detach().clone() for k, v in enc.state_dict().items()})

    cfg = tiny_cfg("train.epochs=2", "model.freeze_encoder_epochs=1")
    trainer = SegmentationTrainer(cfg, [Snap()])
    before = {k: v.detach().clone() for k, v in trainer.module.encoder.state_dict().items()}
    trainer.fit()
    for k, v in before.items():  # weights and BN statistics untouched while frozen
        assert torch.equal(snapshots[0][k], v), k
    changed = [k for k, v in before.items() if v.is_floating_point() and not torch.equal(snapshots[1][k], v)]
    assert changed, "encoder did not train after unfreezing"


def test_checkpoint_loads_weights_only_and_rejects_garbage(tmp_path):
    save_checkpoint({"model": {"w": torch.ones(2)}, "epoch": 1}, tmp_path / "ok")
    assert load_checkpoint(tmp_path / "ok")["epoch"] == 1
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot load checkpoint"):
        load_checkpoint(tmp_path / "bad")
    with pytest.raises(UserError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "missing")

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"model": {}, "x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(UserError, match="cannot load checkpoint"):
        load_checkpoint(tmp_path / "evil.pt")


def test_grad_accumulation_steps_the_optimizer_less_often(tiny_cfg):
    steps = []

    class CountOptSteps(SegmentationTrainer):
        def optimizer_step(self):
            steps.append(self.epoch)
            super().optimizer_step()

    CountOptSteps(tiny_cfg("train.epochs=1", "train.grad_accum=2", "train.batch_size=2")).fit()
    assert len(steps) == 3  # 6 batches of 2, one optimizer step per 2 batches


def test_dataset_normalization_travels_in_the_checkpoint(tiny_cfg, tmp_path):
    from raysegtrain.config import Config
    from raysegtrain.data.dataset import build_dataset
    from raysegtrain.inference import normalization

    cfg = tiny_cfg("train.epochs=1", "data.normalize=dataset")
    train_local(cfg, tmp_path)
    trained = Config.model_validate(load_checkpoint(tmp_path / "best")["config"])
    stats = build_dataset(cfg.data, "train", train=True).normalizer
    assert trained.data.normalize == "dataset" and stats.mean != (0.485, 0.456, 0.406)  # the set's own statistics
    assert (tuple(trained.data.mean), tuple(trained.data.std)) == (stats.mean, stats.std)
    # the training set is no longer needed to predict with the checkpoint
    moved = trained.model_copy(update={"data": trained.data.model_copy(update={"root": tmp_path / "gone"})})
    assert normalization(moved) == (stats.mean, stats.std)
