"""The shared loop in one process (no Ray): learning, checkpoints, exact resume, NaN stop, early stop, freezing,
start-up figures, building at fit, validation that trains nothing."""

import copy
import os
import time

import pytest
import torch

from raysegtrain.checkpoint import load_checkpoint, save_checkpoint
from raysegtrain.engine import SegmentationTrainer, train_local
from raysegtrain.errors import TrainingError, UserError
from raysegtrain.hooks import Hook, LocalCheckpointHook, StartupTimingHook, StopTraining

from .conftest import interrupted_then_resumed


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
    t0 = time.time() - 3.0  # a caller that started 3 s ago, handed the job over 2 s later, in two stages
    startup = StartupTimingHook(t0, submitted=t0 + 2.0, driver_stages={"checks": 1.5, "ray": 0.5})
    summary = train_local(cfg, tmp_path, hooks=[startup, rec])
    assert summary["epochs"] == 3 and summary["stop_reason"] == "completed"
    losses = [m["train_loss"] for m in rec.epochs]
    assert losses[-1] < losses[0]
    assert all(0.0 <= m["val_iou"] <= 1.0 for m in rec.epochs)
    assert rec.steps == 3 * 3  # 12 images / batch 4
    best, last = load_checkpoint(tmp_path / "best"), load_checkpoint(tmp_path / "last")
    assert last["epoch"] == 3 and 1 <= best["epoch"] <= 3
    assert best["best_value"] == pytest.approx(max(m["val_fg_iou"] for m in rec.epochs))  # the binary default monitor
    assert last["config"]["model"]["encoder"] == "resnet18"
    # every epoch's training figures; the first epoch's start-up split adds up to the first step's latency
    assert all(m["epoch_time_s"] > 0 and m["images_per_s"] > 0 and 0 <= m["data_wait_share"] <= 1 for m in rec.epochs)
    first = rec.epochs[0]
    parts = ("startup_driver_s", "startup_workers_s", "startup_setup_s", "startup_first_batch_s")
    assert all(first[k] >= 0 for k in parts)
    assert sum(first[k] for k in parts) == pytest.approx(first["first_step_s"], abs=1e-6)
    assert first["startup_driver_s"] == pytest.approx(2.0) and first["startup_driver_checks_s"] == 1.5
    assert all("first_step_s" not in m for m in rec.epochs[1:])


@pytest.mark.parametrize("workers", [0, 2])
def test_two_epochs_equal_one_plus_resume(tiny_cfg, tmp_path, workers):
    # with loader workers, epoch 2's batches are prefetched during epoch 1's validation in the straight run
    cfg = tiny_cfg("train.epochs=2", "schedule.name=cosine", "schedule.warmup_epochs=0.5",
                   f"data.loader_workers={workers}")
    train_local(cfg, tmp_path / "straight")
    interrupted_then_resumed(cfg, tmp_path / "split")  # a run whose config says 2 epochs, stopped after the first

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
    trainer.setup()  # builds the model now; fit does not build it again
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
    (tmp_path / "bad" / "checkpoint.pt").write_bytes(b"\x80\x02 truncated pickle")
    with pytest.raises(UserError, match="cannot load checkpoint"):
        load_checkpoint(tmp_path / "bad")
    # a file of another kind (Ray's checkpoint_manager_snapshot.json sits beside the checkpoint folders)
    (tmp_path / "run" / "checkpoint_000001").mkdir(parents=True)
    save_checkpoint({"model": {"w": torch.ones(2)}, "epoch": 1}, tmp_path / "run" / "checkpoint_000002")
    (tmp_path / "run" / "checkpoint_manager_snapshot.json").write_text('{"checkpoints": []}')
    with pytest.raises(UserError, match=r"checkpoint_manager_snapshot.json is not a checkpoint \(not a file torch"):
        load_checkpoint(tmp_path / "run" / "checkpoint_manager_snapshot.json")
    # a run's folder: its checkpoint folders are named (only those that hold a checkpoint)
    with pytest.raises(UserError, match=r"holds checkpoint folders, not a checkpoint: pass one of them "
                                        r"\(checkpoint_000002\)$"):
        load_checkpoint(tmp_path / "run")
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


