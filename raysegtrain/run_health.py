"""Whether a finished run's numbers say it diverged without ever producing a non-finite loss.

A non-finite loss stops a run as it happens (engine.py). A run can also blow up and stay finite: logits grown so
large that the validation loss reads 1e12 while the model predicts background everywhere; it ends FINISHED and
looks like any other. `divergence` flags it from the metric history, for the summary and the MLflow run.
"""

from __future__ import annotations

import math
from typing import Any

from .config import Config

# A model that guesses uniformly scores at most about 1 per unit of loss weight (Dice, Jaccard and Tversky are at
# most 1; cross-entropy of a uniform guess is ln(num_classes)). A validation loss this many times above that is not
# a model that learns slowly: it is one whose outputs have run away.
DIVERGED_FACTOR = 100.0


def loss_ceiling(cfg: Config) -> float:
    """The validation loss above which a run counts as diverged, for CFG's loss mix."""
    per_weight = max(1.0, math.log(cfg.data.num_classes))
    return DIVERGED_FACTOR * per_weight * sum(cfg.loss.terms().values())


def divergence(cfg: Config, history: list[dict[str, Any]]) -> str | None:
    """A one-line reason when the last validated epoch of HISTORY shows a diverged run, else None."""
    validated = [h for h in history if isinstance(h.get("val_loss"), (int, float))]
    if not validated:
        return None
    last = validated[-1]
    loss, ceiling = float(last["val_loss"]), loss_ceiling(cfg)
    if math.isfinite(loss) and loss <= ceiling:
        return None
    names = cfg.data.names()[1:]
    recalls = [last.get(f"val_recall_{n}") for n in names]
    background_only = all(isinstance(r, (int, float)) and r == 0 for r in recalls)
    return (f"val_loss {loss:.3g} at epoch {int(last.get('epoch', len(history)))} is over {ceiling:.3g} (far above "
            f"a uniform guess){'; the model predicts background only' if background_only else ''}: lower optim.lr "
            f"or set train.grad_clip")
