"""The tree a `space` mapping is parsed into: constants, numeric ranges and choices whose options carry sub-spaces.

It exists so that every other part (naming, sampling, validation) walks one typed structure instead of raw YAML, and
so that the few YAML value rules they all need (PyYAML reads `1e-4` as text; `true == 1`) are decided in one place.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import yaml

_YAML11_FLOAT = re.compile(r"^[-+]?(\d+(\.\d*)?|\.\d+)[eE][-+]?\d+$")   # 1e-4: a float in YAML 1.2, a str in PyYAML


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
        """The values Optuna sees, one per option."""
        return [option_label(o) for o in self.options]

    def index_of(self, value) -> Optional[int]:
        value = yaml_number(value)
        for i, (option, label) in enumerate(zip(self.options, self.labels)):
            if same(value, option) or same(value, label):
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


def iter_nodes(nodes: list[Node]) -> Iterator[Node]:
    """Every node of the tree, parents before their sub-spaces."""
    for node in nodes:
        yield node
        for branch in getattr(node, "branches", []):
            yield from iter_nodes(branch)


def option_label(option) -> Any:
    """The value Optuna records for a choice option: the option itself when Optuna can store it, else its YAML text."""
    return option if option is None or isinstance(option, (bool, int, float, str)) else _yaml_text(option)


def same(a, b) -> bool:
    """Equal, without YAML's `true == 1` and `"1" != 1` surprises: numbers compare by value, the rest by type too."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    both_numbers = isinstance(a, (int, float)) and isinstance(b, (int, float))
    return (both_numbers or type(a) is type(b)) and a == b


def _yaml_text(v) -> str:
    return yaml.safe_dump(v, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()


def yaml_number(v):
    """PyYAML reads `1e-4` (no dot) as a string; YAML 1.2 and every user mean a float."""
    if isinstance(v, str) and _YAML11_FLOAT.match(v):
        return float(v)
    if isinstance(v, list):
        return [yaml_number(x) for x in v]
    return v
