"""Search-space files for `raysegtrain tune SPACE.yaml`: parsing, validation, and compilation to Optuna define-by-run.

A space file is a base fit config plus distributions over its dotted keys, and the study settings::

    base: ../my_fit.yaml              # a fit config file (relative to this file) or an inline mapping
    overrides: [train.batch_size=16]  # dotted key=value applied to the base
    objective: {metric: val_iou, mode: max}          # mode default: min for *loss metrics, else max
    budget: {num_samples: 8, time_budget_s: 3600}
    max_concurrent_trials: 4
    trial: {num_workers: 1, gpus_per_worker: 0.25, cpus_per_worker: 4}   # -> scaling.* of every trial
    asha: {max_epochs: 20, grace_period: 2, reduction_factor: 3}        # max_epochs -> train.epochs
    searcher: {algorithm: tpe, seed: 0, points_to_evaluate: [{model.arch: unet, model.encoder: resnet34}]}
    space:
      optim.lr: {loguniform: [1.0e-4, 3.0e-3]}
      model.arch:
        choice:
          unet: {model.encoder: {choice: [resnet18, resnet34]}}
          fpn:  {model.encoder: {choice: [resnet34, efficientnet-b0]}}
      schedule.name: {choice: [cosine, step]}
      schedule.step_size: {int: [2, 10], when: {schedule.name: step}}
      loss_mix:                                       # a label, not a config key: one option per loss mix
        branch:
          dice_bce:   {loss.dice: {uniform: [0.2, 0.8]}, loss.bce: {uniform: [0.2, 0.8]}}
          dice_focal: {loss.dice: 1.0, loss.focal: {uniform: [0.5, 2]}, loss.focal_gamma: {uniform: [1, 3]}}

Entries of `space` (keys are dotted config keys, except `branch` labels):
- `{choice: [a, b]}`; `{choice: {a: {sub-space}, b: {}}}` samples the sub-space only when its option is chosen;
  `{branch: {label: {sub-space}, ...}}` is such a choice whose value is not a config key (only its sub-space is set).
- `{uniform: [lo, hi]}`, `{loguniform: [lo, hi]}`, `{int: [lo, hi], log: false, step: 1}`, `{quniform: [lo, hi, q]}`.
- a scalar: a constant. (A bare list is rejected as ambiguous: write `{choice: [...]}`.)
- `when: {parent.key: option}` (or a list of options) on any entry is short for nesting the entry in those options'
  sub-spaces; the parent must be a choice at the same level.
- Loss mixes: if a trial's sampled values name any loss weight (`loss.dice`, `loss.bce`, ...), they define the whole
  mix: the base's weights are dropped and unnamed terms are 0 (the rule of `config.LossConfig`).
- Owned by the study settings and rejected in `space`: train.epochs (asha.max_epochs), scaling.num_workers /
  gpus_per_worker / cpus_per_worker / use_gpu (trial.*), train.monitor / train.mode (objective).

Optuna parameter names: the dotted key with `/` for `.` (Ray nests on `/`), then, for a parameter inside a
conditional option, `:<parent key>:<option>` for each enclosing choice, outermost first:
`optim/lr`, `model/arch`, `model/encoder:model.arch:unet`, `schedule/step_size:schedule.name:step`,
`loss_mix`, `loss/dice:loss_mix:dice_bce`. A parameter gets a separate name per option it lives in, so no Optuna
distribution changes between trials (Optuna rejects a categorical whose choices change). Only characters that MLflow
accepts in parameter names are used (option text is sanitised), so Ray's config can be logged as-is.

What Ray passes to the trainable: `OptunaSearch(space=search_space.define_by_run)` builds each trial's config from the
suggested Optuna parameters (nested on `/`) merged with the function's return value `{"overrides": {dotted.key:
value}}`. So the trial config is `{"overrides": {...}, <the Optuna parameters, nested>}`; the trainable uses only
`config["overrides"]`: `search_space.trial_config(config)` gives the trial's `Config`.

API: `load_space(path, cli_overrides)` -> `SearchSpace` (everything validated; ConfigError otherwise) with
`define_by_run(trial)`, `sample(trial)` (flat overrides), `trial_config(overrides)`, `points_to_evaluate` (Optuna
names, for OptunaSearch's `points_to_evaluate`, which enqueues them as fixed params), `make_sampler()`, `asha`
(ASHAScheduler kwargs), `metric`/`mode`/`num_samples`/`time_budget_s`/`max_concurrent_trials`, `parameters`,
`overrides_for_params(optuna_params)`, `example_configs()` (one config per option/range end/branch combination, for
slow preflight checks such as building each arch/encoder model) and `to_dict()` (for logging).

Validation before Ray starts: the settings and every dotted key against the schema; then every constant, option and
range end is built into a trial config, first on its own (a loss weight with its whole mix) so the error names its
key, then with the rest of its branch at the middle of its ranges; then every combination of conditional options
(up to MAX_CHECKED_COMBINATIONS) with all ranges at their low ends and at their high ends. Interactions between two
ranges at opposite ends are not enumerated; such a trial fails at its own config build with the same one-line error.
"""

from __future__ import annotations

