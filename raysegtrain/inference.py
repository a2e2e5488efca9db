"""A trained model applied to images: loading it, preprocessing as validation does, probabilities, masks.

MODEL is a checkpoint file or folder (`checkpoint.pt`, or a folder holding `best/checkpoint.pt`), or an MLflow run:
`runs:/<run_id>[/<artifact path>]` or a bare 32-hex run id, whose `best_checkpoint` artifact is downloaded from the
tracking store (`--tracking-uri`, else $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db).

Preprocessing is validation's: the eval transform of the checkpoint's config (same size policy; 8-bit images stay
uint8 through it, as in the training loop), then the same on-device normalisation (same mean/std), so a prediction
at the training size is exactly what validation scored. The transform's output is mapped back to the input's
pixels: the region the image occupies after padding is found by sending a mask of ones through the same
transform (padding fills masks with 0 or `ignore_index`, never 1), then cropped and, for the resize policy, resized
back. Sliding-window inference instead works at the image's own resolution with windows of the training size.
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .config import Config
from .errors import DataError, ModelError, UserError

BEST_CHECKPOINT_ARTIFACT = "best_checkpoint"
RUN_ID = re.compile(r"^[0-9a-f]{32}$")
SIZE_DIVISOR = 32
FLIPS: tuple[tuple[int, ...], ...] = ((), (3,), (2,), (2, 3))  # identity, horizontal, vertical, both
Blend = Literal["gaussian", "linear"]


# ---------------------------------------------------------------------------------------------------- loading
@dataclass
class LoadedModel:
    model: nn.Module
    cfg: Config
    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str  # what the user named
    checkpoint: str  # the file that was read (inside a temporary download for MLflow runs)
    run_id: str | None = None
    tracking_uri: str | None = None
    info: dict = field(default_factory=dict)  # epoch and metrics stored in the checkpoint

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def load(model: str | Path, device: str | torch.device | None = None, tracking_uri: str | None = None) -> LoadedModel:
    from .checkpoint import load_checkpoint

    text = str(model)
    run_id, artifact = (None, None) if Path(text).expanduser().exists() else parse_run_reference(text)
    uri = None
    if run_id is None:
        path = checkpoint_path(text)
        state = load_checkpoint(path)
    else:
        uri = _resolved_uri(tracking_uri)
        path, state = _download_checkpoint(run_id, artifact, uri)
    cfg = checkpoint_config(state, path)
    net = model_from_state(cfg, state["model"], device)
    mean, std = normalization(cfg)
    info = {"epoch": state.get("epoch"), "metrics": state.get("metrics", {})}
    return LoadedModel(net, cfg, mean, std, text, str(path), run_id, uri, info)


def parse_run_reference(text: str) -> tuple[str | None, str | None]:
    """(run id, artifact path) of `runs:/<id>[/path]` or a bare run id; (None, None) for anything else."""
    if text.startswith("runs:/"):
        parts = text[len("runs:/"):].strip("/").split("/", 1)
        if not RUN_ID.match(parts[0]):
            raise ModelError(f"MODEL {text}: {parts[0]!r} is not an MLflow run id (32 hex digits)")
        return parts[0], (parts[1] if len(parts) > 1 and parts[1] else BEST_CHECKPOINT_ARTIFACT)
    if RUN_ID.match(text):
        return text, BEST_CHECKPOINT_ARTIFACT
    return None, None


def checkpoint_path(text: str) -> Path:
    from .checkpoint import CHECKPOINT_FILE, run_folder_message

    p = Path(text).expanduser()
    if p.is_dir():
        for candidate in (p / CHECKPOINT_FILE, p / "best" / CHECKPOINT_FILE):
            if candidate.is_file():
                return candidate
        if run_folder := run_folder_message(p):
            raise ModelError(f"MODEL {run_folder}")
        raise ModelError(f"MODEL {text}: folder holds no {CHECKPOINT_FILE} (nor best/{CHECKPOINT_FILE})")
    if p.is_file():
        return p
    raise ModelError(f"MODEL {text}: no such checkpoint file or folder, and not an MLflow run "
                     f"(runs:/<run_id>/... or a 32-hex run id)")


def _resolved_uri(tracking_uri: str | None) -> str:
    from .tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    # MLflow would silently create an empty SQLite store: a missing file means "wrong place", say so
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        raise ModelError(f"no MLflow store at {uri} (set --tracking-uri or MLFLOW_TRACKING_URI)")
    return uri


def _download_checkpoint(run_id: str, artifact: str, uri: str) -> tuple[str, dict]:
    from . import tracking
    from .checkpoint import load_checkpoint

    with tempfile.TemporaryDirectory(prefix="raysegtrain-model-") as tmp:
        try:
            local = tracking.download_artifact(uri, run_id, artifact, tmp)
        except tracking.NoSuchRun:
            raise ModelError(f"MODEL {run_id}: no such MLflow run in {uri}") from None
        except tracking.NoSuchArtifact as e:
            raise ModelError(f"MLflow run {run_id} has no artifact {artifact!r} ({e})") from None
        except tracking.RunReadError as e:
            raise ModelError(f"cannot read MLflow run {run_id} from {uri}: {e}") from None
        state = load_checkpoint(local)
    return f"runs:/{run_id}/{artifact}", state


def checkpoint_config(state: dict, path) -> Config:
    from pydantic import ValidationError

    if "config" not in state:
        raise ModelError(f"{path}: checkpoint has no 'config' entry")
    try:
        return Config.model_validate(state["config"])
    except ValidationError as e:
        raise ModelError(f"{path}: the checkpoint's config is not valid here: {str(e).splitlines()[0]}") from None


def model_from_state(cfg: Config, weights: dict, device: str | torch.device | None = None) -> nn.Module:
    """The model of CFG with WEIGHTS, in eval mode. Encoder weights are not fetched: the checkpoint holds them."""
    from .model import build_model

    bare = cfg.model_copy(update={"model": cfg.model.model_copy(update={"encoder_weights": None})})
    net = build_model(bare)
    try:
        net.load_state_dict(weights)
    except RuntimeError as e:
        raise ModelError(f"the checkpoint's weights do not fit {cfg.model.arch}/{cfg.model.encoder}: "
                         f"{str(e).splitlines()[0]}") from None
    return net.to(resolve_device(device)).eval()


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"device {device} requested but no CUDA GPU is available")
    return device


def normalization(cfg: Config) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The mean/std validation used. `normalize: dataset` without explicit values needs the training set."""
    from .data.statistics import mean_std

    try:
        return mean_std(cfg.data)  # reads the training set only for dataset statistics
    except DataError as e:
        raise ModelError(f"the model was trained with data.normalize=dataset: its training set is needed for the "
                         f"statistics and cannot be read here ({e})") from None


