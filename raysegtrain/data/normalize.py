"""Pixels → model input: `(x / 255 - mean) / std` for uint8, `(x - mean) / std` for float 0..1, on x's device.

8-bit images travel as uint8 from decoding through augmentation, collation and the host-to-device copy (a quarter of
float32's bytes); normalisation is the last step, on the device, where it is one cheap elementwise pass. The same
`Normalizer` serves training (engine.to_device), the dataset (the rare images that are not 8-bit, which it returns
normalised as before), and inference, so every path computes the model's input with the same arithmetic.

What a model accepts (the engine's rule, unchanged for custom dataset sources): a uint8 image batch is raw pixels and
is normalised here; a float batch is already the model's input and passes as it is.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..config import DataConfig


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
            self._normalizer = Normalizer(*config_mean_std(self.cfg))
        return self._normalizer(x)


def config_mean_std(cfg: DataConfig) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """mean_std of the config; the dataset root is resolved (and read) only for normalize=dataset statistics."""
    from .dataset import resolve_root
    from .transforms import mean_std

    if cfg.normalize != "dataset" or (cfg.mean is not None and cfg.std is not None):
        return mean_std(cfg, ".")
    return mean_std(cfg, resolve_root(cfg))


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
