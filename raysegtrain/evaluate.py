"""Metrics of a trained checkpoint on a split, with the very code that validates during training."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .config import Config
from .engine import SegmentationTrainer, load_checkpoint


def evaluate_checkpoint(checkpoint: str | Path, cfg: Config | None = None, split: str | None = None,
                        device: str | None = None) -> dict[str, Any]:
    """Validate CHECKPOINT's weights on SPLIT (default: the config's validation split). CFG defaults to the config
    stored in the checkpoint."""
    state = load_checkpoint(checkpoint)
    cfg = cfg or Config.model_validate(state["config"])
    if split:
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"val_split": split})})
    trainer = SegmentationTrainer(cfg, device=device)
    trainer.module.load_state_dict(state["model"])
    return trainer.validate()
