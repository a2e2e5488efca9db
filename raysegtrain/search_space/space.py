"""`SearchSpace`: a validated space file, compiled for Ray Tune's OptunaSearch and ASHA, and the trial configs.

It exists as the one object the study code needs: the settings Ray Tune asks for, `define_by_run` for OptunaSearch,
and `trial_config` to turn what Ray passes a trial back into a `Config`. What Ray passes: `OptunaSearch(space=
define_by_run)` builds each trial's config from the suggested Optuna parameters (nested on `/`) merged with the
function's return value `{"overrides": {dotted.key: value}}`; only `config["overrides"]` is used. A trial config is
layered as base + the file's overrides + the trial/asha/objective settings + the sampled overrides, where sampled loss
weights replace the base's whole mix (the rule of `config.LossConfig`).
"""

from __future__ import annotations

import copy
import itertools
import warnings
from typing import Any, Iterator, Optional

from pydantic import ValidationError

from ..config import LOSS_TERMS, Config, apply_overrides, format_validation_error, monitor_mode
from ..errors import ConfigError
from ..redaction import redact_config_dict, supply_redacted
from .keys import LOSS_WEIGHT_KEYS, RAY_RESULT_KEY
from .naming import assign_names, check_conflicts, check_unique_names
from .nodes import Constant, iter_nodes
from .parsing import parse_space
from .pickers import FixedPicker, OptunaPicker, resolve
from .settings import SpaceFile
from .validation import check_combinations, check_every_value, checked_combinations, point_params, value_cases

TIME_ATTR = "epoch"            # ASHA's time attribute: the epoch every trial reports


