"""What the driver shows: the epochs bar's ETA from the first steps on, and the synthetic set's generation."""

from __future__ import annotations

import io
import re

import pytest
from rich.console import Console

from raysegtrain.config import SyntheticConfig
from raysegtrain.data import synthetic
from raysegtrain.progress import ProgressDisplay, show_generation


class Clock:
    """A time source the test moves by hand: rich's speed estimate then has exact timestamps."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class EmptyQueue:
    """The display's queue API with nothing in it: the test feeds the handler itself, in order."""

    def qsize(self) -> int:
        return 0

    def get_nowait_batch(self, n):
        return []

    def shutdown(self):
        pass


def test_epochs_bar_has_an_eta_within_the_first_epoch(tiny_cfg):
    cfg = tiny_cfg("train.epochs=30")
    clock = Clock()
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, color_system=None, width=160, get_time=clock)
    with ProgressDisplay(cfg, mode="bar", console=console, queue=EmptyQueue()) as display:
        display._handle(("start", "cpu (CPU) x 1 worker(s), fp32"))
        clock.now += 20.0  # the workers' start-up is not part of the speed
        display._handle(("epoch_start", 0, 30, 10))
        for step in range(1, 6):  # one step a second, 10 steps an epoch: 0.1 epoch/s
            clock.now += 1.0
            display._handle(("step", 0, step, 10, 0.5, 1e-3))
        task = display.progress.tasks[display.epoch_task]
        assert task.completed == 0.5
        assert task.time_remaining is not None and abs(task.time_remaining - 295) < 1  # 29.5 epochs at 0.1/s
        display.progress.refresh()
        row = out.getvalue().rsplit("epochs ", 1)[1].split("\n")[0]
        assert " 0/30 " in row and row.rstrip().endswith("0:04:55"), row  # "M/N" still counts whole epochs

        # validation takes time too: the run's average speed counts it in (5 s of steps, then 5 s of validation)
        clock.now += 10.0
        display._handle(("epoch_end", {"epoch": 1, "train_loss": 0.5, "val_loss": 0.4, "val_iou": 0.3}))
        display._handle(("epoch_start", 1, 30, 10))
        clock.now += 1.0
        display._handle(("step", 1, 1, 10, 0.5, 1e-3))
        task = display.progress.tasks[display.epoch_task]
        assert task.completed == 1.1 and abs(task.speed - 1.0 / 15) < 1e-9
        assert "epoch 1/30" in out.getvalue()


def test_generation_says_what_it_writes_in_one_line_when_not_on_a_terminal(tmp_path, monkeypatch):
    monkeypatch.setenv("RAYSEGTRAIN_CACHE", str(tmp_path / "cache"))
    syn = SyntheticConfig(size=32, num_train=3, num_val=2, num_test=1)
    out = io.StringIO()
    root = show_generation(syn, Console(file=out, width=60), bar=True)  # a log: no bar, however wide the path
    assert root == synthetic.cache_path(syn) and (root / "splits" / "train.txt").is_file()
    lines = out.getvalue().splitlines()
    assert len(lines) == 1, out.getvalue()
    assert lines[0].startswith(f"generating the synthetic dataset (6 images, 32²) into {root} ...")
    assert re.search(r" done in \d+ s$", lines[0])

    again = io.StringIO()
    assert show_generation(syn, Console(file=again)) == root and again.getvalue() == ""  # cached: nothing to say


def test_generation_on_a_terminal_shows_a_bar(tmp_path, monkeypatch):
    monkeypatch.setenv("RAYSEGTRAIN_CACHE", str(tmp_path / "cache"))
    syn = SyntheticConfig(size=32, num_train=3, num_val=2, num_test=1)
    out = io.StringIO()
    show_generation(syn, Console(file=out, force_terminal=True, width=120), bar=True)
    text = out.getvalue()
    assert "generating the synthetic dataset (6 images, 32²)" in text and "6/6" in text


def test_generate_reports_every_image_to_its_callback_and_prints_nothing(tmp_path, capsys):
    syn = SyntheticConfig(size=32, num_train=3, num_val=2, num_test=0)
    seen = []
    synthetic.generate(tmp_path / "set", syn, progress=lambda done, total: seen.append((done, total)))
    assert seen == [(i, 5) for i in range(6)]
    assert capsys.readouterr() == ("", "")  # library use stays quiet


def test_fit_checks_generate_the_synthetic_set_only_after_the_cheap_checks_pass(tiny_cfg):
    from raysegtrain import preflight
    from raysegtrain.errors import UserError

    generated = []
    with pytest.raises(UserError, match="resnet1000"):  # a model mistake is said without waiting for the data
        preflight.check_fit(tiny_cfg("model.encoder=resnet1000"), generated.append)
    assert generated == []
    cfg = tiny_cfg()
    preflight.check_fit(cfg, generated.append)
    assert generated == [cfg.data.synthetic]


def test_output_into_a_file_or_pipe_is_never_wrapped(capsys):
    """A log keeps one line per epoch: the console that commands write through does not wrap at 80 columns when
    stderr is not a terminal (pytest's capture is not one)."""
    from raysegtrain.progress import format_epoch
    from raysegtrain.terminal import console

    line = format_epoch({"epoch": 3, "train_loss": 0.41234, "val_loss": 0.39871, "val_iou": 0.7123,
                         "best_val_iou": 0.7345, "best_epoch": 2, "images_per_s": 423.0, "data_wait_share": 0.01,
                         "epoch_time_s": 12.3}, 30, "val_iou") + "  " + "x" * 60
    assert len(line) > 120
    console().print(line)
    assert capsys.readouterr().err.splitlines() == [line]


def test_study_tables_show_the_parameters_that_differ_in_columns(capsys):
    """The live status table: one column per sampled key that differs between trials (named by its last part),
    none for a key every trial shares; every trial on one line."""
    from types import SimpleNamespace

    from raysegtrain.study_status import status_table
    from raysegtrain.study_trials import TrialProgress
    from raysegtrain.terminal import console

    params = [{"optim.lr": 0.001, "model.arch": "unet", "loss.bce": 0.5, "model.encoder": "resnet18"},
              {"optim.lr": 0.0003, "model.arch": "fpn", "loss.bce": 0.5, "model.encoder": "resnet18"},
              {"optim.lr": 0.002, "model.arch": "deeplabv3plus", "loss.bce": 0.5, "model.encoder": "resnet18",
               "schedule.step_size": 2}]
    trials = [SimpleNamespace(trial_id=f"t{i}", status="RUNNING") for i in range(3)]
    status = SimpleNamespace(study="s", space=SimpleNamespace(metric="val_iou"),
                             trials={f"t{i}": TrialProgress(params=p, epoch=i, value=0.5) for i, p in enumerate(params)})
    console().print(status_table(status, trials))
    out = capsys.readouterr().err.splitlines()
    header = next(line for line in out if "trial" in line)
    assert all(col in header for col in ("lr", "arch", "step_size")) and "encoder" not in header and "bce" not in header
    rows = [line for line in out if line.startswith("│ t")]
    assert len(rows) == 3 and "deeplabv3plus" in rows[2] and "0.0003" in rows[1]
