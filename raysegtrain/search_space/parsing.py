"""Reading the `space` mapping of a space file into the node tree, with one ConfigError line per mistake.

It exists so that everything about the entry syntax (the distribution keywords, bounds, steps, `when` conditions and
option sub-spaces) is checked where it is read, naming the exact place in the file; later stages can then assume a
well-formed tree.
"""

from __future__ import annotations

import copy
import math
from typing import Any

from ..config import suggest
from ..errors import ConfigError
from .keys import check_label, check_searchable_key
from .nodes import Choice, Constant, Node, Numeric, option_label, same, yaml_number

DISTRIBUTIONS = ("choice", "branch", "uniform", "loguniform", "int", "quniform")
ENTRY_KEYWORDS = (*DISTRIBUTIONS, "log", "step", "when")


def parse_space(space: dict, loc: str = "space") -> list[Node]:
    """The `space` mapping as a tree of nodes (conditions attached, names not yet assigned)."""
    if not isinstance(space, dict):
        raise ConfigError(f"{loc}: must be a mapping of dotted config keys to distributions")
    nodes = [_parse_entry(str(key), spec, f"{loc}.{key}") for key, spec in space.items()]
    return _attach_conditions(nodes)


def _parse_entry(key: str, spec: Any, loc: str) -> Node:
    if isinstance(spec, dict) and "branch" in spec:
        check_label(key, loc)
    else:
        check_searchable_key(key, loc)
    if isinstance(spec, dict):
        return _parse_distribution(key, spec, loc)
    if isinstance(spec, list):
        raise ConfigError(f"{loc}: a bare list is ambiguous; write {{choice: [...]}} to search it, or set a constant "
                          f"list in base/overrides")
    return Constant(key, loc, value=yaml_number(spec))


def _parse_distribution(key: str, spec: dict, loc: str) -> Node:
    unknown = [k for k in spec if k not in ENTRY_KEYWORDS]
    if unknown:
        hint = suggest(str(unknown[0]), ENTRY_KEYWORDS)
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
    return str(parent), [yaml_number(o) for o in options], f"{loc}.{parent}"


def _parse_choice(key: str, spec: Any, entry_loc: str, kind: str) -> Choice:
    loc, is_label = f"{entry_loc}.{kind}", kind == "branch"
    if is_label and not isinstance(spec, dict):
        raise ConfigError(f"{loc}: must map each option to its sub-space, e.g. {{dice_bce: {{loss.dice: 0.5}}}}")
    if isinstance(spec, dict):
        options = [yaml_number(o) for o in spec]
        subs = list(spec.values())
    elif isinstance(spec, list):
        options, subs = [yaml_number(o) for o in spec], [None] * len(spec)
    else:
        raise ConfigError(f"{loc}: must be a list of options or a mapping option -> sub-space")
    if not options:
        raise ConfigError(f"{loc}: empty choice")
    _check_distinct_options(options, loc)
    branches = [_parse_sub_space(sub, f"{loc}.{option}") for option, sub in zip(options, subs)]
    return Choice(key, entry_loc, options=options, branches=branches, is_label=is_label)


def _check_distinct_options(options: list, loc: str) -> None:
    labels = [option_label(o) for o in options]
    for i, label in enumerate(labels):
        if any(same(label, other) for other in labels[:i]):
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
    v = yaml_number(v)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ConfigError(f"{loc}: bounds must be finite numbers (got {v!r})")
    return v


def _attach_conditions(nodes: list[Node]) -> list[Node]:
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
            hint = "" if parent else suggest(parent_key, [n.key for n in nodes if isinstance(n, Choice)])
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
