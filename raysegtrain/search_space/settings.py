"""The study settings of a space file (objective, budget, trial resources, ASHA, searcher) as a pydantic schema.

It exists so that the settings get the same treatment as a fit config: unknown keys and out-of-range values are
rejected with their dotted path and the closest valid name, by the formatter that config errors use, before any of
the `space` entries are looked at.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..config import Config, TrainConfig, format_validation_error
from ..errors import ConfigError


class _Settings(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Objective(_Settings):
    metric: str = Field("auto", description="the reported metric that Optuna optimises and ASHA compares; auto: the "
                                            "base config's train.monitor (val_fg_iou for binary tasks, val_iou "
                                            "for multi-class, unless the base sets one)")
    mode: Optional[Literal["max", "min"]] = Field(None, description="default: min for *loss metrics, else max")

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, v: str) -> str:
        if v == "auto":
            return v
        try:
            TrainConfig.model_validate({"monitor": v})
        except ValidationError as e:
            raise ValueError(e.errors()[0]["msg"].removeprefix("Value error, ")) from None
        return v


class Budget(_Settings):
    num_samples: int = Field(8, ge=-1, description="trials to run; -1 = until time_budget_s runs out")
    time_budget_s: Optional[float] = Field(None, gt=0, description="stop starting trials after this many seconds")

    @model_validator(mode="after")
    def _bounded(self):
        if self.num_samples == 0:
            raise ValueError("num_samples must be >= 1 (or -1 with time_budget_s)")
        if self.num_samples == -1 and self.time_budget_s is None:
            raise ValueError("num_samples: -1 (unlimited) needs time_budget_s")
        return self


class TrialResources(_Settings):
    """Per-trial scaling; each field left out keeps the base config's `scaling` value."""

    num_workers: Optional[int] = Field(None, ge=1, description="Ray Train workers (DDP ranks) per trial")
    gpus_per_worker: Optional[float] = Field(None, gt=0, description="fractions pack trials on a GPU (0.25 = 4)")
    cpus_per_worker: Optional[float] = Field(None, gt=0, description="CPUs reserved per worker")
    use_gpu: Optional[Literal["auto", "true", "false"]] = Field(None, description="as scaling.use_gpu")
    runtime: Literal["auto", "warm", "trainer"] = Field(
        "auto", description="warm: the trial trains inside its Tune actor, which the next trial reuses (imports, "
                            "CUDA context, caches stay warm); trainer: a TorchTrainer per trial; auto: warm for one "
                            "worker per trial, trainer for DDP trials")

    @field_validator("use_gpu", mode="before")
    @classmethod
    def _bool(cls, v):
        return str(v).lower() if isinstance(v, bool) else v

    def as_overrides(self) -> dict[str, Any]:
        """The scaling.* keys of the trial config (`runtime` is the study's, not the config's)."""
        return {f"scaling.{k}": v for k, v in self.model_dump(exclude={"runtime"}).items() if v is not None}


class Asha(_Settings):
    max_epochs: Optional[int] = Field(None, ge=1, description="epochs of every trial (train.epochs); default: base's")
    grace_period: int = Field(1, ge=1, description="epochs every trial runs before ASHA may stop it")
    reduction_factor: float = Field(3, gt=1, description="keep the top 1/reduction_factor at each rung")


class Searcher(_Settings):
    algorithm: Literal["tpe", "random", "gp", "qmc"] = Field(
        "tpe", description="Optuna sampler: tpe (multivariate, grouped for conditional spaces), random, gp "
                           "(Gaussian process), qmc (quasi-random); conditional parameters outside the common part "
                           "are sampled at random by gp and qmc")
    seed: Optional[int] = Field(0, description="sampler seed: the same seed proposes the same sequence")
    n_startup_trials: Optional[int] = Field(None, ge=0, description="tpe/gp: random trials before the model")
    points_to_evaluate: list[dict[str, Any]] = Field(
        default_factory=list, description="known-good starting points, {dotted.key or branch label: value}")


class CheckpointSettings(_Settings):
    """Which trials' checkpoints outlive the study."""

    mlflow: Literal["all", "top", "best", "none"] = Field(
        "top", description="trials whose best weights (weights only) go to their MLflow run: all, the top "
                           "`top` by the objective, the best trial only, or none")
    top: int = Field(3, ge=1, description="how many trials `mlflow: top` keeps")
    prune: bool = Field(True, description="once the study has finished, delete the trial checkpoints on disk "
                                          "except each kept trial's best (a finished study resumes nothing)")

    @property
    def kept(self) -> int | None:
        """How many of the best trials keep their checkpoint (None: all)."""
        return {"all": None, "top": self.top, "best": 1, "none": 0}[self.mlflow]


class RepeatSettings(_Settings):
    """Repeat-best: after the search, the top configs trained again with several seeds (study_repeat.py)."""

    top: int = Field(0, ge=0, description="configs re-run after the search, best first; 0 = no repeats")
    seeds: int = Field(3, ge=2, le=50, description="seeds per config (train.seed, train.seed+1, ...)")


class SpaceFile(_Settings):
    base: Union[str, dict[str, Any]] = Field(default_factory=dict, description="fit config: path or inline mapping")
    overrides: list[str] = Field(default_factory=list, description="dotted key=value applied to the base")
    objective: Objective = Field(default_factory=Objective)
    budget: Budget = Field(default_factory=Budget)
    max_concurrent_trials: int = Field(1, ge=1, description="trials running at once")
    trial: TrialResources = Field(default_factory=TrialResources)
    asha: Asha = Field(default_factory=Asha)
    searcher: Searcher = Field(default_factory=Searcher)
    checkpoints: CheckpointSettings = Field(default_factory=CheckpointSettings)
    repeat: RepeatSettings = Field(default_factory=RepeatSettings)
    space: dict[str, Any] = Field(description="distributions over dotted config keys")


SETTINGS_KEYS = ("objective", "budget", "max_concurrent_trials", "trial", "asha", "searcher", "checkpoints",
                 "repeat")
# a config section written at the top of a space file: say where it belongs rather than guess a settings key
_MISPLACED = {section: "config sections go under base: (or use overrides)" for section in Config.model_fields}


def parse_settings(raw: dict, source: str = "space") -> SpaceFile:
    """The whole space file validated as settings (the `space` entries are parsed later, into nodes)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping (base:, space:, ...)")
    if "space" not in raw:
        raise ConfigError(f"{source}: space: required (the distributions to search)")
    try:
        return SpaceFile.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(f"{source}: {format_validation_error(e, SpaceFile, _MISPLACED)}") from None
