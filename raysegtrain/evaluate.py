"""Metrics of a trained model on a split, with the very code that validates during training.

`evaluate_checkpoint` returns validate()'s metrics; `evaluate_model` adds what the `evaluate` command reports: each
image's IoU and Dice (recorded by a subclass of the training meter, in the split's order), the confusion matrix, and
files (metrics JSON, per-image CSV, confusion-matrix PNG), optionally logged to the model's MLflow run.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import segmentation_models_pytorch as smp
import torch

from .checkpoint import load_checkpoint
from .config import Config, apply_overrides
from .engine import SegmentationTrainer
from .errors import DataError, ModelError, UserError
from .metrics import ConfusionMeter, per_class_scores


def evaluate_checkpoint(checkpoint: str | Path, cfg: Config | None = None, split: str | None = None,
                        device: str | None = None) -> dict[str, Any]:
    """Validate CHECKPOINT's weights on SPLIT (default: the config's validation split). CFG defaults to the config
    stored in the checkpoint."""
    state = load_checkpoint(checkpoint)
    cfg = cfg or Config.model_validate(state["config"])
    if split:
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"val_split": split})})
    trainer = SegmentationTrainer(cfg, device=device)
    trainer.setup_validation()  # no training set, optimizer or schedule
    trainer.module.load_state_dict(state["model"])
    return trainer.validate()


# ------------------------------------------------------------------------------------------- evaluate command
REPORT_FILES = {"metrics": "metrics.json", "per_image": "per_image.csv", "confusion": "confusion_matrix.png"}


class RecordingMeter(ConfusionMeter):
    """The training meter, also keeping each image's IoU and Dice in order (binary: foreground, 1 when target and
    prediction are both empty; multiclass: mean over the classes present in the image's target or prediction)."""

    def reset(self) -> None:
        super().reset()
        self.image_scores: list[tuple[float, float]] = []

    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        super().update(logits, target)
        target = target.squeeze(1) if target.dim() == 4 else target
        per_image = self._per_image_confusion(self.predict(logits), target.long()).cpu()
        iou = per_class_scores(per_image, smp.metrics.iou_score).double()
        dice = per_class_scores(per_image, smp.metrics.f1_score).double()
        if self.binary:
            iou, dice = iou[:, 1].nan_to_num(1.0), dice[:, 1].nan_to_num(1.0)
        else:
            iou, dice = iou.nanmean(dim=1), dice.nanmean(dim=1)
        empty = per_image.sum(dim=(1, 2)) == 0  # every pixel ignored: no score
        iou[empty], dice[empty] = math.nan, math.nan
        self.image_scores.extend(zip(iou.tolist(), dice.tolist()))


class EvaluationTrainer(SegmentationTrainer):
    def build_meter(self):
        d = self.cfg.data
        return RecordingMeter(d.num_classes, ignore_index=d.ignore_index, binary=d.binary,
                              threshold=self.cfg.train.threshold, class_names=d.names())


@dataclass
class EvaluationReport:
    model: str
    split: str
    metrics: dict[str, float]  # validate()'s metrics without the "val_" prefix: iou, dice, loss, iou_<class>, ...
    confusion: np.ndarray  # rows: target class, columns: predicted class
    class_names: list[str]
    images: list[dict[str, Any]]  # stem, iou, dice
    epoch: int | None = None

    def mlflow_metrics(self) -> dict[str, float]:
        return {f"eval_{self.split}_{k}": v for k, v in self.metrics.items()}


def evaluation_config(base: Config, config_file: str | None = None, overrides: list[str] = ()) -> Config:
    """The checkpoint's config, then a YAML file's keys, then key=value overrides (e.g. data.root=/elsewhere)."""
    from .config import build, flatten, load_yaml

    raw = base.to_dict()
    if config_file:
        raw = apply_overrides(raw, flatten(load_yaml(config_file)))
    return build(raw, list(overrides), source="evaluate config", supply_redacted=False)  # uses no credential


