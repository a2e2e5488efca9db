"""`train.compile`: the compiled training step trains what the eager one trains (accumulation, clipping, freezing,
resume), falls back to eager in one line when compiling fails, reports its compile figures, and keeps checkpoints
loadable. On CPU the capture runs through dynamo and AOT autograd with the `aot_eager` backend (inductor's CPU code
generation would cost minutes of C++ compiling per test); the GPU benchmark runs inductor."""

import pytest
import torch

from raysegtrain import compiling
from raysegtrain.checkpoint import load_checkpoint
from raysegtrain.engine import SegmentationTrainer, train_local
from raysegtrain.hooks import Hook

from .conftest import interrupted_then_resumed

COMPILED = ("train.compile=on", "train.compile_backend=aot_eager")


class Record(Hook):
    def __init__(self):
        self.epochs, self.notices = [], []

    def after_epoch(self, metrics):
        self.epochs.append(dict(metrics))

    def notice(self, message):
        self.notices.append(message)


def _assert_same_training(a_dir, b_dir, rtol=1e-4, atol=1e-5):
    a, b = load_checkpoint(a_dir / "last"), load_checkpoint(b_dir / "last")
    assert a["model"].keys() == b["model"].keys()  # no "_orig_mod." prefix: checkpoints hold the bare model
    for k, v in a["model"].items():
        if v.is_floating_point():
            torch.testing.assert_close(b["model"][k], v, rtol=rtol, atol=atol, msg=k)
    for ma, mb in zip(a["history"], b["history"], strict=True):
        assert mb["train_loss"] == pytest.approx(ma["train_loss"], rel=1e-4)
        assert mb["val_iou"] == pytest.approx(ma["val_iou"], abs=1e-4)


@pytest.mark.parametrize("setting,device,images,expected", [
    ("off", "cuda", 10**9, False), ("on", "cpu", 0, True), ("auto", "cpu", 10**9, False),
    ("auto", "cuda", compiling.AUTO_MIN_IMAGES - 1, False), ("auto", "cuda", compiling.AUTO_MIN_IMAGES, True)])
def test_auto_compiles_long_gpu_runs_only(setting, device, images, expected):
    on, reason = compiling.compile_decision(setting, torch.device(device), images)
    assert on is expected and reason.startswith(setting)


def test_compiled_step_trains_what_eager_trains(tiny_cfg, tmp_path):
    """Gradient accumulation with a partial window, clipping and a warm-up schedule, compiled and eager."""
    common = ("train.epochs=2", "train.grad_accum=2", "train.grad_clip=1.0", "schedule.warmup_epochs=0.5")
    rec = Record()
    train_local(tiny_cfg(*common, "train.compile=off"), tmp_path / "eager")
    train_local(tiny_cfg(*common, *COMPILED), tmp_path / "compiled", hooks=[rec])
    _assert_same_training(tmp_path / "eager", tmp_path / "compiled")
    first, second = rec.epochs
    assert first["compiled"] == 1.0 and second["compiled"] == 1.0 and not rec.notices
    # the first epoch compiled the step (forward + backward) and validation's forward; the second reused them
    assert first["compile_graphs"] >= 2 and first["compile_s"] > 0
    assert "compile_graphs" not in second


def test_unfreezing_the_encoder_recompiles_and_trains_it(tiny_cfg, tmp_path):
    snapshots, rec = [], Record()

    class Snap(Hook):
        def after_epoch(self, metrics):
            snapshots.append({k: v.detach().clone() for k, v in self.trainer.module.encoder.state_dict().items()})

    cfg = tiny_cfg("train.epochs=2", "model.freeze_encoder_epochs=1", *COMPILED)
    trainer = SegmentationTrainer(cfg, [Snap(), rec])
    trainer.setup()
    before = {k: v.detach().clone() for k, v in trainer.module.encoder.state_dict().items()}
    trainer.fit()
    assert all(torch.equal(snapshots[0][k], v) for k, v in before.items())  # frozen: untouched
    assert [k for k, v in before.items() if v.is_floating_point() and not torch.equal(snapshots[1][k], v)]
    assert rec.epochs[1]["compile_graphs"] >= 1  # a new graph for the trainable encoder, not the frozen one reused
    # and it is what eager training does
    train_local(tiny_cfg("train.epochs=2", "model.freeze_encoder_epochs=1", "train.compile=off"), tmp_path / "e")
    eager = load_checkpoint(tmp_path / "e" / "last")["model"]
    for k, v in trainer.module.state_dict().items():
        if v.is_floating_point():
            torch.testing.assert_close(v, eager[k], rtol=1e-4, atol=1e-5, msg=k)


def test_compiled_resume_equals_the_straight_run(tiny_cfg, tmp_path):
    cfg = tiny_cfg("train.epochs=2", *COMPILED)
    train_local(cfg, tmp_path / "straight")
    interrupted_then_resumed(cfg, tmp_path / "split")
    _assert_same_training(tmp_path / "straight", tmp_path / "split", rtol=1e-5, atol=1e-6)


