"""Which keys a `space` entry may have: a dotted config key the study does not own, or a `branch` label.

It exists because the rules about keys are shared: parsing rejects a key the study settings own or a label that
would collide with the trial config Ray passes on, and building trial configs treats loss weights specially (naming
one sets the whole mix); keeping the lists here keeps those modules free of each other.
"""

from __future__ import annotations

import re

from ..config import LOSS_TERMS, Config, check_config_key, close_key
from ..errors import ConfigError

LOSS_WEIGHT_KEYS = frozenset(f"loss.{t}" for t in LOSS_TERMS)
STUDY_OWNED_KEYS = {
    "train.epochs": "asha.max_epochs", "train.monitor": "objective.metric", "train.mode": "objective.mode",
    "scaling.num_workers": "trial.num_workers", "scaling.gpus_per_worker": "trial.gpus_per_worker",
    "scaling.cpus_per_worker": "trial.cpus_per_worker", "scaling.use_gpu": "trial.use_gpu",
}
RAY_RESULT_KEY = "overrides"   # the key of the define-by-run return value, i.e. of the trial config Ray passes on
_LABEL = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*$")


def check_searchable_key(key: str, loc: str) -> None:
    """A config key that a space may search: dotted, in the schema, and not set by the study settings."""
    if "." not in key:
        hint = close_key(key) or " (config keys are dotted, e.g. optim.lr)"
        raise ConfigError(f"{loc}: unknown config key {key!r}{hint}; a label that is not a config key needs "
                          f"{{branch: {{...}}}}")
    check_config_key(key, loc)
    if key in STUDY_OWNED_KEYS:
        raise ConfigError(f"{loc}: {key} is set by the study settings; use {STUDY_OWNED_KEYS[key]}")


def check_label(key: str, loc: str) -> None:
    """A `branch` label: a plain name that is neither a config key nor a key of Ray's trial config."""
    if "." in key:
        raise ConfigError(f"{loc}: 'branch' is for labels that are not config keys; use 'choice' for {key}")
    if not _LABEL.match(key):
        raise ConfigError(f"{loc}: branch label {key!r} must be letters, digits, '_' or '-'")
    if key in Config.model_fields or key == RAY_RESULT_KEY:
        raise ConfigError(f"{loc}: branch label {key!r} is a reserved name; pick another (e.g. {key}_mix)")