class SearchSpace:
    """A validated search space: the study settings, the base config and the compiled distributions."""

    def __init__(self, settings: SpaceFile, base_raw: dict, source: str = "space", raw: Optional[dict] = None):
        self.settings = settings
        self.source = source
        self.raw = raw if raw is not None else settings.model_dump(mode="json")
        self.nodes = parse_space(settings.space)
        assign_names(self.nodes)
        check_conflicts(self.nodes)
        check_unique_names(self.nodes)
        if not any(not isinstance(n, Constant) for n in iter_nodes(self.nodes)):
            raise ConfigError("space: has no distribution to search (only constants); add a choice or a range")
        self._study_raw = self._study_base(base_raw)
        self._study_raw_no_loss_weights = _without_loss_weights(self._study_raw)
        self.base_config = self._build(self._study_raw, {}, "base with the trial/asha/objective settings")
        check_every_value(self.nodes, self._config_error)
        check_combinations(self.nodes, self._config_error)
        self.points_to_evaluate = [point_params(self.nodes, p, f"searcher.points_to_evaluate[{i}]", self._config_error)
                                   for i, p in enumerate(settings.searcher.points_to_evaluate)]

    # -- settings --------------------------------------------------------------------------------------------
    @property
    def metric(self) -> str:
        """The objective, resolved: `objective.metric`, or for `auto` the base config's train.monitor."""
        return self._metric

    @property
    def mode(self) -> str:
        return monitor_mode(self._metric, self.settings.objective.mode)

    @property
    def num_samples(self) -> int:
        return self.settings.budget.num_samples

    @property
    def time_budget_s(self) -> Optional[float]:
        return self.settings.budget.time_budget_s

    @property
    def max_concurrent_trials(self) -> int:
        return self.settings.max_concurrent_trials

    @property
    def max_epochs(self) -> int:
        return self.base_config.train.epochs

    @property
    def runtime(self) -> str:
        """How trials run, resolved: "warm" (in the reused Tune actor) or "trainer" (a TorchTrainer per trial)."""
        asked, workers = self.settings.trial.runtime, self.base_config.scaling.num_workers
        if asked == "auto":
            return "warm" if workers == 1 else "trainer"
        return asked

    @property
    def asha(self) -> dict[str, Any]:
        """Keyword arguments for `ray.tune.schedulers.ASHAScheduler` (metric/mode come from TuneConfig)."""
        a = self.settings.asha
        return {"time_attr": TIME_ATTR, "max_t": self.max_epochs, "grace_period": a.grace_period,
                "reduction_factor": a.reduction_factor}

    def make_sampler(self):
        """The Optuna sampler the `searcher` section asks for (pass it to OptunaSearch(sampler=...))."""
        import optuna

        s = self.settings.searcher
        startup = {} if s.n_startup_trials is None else {"n_startup_trials": s.n_startup_trials}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            if s.algorithm == "tpe":
                return optuna.samplers.TPESampler(seed=s.seed, multivariate=True, group=True, **startup)
            if s.algorithm == "gp":
                return optuna.samplers.GPSampler(seed=s.seed, warn_independent_sampling=False, **startup)
            if s.algorithm == "qmc":
                return optuna.samplers.QMCSampler(seed=s.seed, scramble=True, warn_independent_sampling=False)
            return optuna.samplers.RandomSampler(seed=s.seed)

    # -- sampling --------------------------------------------------------------------------------------------
    def define_by_run(self, trial) -> dict[str, dict[str, Any]]:
        """For `OptunaSearch(space=...)`: suggests the active parameters, returns {"overrides": {dotted.key: v}}."""
        return {RAY_RESULT_KEY: self.sample(trial)}

    def sample(self, trial) -> dict[str, Any]:
        """The flat {dotted.key: value} overrides of one Optuna trial (constants included, branch labels not)."""
        return resolve(self.nodes, OptunaPicker(trial))

    def overrides_for_params(self, params: dict[str, Any]) -> dict[str, Any]:
        """The overrides of a finished Optuna trial's `params` ({optuna name: value})."""
        import optuna

        return self.sample(optuna.trial.FixedTrial(params))

    def trial_config(self, overrides: dict[str, Any]) -> Config:
        """base + trial scaling + asha.max_epochs + objective + the sampled overrides. Accepts the flat overrides
        or the whole config Ray passed to the trainable ({"overrides": {...}, ...})."""
        if isinstance(overrides.get(RAY_RESULT_KEY), dict):
            overrides = overrides[RAY_RESULT_KEY]
        return self._build(self._raw_for(overrides), overrides, "trial config")

    @property
    def parameters(self) -> dict[str, str]:
        """Every Optuna parameter name with its distribution, e.g. {'model/encoder:model.arch:unet': "choice [...]"}."""
        return {n.name: n.describe() for n in iter_nodes(self.nodes) if not isinstance(n, Constant)}

    def example_configs(self) -> Iterator[tuple[dict[str, Any], Config]]:
        """(overrides, Config) covering every option and range end (the rest of its branch at the middle) and every
        combination of conditional options: for preflight checks too slow to run per trial, e.g. building each
        reachable arch/encoder model. Distinct overrides only."""
        seen = set()
        middles = (resolve(self.nodes, FixedPicker("middle", forced)) for forced in checked_combinations(self.nodes))
        for overrides in itertools.chain((case for _, _, case, _ in value_cases(self.nodes)), middles):
            key = repr(sorted(overrides.items(), key=lambda kv: kv[0]))
            if key not in seen:
                seen.add(key)
                yield overrides, self.trial_config(overrides)

    def to_dict(self) -> dict[str, Any]:
        """Everything about the study, for logging (credentials redacted): the space file as applied, the resolved
        base and parameters."""
        return redact_config_dict({"source": self.source, **copy.deepcopy(self.raw),
                "resolved": {"metric": self.metric, "mode": self.mode, "num_samples": self.num_samples,
                             "time_budget_s": self.time_budget_s, "max_concurrent_trials": self.max_concurrent_trials,
                             "trial_runtime": self.runtime, "asha": self.asha, "points_to_evaluate": self.points_to_evaluate,
                             "parameters": self.parameters},
                "base_config": self.base_config.to_dict()})

    def redacted(self) -> "SearchSpace":
        """This space with every credential of its base redacted: what travels to the trials (which write no
        MLflow run and store through Tune's storage) and into Ray's saved study state."""
        other = copy.copy(self)
        other.settings = self.settings.model_copy(update={"overrides": redact_config_dict(self.settings.overrides)})
        other.raw = redact_config_dict(self.raw)
        other._study_raw = redact_config_dict(self._study_raw)
        other._study_raw_no_loss_weights = redact_config_dict(self._study_raw_no_loss_weights)
        other.base_config = Config.model_validate(self.base_config.redacted_dict())
        return other

    # -- building configs ------------------------------------------------------------------------------------
    def _study_base(self, base_raw: dict) -> dict:
        s = self.settings
        raw = supply_redacted(apply_overrides(base_raw, s.overrides), self.source)
        base = self._build(raw, {}, "base")
        asked = s.objective.metric
        self._metric = base.train.monitor if asked == "auto" else asked
        fixed = {**s.trial.as_overrides(), "train.epochs": s.asha.max_epochs or base.train.epochs,
                 "train.monitor": self.metric, "train.mode": self.mode}
        # short trials: checkpoints on improvement and at the end, no cuDNN autotuning, unless the base says otherwise
        if "checkpoint_every" not in (raw.get("run") or {}):
            fixed["run.checkpoint_every"] = 0
        if "cudnn_benchmark" not in (raw.get("train") or {}):
            fixed["train.cudnn_benchmark"] = "off"
        if s.trial.runtime == "warm" and apply_overrides(raw, fixed).get("scaling", {}).get("num_workers", 1) != 1:
            raise ConfigError("trial.runtime=warm trains each trial in one process: set trial.num_workers=1, or "
                              "trial.runtime=auto (a TorchTrainer per trial for DDP)")
        if s.asha.grace_period > fixed["train.epochs"]:
            raise ConfigError(f"asha.grace_period ({s.asha.grace_period}) must be <= asha.max_epochs "
                              f"({fixed['train.epochs']})")
        return apply_overrides(raw, fixed)

    def _raw_for(self, overrides: dict[str, Any]) -> dict:
        names_loss_weight = any(k in LOSS_WEIGHT_KEYS for k in overrides)
        raw = self._study_raw_no_loss_weights if names_loss_weight else self._study_raw
        return apply_overrides(raw, overrides)

    def _config_error(self, overrides: dict[str, Any]) -> Optional[str]:
        """The one-line error of the trial config these overrides give, or None if it is valid."""
        try:
            Config.model_validate(self._raw_for(overrides))
        except ValidationError as e:
            return format_validation_error(e).removeprefix("(top level): ")
        except ConfigError as e:
            return str(e)
        return None

    def _build(self, raw: dict, overrides: dict, what: str) -> Config:
        try:
            return Config.model_validate(raw)
        except ValidationError as e:
            msg = format_validation_error(e).removeprefix("(top level): ")
            shown = f" {_short(overrides)}" if overrides else ""
            raise ConfigError(f"{self.source}: {what}{shown} is invalid: {msg}") from None


def _without_loss_weights(raw: dict) -> dict:
    raw = copy.deepcopy(raw)
    loss = raw.get("loss")
    if isinstance(loss, dict):
        raw["loss"] = {k: v for k, v in loss.items() if k not in LOSS_TERMS}
    return raw


def _short(overrides: dict) -> str:
    return "{" + ", ".join(f"{k}: {v!r}" for k, v in overrides.items()) + "}"