def evaluate_model(loaded, cfg: Config | None = None, split: str = "val", device: str | None = None
                   ) -> EvaluationReport:
    """Score LOADED (an `inference.LoadedModel`) on SPLIT with the training loop's own validation."""
    from .data.splits import has_split, split_name

    cfg = cfg or loaded.cfg
    name = split_name(cfg.data, split)
    if not has_split(cfg.data, name):
        raise DataError(f"the dataset has no split {name!r}")
    # the checkpoint holds the encoder's weights: never fetch pretrained ones (offline hosts, local files)
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"val_split": name}),
                                 "model": cfg.model.model_copy(update={"encoder_weights": None})})
    trainer = EvaluationTrainer(cfg, device=device)
    trainer.setup_validation()
    try:
        trainer.module.load_state_dict(loaded.model.state_dict())
    except RuntimeError as e:
        raise ModelError(f"the checkpoint's weights do not fit the evaluation config's model: "
                         f"{str(e).splitlines()[0]}") from None
    metrics = {k.removeprefix("val_"): v for k, v in trainer.validate().items()}
    stems = trainer.val_set.stems
    scores = trainer.meter.image_scores
    images = [{"stem": s, "iou": i, "dice": d} for s, (i, d) in zip(stems, scores)]
    return EvaluationReport(loaded.source, split, metrics, trainer.meter.confusion_matrix(), cfg.data.names(),
                            images, loaded.info.get("epoch"))


def report_paths(out_dir: str | Path) -> dict[str, Path]:
    return {k: Path(out_dir) / v for k, v in REPORT_FILES.items()}


def check_report_paths(out_dir: str | Path, overwrite: bool) -> None:
    existing = [p for p in report_paths(out_dir).values() if p.exists()]
    if existing and not overwrite:
        raise UserError(f"{existing[0]} already exists; nothing was written (pass --overwrite to replace it)")


def write_report(report: EvaluationReport, out_dir: str | Path) -> dict[str, Path]:
    """metrics.json, per_image.csv (stem, iou, dice), confusion_matrix.png in OUT_DIR."""
    from .plots import confusion_matrix

    paths = report_paths(out_dir)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    with open(paths["per_image"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["stem", "iou", "dice"])
        writer.writeheader()
        writer.writerows(report.images)
    confusion_matrix(report.confusion, report.class_names, paths["confusion"])
    per_class = {name: {m: report.metrics.get(f"{m}_{name}") for m in ("iou", "dice", "precision", "recall")}
                 | {"pixels": int(report.confusion[i].sum())} for i, name in enumerate(report.class_names)}
    document = {"model": report.model, "checkpoint_epoch": report.epoch, "split": report.split,
                "images": len(report.images), "metrics": report.metrics, "per_class": per_class,
                "confusion_matrix": report.confusion.tolist()}
    paths["metrics"].write_text(json.dumps(_finite_or_none(document), indent=1) + "\n")
    return paths


def _finite_or_none(obj):
    """JSON has no NaN: undefined scores (0/0) become null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite_or_none(v) for v in obj]
    return obj


def class_table(report: EvaluationReport):
    """A rich Table: one row per class, then the macro mean."""
    from rich.table import Table

    m = report.metrics
    table = Table(title=f"{report.split}: {len(report.images)} images, mean IoU {m['iou']:.4f}, "
                        f"pixel accuracy {m['pixel_acc']:.4f}")
    for col in ("class", "IoU", "Dice", "precision", "recall", "pixels"):
        table.add_column(col, justify="left" if col == "class" else "right")
    for i, name in enumerate(report.class_names):
        table.add_row(name, *(_fmt(m.get(f"{k}_{name}")) for k in ("iou", "dice", "precision", "recall")),
                      str(int(report.confusion[i].sum())))
    table.add_row("mean", *(_fmt(m.get(k)) for k in ("iou", "dice", "precision", "recall")),
                  str(int(report.confusion.sum())), style="bold")
    return table


def _fmt(value) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.4f}"


def log_report(report: EvaluationReport, files: dict[str, Path], run_id: str, tracking_uri: str) -> None:
    """eval_<split>_* metrics and the report files (under eval_<split>/) into the model's MLflow run."""
    from . import tracking

    c = tracking.client(tracking_uri)
    tracking.log_metrics(c, run_id, report.mlflow_metrics(), step=report.epoch or 0)
    for path in files.values():
        tracking.log_artifact(c, run_id, path, f"eval_{report.split}")
