"""Checkpoint files: one `checkpoint.pt` per directory, written atomically and read with `weights_only=True`.

A training checkpoint holds what `SegmentationTrainer.state_dict` gives (model, optimizer, schedule, scaler, epoch,
best-metric state, history, the config as trained); `inference_state` drops what only resuming needs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from .errors import UserError
from .redaction import redact_config_dict

CHECKPOINT_FILE = "checkpoint.pt"
TRAINING_ONLY_KEYS = ("optimizer", "schedule", "scaler")


def save_checkpoint(state: dict[str, Any], directory: str | Path) -> Path:
    """Write `state` to DIRECTORY/checkpoint.pt atomically (tmp file, then rename); its config with credentials
    redacted (a checkpoint is shared and logged as an artifact)."""
    if isinstance(state.get("config"), dict):
        state = {**state, "config": redact_config_dict(state["config"])}
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / CHECKPOINT_FILE
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def inference_state(state: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint without what only resuming needs (the optimizer state is twice the weights for Adam): what
    predict, evaluate and export load, at a third of the size."""
    return {k: v for k, v in state.items() if k not in TRAINING_ONLY_KEYS}


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint file, or DIRECTORY/checkpoint.pt, with `weights_only=True` (safe for untrusted files)."""
    p = Path(path)
    if p.is_dir():
        if not (p / CHECKPOINT_FILE).is_file() and (run_folder := run_folder_message(p)):
            raise UserError(run_folder)
        p = p / CHECKPOINT_FILE
    if not p.is_file():
        raise UserError(f"checkpoint not found: {p}")
    if not looks_like_torch_save(p):
        raise UserError(f"{p} is not a checkpoint (not a file torch.save writes); a raysegtrain checkpoint is the "
                        f"{CHECKPOINT_FILE} of a checkpoint_* folder, or that folder")
    try:
        state = torch.load(p, map_location=map_location, weights_only=True)
    except Exception as e:  # corrupt file, or pickled objects that weights_only refuses
        raise UserError(f"cannot load checkpoint {p}: {load_failure(e)}") from None
    if not isinstance(state, dict) or "model" not in state:
        raise UserError(f"{p} is not a raysegtrain checkpoint (no 'model' entry)")
    return state


def run_folder_message(folder: Path) -> str | None:
    """The error for FOLDER given where a checkpoint was meant, when it is a run's folder (its checkpoint_*
    subfolders hold the checkpoints): which of them to pass. None when FOLDER holds none."""
    inside = sorted(c.parent.name for c in folder.glob(f"checkpoint_*/{CHECKPOINT_FILE}"))
    if not inside:
        return None
    return f"{folder} holds checkpoint folders, not a checkpoint: pass one of them ({', '.join(inside)})"


def looks_like_torch_save(path: Path) -> bool:
    """Whether PATH starts as torch.save's files do: a zip archive (the format since torch 1.6) or a pickle (the
    legacy format). Anything else, a JSON or YAML file given by mistake, gets its own message, not the unpickler's."""
    with path.open("rb") as f:
        head = f.read(4)
    return head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"


def load_failure(err: BaseException) -> str:
    """Why a safe load failed, in one line. PyTorch's message for a refused object leads with advice to load with
    weights_only=False (which would run whatever the file asks) and gives the reason further down ("Unsupported
    global: GLOBAL posix.system ...", or "Trying to load unsupported GLOBAL posix.system ..." depending on the
    version): keep only the reason."""
    import re

    text = str(err)
    if "Weights only load failed" not in text:
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        return lines[0] if lines else type(err).__name__
    reasons = [re.sub(r"^WeightsUnpickler error: ", "", ln.strip()) for ln in text.splitlines()
               if ln.strip() and not re.search(r"weights_only|Weights only load failed|^\(?\d\)", ln.strip())]
    reason = re.split(r" Please use | was not an allowed global", reasons[0])[0] if reasons else "an object it forbids"
    return (f"refused by the safe loader: {reason.rstrip('.')}. A raysegtrain checkpoint holds only tensors and plain "
            f"values; this file asks to load code or other objects, so it was not written by raysegtrain or was "
            f"changed since")
