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