import copy
import difflib
import itertools
import math
import re
import typing
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from . import config as cfgmod
from .config import LOSS_TERMS, Config
from .errors import ConfigError

DISTRIBUTIONS = ("choice", "branch", "uniform", "loguniform", "int", "quniform")
ENTRY_KEYWORDS = (*DISTRIBUTIONS, "log", "step", "when")
LOSS_WEIGHT_KEYS = frozenset(f"loss.{t}" for t in LOSS_TERMS)
STUDY_OWNED_KEYS = {
    "train.epochs": "asha.max_epochs", "train.monitor": "objective.metric", "train.mode": "objective.mode",
    "scaling.num_workers": "trial.num_workers", "scaling.gpus_per_worker": "trial.gpus_per_worker",
    "scaling.cpus_per_worker": "trial.cpus_per_worker", "scaling.use_gpu": "trial.use_gpu",
}
RAY_RESULT_KEY = "overrides"   # the key of the define-by-run return value, i.e. of the trial config Ray passes on
TIME_ATTR = "epoch"            # ASHA's time attribute: the epoch every trial reports
MAX_CHECKED_COMBINATIONS = 2000
_LABEL = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*$")
_YAML11_FLOAT = re.compile(r"^[-+]?(\d+(\.\d*)?|\.\d+)[eE][-+]?\d+$")   # 1e-4: a float in YAML 1.2, a str in PyYAML
_MLFLOW_UNSAFE = re.compile(r"[^\w.\- ]")


# ------------------------------------------------------------------------------------------------ study settings
class _Settings(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Objective(_Settings):
    metric: str = Field("val_iou", description="the reported metric that Optuna optimises and ASHA compares")
    mode: Optional[Literal["max", "min"]] = Field(None, description="default: min for *loss metrics, else max")

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, v: str) -> str:
        try:
            cfgmod.TrainConfig.model_validate({"monitor": v})
        except ValidationError as e:
            raise ValueError(e.errors()[0]["msg"].removeprefix("Value error, ")) from None
        return v

    @property
    def resolved_mode(self) -> str:
        return self.mode or ("min" if self.metric.endswith("loss") else "max")


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

    @field_validator("use_gpu", mode="before")
    @classmethod
    def _bool(cls, v):
        return str(v).lower() if isinstance(v, bool) else v

    def as_overrides(self) -> dict[str, Any]:
        return {f"scaling.{k}": v for k, v in self.model_dump().items() if v is not None}


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


class SpaceFile(_Settings):
    base: Union[str, dict[str, Any]] = Field(default_factory=dict, description="fit config: path or inline mapping")
    overrides: list[str] = Field(default_factory=list, description="dotted key=value applied to the base")
    objective: Objective = Field(default_factory=Objective)
    budget: Budget = Field(default_factory=Budget)
    max_concurrent_trials: int = Field(1, ge=1, description="trials running at once")
    trial: TrialResources = Field(default_factory=TrialResources)
    asha: Asha = Field(default_factory=Asha)
    searcher: Searcher = Field(default_factory=Searcher)
    space: dict[str, Any] = Field(description="distributions over dotted config keys")


SETTINGS_KEYS = ("objective", "budget", "max_concurrent_trials", "trial", "asha", "searcher")


# ---------------------------------------------------------------------------------------------------- the nodes
@dataclass(frozen=True)
class Condition:
    parent: str     # the parent's dotted key or branch label
    label: Any      # the option's Optuna value


@dataclass
class Node:
    key: str                                   # dotted config key (or a branch label)
    loc: str                                   # where it is written, e.g. space.model.arch.choice.unet.model.encoder
    when: Optional[tuple[str, list, str]] = None   # (parent key, options, loc) until attached to the parent
    conditions: tuple[Condition, ...] = ()
    name: str = ""                             # the Optuna parameter name

    def keys_set(self) -> set[str]:
        return {self.key}

    def check_values(self) -> Iterator[tuple[str, Any]]:
        """(description, what the picker must return) for each value to try in a config; None: nothing to force."""
        raise NotImplementedError


@dataclass
class Constant(Node):
    value: Any = None

    def check_values(self):
        yield f"value {self.value!r}", None


