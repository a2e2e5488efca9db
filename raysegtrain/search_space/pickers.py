"""Walking the active part of the tree to a trial's flat overrides, with a picker deciding each sampled value.

It exists because one walk serves three callers that differ only in where values come from: an Optuna trial
(define-by-run sampling), fixed ends of every range (validation and example configs), and a user's known-good point
(`searcher.points_to_evaluate`, translated to Optuna names).
"""

from __future__ import annotations

import copy
from typing import Any, Literal, Optional

from ..errors import ConfigError
from .nodes import Choice, Constant, Node, Numeric, yaml_number


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
        return node.index_of(self.trial.suggest_categorical(node.name, node.labels))


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
        self.point, self.loc = {k: yaml_number(v) for k, v in point.items()}, loc
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
