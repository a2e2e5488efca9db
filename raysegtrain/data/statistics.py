"""Numbers taken from the data: the per-channel mean/std the model's input is normalised with (and the `Normalizer`
that applies them), and the class frequencies that `data.class_weights: auto` weights the loss by.

Which mean/std a config uses is decided here only (`uses_dataset_stats`, `mean_std`): explicit `data.mean` /
`data.std` win; otherwise `data.normalize` gives them: imagenet (constants), none (0 and 1: the 0..1 scale), or
dataset (computed from the train images, so only that policy reads `data.root`).

Pixels → model input: `(x / 255 - mean) / std` for uint8, `(x - mean) / std` for float 0..1, on x's device.
8-bit images travel as uint8 from decoding through augmentation, collation and the host-to-device copy (a quarter of
float32's bytes); normalisation is the last step, on the device, where it is one cheap elementwise pass. The same
`Normalizer` serves training (engine.to_device), the dataset (the rare images that are not 8-bit, which it returns
normalised), and inference, so every path computes the model's input with the same arithmetic.

What a model accepts (the engine's rule, custom dataset sources included): a uint8 image batch is raw pixels and
is normalised here; a float batch is already the model's input and passes as it is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..config import DataConfig

# `.splits` and `.io` are imported inside the functions that read files: the engine imports this module at start-up,
# and those bring OpenCV and PIL, which it does not otherwise need there.

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
STATS_MAX_IMAGES = 512  # dataset mean/std: at most this many train images, evenly spaced
CLASS_WEIGHT_MAX_MASKS = 2048  # auto class weights: at most this many train masks, evenly spaced

Stats = tuple[tuple[float, ...], tuple[float, ...]]


# ------------------------------------------------------------------------------------------------------ mean/std
def uses_dataset_stats(cfg: DataConfig) -> bool:
    """Whether the statistics come from the train images: normalize=dataset, unless data.mean and data.std are both
    given (explicit values win over `normalize`). Only then is the dataset root read."""
    return cfg.normalize == "dataset" and (cfg.mean is None or cfg.std is None)


def mean_std(cfg: DataConfig, root: str | Path | None = None) -> Stats:
    """Per-channel (mean, std) on the 0..1 scale, which a `Normalizer` applies. Explicit cfg.mean / cfg.std win over
    `normalize`. ROOT is the dataset folder for dataset statistics (resolved from cfg when not given); the other
    policies never read it."""
    c = cfg.in_channels
    if uses_dataset_stats(cfg):
        if root is None:
            from .splits import resolve_root

            root = resolve_root(cfg)
        mean, std = dataset_stats(cfg, Path(root))
    elif cfg.normalize == "imagenet":
        mean, std = _imagenet_stats(c)
    else:  # none; or dataset statistics that data.mean and data.std both replace
        mean, std = (0.0,) * c, (1.0,) * c
    return (tuple(cfg.mean) if cfg.mean is not None else mean, tuple(cfg.std) if cfg.std is not None else std)


def _imagenet_stats(in_channels: int) -> Stats:
    """ImageNet's RGB statistics; for another channel count, their channel averages on every channel."""
    if in_channels == 3:
        return IMAGENET_MEAN, IMAGENET_STD
    return (float(np.mean(IMAGENET_MEAN)),) * in_channels, (float(np.mean(IMAGENET_STD)),) * in_channels


_STATS_CACHE: dict[tuple, Stats] = {}


def dataset_stats(cfg: DataConfig, root: Path) -> Stats:
    """Mean/std over (at most STATS_MAX_IMAGES evenly spaced) train images, streamed; cached per process."""
    from .io import read_image
    from .splits import list_split

    key = (str(Path(root).resolve()), cfg.layout, cfg.images_dir, cfg.split_dir, cfg.train_split, cfg.in_channels)
    if key not in _STATS_CACHE:
        pairs = evenly_spaced(list_split(cfg, "train", root), STATS_MAX_IMAGES)
        total = np.zeros(cfg.in_channels)
        squares = np.zeros(cfg.in_channels)
        count = 0
        for image_path, _ in pairs:
            pixels = read_image(image_path, cfg.in_channels).reshape(-1, cfg.in_channels).astype(np.float64)
            total += pixels.sum(0)
            squares += (pixels * pixels).sum(0)
            count += len(pixels)
        mean = total / count
        std = np.sqrt(np.maximum(squares / count - mean * mean, 0.0))
        _STATS_CACHE[key] = (tuple(float(m) for m in mean), tuple(float(max(s, 1e-3)) for s in std))
    return _STATS_CACHE[key]