# ------------------------------------------------------------------------------------------------ probabilities
def predict_logits(model: nn.Module, images: torch.Tensor, amp_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Raw model output (N, K, H, W) as float32."""
    with torch.inference_mode():
        if amp_dtype is None:
            return model(images).float()
        with torch.autocast(images.device.type, dtype=amp_dtype):
            return model(images).float()


def to_probs(logits: torch.Tensor) -> torch.Tensor:
    """Binary models (one channel): sigmoid; multiclass: softmax over classes."""
    return logits.sigmoid() if logits.shape[1] == 1 else logits.softmax(dim=1)


def predict_probs(model: nn.Module, images: torch.Tensor, tta: bool = False,
                  amp_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Probabilities (N, K, H, W); with TTA the mean over horizontal/vertical flips, each flipped back."""
    flips = FLIPS if tta else ((),)
    total = None
    for dims in flips:
        flipped = images.flip(dims) if dims else images
        probs = to_probs(predict_logits(model, flipped, amp_dtype))
        probs = probs.flip(dims) if dims else probs
        total = probs if total is None else total + probs
    return total / len(flips)


def window_starts(size: int, window: int, stride: int) -> list[int]:
    """Window offsets covering 0..size, the last one flush with the end."""
    if size <= window:
        return [0]
    starts = list(range(0, size - window, stride))
    return starts + [size - window]


def blend_weights(window_hw: tuple[int, int], blend: Blend = "gaussian") -> torch.Tensor:
    """(1, 1, h, w) weights, 1 at the centre and small but > 0 at the border (pixels that only a window's border
    covers still get a value). The outer product of two 1-D profiles, so weight ratios between windows stay exact
    in each direction. gaussian: sigma = side/8 (nnU-Net's choice); linear: a tent falling to ~0 at the border."""

    def profile(n: int) -> np.ndarray:
        d = np.arange(n, dtype=np.float64) - (n - 1) / 2
        if blend == "gaussian":
            p = np.exp(-(d ** 2) / (2 * (n / 8) ** 2))
        elif blend == "linear":
            p = 1 - np.abs(d) / (n / 2)
        else:
            raise ValueError(f"unknown blend {blend!r} (gaussian or linear)")
        return p / p.max()

    w = np.outer(profile(window_hw[0]), profile(window_hw[1]))
    return torch.from_numpy(w.astype(np.float32))[None, None]


def sliding_window_probs(model: nn.Module, image: torch.Tensor, window_hw: tuple[int, int], overlap: float = 0.5,
                         blend: Blend = "gaussian", tta: bool = False, batch_size: int = 8,
                         amp_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Probabilities (1, K, H, W) of one image (1, C, H, W) from overlapping windows, blended by weight.

    Windows larger than the image shrink to it (sides stay multiples of 32 when the image's are)."""
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    _, _, h, w = image.shape
    wh, ww = min(window_hw[0], h), min(window_hw[1], w)
    boxes = [(y, x) for y in window_starts(h, wh, max(1, round(wh * (1 - overlap))))
             for x in window_starts(w, ww, max(1, round(ww * (1 - overlap))))]
    weights = blend_weights((wh, ww), blend).to(image.device)
    total = norm = None
    for i in range(0, len(boxes), batch_size):
        chunk = boxes[i:i + batch_size]
        tiles = torch.cat([image[:, :, y:y + wh, x:x + ww] for y, x in chunk])
        probs = predict_probs(model, tiles, tta, amp_dtype)
        if total is None:
            total = torch.zeros((1, probs.shape[1], h, w), device=image.device)
            norm = torch.zeros((1, 1, h, w), device=image.device)
        for (y, x), p in zip(chunk, probs):
            total[:, :, y:y + wh, x:x + ww] += p * weights[0]
            norm[:, :, y:y + wh, x:x + ww] += weights[0]
    return total / norm


# ------------------------------------------------------------------------------------------------------ masks
def to_mask(probs: torch.Tensor, cfg: Config, threshold: float | None = None) -> torch.Tensor:
    """Class ids (N, H, W) from probabilities (N, K, H, W): binary `p > threshold` (the config's by default, as
    the validation metrics), multiclass argmax."""
    if cfg.data.binary:
        t = cfg.train.threshold if threshold is None else threshold
        return (probs[:, 0] > t).long()
    return probs.argmax(dim=1)


def remove_small_components(mask: np.ndarray, min_size: int) -> np.ndarray:
    """Per class > 0: 8-connected components smaller than MIN_SIZE pixels become background (0)."""
    out = mask.copy()
    for c in np.unique(mask):
        if c == 0:
            continue
        n, labels, stats, _ = cv2.connectedComponentsWithStats((mask == c).astype(np.uint8), connectivity=8)
        small = np.flatnonzero(stats[:, cv2.CC_STAT_AREA] < min_size)
        small = small[small > 0]  # label 0 is everything that is not class c
        if small.size:
            out[np.isin(labels, small)] = 0
    return out


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Per class > 0: background pixels enclosed by that class (not 4-connected to the image border through
    non-class pixels) take the class. Other classes inside a region are left alone."""
    out = mask.copy()
    for c in np.unique(mask):
        if c == 0:
            continue
        outside = (mask != c).astype(np.uint8)
        _, labels = cv2.connectedComponents(outside, connectivity=4)
        border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
        enclosed = (outside == 1) & ~np.isin(labels, border)
        out[enclosed & (out == 0)] = c
    return out


def postprocess(mask: np.ndarray, min_size: int = 0, holes: bool = False) -> np.ndarray:
    if min_size > 0:
        mask = remove_small_components(mask, min_size)
    if holes:
        mask = fill_holes(mask)
    return mask


# -------------------------------------------------------------------------------------------------- predictor
@dataclass(frozen=True)
class InferenceOptions:
    threshold: float | None = None  # binary only; None = the training config's train.threshold
    tta: bool = False
    sliding_window: bool = False
    overlap: float = 0.5
    blend: Blend = "gaussian"
    min_size: int = 0
    fill_holes: bool = False
    batch_size: int = 8

    def __post_init__(self):
        if not 0 <= self.overlap < 1:
            raise UserError(f"--overlap must be in [0, 1), got {self.overlap}")
        if self.threshold is not None and not 0 < self.threshold < 1:
            raise UserError(f"--threshold must be in (0, 1), got {self.threshold}")
        if self.min_size < 0 or self.batch_size < 1:
            raise UserError("--min-size must be >= 0 and --batch-size >= 1")


class Predictor:
    """Images → probabilities and masks at their own size. An image is HxWxC uint8 (0..255) or float 0..1: what
    `io.read_pixels` (uint8 for 8-bit files: the validation pipeline's own path) or `io.read_image` give.

    Preprocessing is validation's: the eval transform (on the image's own type), then on the device the same
    `Normalizer` the training loop applies."""

    def __init__(self, model: nn.Module, cfg: Config, mean, std, options: InferenceOptions = InferenceOptions()):
        from .data.statistics import Normalizer
        from .data.transforms import build_eval_transform
        from .runtime import resolve_amp

        self.model, self.cfg, self.options = model.eval(), cfg, options
        self.device = next(model.parameters()).device
        self.amp_dtype = resolve_amp(cfg.train.amp, self.device)
        self.normalizer = Normalizer(mean, std)
        self.transform = build_eval_transform(cfg.data)
        # sliding windows see the image at its own resolution: only padding to a multiple of 32, then windows
        self.native_transform = build_eval_transform(cfg.data.model_copy(update={"resize_policy": "pad"}))
        h, w = cfg.data.size_hw
        self.window = (-(-h // SIZE_DIVISOR) * SIZE_DIVISOR, -(-w // SIZE_DIVISOR) * SIZE_DIVISOR)

    @classmethod
    def from_loaded(cls, loaded: LoadedModel, options: InferenceOptions = InferenceOptions()) -> "Predictor":
        return cls(loaded.model, loaded.cfg, loaded.mean, loaded.std, options)

    def probabilities(self, images: Sequence[np.ndarray]) -> list[torch.Tensor]:
        """(K, H, W) probabilities per image, on the model's device."""
        if self.options.sliding_window:
            return [self._sliding(image) for image in images]
        prepared = [self._prepare(self.transform, image) for image in images]
        out: list[torch.Tensor] = []
        for group in _same_shape_runs(prepared, self.options.batch_size):
            batch = self.normalizer(torch.stack([x for x, _, _ in group]).to(self.device))
            probs = predict_probs(self.model, batch, self.options.tta, self.amp_dtype)
            out.extend(_restore(p, box, size) for p, (_, box, size) in zip(probs, group))
        return out

    def masks(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Post-processed class-id masks (HxW uint8, or uint16 beyond 256 classes)."""
        dtype = np.uint8 if self.cfg.data.num_classes <= 256 else np.uint16
        out = []
        for probs in self.probabilities(images):
            mask = to_mask(probs[None], self.cfg, self.options.threshold)[0].cpu().numpy().astype(dtype)
            out.append(postprocess(mask, self.options.min_size, self.options.fill_holes))
        return out

    def _sliding(self, image: np.ndarray) -> torch.Tensor:
        x, box, size = self._prepare(self.native_transform, image)
        o = self.options
        x = self.normalizer(x[None].to(self.device))
        probs = sliding_window_probs(self.model, x, self.window, o.overlap, o.blend, o.tta, o.batch_size,
                                     self.amp_dtype)
        return _restore(probs[0], box, size)

    @staticmethod
    def _prepare(transform, image: np.ndarray):
        """(C×h×w tensor of the image's type, not normalised; (top, left, bottom, right) of the image in it;
        original (H, W))."""
        out = transform(image=image, mask=np.ones(image.shape[:2], np.int32))
        inside = np.asarray(out["mask"]) == 1
        rows, cols = np.flatnonzero(inside.any(axis=1)), np.flatnonzero(inside.any(axis=0))
        box = (int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1)
        return out["image"], box, image.shape[:2]


def _same_shape_runs(items: list, limit: int):
    """Consecutive items whose tensors share a shape and type, at most LIMIT at a time (one batch each)."""
    run: list = []
    for item in items:
        if run and (len(run) == limit or run[0][0].shape != item[0].shape or run[0][0].dtype != item[0].dtype):
            yield run
            run = []
        run.append(item)
    if run:
        yield run


def _restore(probs: torch.Tensor, box: tuple[int, int, int, int], size: tuple[int, int]) -> torch.Tensor:
    """Probabilities (K, h, w) of the transformed image → (K, H, W) on the original pixels."""
    top, left, bottom, right = box
    probs = probs[:, top:bottom, left:right]
    if tuple(probs.shape[1:]) != tuple(size):
        probs = F.interpolate(probs[None], size=tuple(size), mode="bilinear", align_corners=False)[0]
    return probs