@dataclass
class Numeric(Node):
    kind: str = "uniform"         # uniform | loguniform | int | quniform
    low: float = 0.0
    high: float = 1.0
    step: Optional[float] = None  # int step or quniform q
    log: bool = False

    def suggest(self, trial) -> Any:
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.name, self.low, self.high, step=self.step, log=self.kind == "loguniform")

    @property
    def top(self) -> float:
        """The largest reachable value (the high bound, or the last grid point below it)."""
        if self.step is None:
            return self.high
        return self._grid(round((self.high - self.low) / self.step))

    @property
    def middle(self) -> float:
        if self.step is not None:
            return self._grid(round((self.high - self.low) / self.step) // 2)
        if self.kind == "loguniform" or self.log:
            mid = math.sqrt(self.low * self.high)
        else:
            mid = (self.low + self.high) / 2
        return round(mid) if self.kind == "int" else mid

    def _grid(self, i: int):
        v = self.low + i * self.step
        return int(v) if self.kind == "int" else min(v, self.high)

    def contains(self, v) -> bool:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not self.low <= v <= self.high:
            return False
        if self.kind == "int" and v != int(v):
            return False
        step = self.step or (1 if self.kind == "int" else None)
        return step is None or math.isclose((v - self.low) / step, round((v - self.low) / step), abs_tol=1e-9)

    def check_values(self):
        yield f"low end {self.low!r}", self.low
        yield f"high end {self.top!r}", self.top

    def describe(self) -> str:
        extra = f", step {self.step:g}" if self.step else ""
        return f"{'int log' if self.kind == 'int' and self.log else self.kind} [{self.low:g}, {self.high:g}{extra}]"


@dataclass
class Choice(Node):
    options: list = field(default_factory=list)     # the values written in the file
    branches: list = field(default_factory=list)    # per option: the sub-space (a list of nodes), maybe empty
    is_label: bool = False                          # `branch`: the value is not a config key

    @property
    def labels(self) -> list:
        """The values Optuna sees: the option itself when Optuna can store it, else its YAML text."""
        return [o if _optuna_scalar(o) else _yaml_text(o) for o in self.options]

    def index_of(self, value) -> Optional[int]:
        value = _yaml_number(value)
        for i, (option, label) in enumerate(zip(self.options, self.labels)):
            if _same(value, option) or _same(value, label):
                return i
        return None

    def keys_set(self) -> set[str]:
        return {self.key}.union(*(_keys_set(branch) for branch in self.branches))

    def check_values(self):
        for i, option in enumerate(self.options):
            yield f"option {option!r}", i

    def describe(self) -> str:
        return f"{'branch' if self.is_label else 'choice'} {self.labels}"


def _keys_set(nodes: list[Node]) -> set[str]:
    return set().union(*(n.keys_set() for n in nodes)) if nodes else set()


def _optuna_scalar(v) -> bool:
    return v is None or isinstance(v, (bool, int, float, str))


def _same(a, b) -> bool:
    """Equal, without YAML's `true == 1` and `"1" != 1` surprises: numbers compare by value, the rest by type too."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    both_numbers = isinstance(a, (int, float)) and isinstance(b, (int, float))
    return (both_numbers or type(a) is type(b)) and a == b


def _yaml_text(v) -> str:
    return yaml.safe_dump(v, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()


def _yaml_number(v):
    """PyYAML reads `1e-4` (no dot) as a string; YAML 1.2 and every user mean a float."""
    if isinstance(v, str) and _YAML11_FLOAT.match(v):
        return float(v)
    if isinstance(v, list):
        return [_yaml_number(x) for x in v]
    return v


# ------------------------------------------------------------------------------------------- config-key schema
@lru_cache(maxsize=1)
def all_config_keys() -> tuple[str, ...]:
    """Every dotted leaf key of `Config` (data.synthetic.size, model.arch, ...)."""
    def walk(model: type[BaseModel], prefix: str) -> Iterator[str]:
        for name, f in model.model_fields.items():
            if _is_section(f.annotation):
                yield from walk(f.annotation, f"{prefix}{name}.")
            else:
                yield f"{prefix}{name}"

    return tuple(walk(Config, ""))


def _is_section(annotation) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _is_mapping_field(annotation) -> bool:
    return typing.get_origin(annotation) is dict or annotation is dict


def check_config_key(key: str, loc: str) -> None:
    """A dotted key must name a leaf of `Config` (or a key inside a dict-valued field such as model.kwargs)."""
    model: type[BaseModel] = Config
    parts = key.split(".")
    for i, part in enumerate(parts):
        f = model.model_fields.get(part)
        if f is None:
            raise ConfigError(f"{loc}: unknown config key {key!r}{_close_key(key)}")
        if _is_section(f.annotation):
            model = f.annotation
            if i == len(parts) - 1:
                raise ConfigError(f"{loc}: {key!r} is a config section, not a key; search its keys "
                                  f"(e.g. {next(k for k in all_config_keys() if k.startswith(key + '.'))!r})")
            continue
        if i < len(parts) - 1 and not _is_mapping_field(f.annotation):
            prefix = ".".join(parts[:i + 1])
            raise ConfigError(f"{loc}: {prefix!r} is a value, not a section (in {key!r})")
        return


def _close_key(key: str) -> str:
    close = difflib.get_close_matches(key, all_config_keys(), n=1, cutoff=0.6)
    if not close:
        leaf = key.rsplit(".", 1)[-1]
        close = [k for k in all_config_keys() if k.rsplit(".", 1)[-1] == leaf][:1]
    return f" (did you mean {close[0]!r}?)" if close else ""


# -------------------------------------------------------------------------------------------- parsing the space
def parse_space(space: dict, loc: str = "space") -> list[Node]:
    """The `space` mapping as a tree of nodes (conditions attached, names not yet assigned)."""
    if not isinstance(space, dict):
        raise ConfigError(f"{loc}: must be a mapping of dotted config keys to distributions")
    nodes = [_parse_entry(str(key), spec, f"{loc}.{key}") for key, spec in space.items()]
    return _attach_conditions(nodes, loc)


def _parse_entry(key: str, spec: Any, loc: str) -> Node:
    if isinstance(spec, dict) and "branch" in spec:
        _check_label(key, loc)
    else:
        _check_searchable_key(key, loc)
    if isinstance(spec, dict):
        return _parse_distribution(key, spec, loc)
    if isinstance(spec, list):
        raise ConfigError(f"{loc}: a bare list is ambiguous; write {{choice: [...]}} to search it, or set a constant "
                          f"list in base/overrides")
    return Constant(key, loc, value=_yaml_number(spec))


def _check_searchable_key(key: str, loc: str) -> None:
    if "." not in key:
        hint = _close_key(key) or " (config keys are dotted, e.g. optim.lr)"
        raise ConfigError(f"{loc}: unknown config key {key!r}{hint}; a label that is not a config key needs "
                          f"{{branch: {{...}}}}")
    check_config_key(key, loc)
    if key in STUDY_OWNED_KEYS:
        raise ConfigError(f"{loc}: {key} is set by the study settings; use {STUDY_OWNED_KEYS[key]}")


def _check_label(key: str, loc: str) -> None:
    if "." in key:
        raise ConfigError(f"{loc}: 'branch' is for labels that are not config keys; use 'choice' for {key}")
    if not _LABEL.match(key):
        raise ConfigError(f"{loc}: branch label {key!r} must be letters, digits, '_' or '-'")
    if key in Config.model_fields or key == RAY_RESULT_KEY:
        raise ConfigError(f"{loc}: branch label {key!r} is a reserved name; pick another (e.g. {key}_mix)")


def _parse_distribution(key: str, spec: dict, loc: str) -> Node:
    unknown = [k for k in spec if k not in ENTRY_KEYWORDS]
    if unknown:
        hint = cfgmod._suggest(str(unknown[0]), ENTRY_KEYWORDS)
        raise ConfigError(f"{loc}.{unknown[0]}: unknown keyword{hint}; an entry is one of "
                          f"{', '.join(DISTRIBUTIONS)} (a constant mapping belongs in base/overrides)")
    kinds = [k for k in DISTRIBUTIONS if k in spec]
    if len(kinds) != 1:
        raise ConfigError(f"{loc}: give exactly one of {', '.join(DISTRIBUTIONS)} (got {kinds or 'none'})")
    kind = kinds[0]
    extra = [k for k in ("log", "step") if k in spec and kind != "int"]
    if extra:
        raise ConfigError(f"{loc}.{extra[0]}: only for int (use quniform for a float step, loguniform for log)")
    when = _parse_when(spec["when"], f"{loc}.when") if "when" in spec else None
    if kind in ("choice", "branch"):
        node = _parse_choice(key, spec[kind], loc, kind)
    else:
        node = _parse_numeric(key, kind, spec, loc)
    node.when = when
    return node


def _parse_when(spec: Any, loc: str) -> tuple[str, list, str]:
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ConfigError(f"{loc}: must be one {{parent.key: option}} (or a list of options); nest choices for "
                          f"several conditions")
    (parent, options), = spec.items()
    options = options if isinstance(options, list) else [options]
    if not options:
        raise ConfigError(f"{loc}.{parent}: empty list of options")
    return str(parent), [_yaml_number(o) for o in options], f"{loc}.{parent}"


def _parse_choice(key: str, spec: Any, entry_loc: str, kind: str) -> Choice:
    loc, is_label = f"{entry_loc}.{kind}", kind == "branch"
    if is_label and not isinstance(spec, dict):
        raise ConfigError(f"{loc}: must map each option to its sub-space, e.g. {{dice_bce: {{loss.dice: 0.5}}}}")
    if isinstance(spec, dict):
        options = [_yaml_number(o) for o in spec]
        subs = list(spec.values())
    elif isinstance(spec, list):
        options, subs = [_yaml_number(o) for o in spec], [None] * len(spec)
    else:
        raise ConfigError(f"{loc}: must be a list of options or a mapping option -> sub-space")
    if not options:
        raise ConfigError(f"{loc}: empty choice")
    _check_distinct_options(options, loc)
    branches = [_parse_sub_space(sub, f"{loc}.{option}") for option, sub in zip(options, subs)]
    return Choice(key, entry_loc, options=options, branches=branches, is_label=is_label)


def _check_distinct_options(options: list, loc: str) -> None:
    labels = [o if _optuna_scalar(o) else _yaml_text(o) for o in options]
    for i, label in enumerate(labels):
        if any(_same(label, other) for other in labels[:i]):
            raise ConfigError(f"{loc}: option {options[i]!r} is listed twice")


def _parse_sub_space(sub: Any, loc: str) -> list[Node]:
    if sub is None or sub == {}:
        return []
    if not isinstance(sub, dict):
        raise ConfigError(f"{loc}: an option's sub-space must be a mapping of dotted keys (or {{}}), got {sub!r}")
    return parse_space(sub, loc)


def _parse_numeric(key: str, kind: str, spec: dict, loc: str) -> Numeric:
    bounds = spec[kind]
    want = 3 if kind == "quniform" else 2
    if not isinstance(bounds, list) or len(bounds) != want:
        form = "[low, high, q]" if kind == "quniform" else "[low, high]"
        raise ConfigError(f"{loc}.{kind}: must be {form}")
    low, high = (_number(b, f"{loc}.{kind}") for b in bounds[:2])
    if low >= high:
        raise ConfigError(f"{loc}.{kind}: low ({low:g}) must be < high ({high:g})")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"{loc}.{kind}: low must be > 0 for loguniform (got {low:g})")
    if kind == "int":
        return _parse_int(key, spec, loc, low, high)
    step = None
    if kind == "quniform":
        step = _number(bounds[2], f"{loc}.{kind}")
        _check_step(step, low, high, f"{loc}.{kind}", "q")
    return Numeric(key, loc, kind=kind, low=float(low), high=float(high), step=step)


def _parse_int(key: str, spec: dict, loc: str, low, high) -> Numeric:
    for name, v in (("low", low), ("high", high)):
        if v != int(v):
            raise ConfigError(f"{loc}.int: {name} must be an integer for int (got {v!r})")
    step = _number(spec.get("step", 1), f"{loc}.step")
    if step != int(step):
        raise ConfigError(f"{loc}.step: must be an integer (got {step!r})")
    _check_step(step, low, high, f"{loc}.step", "step")
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise ConfigError(f"{loc}.log: must be true or false")
    if log and (step != 1 or low < 1):
        raise ConfigError(f"{loc}.log: needs low >= 1 and step 1 (Optuna's rule for log int)")
    return Numeric(key, loc, kind="int", low=int(low), high=int(high), step=int(step) if step != 1 else None, log=log)


def _check_step(step, low, high, loc: str, what: str) -> None:
    if step <= 0 or step > high - low:
        raise ConfigError(f"{loc}: {what} must be > 0 and <= high - low (got {step:g})")
    n = (high - low) / step
    if not math.isclose(n, round(n), abs_tol=1e-9):
        raise ConfigError(f"{loc}: {what} ({step:g}) must divide high - low ({high - low:g})")


def _number(v: Any, loc: str):
    v = _yaml_number(v)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ConfigError(f"{loc}: bounds must be finite numbers (got {v!r})")
    return v


def _attach_conditions(nodes: list[Node], loc: str) -> list[Node]:
    """Move each `when` entry into its parent choice's sub-spaces (a copy per option)."""
    by_key = {n.key: n for n in nodes if n.when is None}
    for node in [n for n in nodes if n.when is not None]:
        parent_key, options, when_loc = node.when
        parent = by_key.get(parent_key)
        if parent is None and any(n.key == parent_key for n in nodes):
            raise ConfigError(f"{when_loc}: the condition's parent {parent_key!r} is itself conditional; nest the "
                              f"choices instead of chaining conditions")
        if not isinstance(parent, Choice):
            what = "is not a choice" if parent else "is not in the space"
            hint = "" if parent else cfgmod._suggest(parent_key, [n.key for n in nodes if isinstance(n, Choice)])
            raise ConfigError(f"{when_loc}: the condition's parent {parent_key!r} {what} at this "
                              f"level{hint}")
        for option in options:
            i = parent.index_of(option)
            if i is None:
                raise ConfigError(f"{when_loc}: {option!r} is not an option of {parent_key} "
                                  f"(options: {parent.labels})")
            parent.branches[i].append(_unconditioned(node))
    return [n for n in nodes if n.when is None]


def _unconditioned(node: Node) -> Node:
    twin = copy.deepcopy(node)
    twin.when = None
    return twin


# ------------------------------------------------------------------------------------ names and conflicts
def assign_names(nodes: list[Node], conditions: tuple[Condition, ...] = ()) -> None:
    for node in nodes:
        node.conditions = conditions
        node.name = optuna_name(node.key, conditions)
        if isinstance(node, Choice):
            for label, branch in zip(node.labels, node.branches):
                assign_names(branch, conditions + (Condition(node.key, label),))


def optuna_name(key: str, conditions: tuple[Condition, ...] = ()) -> str:
    """`model/encoder:model.arch:unet`: the key with `/` for `.`, then `:parent:option` per enclosing choice."""
    suffix = "".join(f":{c.parent}:{_MLFLOW_UNSAFE.sub('_', str(c.label))}" for c in conditions)
    return key.replace(".", "/") + suffix


def check_conflicts(nodes: list[Node]) -> None:
    """Two entries that can be active in one trial must not set the same key."""
    seen: dict[str, str] = {}
    for node in nodes:
        for key in sorted(node.keys_set()):
            if key in seen:
                raise ConfigError(f"{node.loc}: sets {key}, which {seen[key]} also sets in the same trial")
            seen[key] = node.loc
    for node in nodes:
        for branch in getattr(node, "branches", []):
            check_conflicts(branch)


def iter_nodes(nodes: list[Node]) -> Iterator[Node]:
    for node in nodes:
        yield node
        for branch in getattr(node, "branches", []):
            yield from iter_nodes(branch)


# ----------------------------------------------------------------------------------------- resolving the tree
class Picker:
    """Decides a value for each sampled node while the tree is walked."""

    def number(self, node: Numeric):
        raise NotImplementedError

    def option(self, node: Choice) -> int:
        raise NotImplementedError


class OptunaPicker(Picker):
    """Asks an Optuna trial (define-by-run): one suggest call per active node."""

    def __init__(self, trial):
        self.trial = trial

    def number(self, node):
        return node.suggest(self.trial)

    def option(self, node):
        labels = node.labels
        return node.index_of(self.trial.suggest_categorical(node.name, labels))


class FixedPicker(Picker):
    """Deterministic values: every range at its `middle`, `low` or `high` end; `forced` wins (by node id)."""

    def __init__(self, end: Literal["middle", "low", "high"] = "middle", forced: Optional[dict[int, Any]] = None):
        self.end, self.forced = end, forced or {}

    def number(self, node):
        if id(node) in self.forced:
            return self.forced[id(node)]
        return {"middle": node.middle, "low": node.low, "high": node.top}[self.end]

    def option(self, node):
        if id(node) in self.forced:
            return self.forced[id(node)]
        return len(node.options) - 1 if self.end == "high" else 0


class PointPicker(FixedPicker):
    """A known-good point {key: value}: its values where given (recorded under Optuna names), else the middle."""

    def __init__(self, point: dict, loc: str):
        super().__init__("middle")
        self.point, self.loc = {k: _yaml_number(v) for k, v in point.items()}, loc
        self.params: dict[str, Any] = {}
        self.used: set[str] = set()

    def number(self, node):
        if node.key not in self.point:
            return super().number(node)
        value = self._take(node)
        if not node.contains(value):
            raise ConfigError(f"{self.loc}.{node.key}: {value!r} is outside {node.describe()}")
        self.params[node.name] = value
        return value

    def option(self, node):
        if node.key not in self.point:
            return super().option(node)
        i = node.index_of(self._take(node))
        if i is None:
            raise ConfigError(f"{self.loc}.{node.key}: {self.point[node.key]!r} is not an option "
                              f"(options: {node.labels})")
        self.params[node.name] = node.labels[i]
        return i

    def _take(self, node: Node):
        missing = [c.parent for c in node.conditions if c.parent not in self.point]
        if missing:
            raise ConfigError(f"{self.loc}.{node.key}: lives under {missing[0]}; give {missing[0]} too")
        self.used.add(node.key)
        return self.point[node.key]


def resolve(nodes: list[Node], picker: Picker, out: Optional[dict] = None) -> dict[str, Any]:
    """Walk the active part of the tree: {dotted.key: value} of every constant and sampled config key."""
    out = {} if out is None else out
    for node in nodes:
        if isinstance(node, Constant):
            out[node.key] = copy.deepcopy(node.value)
        elif isinstance(node, Numeric):
            out[node.key] = picker.number(node)
        else:
            i = picker.option(node)
            if not node.is_label:
                out[node.key] = copy.deepcopy(node.options[i])
            resolve(node.branches[i], picker, out)
    return out


def branch_combinations(nodes: list[Node]) -> Iterator[dict[int, int]]:
    """Every way to pick the options of the choices that have sub-spaces: {id(choice): option index}."""
    per_node = [list(_choice_combinations(n)) for n in nodes if isinstance(n, Choice) and any(n.branches)]
    for combo in itertools.product(*per_node):
        yield {k: v for part in combo for k, v in part.items()}


def _choice_combinations(node: Choice) -> Iterator[dict[int, int]]:
    for i, branch in enumerate(node.branches):
        for sub in branch_combinations(branch):
            yield {id(node): i, **sub}


def _paths_to(nodes: list[Node], ancestors: dict[int, int] | None = None) -> Iterator[tuple[Node, dict[int, int]]]:
    """Each node with the option choices that make it active."""
    ancestors = ancestors or {}
    for node in nodes:
        yield node, ancestors
        if isinstance(node, Choice):
            for i, branch in enumerate(node.branches):
                yield from _paths_to(branch, {**ancestors, id(node): i})


# ------------------------------------------------------------------------------------------------ the space
class SearchSpace:
    """A validated search space: the study settings, the base config and the compiled distributions."""

    def __init__(self, settings: SpaceFile, base_raw: dict, source: str = "space", raw: Optional[dict] = None):
        self.settings = settings
        self.source = source
        self.raw = raw if raw is not None else settings.model_dump(mode="json")
        self.nodes = parse_space(settings.space)
        assign_names(self.nodes)
        check_conflicts(self.nodes)
        self._check_unique_names()
        if not any(not isinstance(n, Constant) for n in iter_nodes(self.nodes)):
            raise ConfigError("space: has no distribution to search (only constants); add a choice or a range")
        self._study_raw = self._study_base(base_raw)
        self._study_raw_no_loss_weights = _without_loss_weights(self._study_raw)
        self.base_config = self._build(self._study_raw, {}, "base with the trial/asha/objective settings")
        self._check_every_value()
        self._check_combinations()
        self.points_to_evaluate = [self._point_params(p, f"searcher.points_to_evaluate[{i}]")
                                   for i, p in enumerate(settings.searcher.points_to_evaluate)]

    # -- settings --------------------------------------------------------------------------------------------
    @property
    def metric(self) -> str:
        return self.settings.objective.metric

    @property
    def mode(self) -> str:
        return self.settings.objective.resolved_mode

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
        middles = (resolve(self.nodes, FixedPicker("middle", forced)) for forced in self._combinations())
        for overrides in itertools.chain((case for _, _, case, _ in self._value_cases()), middles):
            key = repr(sorted(overrides.items(), key=lambda kv: kv[0]))
            if key not in seen:
                seen.add(key)
                yield overrides, self.trial_config(overrides)

    def to_dict(self) -> dict[str, Any]:
        """Everything about the study, for logging: the space file as applied, the resolved base and parameters."""
        return {"source": self.source, **copy.deepcopy(self.raw),
                "resolved": {"metric": self.metric, "mode": self.mode, "num_samples": self.num_samples,
                             "time_budget_s": self.time_budget_s, "max_concurrent_trials": self.max_concurrent_trials,
                             "asha": self.asha, "points_to_evaluate": self.points_to_evaluate,
                             "parameters": self.parameters},
                "base_config": self.base_config.to_dict()}

    # -- building configs ------------------------------------------------------------------------------------
    def _study_base(self, base_raw: dict) -> dict:
        s = self.settings
        raw = cfgmod.apply_overrides(base_raw, s.overrides)
        base = self._build(raw, {}, "base")
        fixed = {**s.trial.as_overrides(), "train.epochs": s.asha.max_epochs or base.train.epochs,
                 "train.monitor": self.metric, "train.mode": self.mode}
        if s.asha.grace_period > fixed["train.epochs"]:
            raise ConfigError(f"asha.grace_period ({s.asha.grace_period}) must be <= asha.max_epochs "
                              f"({fixed['train.epochs']})")
        return cfgmod.apply_overrides(raw, fixed)

    def _raw_for(self, overrides: dict[str, Any]) -> dict:
        names_loss_weight = any(k in LOSS_WEIGHT_KEYS for k in overrides)
        raw = self._study_raw_no_loss_weights if names_loss_weight else self._study_raw
        return cfgmod.apply_overrides(raw, overrides)

    def _config_error(self, overrides: dict[str, Any]) -> Optional[str]:
        try:
            Config.model_validate(self._raw_for(overrides))
        except ValidationError as e:
            return cfgmod.format_validation_error(e).removeprefix("(top level): ")
        except ConfigError as e:
            return str(e)
        return None

    def _build(self, raw: dict, overrides: dict, what: str) -> Config:
        try:
            return Config.model_validate(raw)
        except ValidationError as e:
            msg = cfgmod.format_validation_error(e).removeprefix("(top level): ")
            shown = f" {_short(overrides)}" if overrides else ""
            raise ConfigError(f"{self.source}: {what}{shown} is invalid: {msg}") from None

    # -- validation ------------------------------------------------------------------------------------------
    def _check_unique_names(self) -> None:
        seen: dict[str, str] = {}
        for node in iter_nodes(self.nodes):
            if not isinstance(node, Constant) and node.name in seen:
                raise ConfigError(f"{node.loc}: its Optuna name {node.name!r} clashes with {seen[node.name]}; "
                                  f"rename an option")
            seen[node.name] = node.loc

    def _value_cases(self) -> Iterator[tuple[Node, str, dict[str, Any], dict[int, int]]]:
        """Each constant, then each option, then each range end, with the rest of its branch at the middle:
        (node, what, overrides, the options that make the node active)."""
        order = {Constant: 0, Choice: 1, Numeric: 2}
        for node, ancestors in sorted(_paths_to(self.nodes), key=lambda na: order[type(na[0])]):
            for what, pick in node.check_values():
                forced = ancestors if pick is None else {**ancestors, id(node): pick}
                yield node, what, resolve(self.nodes, FixedPicker("middle", forced)), ancestors

    def _combinations(self) -> Iterator[dict[int, int]]:
        return itertools.islice(branch_combinations(self.nodes), MAX_CHECKED_COMBINATIONS)

    def _check_every_value(self) -> None:
        """Each value first on its own (with the options above it; a loss weight with its whole mix), so that the
        error names the key at fault; then with the rest of its branch at the middle."""
        for in_context in (False, True):
            for node, what, overrides, ancestors in self._value_cases():
                if not in_context:
                    overrides = self._isolated(node, overrides, ancestors)
                error = self._config_error(overrides)
                if error:
                    raise ConfigError(f"{node.loc}: {what} gives an invalid trial config: {error}")

    def _isolated(self, node: Node, overrides: dict[str, Any], ancestors: dict[int, int]) -> dict[str, Any]:
        keys = {node.key} | {n.key for n in iter_nodes(self.nodes) if id(n) in ancestors}
        whole_mix = node.key in LOSS_WEIGHT_KEYS
        return {k: v for k, v in overrides.items() if k in keys or (whole_mix and k.startswith("loss."))}

    def _check_combinations(self) -> None:
        """Every combination of conditional options, with all ranges at their low and at their high ends."""
        for forced in self._combinations():
            for end in ("low", "high"):
                overrides = resolve(self.nodes, FixedPicker(end, forced))
                error = self._config_error(overrides)
                if error:
                    chosen = self._describe_choices(forced) or "the space"
                    raise ConfigError(f"space: {chosen} with every range at its {end} end gives an invalid trial "
                                      f"config: {error}")

    def _describe_choices(self, forced: dict[int, int]) -> str:
        return ", ".join(f"{n.key}={n.labels[forced[id(n)]]}" for n in iter_nodes(self.nodes) if id(n) in forced)

    def _point_params(self, point: dict, loc: str) -> dict[str, Any]:
        """A user point {dotted.key: value} as Optuna's {parameter name: value} (what OptunaSearch enqueues)."""
        picker = PointPicker(point, loc)
        overrides = resolve(self.nodes, picker)
        constants = {n.key: n.value for n in iter_nodes(self.nodes) if isinstance(n, Constant)}
        for key in point:
            if key in picker.used:
                continue
            if key in constants:
                raise ConfigError(f"{loc}.{key}: is a constant of the space ({constants[key]!r}); leave it out")
            known = {n.key for n in iter_nodes(self.nodes)}
            why = "is not active with the options this point chooses" if key in known else "is not in the space"
            raise ConfigError(f"{loc}.{key}: {why}{'' if key in known else cfgmod._suggest(key, sorted(known))}")
        error = self._config_error(overrides)
        if error:
            raise ConfigError(f"{loc}: gives an invalid trial config: {error}")
        return picker.params


def _without_loss_weights(raw: dict) -> dict:
    raw = copy.deepcopy(raw)
    loss = raw.get("loss")
    if isinstance(loss, dict):
        raw["loss"] = {k: v for k, v in loss.items() if k not in LOSS_TERMS}
    return raw


def _short(overrides: dict) -> str:
    return "{" + ", ".join(f"{k}: {v!r}" for k, v in overrides.items()) + "}"


# ---------------------------------------------------------------------------------------------------- loading
def load_space(path: str | Path, cli_overrides: list[str] | tuple[str, ...] = ()) -> SearchSpace:
    """Read and validate a space file; every user mistake raises ConfigError (one line naming the key).

    `cli_overrides` (`key=value`): keys under objective/budget/max_concurrent_trials/trial/asha/searcher set the study
    settings, `space.<dotted.key>=<YAML>` replaces a space entry, `base=<path>` the base; anything else is a config
    override applied to the base after the file's `overrides`.
    """
    path = Path(path)
    raw = cfgmod.load_yaml(path)
    if isinstance(raw.get("base"), str):
        raw["base"] = str(path.parent / Path(raw["base"]).expanduser())
    raw = apply_cli_overrides(raw, list(cli_overrides))
    return space_from_dict(raw, source=str(path))


def space_from_dict(raw: dict, source: str = "space") -> SearchSpace:
    """A SearchSpace from a space mapping (a `base` path is read relative to the working directory)."""
    settings = parse_settings(raw, source)
    base_raw = settings.base if isinstance(settings.base, dict) else _read_base(settings.base)
    return SearchSpace(settings, base_raw, source=source, raw=raw)


def parse_settings(raw: dict, source: str = "space") -> SpaceFile:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping (base:, space:, ...)")
    if "space" not in raw:
        raise ConfigError(f"{source}: space: required (the distributions to search)")
    try:
        return SpaceFile.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(f"{source}: {format_settings_error(e)}") from None


def _read_base(path: str) -> dict:
    try:
        return cfgmod.load_yaml(path)
    except ConfigError as e:
        raise ConfigError(f"base: {e}") from None


def apply_cli_overrides(raw: dict, items: list[str]) -> dict:
    raw = copy.deepcopy(raw)
    config_overrides = []
    for item in items:
        key, value = cfgmod._split_override(item)
        head = key.split(".", 1)[0]
        if head in SETTINGS_KEYS:
            raw = cfgmod.apply_overrides(raw, {key: value})
        elif head == "space" and "." in key:
            raw.setdefault("space", {})[key.split(".", 1)[1]] = value
        elif key == "base":
            raw["base"] = value
        else:
            config_overrides.append(item)
    if config_overrides:
        raw["overrides"] = [*(raw.get("overrides") or []), *config_overrides]
    return raw


def format_settings_error(e: ValidationError) -> str:
    err = e.errors()[0]
    loc = [str(p) for p in err["loc"] if not cfgmod._is_type_tag(str(p)) and not str(p).startswith("function-")]
    path = ".".join(loc) or "(top level)"
    if err["type"] == "extra_forbidden":
        parent = _settings_model_at(loc[:-1])
        prefix = ".".join(loc[:-1]) + "." if len(loc) > 1 else ""
        if not prefix and loc[-1] in Config.model_fields:
            return f"unknown key {path!r}: config sections go under base: (or use overrides)"
        hint = cfgmod._suggest(loc[-1], list(parent.model_fields), prefix) if parent else ""
        return f"unknown key {path!r}{hint}"
    if err["type"] == "missing":
        return f"{path}: required"
    msg = err["msg"].removeprefix("Value error, ")
    return f"{path}: {msg}" if err["type"] == "value_error" else f"{path}: {msg} (got {err.get('input')!r})"


def _settings_model_at(loc: list[str]) -> Optional[type[BaseModel]]:
    model: type[BaseModel] = SpaceFile
    for key in loc:
        f = model.model_fields.get(key)
        ann = getattr(f, "annotation", None)
        ann = next((a for a in typing.get_args(ann) if _is_section(a)), ann)
        if not _is_section(ann):
            return None
        model = ann
    return model
