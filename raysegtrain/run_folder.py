"""A run's folder, `run.storage_path/<name>`: its name reserved at the start, and the config it trains kept in it.

A new run creates its folder exclusively (`mkdir` without `exist_ok`, atomic on a local or NFS path) at its start,
before its checks and long before Ray: two fits given one name cannot both have it, and an unwritable
`run.storage_path` is found there, in a second. A run that stops before it trains gives the name back (`release`).
Once the checks pass, the resolved config is written into the folder (`RUN_CONFIG`), so that `fit --resume NAME`
trains what the run was started with even when no checkpoint was written yet. On remote storage (s3://, gs://) the
reservation is a check then a write: not atomic.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from .config import Config, build, load_yaml
from .errors import UserError

RUN_CONFIG = "raysegtrain_config.yaml"  # the config the run trains (a resume's allowed overrides written in)


def new_run_name() -> str:
    """fit-<date>-<time>-<4 hex>: two fits started in the same second still get two names."""
    return f"fit-{datetime.now():%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"


@dataclass
class RunFolder:
    """STORAGE/NAME, a local path or a URI; CREATED when this process reserved it (a new run)."""

    storage: str
    name: str
    created: bool = False
    created_storage: bool = False  # the storage folder itself was made for this run

    @property
    def remote(self) -> bool:
        return "://" in self.storage

    @property
    def path(self) -> str:
        return f"{self.storage}/{self.name}" if self.remote else str(Path(self.storage) / self.name)

    def exists(self) -> bool:
        if self.remote:
            import pyarrow.fs

            fs, base = pyarrow.fs.FileSystem.from_uri(self.path)
            return fs.get_file_info(base).type != pyarrow.fs.FileType.NotFound
        return Path(self.path).exists()

    def write_config(self, cfg: Config) -> None:
        """The config the run trains, into the folder (replaced atomically on a local path)."""
        text = cfg.to_yaml()
        if self.remote:
            import pyarrow.fs

            fs, base = pyarrow.fs.FileSystem.from_uri(self.path)
            with fs.open_output_stream(f"{base}/{RUN_CONFIG}") as f:
                f.write(text.encode())
            return
        target = Path(self.path) / RUN_CONFIG
        tmp = target.with_name(f".{RUN_CONFIG}.{os.getpid()}.tmp")
        tmp.write_text(text)
        os.replace(tmp, target)

    def read_config(self) -> Config | None:
        """The config the run was started with (None for a run that has no RUN_CONFIG: made by an older version)."""
        raw = self.read_raw_config()
        return None if raw is None else build(raw, source=f"{self.path}/{RUN_CONFIG}")

    def read_raw_config(self) -> dict | None:
        """RUN_CONFIG as saved (credentials redacted), or None."""
        if self.remote:
            import pyarrow.fs
            import yaml

            fs, base = pyarrow.fs.FileSystem.from_uri(self.path)
            if fs.get_file_info(f"{base}/{RUN_CONFIG}").type == pyarrow.fs.FileType.NotFound:
                return None
            with fs.open_input_stream(f"{base}/{RUN_CONFIG}") as f:
                raw = yaml.safe_load(f.read().decode()) or {}
        else:
            p = Path(self.path) / RUN_CONFIG
            if not p.is_file():
                return None
            raw = load_yaml(p)
        return raw

    def release(self) -> None:
        """Give the name back when the run never started: the folder goes if it holds nothing but RUN_CONFIG."""
        if not self.created or self.remote:
            return
        folder = Path(self.path)
        try:
            if {p.name for p in folder.iterdir()} <= {RUN_CONFIG}:
                (folder / RUN_CONFIG).unlink(missing_ok=True)
                folder.rmdir()
                if self.created_storage:
                    folder.parent.rmdir()  # fails, and stays, if another run has appeared in it
        except OSError:  # something else appeared in it meanwhile: it stays
            pass


def reserve(storage: str, name: str | None) -> RunFolder:
    """The folder of a new run, created here and nowhere else. NAME None: a default name, drawn again on a clash.
    A UserError when the name is taken (a run never reuses one: Ray would silently resume it) or the storage cannot
    be written."""
    for _ in range(10):
        folder = RunFolder(storage, name or new_run_name())
        if folder.remote:
            if folder.exists():
                taken = True
            else:
                import pyarrow.fs

                fs, base = pyarrow.fs.FileSystem.from_uri(folder.path)
                fs.create_dir(base, recursive=True)
                taken = False
        else:
            folder.created_storage = not Path(storage).exists()
            taken = _make_exclusive(Path(folder.path), storage)
        if not taken:
            folder.created = True
            return folder
        if name is not None:
            raise UserError(f"a run named {name!r} already exists under {storage}: use --resume {name} to continue "
                            f"it, or choose another run.name")
    raise UserError(f"no free run name under {storage} after 10 tries: set run.name")


def _make_exclusive(path: Path, storage: str) -> bool:
    """Creates PATH (and its parents); False when this call made it, True when it existed already."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            path.mkdir()
        except FileExistsError:
            return True
    except OSError as e:
        raise UserError(f"run.storage_path {storage} cannot be written ({e.strerror or e}): choose a folder you can "
                        f"write to") from None
    return False


def existing(storage: str, name: str) -> RunFolder:
    """The folder of run NAME, which a resume continues; a UserError when there is none or it cannot be written."""
    folder = RunFolder(storage, name)
    if not folder.exists():
        raise UserError(f"no run named {name!r} under {storage} to resume")
    if not folder.remote and not os.access(folder.path, os.W_OK):
        raise UserError(f"run {name!r}: {folder.path} is not writable, so it cannot be continued")
    return folder