def test_attributes_set_before_fit_take_effect(tiny_cfg):
    """Construction builds nothing; fit builds with the attributes as they are then."""
    rec = Record()
    trainer = SegmentationTrainer(tiny_cfg("train.epochs=2"), [rec])
    assert trainer.built is None and not hasattr(trainer, "model")
    trainer.epochs, trainer.batch_size = 1, 2
    summary = trainer.fit()
    assert summary["epochs"] == 1 and len(rec.epochs) == 1
    assert rec.steps == 6  # 12 images / batch 2
    assert "startup_setup_s" in rec.epochs[0]  # the trainer's own start-up figures when the caller gives none


def test_validation_leaves_the_schedule_alone_and_fit_steps_the_plateau_per_epoch(tiny_cfg):
    trainer = SegmentationTrainer(tiny_cfg("train.epochs=2", "schedule.name=plateau", "schedule.warmup_epochs=0"))
    trainer.setup()
    before = copy.deepcopy(trainer.schedule.state_dict())
    trainer.validate()
    trainer.validate()
    assert trainer.schedule.state_dict() == before
    trainer.fit()
    assert trainer.schedule.plateau.last_epoch == 2  # once at the end of each validated epoch


def test_evaluation_builds_no_training_set_nor_optimizer(tiny_cfg, tmp_path, monkeypatch):
    import raysegtrain.data.dataset as dataset
    from raysegtrain.evaluate import evaluate_checkpoint
    from raysegtrain.model import build_model

    cfg = tiny_cfg()
    torch.manual_seed(0)
    weights = build_model(cfg).state_dict()
    save_checkpoint({"model": weights, "config": cfg.to_dict()}, tmp_path)
    reference = SegmentationTrainer(cfg)  # the training path, on the same weights
    reference.setup()
    reference.module.load_state_dict(weights)
    expected = reference.validate()

    built, build = [], dataset.build_dataset
    monkeypatch.setattr(dataset, "build_dataset", lambda *a, **kw: built.append(kw["train"]) or build(*a, **kw))
    monkeypatch.setattr(SegmentationTrainer, "build_optimizer", lambda self: pytest.fail("built an optimizer"))
    monkeypatch.setattr(SegmentationTrainer, "build_schedule", lambda self: pytest.fail("built a schedule"))
    metrics = evaluate_checkpoint(tmp_path, device="cpu")
    assert built == [False]  # the validation split only
    assert metrics == pytest.approx(expected, nan_ok=True)


def test_a_run_leaves_no_process_wide_algorithm_settings_to_the_next(tiny_cfg):
    """deterministic and cuDNN autotuning are process-wide: a later run in the same process (a warm study's next
    trial) gets its own settings, not the previous run's."""
    from raysegtrain.runtime import seed_everything

    seed_everything(0, deterministic=True)
    assert torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.benchmark
    seed_everything(0, deterministic=False)
    assert not torch.are_deterministic_algorithms_enabled()
    assert torch.backends.cudnn.benchmark == torch.cuda.is_available()
    seed_everything(0, deterministic=False, cudnn_benchmark="off")
    assert not torch.backends.cudnn.benchmark


@pytest.mark.parametrize("every,expected", [(1, [1, 2, 3, 4]), (0, [1, 4]), (2, [1, 2, 4])])
def test_reports_carry_checkpoints_every_n_epochs_on_improvement_and_at_the_end(tiny_cfg, every, expected):
    """RayReportHook with a recording report function: which epochs' reports carry a checkpoint."""
    from raysegtrain.train_worker import RayReportHook

    sent = []
    cfg = tiny_cfg("train.epochs=4", f"run.checkpoint_every={every}")

    class OnlyFirstImproves(Hook):
        def after_epoch(self, metrics):
            metrics["is_best"] = float(metrics["epoch"] == 1)

    def report(metrics, checkpoint=None):
        sent.append((int(metrics["epoch"]), checkpoint is not None, metrics["worker_pid"]))

    SegmentationTrainer(cfg, [OnlyFirstImproves(), RayReportHook(0, report=report)], device="cpu").fit()
    assert [epoch for epoch, has_checkpoint, _ in sent if has_checkpoint] == expected
    assert [epoch for epoch, *_ in sent] == [1, 2, 3, 4]
    assert {pid for *_, pid in sent} == {float(os.getpid())}
