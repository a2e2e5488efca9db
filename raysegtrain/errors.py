"""User-facing errors: one line, a non-zero exit, no traceback.

Anything a user can get wrong (config, data, paths, weights, resources) raises a subclass of `UserError`; the CLI
prints `error: <message>` and exits with `exit_code`. Everything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A mistake in what the user gave us. `str(err)` is the whole message, on one line."""

    exit_code = 2


class ConfigError(UserError):
    pass


class DataError(UserError):
    pass


class ModelError(UserError):
    pass


class ResourceError(UserError):
    """Asked for resources (GPUs, CPUs) that the machine or cluster does not have."""


class TrainingError(Exception):
    """The run itself failed (e.g. a non-finite loss); not a user input mistake, but reported in one line too."""

    exit_code = 1
