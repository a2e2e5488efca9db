"""The LR range test (Smith 2015; fastai's `lr_find`) on the real training loop, and the rule that turns its curve
into a learning rate.

The test trains the configured model on the configured data, in one process, for at most `optim.lr_finder.steps`
optimizer steps, with the learning rate growing exponentially from `min_lr` to `max_lr` (every parameter group keeps
its `encoder_lr_mult` ratio; the schedule is not used). The loss is smoothed with a bias-corrected exponential moving
average (`smoothing`); the test stops early when the smoothed loss exceeds `diverge` times its minimum, or a loss is
not finite.

The suggestion (`suggest_lr`): the learning rate at the minimum of the loss smoothed without lag, divided by 10. At
the minimum the lr is already on the edge of instability; one decade below it the loss still falls steeply, and the
rule is the classic one (Smith; fastai's `lr_min`), less noisy than the point of steepest descent, which is also
reported (`steepest_lr`, the most negative slope of the smoothed loss over log lr before the minimum). The causal
moving average that watches for divergence lags by about 1/(1-smoothing) steps, which on a ramp of a hundred steps
over seven decades moves its minimum a decade to the right; the suggestion therefore uses the mean of that average
run forwards and backwards over the recorded curve (`centered`), whose lags cancel, and does not look for the minimum
in the last 1/(1-smoothing) steps, which the backward average has barely smoothed. Segmentation losses (Dice, BCE
with BatchNorm) are bounded in practice, so a test often ends without diverging on a flat, noisy tail: that tail is
what the trim keeps out of the choice.

Nothing here knows of Ray or MLflow: `run_range_test` is the loop, `lr_find_remote` (ray_support side) runs it on a
worker with one training worker's resources, tracking.log_lr_find records it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from itertools import count
from pathlib import Path
from typing import Any, Sequence

from .config import Config


@dataclass
class RangeTest:
    lrs: list[float]
    losses: list[float]
    smoothed: list[float]  # `centered` (no lag): the curve the suggestion is read from
    suggestion: float  # min_loss_lr / 10: the rule this module documents
    min_loss_lr: float  # lr at the smoothed loss's minimum
    steepest_lr: float  # lr of the steepest descent of the smoothed loss (for comparison)
    stop: str  # "diverged at step N" or "completed N steps"
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        return (f"suggested lr {self.suggestion:.3g} (= lr at the smoothed loss's minimum, {self.min_loss_lr:.3g}, "
                f"/ 10; steepest descent at {self.steepest_lr:.3g}); {self.stop}")


# ----------------------------------------------------------------------------------------------- the curve's rules
def lr_ramp(min_lr: float, max_lr: float, steps: int) -> list[float]:
    """STEPS learning rates growing exponentially from MIN_LR to MAX_LR."""
    if steps < 2:
        return [min_lr]
    ratio = (max_lr / min_lr) ** (1 / (steps - 1))
    return [min_lr * ratio ** i for i in range(steps)]


def smooth(losses: Sequence[float], beta: float) -> list[float]:
    """Bias-corrected exponential moving average (the first values are not pulled towards 0)."""
    out, avg = [], 0.0
    for i, loss in enumerate(losses, 1):
        avg = beta * avg + (1 - beta) * loss
        out.append(avg / (1 - beta ** i))
    return out


def centered(losses: Sequence[float], beta: float) -> list[float]:
    """The mean of the forward and the backward moving average: smooth like `smooth`, without its lag."""
    forward, backward = smooth(losses, beta), smooth(losses[::-1], beta)[::-1]
    return [(a + b) / 2 for a, b in zip(forward, backward)]


def diverged(smoothed: Sequence[float], factor: float) -> bool:
    """The newest smoothed loss exceeds FACTOR times the lowest so far (or is not finite)."""
    last = smoothed[-1]
    return not math.isfinite(last) or (len(smoothed) > 1 and last > factor * min(smoothed))


def suggest_lr(lrs: Sequence[float], smoothed: Sequence[float], trim: int = 0) -> tuple[float, float, float]:
    """(suggestion, min_loss_lr, steepest_lr) of a range test's curve SMOOTHED (use `centered`), its last TRIM
    points (where the backward average has seen too little to smooth) not candidates for the minimum; see the
    module's doc for the rule."""
    finite = [i for i, s in enumerate(smoothed) if math.isfinite(s)]
    if not finite:
        raise ValueError("the range test recorded no finite loss")
    candidates = finite[:max(1, len(finite) - trim)]
    i_min = min(candidates, key=lambda i: smoothed[i])
    min_loss_lr = lrs[i_min]
    slopes = [(smoothed[i + 1] - smoothed[i]) / (math.log(lrs[i + 1]) - math.log(lrs[i]))
              for i in range(i_min) if i + 1 in finite and i in finite]
    steepest_lr = lrs[min(range(len(slopes)), key=slopes.__getitem__)] if slopes else min_loss_lr
    return min_loss_lr / 10, min_loss_lr, steepest_lr


