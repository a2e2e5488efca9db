"""The training loss: a weighted sum of smp.losses terms (`loss.*` weights), returned with each term's value.

Inputs: logits (N, 1, H, W) for binary or (N, C, H, W) for multiclass, and a LongTensor target (N, H, W) of class ids
that may hold `data.ignore_index`. Logits are cast to float32 first, so autocast (bf16/fp16) cannot spoil the soft
Dice/Jaccard sums. Each term is smp's own (or torch's CrossEntropyLoss); only shape/dtype glue is written here.

ignore_index, per term (checked in smp 0.6's source):
- dice, jaccard, tversky: ignored pixels are zeroed in prediction and target before the soft sums (binary and
  multiclass).
- focal, lovasz: ignored pixels are removed before the loss (binary hinge and multiclass softmax paths alike).
- bce (binary): smp's SoftBCEWithLogitsLoss zeroes the loss of ignored pixels but its 'mean' still divides by *all*
  pixels, so the mean is taken here over valid pixels only; `pos_weight` = w1 / w0 from the class weights and label
  smoothing s gives targets (s/2, 1 - s/2), which equals CrossEntropy's label smoothing over two classes.
- bce (multiclass): torch CrossEntropyLoss(weight=class_weights, ignore_index, label_smoothing).
A batch whose pixels are all ignored gives a zero loss (with a zero gradient) instead of NaN from empty means.
Class weights affect only the cross-entropy term.
"""

from __future__ import annotations

import segmentation_models_pytorch as smp
import torch
from torch import nn

from .config import Config, LossConfig
from .errors import ConfigError

TORCH_NO_IGNORE = -100  # CrossEntropyLoss's default ignore_index, a value targets never hold


class CompositeLoss(nn.Module):
    """forward(logits, target) -> (total, {term: value}); total = sum(weight * term), values detached."""

    def __init__(self, terms: dict[str, nn.Module], weights: dict[str, float], num_outputs: int,
                 ignore_index: int | None = None):
        super().__init__()
        self.terms = nn.ModuleDict(terms)
        self.weights = dict(weights)
        self.num_outputs = num_outputs
        self.ignore_index = ignore_index

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if logits.dim() != 4 or logits.shape[1] != self.num_outputs:
            raise ValueError(f"logits must be (N, {self.num_outputs}, H, W), got {tuple(logits.shape)}")
        if target.shape != logits.shape[:1] + logits.shape[2:]:
            raise ValueError(f"target must be (N, H, W) = {tuple(logits.shape[:1] + logits.shape[2:])}, "
                             f"got {tuple(target.shape)}")
        logits, target = logits.float(), target.long()
        if self.ignore_index is not None and not bool((target != self.ignore_index).any()):
            zero = logits.sum() * 0.0
            return zero, {name: zero.detach() for name in self.terms}
        parts = {name: term(logits, target) for name, term in self.terms.items()}
        total = sum(self.weights[name] * value for name, value in parts.items())
        return total, {name: value.detach() for name, value in parts.items()}


class BinaryCrossEntropy(nn.Module):
    """smp SoftBCEWithLogitsLoss for (N, 1, H, W) logits and (N, H, W) class-id targets, mean over valid pixels."""

    def __init__(self, ignore_index: int | None = None, pos_weight: float | None = None,
                 label_smoothing: float = 0.0):
        super().__init__()
        self.ignore_index = ignore_index
        self.bce = smp.losses.SoftBCEWithLogitsLoss(
            ignore_index=ignore_index, reduction="sum", smooth_factor=label_smoothing / 2 or None,
            pos_weight=None if pos_weight is None else torch.tensor([pos_weight]))

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        target = target.unsqueeze(1).to(logits.dtype)
        valid = target.numel() if self.ignore_index is None else (target != self.ignore_index).sum().clamp_min(1)
        return self.bce(logits, target) / valid


def build_loss(cfg: Config, class_weights: list[float] | None = None) -> CompositeLoss:
    """The loss of `cfg.loss`. `class_weights` (one per class) overrides `cfg.data.class_weights`; 'auto' weights
    must be computed by the caller (from the training masks) and passed here. Move the result to the device."""
    weights = _class_weights(cfg, class_weights)
    mode = smp.losses.BINARY_MODE if cfg.data.binary else smp.losses.MULTICLASS_MODE
    ignore = cfg.data.ignore_index
    terms = {name: make_term(name, cfg.loss, mode, ignore, weights) for name in cfg.loss.terms()}
    return CompositeLoss(terms, cfg.loss.terms(), 1 if cfg.data.binary else cfg.data.num_classes, ignore)


def make_term(name: str, loss: LossConfig, mode: str, ignore_index: int | None,
              class_weights: list[float] | None = None) -> nn.Module:
    if name == "dice":
        return smp.losses.DiceLoss(mode, smooth=loss.smooth, ignore_index=ignore_index)
    if name == "jaccard":
        return smp.losses.JaccardLoss(mode, smooth=loss.smooth, ignore_index=ignore_index)
    if name == "tversky":
        return smp.losses.TverskyLoss(mode, smooth=loss.smooth, ignore_index=ignore_index,
                                      alpha=loss.tversky_alpha, beta=loss.tversky_beta)
    if name == "focal":
        return smp.losses.FocalLoss(mode, alpha=loss.focal_alpha, gamma=loss.focal_gamma, ignore_index=ignore_index)
    if name == "lovasz":
        return smp.losses.LovaszLoss(mode, ignore_index=ignore_index)
    if name == "bce" and mode == smp.losses.BINARY_MODE:
        return BinaryCrossEntropy(ignore_index, _pos_weight(class_weights), loss.label_smoothing)
    if name == "bce":
        weight = None if class_weights is None else torch.tensor(class_weights, dtype=torch.float32)
        return nn.CrossEntropyLoss(weight=weight, label_smoothing=loss.label_smoothing,
                                   ignore_index=TORCH_NO_IGNORE if ignore_index is None else ignore_index)
    raise ConfigError(f"unknown loss term {name!r}")


def _class_weights(cfg: Config, given: list[float] | None) -> list[float] | None:
    weights = given if given is not None else cfg.data.class_weights
    if weights == "none":
        return None
    if weights == "auto":
        raise ValueError("data.class_weights='auto' must be resolved from the training masks before build_loss")
    if len(weights) != cfg.data.num_classes:
        raise ConfigError(f"class weights: {len(weights)} values for num_classes={cfg.data.num_classes}")
    return [float(w) for w in weights]


def _pos_weight(class_weights: list[float] | None) -> float | None:
    if class_weights is None:
        return None
    background, foreground = class_weights
    if background <= 0:
        raise ConfigError(f"class weights {class_weights}: binary BCE needs a background weight > 0 "
                          f"(pos_weight = w1 / w0)")
    return foreground / background
