"""Finding the (image, mask) pairs of a split and serving them as tensors.

Two layouts (`data.layout`):
- split_files: root/split_dir/{split}.txt lists stems; root/images_dir/<stem>.<png|jpg|jpeg|tif|tiff> and
  root/masks_dir/<stem>.<png|tif|tiff>.
- folders: root/images_dir/{split}/<name>.<ext> and root/masks_dir/{split}/<name>.<png|tif|tiff>.
auto takes split_files when split_dir exists, else folders when images_dir/<train split> exists.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..config import DataConfig
from ..errors import DataError
from . import synthetic
from .io import IMAGE_EXTENSIONS, MASK_EXTENSIONS, read_mask, read_pixels
from .normalize import Normalizer

CLASS_WEIGHT_MAX_MASKS = 2048  # auto class weights: at most this many train masks, evenly spaced

Pair = tuple[Path, Path]


# --------------------------------------------------------------------------------------------------- locating data
def resolve_root(cfg: DataConfig) -> Path:
    """The dataset folder as an absolute path: cfg.root, or the synthetic set in the cache (generated if needed)."""
    if cfg.root is None or str(cfg.root) == "":
        return synthetic.cached_root(cfg.synthetic).resolve()
    root = Path(cfg.root).expanduser().resolve()
    if not root.is_dir():
        raise DataError(f"data.root {cfg.root} is not a folder" + (" (it is a file)" if root.exists() else ""))
    return root


def split_name(cfg: DataConfig, split: str) -> str:
    """'train' / 'val' / 'test' mean the configured split names; any other name is taken as it is."""
    return {"train": cfg.train_split, "val": cfg.val_split, "test": cfg.test_split}.get(split, split)


def detect_layout(cfg: DataConfig, root: Path) -> str:
    if cfg.layout != "auto":
        return cfg.layout
    if (root / cfg.split_dir).is_dir():
        return "split_files"
    if (root / cfg.images_dir / cfg.train_split).is_dir():
        return "folders"
    raise DataError(f"{root}: no dataset layout found: expected {cfg.split_dir}/{cfg.train_split}.txt (+ "
                    f"{cfg.images_dir}/, {cfg.masks_dir}/) or {cfg.images_dir}/{cfg.train_split}/ + "
                    f"{cfg.masks_dir}/{cfg.train_split}/")


def has_split(cfg: DataConfig, split: str, root: Path | None = None) -> bool:
    """Whether the split exists at all (the test split is optional)."""
    root = root or resolve_root(cfg)
    name = split_name(cfg, split)
    if detect_layout(cfg, root) == "split_files":
        return (root / cfg.split_dir / f"{name}.txt").is_file()
    return (root / cfg.images_dir / name).is_dir()


def list_split(cfg: DataConfig, split: str, root: Path | None = None) -> list[Pair]:
    """(image, mask) paths of a split, in listing order (split_files) or sorted by name (folders)."""
    root = root or resolve_root(cfg)
    name = split_name(cfg, split)
    if detect_layout(cfg, root) == "split_files":
        pairs = _pairs_from_split_file(cfg, root, name)
    else:
        pairs = _pairs_from_folders(cfg, root, name)
    if not pairs:
        raise DataError(f"{root}: split {name!r} has no images")
    return pairs


def read_split_file(path: Path) -> list[str]:
    """Stems listed in a split file: stripped, blank lines and #-comments skipped, an image extension dropped."""
    if not path.is_file():
        raise DataError(f"split file not found: {path}")
    lines = (line.strip() for line in path.read_text().splitlines())
    return [strip_image_extension(line) for line in lines if line and not line.startswith("#")]


def strip_image_extension(entry: str) -> str:
    return entry[: -len(Path(entry).suffix)] if Path(entry).suffix.lower() in IMAGE_EXTENSIONS else entry


def find_file(folder: Path, stem: str, extensions) -> Path | None:
    for ext in extensions:
        for candidate in (folder / f"{stem}{ext}", folder / f"{stem}{ext.upper()}"):
            if candidate.is_file():
                return candidate
    return None


def _pairs_from_split_file(cfg: DataConfig, root: Path, name: str) -> list[Pair]:
    images, masks = root / cfg.images_dir, root / cfg.masks_dir
    pairs = []
    for stem in read_split_file(root / cfg.split_dir / f"{name}.txt"):
        image = find_file(images, stem, IMAGE_EXTENSIONS)
        if image is None:
            raise DataError(f"split {name!r}: no image for {stem!r} in {images} "
                            f"(tried {', '.join(IMAGE_EXTENSIONS)})")
        mask = find_file(masks, stem, MASK_EXTENSIONS)
        if mask is None:
            raise DataError(f"split {name!r}: no mask for {stem!r} in {masks} (tried {', '.join(MASK_EXTENSIONS)})")
        pairs.append((image, mask))
    return pairs


def folder_images(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _pairs_from_folders(cfg: DataConfig, root: Path, name: str) -> list[Pair]:
    images, masks = root / cfg.images_dir / name, root / cfg.masks_dir / name
    for folder in (images, masks):
        if not folder.is_dir():
            raise DataError(f"split {name!r}: folder not found: {folder}")
    pairs = []
    for image in folder_images(images):
        mask = find_file(masks, image.stem, MASK_EXTENSIONS)
        if mask is None:
            raise DataError(f"split {name!r}: no mask for {image.name} in {masks}")
        pairs.append((image, mask))
    return pairs


# --------------------------------------------------------------------------------------------------------- dataset
class SegmentationDataset(Dataset):
    """Items are dict(image=CxHxW tensor, mask=HxW integer tensor, index=int).

    image: uint8 0..255 for 8-bit files, not normalised: the engine copies it to the device as uint8 and normalises
    it there (`normalize.model_input`). Other depths (16-bit, float files) come out float32, normalised here with
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
    from .transforms import build_eval_transform, build_train_transform, mean_std  # Albumentations: 0.5 s to import

    root = root or resolve_root(cfg)
    transform = (build_train_transform if train else build_eval_transform)(cfg)
    return SegmentationDataset(list_split(cfg, split, root), cfg, transform, cache=cfg.cache == "memory",
                               normalizer=Normalizer(*mean_std(cfg, root)))


# --------------------------------------------------------------------------------------------------- class weights
def class_weights(cfg: DataConfig, root: Path | None = None) -> list[float] | None:
    """Per-class loss weights: none -> None, a list -> itself, auto -> from the train masks' pixel counts."""
    if cfg.class_weights == "none":
        return None
    if isinstance(cfg.class_weights, list):
        return [float(w) for w in cfg.class_weights]
    return weights_from_counts(class_pixel_counts(cfg, root))


def class_pixel_counts(cfg: DataConfig, root: Path | None = None) -> np.ndarray:
    """Pixels per class over (at most CLASS_WEIGHT_MAX_MASKS evenly spaced) train masks; ignore_index left out."""
    from .transforms import evenly_spaced

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
