"""User-facing errors: one line, a non-zero exit, no traceback.

Anything a user can get wrong (config, data, paths, weights, resources) raises a subclass of `UserError`; the CLI
prints `error: <message>` and exits with `exit_code`. Everything else is a bug and keeps its traceback.
"""


class ReportedError(Exception):
    """An error the CLI reports as `error: <message>` on one line with `exit_code`, without a traceback."""

    exit_code = 1


class UserError(ReportedError):
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


class TrainingError(ReportedError):
    """The run itself failed (e.g. a non-finite loss); not a user input mistake, but reported in one line too."""

    exit_code = 1


def one_line(err: BaseException, *, with_type: bool = True) -> str:
    """ERR on one line, for a user: the first line of its message. Our own errors are worded for the user already;
    anything else gets its class name in front (`ValueError: ...`), unless WITH_TYPE is false, for a caller that puts
    the message inside its own sentence. Another's error without a message is its class name. Credentials in it
    (a URI's password, a token from the environment) are redacted."""
    from .redaction import redact_text

    text = redact_text(str(err).strip()).splitlines()
    msg = text[0] if text else ""
    if not with_type:
        return msg or type(err).__name__
    if isinstance(err, ReportedError):
        return msg
    return f"{type(err).__name__}: {msg}" if msg else type(err).__name__
