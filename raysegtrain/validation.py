"""One validation pass: a model's loss and metrics over a split, summed over every rank.

Training (`SegmentationTrainer.validate`) and the `evaluate` command both run `validate`, so a checkpoint evaluated
later gives the very numbers its training logged. It changes nothing but the meter's statistics and the model's
mode: stepping a schedule on the result is the training loop's business.
"""

from __future__ import annotations

from typing import Iterable

import torch

from .runtime import all_reduce_mean, autocast


@torch.no_grad()
def validate(model: torch.nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], loss_fn, meter,
             device: torch.device, amp_dtype: torch.dtype | None = None, forward=None) -> dict[str, float]:
    """val_loss (LOSS_FN's mean over images) and METER's scores (val_iou, val_dice, ...) of MODEL on BATCHES,
    (model input, mask) pairs on DEVICE. Under DDP every rank calls it with its own shard, and each gets the whole
    split's figures. MODEL is left in eval mode. FORWARD, when given, computes MODEL's output (a compiled forward)."""
    model.eval()
    forward = forward or model
    meter.reset()
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    count = 0
    for x, y in batches:
        with autocast(device, amp_dtype):
            logits = forward(x)
        logits = logits.float()
        loss, _ = loss_fn(logits, y)
        loss_sum += loss.double() * x.shape[0]
        count += x.shape[0]
        meter.update(logits, y)
    meter.all_reduce()
    return {"val_loss": all_reduce_mean(loss_sum, count), **meter.compute()}
