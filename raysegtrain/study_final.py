"""An honest final number for a study: the chosen config's model evaluated once on the test split, after the
selection, and reported apart from the validation figures that chose it.

Selection uses the validation split (the objective), so the best trial's validation score is biased upwards by the
very act of picking the maximum; the test split, untouched until the choice is made, gives the number to quote. It
runs once per finished study, on the chosen trial's best checkpoint (a Ray task holding one training worker's
resources), and is skipped when the dataset has no test split.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .config import Config

FINAL_TEST_FILE = "final_test.yaml"


@dataclass
class FinalTest:
    trial_id: str  # the trial whose checkpoint was evaluated
    split: str  # the test split's name
    metric: str  # the study's objective, e.g. val_fg_iou
    validation_value: float | None  # what selection saw
    metrics: dict[str, float] = field(default_factory=dict)  # test_<name>: value

    @property
    def test_value(self) -> float | None:
        return self.metrics.get(as_test_metric(self.metric))

    @property
    def note(self) -> str:
        return (f"the validation {self.metric} ({_fmt(self.validation_value)}) selected this config; the test figure "
                f"({_fmt(self.test_value)}) was computed once, after selection, on split {self.split!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"trial_id": self.trial_id, "split": self.split, "objective": self.metric,
                f"validation_{self.metric}": self.validation_value, f"{as_test_metric(self.metric)}": self.test_value,
                "note": self.note, "metrics": self.metrics}

    def write(self, folder: Path) -> Path:
        path = folder / FINAL_TEST_FILE
        path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))
        return path


def as_test_metric(metric: str) -> str:
    """val_fg_iou -> test_fg_iou: the same figure on the test split."""
    return "test_" + metric.removeprefix("val_")


def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else "n/a"


def has_test_split(cfg: Config) -> bool:
    from .data.splits import has_split, resolve_root

    try:
        return has_split(cfg.data, "test", resolve_root(cfg.data))
    except Exception:  # no readable layout: nothing to test on
        return False


def evaluate_on_test(checkpoint: str, use_gpu: bool, cpus: float, gpus: float) -> dict[str, float]:
    """CHECKPOINT's metrics on its config's test split, as test_<name> (a Ray task with one worker's resources)."""
    import ray

    from .evaluate import evaluate_checkpoint

    task = ray.remote(num_cpus=cpus, num_gpus=gpus if use_gpu else 0, max_retries=0)(evaluate_checkpoint)
    # the checkpoint's own config (with the dataset statistics it trained with), on the test split
    metrics = ray.get(task.remote(checkpoint, None, "test", "cuda" if use_gpu else "cpu"))
    return {"test_" + k.removeprefix("val_"): float(v) for k, v in metrics.items() if isinstance(v, (int, float))}


def final_test(trial_id: str, cfg: Config, checkpoint: str | None, metric: str, validation_value: float | None,
               scaling) -> FinalTest | None:
    """The chosen trial's CHECKPOINT on CFG's test split, once; None without a test split or a checkpoint."""
    if checkpoint is None or not has_test_split(cfg):
        return None
    res = scaling.resources_per_worker or {}
    metrics = evaluate_on_test(checkpoint, scaling.use_gpu, res.get("CPU", 1), res.get("GPU", 0))
    return FinalTest(trial_id, cfg.data.test_split, metric, validation_value, metrics)