def evenly_spaced(items: list, limit: int) -> list:
    if len(items) <= limit:
        return items
    return [items[int(i * len(items) / limit)] for i in range(limit)]


# ---------------------------------------------------------------------------------------------------- normaliser
class Normalizer:
    """`Normalizer(mean, std)(x)`: a float32 tensor (N)CHW normalised per channel; mean/std on the 0..1 scale.

    x is uint8 (0..255, divided by 255 first) or floating (taken as 0..1). The result is a new tensor on x's device
    with x's memory format (channels_last stays channels_last); x itself is never modified."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        if len(mean) != len(std):
            raise ValueError(f"mean has {len(mean)} values, std {len(std)}")
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self._stats: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() not in (3, 4) or x.shape[-3] != len(self.mean):
            raise ValueError(f"expected (N, {len(self.mean)}, H, W) or ({len(self.mean)}, H, W) pixels, got "
                             f"{tuple(x.shape)}")
        mean, std = self._on(x.device)
        if x.dtype == torch.uint8:
            return x.float().div_(255.0).sub_(mean).div_(std)
        return (x.float() - mean).div_(std)  # out of place first: x.float() is x itself for float32

    def _on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._stats:  # one small copy per device, not one per batch
            shape = (len(self.mean), 1, 1)
            self._stats[device] = (torch.tensor(self.mean, dtype=torch.float32, device=device).view(shape),
                                   torch.tensor(self.std, dtype=torch.float32, device=device).view(shape))
        return self._stats[device]

    def __getstate__(self) -> dict:  # DataLoader workers and Ray: the numbers only, never device tensors
        return {"mean": self.mean, "std": self.std}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["mean"], state["std"])

    def __repr__(self) -> str:
        return f"Normalizer(mean={self.mean}, std={self.std})"


class ConfigNormalizer:
    """A `Normalizer` whose statistics come from the data config, computed at the first call: a custom dataset
    source that serves float (already normalised) images never needs them (normalize=dataset reads data.root)."""

    def __init__(self, cfg: DataConfig):
        self.cfg = cfg
        self._normalizer: Normalizer | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self._normalizer is None:
            self._normalizer = Normalizer(*mean_std(self.cfg))
        return self._normalizer(x)


def input_normalizer(dataset, cfg: DataConfig):
    """What turns a uint8 batch of DATASET into model input: a copy of the dataset's own `normalizer` (a
    SegmentationDataset's), else the config's statistics, computed when first needed."""
    own = getattr(dataset, "normalizer", None)
    if isinstance(own, Normalizer):
        return Normalizer(own.mean, own.std)
    return ConfigNormalizer(cfg)


def model_input(x: torch.Tensor, normalizer) -> torch.Tensor:
    """The engine's rule: uint8 pixels are normalised (on x's device), anything else is already model input."""
    return normalizer(x) if x.dtype == torch.uint8 else x


# ------------------------------------------------------------------------------------------------- class weights
def class_weights(cfg: DataConfig, root: Path | None = None) -> list[float] | None:
    """Per-class loss weights: none -> None, a list -> itself, auto -> from the train masks' pixel counts."""
    if cfg.class_weights == "none":
        return None
    if isinstance(cfg.class_weights, list):
        return [float(w) for w in cfg.class_weights]
    return weights_from_counts(class_pixel_counts(cfg, root))


def class_pixel_counts(cfg: DataConfig, root: Path | None = None) -> np.ndarray:
    """Pixels per class over (at most CLASS_WEIGHT_MAX_MASKS evenly spaced) train masks; ignore_index left out."""
    from .io import read_mask
    from .splits import list_split

    counts = np.zeros(cfg.num_classes, np.int64)
    for _, mask_path in evenly_spaced(list_split(cfg, "train", root), CLASS_WEIGHT_MAX_MASKS):
        mask = read_mask(mask_path, cfg)
        counts += np.bincount(mask[(mask >= 0) & (mask < cfg.num_classes)], minlength=cfg.num_classes)
    return counts


def weights_from_counts(counts) -> list[float]:
    """Inverse square-root frequency, normalised to mean 1. A class with no pixels gets the largest weight."""
    counts = np.asarray(counts, dtype=np.float64)
    if counts.sum() <= 0:
        return [1.0] * len(counts)
    present = counts > 0
    weights = np.zeros_like(counts)
    weights[present] = 1.0 / np.sqrt(counts[present] / counts.sum())
    weights[~present] = weights[present].max()
    return [float(w) for w in weights / weights.mean()]
