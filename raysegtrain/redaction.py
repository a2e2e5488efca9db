"""Credentials never leave the user's environment: the one rule that hides them in everything we write.

What counts as a credential:
- the userinfo of a URI (`http://alice:TOKEN@host` → `http://alice:***@host`; a lone `TOKEN@host` → `***@host`);
- the value of a token-like query or fragment parameter (`?token=`, `sig=`, `X-Amz-Signature=`, `X-Amz-Credential=`,
  `access_key=`, `secret_key=`, `password=`, `key=`, ... : `is_secret_name`), which covers presigned URLs;
- the value of a mapping key with such a name (`redact_config_dict`);
- the value of an environment variable with such a name (`RAY_AUTH_TOKEN`, `AWS_SECRET_ACCESS_KEY`,
  `MLFLOW_TRACKING_PASSWORD`, ...), wherever it appears in a text.

Each is replaced by `PLACEHOLDER`, which a saved config keeps: `supply_redacted` finds it again when such a config is
loaded and takes the value from the command line (the key given again) or the environment
(`RAYSEGTRAIN_<SECTION>_<KEY>`, or `MLFLOW_TRACKING_URI` for `tracking.tracking_uri`), else names the key in a
one-line error. The credential itself is used only where it is read: the config in memory, the environment.
"""

from __future__ import annotations

import io
import os
import re
import sys
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit, urlunsplit

PLACEHOLDER = "***"
MIN_SECRET_LENGTH = 6  # shorter environment values ("1", "true") would blank out ordinary text

_EXACT_NAMES = {"sig", "signature", "key", "token", "password", "passwd", "secret", "auth", "authorization",
                "credential", "credentials", "code", "sas", "apikey"}
_NAME_PARTS = ("token", "secret", "password", "passwd", "signature", "credential", "access_key", "accesskey",
               "api_key", "apikey", "private_key", "account_key", "sas_key", "session_key")
_NOT_SECRET_SUFFIXES = ("_path", "_file", "_mode", "_dir", "_url_path", "_enabled")
_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"<>`]+")


def is_secret_name(name: str) -> bool:
    """Whether a query parameter, mapping key or environment variable of this NAME holds a credential."""
    n = name.strip().lower().replace("-", "_")
    if n.endswith(_NOT_SECRET_SUFFIXES):
        return False
    return n in _EXACT_NAMES or n.rsplit("_", 1)[-1] in _EXACT_NAMES - {"code", "auth"} \
        or any(part in n for part in _NAME_PARTS)


def _redact_params(text: str) -> str:
    """`a=1&token=abc` → `a=1&token=***`: secret-named values replaced, everything else kept byte for byte."""
    parts = []
    for item in text.split("&"):
        name, sep, value = item.partition("=")
        parts.append(f"{name}={PLACEHOLDER}" if sep and value and is_secret_name(name) else item)
    return "&".join(parts)


def redact_uri(uri: str) -> str:
    """URI with its credentials (userinfo password, token-like query/fragment parameters) replaced by PLACEHOLDER."""
    try:
        parts = urlsplit(uri)
    except ValueError:
        return uri
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        user, colon, _ = userinfo.partition(":")
        netloc = f"{user}:{PLACEHOLDER}@{host}" if colon else f"{PLACEHOLDER}@{host}"
    query = _redact_params(parts.query) if parts.query else parts.query
    fragment = _redact_params(parts.fragment) if "=" in parts.fragment else parts.fragment
    if (netloc, query, fragment) == (parts.netloc, parts.query, parts.fragment):
        return uri
    return urlunsplit((parts.scheme, netloc, parts.path, query, fragment))


def environment_secrets() -> list[str]:
    """The values of credential-named environment variables, longest first (so that no shorter one splits one)."""
    values = {v.strip() for k, v in os.environ.items() if is_secret_name(k) and len(v.strip()) >= MIN_SECRET_LENGTH}
    return sorted(values, key=len, reverse=True)


