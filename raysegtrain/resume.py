"""`fit --resume NAME`: the run continues on its own config, changed only in keys that are safe to change.

The config comes from the run's folder (`run_folder.RUN_CONFIG`, written when the run started), or, for a run made
before that file existed, from its newest checkpoint. The command line may change only `config.RESUME_SAFE_KEYS`;
anything else (a config file, a dataset folder, another key) is refused in one line before Ray starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .config import RESUME_SAFE_KEYS, Config, build, check_config_key, flatten, split_override
from .errors import ConfigError, UserError
from .redaction import PLACEHOLDER, redacted_keys
from .run_folder import RunFolder

SAFE_LIST = ", ".join(RESUME_SAFE_KEYS)


def refuse_unsafe(keys) -> None:
    """A ConfigError naming the first key that a resume may not change."""
    unsafe = [k for k in keys if k not in RESUME_SAFE_KEYS]
    if unsafe:
        more = f" (and {', '.join(unsafe[1:])})" if len(unsafe) > 1 else ""
        raise ConfigError(f"--resume continues a run on the config it was started with: {unsafe[0]} cannot change"
                          f"{more}; a resume may change only {SAFE_LIST}")


def run_config(folder: RunFolder) -> Config:
    """The config run FOLDER was started with, as saved: its credentials redacted (`redaction.PLACEHOLDER`)."""
    return build(run_config_raw(folder), source=f"{folder.path} (config)", supply_redacted=False)


def run_config_raw(folder: RunFolder) -> dict:
    """The config run FOLDER was started with (its RUN_CONFIG), else the one its newest checkpoint was trained on,
    as a mapping."""
    raw = folder.read_raw_config()
    if raw is not None:
        return raw
    if not folder.remote:
        from .checkpoint import load_checkpoint

        newest = sorted(Path(folder.path).glob("checkpoint_*/checkpoint.pt"))
        if newest:
            state = load_checkpoint(newest[-1])
            if isinstance(state.get("config"), dict):
                return state["config"]
    raise UserError(f"run {folder.name!r} under {folder.storage} has no saved config (no {Path(folder.path).name}/"
                    f"raysegtrain_config.yaml, no checkpoint): it cannot be resumed; start a new run")


def config_for_resume(name: str, items: list[str]) -> Config:
    """The config of `raysegtrain fit --resume NAME [key=value ...]`: the run's own, with the safe overrides given.
    A config file or dataset folder among ITEMS, or an override of any other key, is a one-line error."""
    from .ray_support import storage_root

    given = [i for i in items if "=" not in i]
    if given:
        raise ConfigError(f"--resume {name} continues the run on the config it was started with: drop {given[0]!r} "
                          f"(a config file or dataset folder); only key=value overrides of {SAFE_LIST} are allowed")
    overrides = dict(split_override(o) for o in items)
    for key in overrides:
        check_config_key(key, f"--resume {name}")  # a misspelt key is unknown, not unsafe
    where = build({}, {k: v for k, v in overrides.items() if k == "run.storage_path"})
    folder = RunFolder(storage_root(where), name)
    if not folder.exists():
        refuse_unsafe(overrides)
        raise UserError(f"no run named {name!r} under {folder.storage} to resume")
    saved = run_config_raw(folder)
    # a credential the run was saved without is given again, on the command line or in the environment
    refuse_unsafe([k for k in overrides if k not in set(redacted_keys(saved))])
    return build(saved, overrides, source=f"--resume {name}")


def changes(saved: Config, cfg: Config) -> dict[str, tuple[Any, Any]]:
    """{key: (was, now)} for every key where CFG differs from SAVED."""
    before, after = flatten(saved.to_dict()), flatten(cfg.to_dict())
    return {k: (before.get(k), after.get(k)) for k in sorted(set(before) | set(after))
            if before.get(k) != after.get(k) and not _redacted(before.get(k))}


def _redacted(value: Any) -> bool:
    """A value saved without its credential: the one given again for it is the same setting, not a change."""
    return isinstance(value, str) and PLACEHOLDER in value


def checked_changes(saved: Config, cfg: Config) -> dict[str, tuple[Any, Any]]:
    """The changes from SAVED to CFG, which a resume trains; a ConfigError when one is not a safe key."""
    found = changes(saved, cfg)
    refuse_unsafe(found)
    return found


def describe(found: dict[str, tuple[Any, Any]]) -> str:
    """'train.epochs 2 -> 4, data.loader_workers 0 -> 2' (or 'none')."""
    return ", ".join(f"{k} {was} -> {now}" for k, (was, now) in found.items()) or "none"
