"""Reading a space file from disk or a mapping, with `raysegtrain tune` command-line overrides applied first.

It exists to keep file-level concerns out of `SearchSpace`: where a `base` path is resolved from (the space file's
folder), and how one list of `key=value` arguments is routed to the study settings, a `space` entry, the `base`, or
the base config.
"""

from __future__ import annotations

import copy
from pathlib import Path

from ..config import apply_overrides, load_yaml, split_override
from ..errors import ConfigError
from .settings import SETTINGS_KEYS, parse_settings
from .space import SearchSpace


def load_space(path: str | Path, cli_overrides: list[str] | tuple[str, ...] = ()) -> SearchSpace:
    """Read and validate a space file; every user mistake raises ConfigError (one line naming the key).

    `cli_overrides` (`key=value`): keys under objective/budget/max_concurrent_trials/trial/asha/searcher set the study
    settings, `space.<dotted.key>=<YAML>` replaces a space entry, `base=<path>` the base; anything else is a config
    override applied to the base after the file's `overrides`.
    """
    path = Path(path)
    raw = load_yaml(path)
    if isinstance(raw.get("base"), str):
        raw["base"] = str(path.parent / Path(raw["base"]).expanduser())
    raw = apply_cli_overrides(raw, list(cli_overrides))
    return space_from_dict(raw, source=str(path))


def space_from_dict(raw: dict, source: str = "space") -> SearchSpace:
    """A SearchSpace from a space mapping (a `base` path is read relative to the working directory)."""
    settings = parse_settings(raw, source)
    base_raw = settings.base if isinstance(settings.base, dict) else _read_base(settings.base)
    return SearchSpace(settings, base_raw, source=source, raw=raw)


def _read_base(path: str) -> dict:
    try:
        return load_yaml(path)
    except ConfigError as e:
        raise ConfigError(f"base: {e}") from None


def apply_cli_overrides(raw: dict, items: list[str]) -> dict:
    """The space mapping (a copy) with each `key=value` routed to the settings, a space entry, base or overrides."""
    raw = copy.deepcopy(raw)
    config_overrides = []
    for item in items:
        key, value = split_override(item)
        head = key.split(".", 1)[0]
        if head in SETTINGS_KEYS:
            raw = apply_overrides(raw, {key: value})
        elif head == "space" and "." in key:
            raw.setdefault("space", {})[key.split(".", 1)[1]] = value
        elif key == "base":
            raw["base"] = value
        else:
            config_overrides.append(item)
    if config_overrides:
        raw["overrides"] = [*(raw.get("overrides") or []), *config_overrides]
    return raw
