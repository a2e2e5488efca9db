"""An objective that predicting nothing cannot win: the binary default monitor/objective is the foreground IoU, and a
degenerate model (one class everywhere, or a target class never predicted) is flagged from the confusion matrix."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from raysegtrain import config
from raysegtrain.errors import ConfigError
from raysegtrain.metrics import ConfusionMeter, degenerate_note
from raysegtrain.search_space import load_space, space_from_dict
from raysegtrain.train import best_epoch_metrics

SPACES = Path(__file__).resolve().parents[1] / "search_spaces"


def test_default_monitor_is_foreground_iou_for_binary_and_macro_iou_for_multiclass():
    assert config.load(None).train.monitor == "val_fg_iou"
    assert config.load(None, ["data.num_classes=4"]).train.monitor == "val_iou"
    assert config.load(None, ["train.monitor=val_loss"]).train.monitor == "val_loss"
    # the resolved monitor is what a written config holds, so it reloads as it trained
    cfg = config.load(None)
    assert config.build(cfg.to_dict()).train.monitor == "val_fg_iou"


def test_foreground_iou_is_refused_for_multiclass():
    with pytest.raises(ConfigError, match="val_fg_iou is for binary tasks"):
        config.load(None, ["data.num_classes=4", "train.monitor=val_fg_iou"])


def test_study_objective_auto_follows_the_base_and_shipped_spaces_use_it():
    for path in sorted(SPACES.glob("*.yaml")):
        space = load_space(path)
        assert space.metric == "val_fg_iou" and space.mode == "max", path.name  # all ship binary data
        assert space.base_config.train.monitor == "val_fg_iou"
    multi = space_from_dict({"base": {"data": {"num_classes": 4}}, "space": {"optim.lr": {"choice": [1e-3, 1e-4]}}})
    assert multi.metric == "val_iou"
    chosen = space_from_dict({"base": {"train": {"monitor": "val_dice"}}, "space": {"optim.lr": {"choice": [1e-3]}},
                              "objective": {"metric": "auto"}})
    assert chosen.metric == "val_dice"  # auto keeps a monitor the base chose


def _metrics(predicted: torch.Tensor, target: torch.Tensor, binary: bool = True) -> dict:
    meter = ConfusionMeter(2 if binary else 3, binary=binary)
    logits = (predicted.float() * 2 - 1).unsqueeze(1) * 10 if binary else \
        torch.nn.functional.one_hot(predicted, 3).permute(0, 3, 1, 2).float()
    meter.update(logits, target)
    return meter.compute()


def test_all_background_model_is_flagged_and_scores_zero_foreground_iou():
    target = torch.zeros(2, 8, 8, dtype=torch.long)
    target[:, :2, :2] = 1
    m = _metrics(torch.zeros_like(target), target)
    assert m["val_iou"] > 0.45 and m["val_fg_iou"] == 0.0  # the macro mean rewards predicting nothing
    assert m["val_predicted_classes"] == 1 and m["val_missed_classes"] == 1
    assert degenerate_note(m) == "degenerate: predicts one class everywhere"
    assert degenerate_note(_metrics(target.clone(), target)) is None


def test_a_target_class_never_predicted_is_flagged_but_a_class_absent_from_both_is_not():
    target = torch.tensor([[[0, 1, 2, 2]]])
    m = _metrics(torch.tensor([[[0, 1, 1, 1]]]), target, binary=False)
    assert m["val_missed_classes"] == 1 and "never predicts 1 class" in degenerate_note(m)
    absent = _metrics(torch.tensor([[[0, 1, 1, 0]]]), torch.tensor([[[0, 1, 1, 0]]]), binary=False)
    assert absent["val_missed_classes"] == 0 and degenerate_note(absent) is None


def test_best_epoch_metrics_picks_the_best_epoch_of_the_history():
    history = [{"epoch": 1, "val_predicted_classes": 1.0, "val_missed_classes": 1.0},
               {"epoch": 2, "val_predicted_classes": 2.0, "val_missed_classes": 0.0, "best_epoch": 1.0}]
    assert best_epoch_metrics(history) is history[0]
    assert best_epoch_metrics([]) == {} and best_epoch_metrics([{"epoch": 1}]) == {}
