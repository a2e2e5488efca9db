"""Validation metrics from one confusion matrix accumulated over the whole split (never a mean of batch scores).

`ConfusionMeter.update` turns logits into class ids (binary: sigmoid > threshold; multiclass: argmax), drops
`ignore_index` pixels and adds a per-image C x C confusion matrix (rows: target class, columns: predicted class) made
with one `torch.bincount`. Their sum is the split's matrix; each image's own matrix also gives its IoU (binary: IoU
of the foreground, 1 when neither target nor prediction has any; multiclass: mean IoU over the classes present in its
target or prediction), kept as running sum, sum of squares and count. Images whose pixels are all ignored are not
counted. The per-class scores come from smp.metrics on the matrix's tp/fp/fn/tn, with 0/0 left undefined (NaN):
macro means skip undefined classes, per-class keys report them as NaN.

In DDP, call `all_reduce()` on every rank once after the validation loop, then `compute()`.
"""

from __future__ import annotations

import math

import numpy as np
import segmentation_models_pytorch as smp
import torch
import torch.distributed as dist

SCORES = {"iou": smp.metrics.iou_score, "dice": smp.metrics.f1_score, "precision": smp.metrics.precision,
          "recall": smp.metrics.recall}


class ConfusionMeter:
    def __init__(self, num_classes: int, ignore_index: int | None = None, binary: bool = False,
                 threshold: float = 0.5, class_names: list[str] | None = None):
        if binary and num_classes != 2:
            raise ValueError(f"binary segmentation has 2 classes, got num_classes={num_classes}")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.binary = binary
        self.threshold = threshold
        self.class_names = list(class_names) if class_names else [f"class_{i}" for i in range(num_classes)]
        self.reset()

    def reset(self) -> None:
        self.confusion = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)
        self.image_iou = torch.zeros(3, dtype=torch.float64)  # sum, sum of squares, count
        self._reduced = False

    # --------------------------------------------------------------------------------------------------- update
    @torch.no_grad()
    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        """logits (N, 1, H, W) binary / (N, C, H, W) multiclass; target (N, H, W) (or (N, 1, H, W)) class ids."""
        if target.dim() == 4:
            target = target.squeeze(1)
        predicted = self.predict(logits)
        if predicted.shape != target.shape:
            raise ValueError(f"predictions {tuple(predicted.shape)} and target {tuple(target.shape)} differ in shape")
        per_image = self._per_image_confusion(predicted, target.long())
        self.confusion = self.confusion.to(per_image.device) + per_image.sum(0)
        ious = self._image_ious(per_image)
        stats = torch.stack([ious.sum(), (ious ** 2).sum(), torch.tensor(float(ious.numel()), device=ious.device)])
        self.image_iou = self.image_iou.to(ious.device) + stats

    def predict(self, logits: torch.Tensor) -> torch.Tensor:
        """Class ids (N, H, W) from logits."""
        if self.binary:
            return (logits[:, 0].float().sigmoid() > self.threshold).long()
        return logits.argmax(dim=1)

    def _per_image_confusion(self, predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        c, n = self.num_classes, target.shape[0]
        image = torch.arange(n, device=target.device).view(n, *([1] * (target.dim() - 1))).expand_as(target)
        valid = torch.ones_like(target, dtype=torch.bool) if self.ignore_index is None else target != self.ignore_index
        index = (image * c + target) * c + predicted
        counts = torch.bincount(index[valid], minlength=n * c * c)
        if counts.numel() != n * c * c:
            raise ValueError(f"target holds a class id >= num_classes={c} (and not ignore_index={self.ignore_index})")
        return counts.view(n, c, c)

    def _image_ious(self, per_image: torch.Tensor) -> torch.Tensor:
        iou = per_class_scores(per_image, smp.metrics.iou_score).double()  # (N, C)
        if self.binary:
            per_image_iou = iou[:, 1].nan_to_num(1.0)  # no foreground in target nor prediction: a perfect image
        else:
            per_image_iou = iou.nanmean(dim=1)  # classes absent from the image's target and prediction are NaN
        return per_image_iou[per_image.sum(dim=(1, 2)) > 0]

    # ----------------------------------------------------------------------------------------------- distributed
    def all_reduce(self, group=None) -> None:
        """Sum the statistics over all ranks (no-op without an initialised process group). Call once per split."""
        if not (dist.is_available() and dist.is_initialized()):
            return
        if self._reduced:
            raise RuntimeError("ConfusionMeter.all_reduce() called twice without reset(): statistics would double")
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else "cpu"
        for name in ("confusion", "image_iou"):
            tensor = getattr(self, name).to(device)
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
            setattr(self, name, tensor)
        self._reduced = True

    # ---------------------------------------------------------------------------------------------------- results
    def confusion_matrix(self) -> np.ndarray:
        """(C, C) int64 counts; rows = target class, columns = predicted class."""
        return self.confusion.cpu().numpy()

    def compute(self) -> dict[str, float]:
        confusion = self.confusion.cpu()
        metrics: dict[str, float] = {}
        for name, fn in SCORES.items():
            per_class = per_class_scores(confusion, fn).double()
            metrics[f"val_{name}"] = float(per_class.nanmean())
            for class_name, value in zip(self.class_names, per_class.tolist()):
                metrics[f"val_{name}_{class_name}"] = value
        correct, total = int(confusion.diag().sum()), int(confusion.sum())
        metrics["val_pixel_acc"] = correct / total if total else math.nan
        if self.binary:
            metrics["val_fg_iou"] = metrics[f"val_iou_{self.class_names[1]}"]
        metrics["val_image_iou"], metrics["val_image_iou_std"] = self._image_iou_mean_std()
        metrics.update(prediction_coverage(confusion))
        return metrics

    def _image_iou_mean_std(self) -> tuple[float, float]:
        total, squares, count = self.image_iou.cpu().tolist()
        if count == 0:
            return math.nan, math.nan
        mean = total / count
        return mean, math.sqrt(max(squares / count - mean * mean, 0.0))


def prediction_coverage(confusion: torch.Tensor) -> dict[str, float]:
    """How many classes the model predicts anywhere in the split (`val_predicted_classes`), and how many classes that
    the targets hold it never predicts (`val_missed_classes`): the two signs of a degenerate model."""
    predicted = confusion.sum(dim=0) > 0
    in_target = confusion.sum(dim=1) > 0
    return {"val_predicted_classes": float(int(predicted.sum())),
            "val_missed_classes": float(int((in_target & ~predicted).sum()))}


def degenerate_note(metrics: dict) -> str | None:
    """Why the model behind METRICS (one validated epoch) is degenerate, or None: one class predicted everywhere,
    or a class of the targets never predicted. None when the metrics carry no coverage figures."""
    predicted, missed = metrics.get("val_predicted_classes"), metrics.get("val_missed_classes")
    if predicted is None or missed is None or predicted != predicted:  # NaN: a row without them
        return None
    if predicted <= 1:
        return "degenerate: predicts one class everywhere"
    if missed > 0:
        return f"degenerate: never predicts {int(missed)} class(es) present in the targets"
    return None


def per_class_scores(confusion: torch.Tensor, score_fn) -> torch.Tensor:
    """smp.metrics `score_fn` per class of a (..., C, C) confusion matrix; undefined (0/0) values are NaN."""
    confusion = confusion.double()  # exact counts up to 2**53, and no float32 rounding of large splits
    tp = confusion.diagonal(dim1=-2, dim2=-1)
    fp = confusion.sum(dim=-2) - tp
    fn = confusion.sum(dim=-1) - tp
    tn = confusion.sum(dim=(-2, -1)).unsqueeze(-1) - tp - fp - fn
    return score_fn(tp, fp, fn, tn, reduction="none", zero_division=math.nan)
