"""Where the (image, mask) pairs of a split are: the dataset root, its layout, the split's files.

Two layouts (`data.layout`):
- split_files: root/split_dir/{split}.txt lists stems; root/images_dir/<stem>.<png|jpg|jpeg|tif|tiff> and
  root/masks_dir/<stem>.<png|tif|tiff>.
- folders: root/images_dir/{split}/<name>.<ext> and root/masks_dir/{split}/<name>.<png|tif|tiff>.
auto takes split_files when split_dir exists, else folders when images_dir/<train split> exists.
"""

from __future__ import annotations

from pathlib import Path

from ..config import DataConfig
from ..errors import DataError
from . import synthetic
from .io import IMAGE_EXTENSIONS, MASK_EXTENSIONS

Pair = tuple[Path, Path]


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