def redact_text(text: str) -> str:
    """TEXT (a console line, an error message, a tag) with every URI's credentials and every environment-provided
    credential replaced by PLACEHOLDER."""
    if not text:
        return text
    if "://" in text:
        text = _URI.sub(lambda m: redact_uri(m.group(0)), text)
    for secret in environment_secrets():
        if secret in text:
            text = text.replace(secret, PLACEHOLDER)
    return text


def redact_value(key: str, value: Any) -> Any:
    """VALUE as it may be written under KEY (a dotted config key, a param or tag name)."""
    if isinstance(value, str):
        if value and is_secret_name(key.rsplit(".", 1)[-1]):
            return PLACEHOLDER
        return redact_text(value)
    return value


def redact_config_dict(d: Any, _key: str = "") -> Any:
    """A copy of a nested config mapping (lists included) with every credential redacted."""
    if isinstance(d, dict):
        return {k: redact_config_dict(v, str(k)) for k, v in d.items()}
    if isinstance(d, (list, tuple)):
        return [redact_config_dict(v, _key) for v in d]
    return redact_value(_key, d)


# ------------------------------------------------------------------------------ a redacted config, loaded again
def redacted_keys(d: dict, prefix: str = "") -> list[str]:
    """Dotted keys of D whose string value still carries PLACEHOLDER (a config that was saved redacted)."""
    out = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out += redacted_keys(v, key + ".")
        elif isinstance(v, str) and PLACEHOLDER in v:
            out.append(key)
    return out


def environment_names(key: str) -> list[str]:
    """The environment variables that supply the value of dotted KEY again."""
    names = ["RAYSEGTRAIN_" + re.sub(r"[^A-Za-z0-9]", "_", key).upper()]
    if key == "tracking.tracking_uri":
        names.append("MLFLOW_TRACKING_URI")
    return names


def supply_redacted(raw: dict, source: str = "config") -> dict:
    """RAW with each redacted value taken from the environment again; a ConfigError naming the first key that the
    environment does not supply (nor the command line, whose `key=value` replaces the saved value before this)."""
    from .config import apply_overrides
    from .errors import ConfigError

    supplied = {}
    for key in redacted_keys(raw):
        value = next((os.environ[n] for n in environment_names(key)
                      if os.environ.get(n) and PLACEHOLDER not in os.environ[n]), None)
        if value is None:
            env = " or ".join(f"${n}" for n in environment_names(key))
            raise ConfigError(f"{source}: {key} was saved with its credential redacted ({PLACEHOLDER}): give it "
                              f"again as {key}=VALUE on the command line, or in {env}")
        supplied[key] = value
    return apply_overrides(raw, supplied) if supplied else raw


# ---------------------------------------------------------------------------------------------- the console
class RedactingStream(io.TextIOBase):
    """A text stream that writes through to STREAM with credentials redacted: sys.stdout / sys.stderr of a command,
    so that no print, rich console or log handler of this process shows one."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        self._stream.write(redact_text(text))
        return len(text)

    def flush(self) -> None:
        self._stream.flush()

    def isatty(self) -> bool:
        try:
            return self._stream.isatty()
        except ValueError:  # closed under us (a library that kept this stream past the command)
            return False

    @property
    def closed(self) -> bool:
        return self._stream.closed

    def fileno(self) -> int:
        return self._stream.fileno()

    @property
    def encoding(self):
        return getattr(self._stream, "encoding", "utf-8")

    def __getattr__(self, name):
        return getattr(self._stream, name)


@contextmanager
def redacted_console():
    """sys.stdout and sys.stderr through `RedactingStream` while a command runs; the streams found are put back."""
    saved = sys.stdout, sys.stderr
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, RedactingStream):
            setattr(sys, name, RedactingStream(stream))
    try:
        yield
    finally:
        sys.stdout, sys.stderr = saved