def test_a_failing_compiler_says_so_once_and_the_run_goes_on_eager(tiny_cfg, tmp_path):
    from torch._dynamo import register_backend

    @register_backend(name="raysegtrain_test_broken")
    def broken(gm, example_inputs):
        raise RuntimeError("this backend cannot compile anything\nsecond line")

    rec = Record()
    train_local(tiny_cfg("train.epochs=2", "train.compile=off"), tmp_path / "eager")
    train_local(tiny_cfg("train.epochs=2", "train.compile=on", "train.compile_backend=raysegtrain_test_broken"),
                tmp_path / "fallback", hooks=[rec])
    # one line per compiled function (the step, validation's forward), each saying why, then eager for good
    assert len(rec.notices) == 2 and all("\n" not in n for n in rec.notices)
    assert "training step failed" in rec.notices[0] and "cannot compile anything" in rec.notices[0]
    assert [m["compiled"] for m in rec.epochs] == [0.0, 0.0]
    _assert_same_training(tmp_path / "eager", tmp_path / "fallback", rtol=1e-5, atol=1e-6)


def test_compile_cache_folder_is_the_raysegtrain_cache_unless_set(tmp_path, monkeypatch):
    monkeypatch.setenv("RAYSEGTRAIN_CACHE", str(tmp_path / "rs"))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    folder = compiling.cache_folder("auto")
    assert folder == tmp_path / "rs" / "compile"
    assert compiling.cache_folder(str(tmp_path / "shared")) == tmp_path / "shared"
    compiling.use_cache_folder(folder)
    import os

    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(folder / "inductor")
    assert os.environ["TRITON_CACHE_DIR"] == str(folder / "triton")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/somewhere/the/user/chose")
    compiling.use_cache_folder(tmp_path / "other")
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == "/somewhere/the/user/chose"
    # inductor writes its /tmp default into the variable the first time it looks: that one is ours to replace
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    cache_dir()
    compiling.use_cache_folder(tmp_path / "other")
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "other" / "inductor")


def test_fused_optimizer_is_cuda_only_by_default(tiny_cfg):
    assert SegmentationTrainer(tiny_cfg()).fused_optimizer is False  # CPU
    assert SegmentationTrainer(tiny_cfg(), device="cuda").fused_optimizer is True
    assert SegmentationTrainer(tiny_cfg("optim.fused=off"), device="cuda").fused_optimizer is False


def test_ddp_compiled_fit_trains_what_eager_ddp_trains(tiny_cfg, tmp_path, ray_local):
    """Two gloo workers: dynamo splits the DDP model's graph at the gradient buckets (DDPOptimizer); both ranks
    compile, and the weights match an eager DDP fit's."""
    from raysegtrain.train import fit

    def run(name, *extra):
        cfg = tiny_cfg("scaling.num_workers=2", "scaling.use_gpu=false", "tracking.enabled=false",
                       f"run.storage_path={tmp_path / 'runs'}", f"run.name={name}", *extra)
        return fit(cfg)

    eager, compiled = run("eager", "train.compile=off"), run("compiled", *COMPILED)
    assert [h["compiled"] for h in compiled.history] == [1.0, 1.0]
    assert compiled.history[0]["compile_graphs"] >= 2
    a, b = (load_checkpoint(r.best_checkpoint) for r in (eager, compiled))
    assert a["epoch"] == b["epoch"]
    for k, v in a["model"].items():
        if v.is_floating_point():
            torch.testing.assert_close(b["model"][k], v, rtol=1e-4, atol=1e-5, msg=k)
    assert compiled.history[-1]["val_iou"] == pytest.approx(eager.history[-1]["val_iou"], abs=1e-4)


@pytest.mark.parametrize("setting, message", [
    ("train.compile_backend=inducter", "train.compile_backend 'inducter' is not a torch.compile backend here"),
    ("train.compile_cache={blocker}/cache", "is not a folder"),
])
def test_compile_mistakes_are_one_line_before_ray(setting, message, tmp_path, capsys, no_ray):
    from raysegtrain.cli import main

    from .conftest import TINY

    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    rc = main(["fit", *TINY, "train.compile=on", setting.format(blocker=blocker), "tracking.enabled=false",
               "--no-progress"])
    err = [ln for ln in capsys.readouterr().err.strip().splitlines() if ln.strip()]
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert blocker.read_text() == "not a folder"
    # off compiles nothing, so its settings are not checked
    from raysegtrain import config, preflight

    preflight.check_compile(config.load(None, ["train.compile=off", setting.format(blocker=blocker)]))


def test_start_line_says_why_auto_left_a_gpu_run_eager():
    from types import SimpleNamespace

    from raysegtrain.train_worker import compile_words

    on, reason = compiling.compile_decision("auto", torch.device("cuda"), 1000)
    t = SimpleNamespace(compiled=on, device=torch.device("cuda"), compile="auto", compile_reason=reason,
                        compile_mode="default")
    assert compile_words(t) == f", eager (train.compile auto: off, 1000 training images, compiling pays from " \
                               f"{compiling.AUTO_MIN_IMAGES})"
    assert compile_words(SimpleNamespace(**{**vars(t), "device": torch.device("cpu")})) == ""  # CPU: no news
    assert compile_words(SimpleNamespace(**{**vars(t), "compiled": True})) == ", torch.compile (default)"
