"""`SegmentationDataset`: a split's (image, mask) pairs (found by `splits`) served as tensors; `build_dataset`
gives it the split's transform and the config's normaliser."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..config import DataConfig
from ..errors import DataError
from .io import read_mask, read_pixels
from .augment_presets import auto_preset
from .splits import Pair, list_split, resolve_root, split_name
from .statistics import Normalizer, mean_std


class SegmentationDataset(Dataset):
    """Items are dict(image=CxHxW tensor, mask=HxW integer tensor, index=int).

    image: uint8 0..255 for 8-bit files, not normalised: the engine copies it to the device as uint8 and normalises
    it there (`statistics.model_input`). Other depths (16-bit, float files) come out float32, normalised here with
    `normalizer` (0..1 without one), as all images did before. A batch that mixes the two (`__getitems__`) comes
    out all float, normalised here.
    mask: class ids as uint8 when num_classes <= 256 and ignore_index (if any) <= 255, else int32: 1 or 4 bytes a
    pixel instead of int64's 8 through the loader; the engine takes `.long()` on the device.

    cache=True keeps each decoded (image, mask) in memory after its first read; every DataLoader worker process
    holds its own copy, so pair it with persistent_workers=True.
    """

    def __init__(self, pairs: list[Pair], cfg: DataConfig, transform=None, cache: bool = False,
                 normalizer: Normalizer | None = None):
        self.pairs = list(pairs)
        self.cfg = cfg
        self.transform = transform
        self.cache = cache
        self.normalizer = normalizer
        self.mask_dtype = mask_dtype(cfg)
        self._decoded: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._transform_seed: int | None = None

    def __len__(self) -> int:
        return len(self.pairs)

    @property
    def stems(self) -> list[str]:
        return [image.stem for image, _ in self.pairs]

    def raw(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(HxWxC image as io.read_pixels gives it, HxW int64 mask) before any transform (e.g. for overlays)."""
        image, mask = self._load(index)
        return image, mask.astype(np.int64)

    def _load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(image, mask as self.mask_dtype), from the cache when it holds them."""
        if index in self._decoded:
            return self._decoded[index]
        image_path, mask_path = self.pairs[index]
        image = read_pixels(image_path, self.cfg.in_channels)
        mask = read_mask(mask_path, self.cfg, self.mask_dtype)  # values checked against the class set first
        if image.shape[:2] != mask.shape:
            raise DataError(f"{image_path}: image is {image.shape[1]}x{image.shape[0]} but its mask {mask_path} "
                            f"is {mask.shape[1]}x{mask.shape[0]}")
        if self.cache:
            self._decoded[index] = (image, mask)
        return image, mask

    def preload(self) -> None:
        """With cache=True, decode every item now: loader workers forked afterwards share the decoded arrays
        (copy-on-write) instead of each decoding its own copy."""
        if self.cache:
            for index in range(len(self)):
                self._load(index)

    accepts_seeded_index = True  # dataset[(i, seed)]: item i with its augmentation seeded by SEED

    def __getitem__(self, index: int | tuple[int, int]) -> dict:
        seed = None
        if isinstance(index, tuple):
            index, seed = index
        image, mask = self._load(index)
        if self.transform is not None:
            if seed is not None and hasattr(self.transform, "set_random_seed"):
                self.transform.set_random_seed(seed)
                self._transform_seed = None
            else:
                self._seed_transform()
            out = self.transform(image=image, mask=mask)
            image, mask = out["image"], out["mask"]
        else:
            image = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
        mask = torch.as_tensor(mask)
        if image.dtype != torch.uint8:
            image = self._as_float(image)
        return {"image": image, "mask": mask, "index": index}

    def __getitems__(self, keys: list) -> list[dict]:
        """A batch's items (what DataLoader collates): uint8 and float images cannot share a batch, so when 8-bit
        and other files meet, the uint8 ones are normalised here too."""
        items = [self[key] for key in keys]
        if len({item["image"].dtype for item in items}) > 1:
            for item in items:
                if item["image"].dtype == torch.uint8:
                    item["image"] = self._as_float(item["image"])
        return items

    def _as_float(self, image: torch.Tensor) -> torch.Tensor:
        """Float CxHxW: normalised with `normalizer`, else on the 0..1 scale."""
        if self.normalizer is not None:
            return self.normalizer(image)
        return image.float().div_(255.0) if image.dtype == torch.uint8 else image.float()

    def _seed_transform(self) -> None:
        """Albumentations keeps its own generator, copied as is into every DataLoader worker: without a reseed all
        workers, and every epoch of non-persistent workers, would draw the same augmentations. torch's seed differs
        per worker and per epoch (and follows torch.manual_seed), so it is the one to follow."""
        seed = torch.initial_seed() % 2**32
        if seed != self._transform_seed and hasattr(self.transform, "set_random_seed"):
            self.transform.set_random_seed(seed)
            self._transform_seed = seed


def mask_dtype(cfg: DataConfig) -> type:
    """uint8 when every class id and ignore_index fit in it, else int32 (cv2 warps take neither int64 nor uint32)."""
    top = max(cfg.num_classes - 1, cfg.ignore_index if cfg.ignore_index is not None else 0)
    return np.uint8 if top <= 255 else np.int32


def build_dataset(cfg: DataConfig, split: str, train: bool, root: Path | None = None) -> SegmentationDataset:
    """The split with the train (augmenting) or eval transform; its `normalizer` holds mean_std(cfg, root)."""
    from .transforms import build_eval_transform, build_train_transform  # Albumentations is slow to import: only here

    root = root or resolve_root(cfg)
    pairs = list_split(cfg, split, root)
    if train and cfg.augment == "auto":  # fit resolves it before training (and records it); a study's trials here
        train_pairs = pairs if split_name(cfg, split) == cfg.train_split else list_split(cfg, "train", root)
        cfg = cfg.model_copy(update={"augment": auto_preset(len(train_pairs))})
    transform = (build_train_transform if train else build_eval_transform)(cfg)
    return SegmentationDataset(pairs, cfg, transform, cache=cfg.cache == "memory",
                               normalizer=Normalizer(*mean_std(cfg, root)))
