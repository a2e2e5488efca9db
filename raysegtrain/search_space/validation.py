"""Checking, before Ray starts, that the space can only produce valid trial configs, and which cases that covers.

Every constant, option and range end is built into a trial config, first on its own (a loss weight with its whole
mix) so the error names its key, then with the rest of its branch at the middle of its ranges; then every combination
of conditional options (up to MAX_CHECKED_COMBINATIONS) with all ranges at their low ends and at their high ends.
Interactions between two ranges at opposite ends are not enumerated; such a trial fails at its own config build with
the same one-line error. The same cases give `SearchSpace.example_configs`, for checks too slow to run per trial.
The functions take the tree and a `config_error(overrides)` callback (the error text of the trial config those
overrides give, or None), so they know nothing about how a trial config is layered.
"""

from __future__ import annotations

import itertools
from typing import Any, Callable, Iterator, Optional

from ..config import suggest
from ..errors import ConfigError
from .keys import LOSS_WEIGHT_KEYS
from .nodes import Choice, Constant, Node, Numeric, iter_nodes
from .pickers import FixedPicker, PointPicker, resolve

MAX_CHECKED_COMBINATIONS = 2000
ConfigErrorFn = Callable[[dict[str, Any]], Optional[str]]


# --------------------------------------------------------------------------------------------- the cases
def branch_combinations(nodes: list[Node]) -> Iterator[dict[int, int]]:
    """Every way to pick the options of the choices that have sub-spaces: {id(choice): option index}."""
    per_node = [list(_choice_combinations(n)) for n in nodes if isinstance(n, Choice) and any(n.branches)]
    for combo in itertools.product(*per_node):
        yield {k: v for part in combo for k, v in part.items()}


def _choice_combinations(node: Choice) -> Iterator[dict[int, int]]:
    for i, branch in enumerate(node.branches):
        for sub in branch_combinations(branch):
            yield {id(node): i, **sub}


def checked_combinations(nodes: list[Node]) -> Iterator[dict[int, int]]:
    """The combinations of conditional options that are checked (the first MAX_CHECKED_COMBINATIONS)."""
    return itertools.islice(branch_combinations(nodes), MAX_CHECKED_COMBINATIONS)


def _paths_to(nodes: list[Node], ancestors: dict[int, int] | None = None) -> Iterator[tuple[Node, dict[int, int]]]:
    """Each node with the option choices that make it active."""
    ancestors = ancestors or {}
    for node in nodes:
        yield node, ancestors
        if isinstance(node, Choice):
            for i, branch in enumerate(node.branches):
                yield from _paths_to(branch, {**ancestors, id(node): i})


def value_cases(nodes: list[Node]) -> Iterator[tuple[Node, str, dict[str, Any], dict[int, int]]]:
    """Each constant, then each option, then each range end, with the rest of its branch at the middle:
    (node, what, overrides, the options that make the node active)."""
    order = {Constant: 0, Choice: 1, Numeric: 2}
    for node, ancestors in sorted(_paths_to(nodes), key=lambda na: order[type(na[0])]):
        for what, pick in node.check_values():
            forced = ancestors if pick is None else {**ancestors, id(node): pick}
            yield node, what, resolve(nodes, FixedPicker("middle", forced)), ancestors


# --------------------------------------------------------------------------------------------- the checks
def check_every_value(nodes: list[Node], config_error: ConfigErrorFn) -> None:
    """Each value first on its own (with the options above it; a loss weight with its whole mix), so that the
    error names the key at fault; then with the rest of its branch at the middle."""
    for in_context in (False, True):
        for node, what, overrides, ancestors in value_cases(nodes):
            if not in_context:
                overrides = _isolated(nodes, node, overrides, ancestors)
            error = config_error(overrides)
            if error:
                raise ConfigError(f"{node.loc}: {what} gives an invalid trial config: {error}")


def _isolated(nodes: list[Node], node: Node, overrides: dict[str, Any], ancestors: dict[int, int]) -> dict[str, Any]:
    keys = {node.key} | {n.key for n in iter_nodes(nodes) if id(n) in ancestors}
    whole_mix = node.key in LOSS_WEIGHT_KEYS
    return {k: v for k, v in overrides.items() if k in keys or (whole_mix and k.startswith("loss."))}


def check_combinations(nodes: list[Node], config_error: ConfigErrorFn) -> None:
    """Every combination of conditional options, with all ranges at their low and at their high ends."""
    for forced in checked_combinations(nodes):
        for end in ("low", "high"):
            overrides = resolve(nodes, FixedPicker(end, forced))
            error = config_error(overrides)
            if error:
                chosen = _describe_choices(nodes, forced) or "the space"
                raise ConfigError(f"space: {chosen} with every range at its {end} end gives an invalid trial "
                                  f"config: {error}")


def _describe_choices(nodes: list[Node], forced: dict[int, int]) -> str:
    return ", ".join(f"{n.key}={n.labels[forced[id(n)]]}" for n in iter_nodes(nodes) if id(n) in forced)


def point_params(nodes: list[Node], point: dict, loc: str, config_error: ConfigErrorFn) -> dict[str, Any]:
    """A user point {dotted.key: value} as Optuna's {parameter name: value} (what OptunaSearch enqueues)."""
    picker = PointPicker(point, loc)
    overrides = resolve(nodes, picker)
    constants = {n.key: n.value for n in iter_nodes(nodes) if isinstance(n, Constant)}
    for key in point:
        if key in picker.used:
            continue
        if key in constants:
            raise ConfigError(f"{loc}.{key}: is a constant of the space ({constants[key]!r}); leave it out")
        known = {n.key for n in iter_nodes(nodes)}
        why = "is not active with the options this point chooses" if key in known else "is not in the space"
        raise ConfigError(f"{loc}.{key}: {why}{'' if key in known else suggest(key, sorted(known))}")
    error = config_error(overrides)
    if error:
        raise ConfigError(f"{loc}: gives an invalid trial config: {error}")
    return picker.params
