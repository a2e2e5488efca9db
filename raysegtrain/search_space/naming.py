"""Optuna parameter names for the nodes of a space, and the checks that no two entries collide in one trial.

Names: the dotted key with `/` for `.` (Ray nests on `/`), then, for a parameter inside a conditional option,
`:<parent key>:<option>` for each enclosing choice, outermost first: `optim/lr`, `model/arch`,
`model/encoder:model.arch:unet`, `schedule/step_size:schedule.name:step`, `loss_mix`, `loss/dice:loss_mix:dice_bce`.
A parameter gets a separate name per option it lives in, so no Optuna distribution changes between trials (Optuna
rejects a categorical whose choices change), and only characters that MLflow accepts in parameter names are used
(option text is sanitised), so Ray's config can be logged as-is.
"""

from __future__ import annotations

import re

from ..errors import ConfigError
from .nodes import Choice, Condition, Constant, Node, iter_nodes

_MLFLOW_UNSAFE = re.compile(r"[^\w.\- ]")


def assign_names(nodes: list[Node], conditions: tuple[Condition, ...] = ()) -> None:
    """Give every node its conditions (the enclosing choices' options) and its Optuna name."""
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


def check_unique_names(nodes: list[Node]) -> None:
    """Sanitised option text can make two parameters' names equal; Optuna would then mix their values."""
    seen: dict[str, str] = {}
    for node in iter_nodes(nodes):
        if not isinstance(node, Constant) and node.name in seen:
            raise ConfigError(f"{node.loc}: its Optuna name {node.name!r} clashes with {seen[node.name]}; "
                              f"rename an option")
        seen[node.name] = node.loc