# ------------------------------------------------------------------------------------------------------- the loop
def range_test_config(cfg: Config) -> Config:
    """CFG as the range test trains it: a numeric starting lr in place of `auto`, one worker."""
    f = cfg.optim.lr_finder
    return cfg.model_copy(update={
        "optim": cfg.optim.model_copy(update={"lr": f.min_lr}),
        "scaling": cfg.scaling.model_copy(update={"num_workers": 1}),
    })


def run_range_test(cfg: Config, device: str | None = None, datasets=None) -> RangeTest:
    """The range test of CFG in this process (see the module's doc)."""
    from .engine import SegmentationTrainer

    f = cfg.optim.lr_finder
    trainer = SegmentationTrainer(range_test_config(cfg), device=device, datasets=datasets)
    trainer.epochs = max(trainer.epochs, 1)
    trainer.setup()
    trainer.set_encoder_frozen(False)
    ratios = [g["lr"] / f.min_lr for g in trainer.optimizer.param_groups]  # encoder_lr_mult, kept on the ramp
    ramp = lr_ramp(f.min_lr, f.max_lr, f.steps)
    lrs: list[float] = []
    losses: list[float] = []
    smoothed: list[float] = []
    stop = f"completed {len(ramp)} steps"
    average = 0.0  # the moving average of `smooth`, kept step by step
    trainer.train_mode()
    trainer.optimizer.zero_grad(set_to_none=True)
    for epoch in count():
        for x, y in trainer.device_batches(trainer._start_train_batches(epoch)):
            step = len(lrs)
            for group, ratio in zip(trainer.optimizer.param_groups, ratios):
                group["lr"] = ramp[step] * ratio
            loss = trainer.training_step(x, y)
            trainer.scaler.scale(loss).backward()
            trainer.optimizer_step(step_schedule=False)
            value = float(loss.detach())
            lrs.append(ramp[step])
            losses.append(value)
            average = f.smoothing * average + (1 - f.smoothing) * value
            smoothed.append(average / (1 - f.smoothing ** len(lrs)) if math.isfinite(value) else math.inf)
            if step >= 5 and diverged(smoothed, f.diverge):
                stop = f"diverged at step {step + 1} (lr {ramp[step]:.3g})"
                break
            if len(lrs) == len(ramp):
                break
        else:
            if not trainer.train_loader:
                raise ValueError("the range test has no training batches")
            continue
        break
    finite = [i for i, v in enumerate(losses) if math.isfinite(v)]
    curve = centered([losses[i] for i in finite], f.smoothing)
    suggestion, min_loss_lr, steepest_lr = suggest_lr([lrs[i] for i in finite], curve,
                                                      trim=round(1 / (1 - f.smoothing)))
    smoothed = [math.inf] * len(lrs)
    for i, v in zip(finite, curve):
        smoothed[i] = v
    return RangeTest(lrs, losses, smoothed, suggestion, min_loss_lr, steepest_lr, stop)


def with_lr(cfg: Config, lr: float) -> Config:
    """CFG with optim.lr set to LR (the range test's choice, in place of `auto`)."""
    return cfg.model_copy(update={"optim": cfg.optim.model_copy(update={"lr": float(lr)})})


def resolve_trial_lr(cfg: Config, resume_state: dict | None, run_test) -> tuple[Config, float | None]:
    """A study trial's `optim.lr: auto` (the space does not search optim.lr): the lr its checkpoint trained with
    when the trial resumes, else RUN_TEST(cfg)'s suggestion. Returns the config to train and the lr found now (None
    when nothing ran)."""
    if cfg.optim.lr != "auto":
        return cfg, None
    trained = ((resume_state or {}).get("config") or {}).get("optim", {}).get("lr")
    if isinstance(trained, (int, float)):
        return with_lr(cfg, trained), None
    result = run_test(cfg)
    return with_lr(cfg, result.suggestion), result.suggestion


def write_outputs(result: RangeTest, out_dir: str | Path) -> dict[str, Path]:
    """The plot (lr_find.png), the curve (lr_find.csv) and the summary (lr_find.yaml) in OUT_DIR."""
    import csv

    import yaml

    from . import plots

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"plot": out / "lr_find.png", "csv": out / "lr_find.csv", "summary": out / "lr_find.yaml"}
    plots.lr_range_test(result.lrs, result.losses, result.smoothed, result.suggestion, result.min_loss_lr,
                        paths["plot"])
    with open(paths["csv"], "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["step", "lr", "loss", "smoothed_loss"])
        for i, row in enumerate(zip(result.lrs, result.losses, result.smoothed), 1):
            w.writerow([i, *row])
    paths["summary"].write_text(yaml.safe_dump(
        {"suggestion": result.suggestion, "min_loss_lr": result.min_loss_lr, "steepest_lr": result.steepest_lr,
         "stop": result.stop, "steps": len(result.lrs),
         "rule": "lr at the minimum of the smoothed loss / 10"}, sort_keys=False))
    return paths
