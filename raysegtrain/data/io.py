"""Reading images and masks from disk into the arrays the pipeline uses.

`read_pixels` -> HxWxC with exactly `in_channels` channels (RGB order), as the training and inference pipelines take
                 it: uint8 0..255 for 8-bit files (nearly all PNG/JPEG), float32 0..1 for the rest (16-bit, float).
`read_image` -> the same pixels as float32 in 0..1, whatever the file's depth (statistics, callers doing arithmetic).
`read_mask`  -> HxW class ids (plus `ignore_index`), whatever the file's format; int64 unless asked otherwise.
Every failure is a `DataError` that names the file; the subclasses below let `check_dataset` sort problems by kind.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from ..config import DataConfig
from ..errors import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
MASK_EXTENSIONS = (".png", ".tif", ".tiff")
_TIFF = (".tif", ".tiff")


class UnreadableFileError(DataError):
    """The file is missing, truncated or not an image."""


class ChannelsError(DataError):
    """The image's channel count cannot be converted to `in_channels`."""


class MaskValuesError(DataError):
    """The mask holds values that are not a class id (nor `ignore_index`), or colours not in the palette."""


# ------------------------------------------------------------------------------------------------------- decoding
def decode(path: str | Path) -> np.ndarray:
    """The file's pixels as stored: HxW or HxWxC, native dtype; 3/4-channel colour in RGB(A) order."""
    path = Path(path)
    array = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if array is not None and array.ndim == 3 and array.shape[2] in (3, 4):
        array = cv2.cvtColor(array, cv2.COLOR_BGR2RGB if array.shape[2] == 3 else cv2.COLOR_BGRA2RGBA)
    if array is None and path.suffix.lower() in _TIFF:
        array = _decode_tiff(path)
    if array is None:
        reason = "file not found" if not path.is_file() else "not a readable image (corrupt or unsupported)"
        raise UnreadableFileError(f"{path}: {reason}")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    return array


def _decode_tiff(path: Path) -> np.ndarray | None:
    import tifffile

    try:
        array = tifffile.imread(path)
    except Exception:  # tifffile raises many kinds for broken files
        return None
    if array.ndim == 4:  # several pages: the first one
        array = array[0]
    # planar (C, H, W) storage: channels last like everything else
    if array.ndim == 3 and array.shape[0] <= 16 and array.shape[2] > 16:
        array = np.moveaxis(array, 0, -1)
    return array if array.ndim in (2, 3) else None


def channels_of(array: np.ndarray) -> int:
    return 1 if array.ndim == 2 else array.shape[2]


# --------------------------------------------------------------------------------------------------------- images
def read_image(path: str | Path, in_channels: int) -> np.ndarray:
    """HxWxC float32 in 0..1, C = in_channels (gray is replicated to RGB, RGB is converted to gray)."""
    array = decode(path)
    return to_channels(scale_to_unit(array, path), in_channels, path)


def read_pixels(path: str | Path, in_channels: int) -> np.ndarray:
    """HxWxC, C = in_channels: uint8 for 8-bit files, float32 in 0..1 for other depths.

    This is what the datasets and `predict` feed their transforms: augmentation runs on uint8 (decode plus the
    default pipeline take about half the time they take on float32), and the batch crosses loader workers, pinned
    memory and the host-to-device copy at a quarter of float32's bytes; `statistics.Normalizer` divides by 255 on
    the device. 16-bit and float files (rare) keep their precision as float32 0..1, exactly as `read_image` gives
    them. An RGB file read into a 1-channel model is converted to gray in 8 bits (cv2 rounds to the nearest level,
    within 0.5/255 of read_image's value)."""
    array = decode(path)
    if array.dtype == np.bool_:
        array = array.astype(np.uint8) * np.uint8(255)
    if array.dtype != np.uint8:
        array = scale_to_unit(array, path)
    return to_channels(array, in_channels, path)


def scale_to_unit(array: np.ndarray, path: str | Path = "") -> np.ndarray:
    """Integers are divided by their type's maximum (8-bit /255, 16-bit /65535); floats are taken as 0..1."""
    if array.dtype == np.bool_:
        return array.astype(np.float32)
    if np.issubdtype(array.dtype, np.integer):
        top = np.iinfo(array.dtype).max
        return np.clip(array, 0, None).astype(np.float32) / np.float32(top)
    if np.issubdtype(array.dtype, np.floating):
        return array.astype(np.float32, copy=False)
    raise UnreadableFileError(f"{path}: unsupported pixel type {array.dtype}")


def to_channels(image: np.ndarray, in_channels: int, path: str | Path = "") -> np.ndarray:
    have = channels_of(image)
    if image.ndim == 2:
        image = image[:, :, None]
    if have == in_channels:
        return image
    if have == 1 and in_channels == 3:
        return np.repeat(image, 3, axis=2)
    if have == 3 and in_channels == 1:
        return cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)[:, :, None]
    raise ChannelsError(f"{path}: image has {have} channels; data.in_channels={in_channels} "
                        f"accepts {'1 or 3' if in_channels in (1, 3) else in_channels}")


# ---------------------------------------------------------------------------------------------------------- masks
def read_mask(path: str | Path, cfg: DataConfig, dtype=np.int64) -> np.ndarray:
    """HxW class ids in 0..num_classes-1, or ignore_index, as DTYPE (int64 unless the caller knows a narrower type
    holds every class id); other values raise MaskValuesError. Values are checked before the cast."""
    mask = decode_mask(path, cfg)
    check_mask_values(mask, cfg, path)
    return mask.astype(dtype, copy=False)


def decode_mask(path: str | Path, cfg: DataConfig) -> np.ndarray:
    """The mask file as HxW integer labels per `cfg.mask_format` (the file's own integer type where it has one),
    without checking them against the class set.

    P-mode PNGs always give their palette indices; RGB masks go through `cfg.palette` when it is set (formats auto
    and palette), and are otherwise accepted only if they are gray stored as RGB.
    """
    path = Path(path)
    array = _palette_indices(path)
    if array is None:
        array = decode(path)
    if array.ndim == 3:
        if cfg.palette is not None and cfg.mask_format in ("auto", "palette") and array.shape[2] in (3, 4):
            return map_palette(array[:, :, :3], cfg.palette, path)
        array = _gray_from_equal_channels(array, cfg, path)
    if np.issubdtype(array.dtype, np.floating):
        if not np.all(np.mod(array, 1) == 0):
            raise MaskValuesError(f"{path}: mask has fractional values (a mask holds class ids)")
        array = array.astype(np.int64)
    if cfg.mask_format == "binary" or cfg.mask_format == "auto" and cfg.binary:
        values = distinct_values(array)
        if cfg.mask_format == "binary" or _only(values, (0, 255)):
            return _binary(array, values, cfg, path)
    return array


def distinct_values(labels: np.ndarray) -> np.ndarray:
    """Sorted distinct values; a histogram for 8/16-bit labels (~10x faster than np.unique on a 512² mask)."""
    if labels.dtype in (np.uint8, np.uint16) and labels.size:
        return np.flatnonzero(np.bincount(labels.ravel(), minlength=1))
    return np.unique(labels)


def _palette_indices(path: Path) -> np.ndarray | None:
    try:
        with Image.open(path) as im:
            return np.array(im) if im.mode == "P" else None
    except Exception:  # not something PIL reads: decode() reports it
        return None


def _gray_from_equal_channels(array: np.ndarray, cfg: DataConfig, path: Path) -> np.ndarray:
    colour = array[:, :, :3]
    if array.shape[2] in (3, 4) and (colour == colour[:, :, :1]).all():
        return array[:, :, 0]
    hint = "set data.palette to the class colours" if cfg.palette is None else "use mask_format auto or palette"
    raise MaskValuesError(f"{path}: mask has {array.shape[2]} channels with different values; "
                          f"for colour masks {hint}")


def map_palette(rgb: np.ndarray, palette, path: str | Path = "") -> np.ndarray:
    codes = _rgb_code(rgb.astype(np.int64))
    table = {int(_rgb_code(np.array(c, dtype=np.int64))): i for i, c in enumerate(palette)}
    present, inverse = np.unique(codes, return_inverse=True)
    unknown = [int(c) for c in present if int(c) not in table]
    if unknown:
        shown = ", ".join(str(((c >> 16) & 255, (c >> 8) & 255, c & 255)) for c in unknown[:5])
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        raise MaskValuesError(f"{path}: mask colours not in data.palette: {shown}{more}")
    lookup = np.array([table[int(c)] for c in present], dtype=np.int64)
    return lookup[inverse].reshape(codes.shape)


def _rgb_code(rgb: np.ndarray) -> np.ndarray:
    return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


def _only(values: np.ndarray, allowed) -> bool:
    return bool(np.isin(values, allowed).all())


def _binary(labels: np.ndarray, values: np.ndarray, cfg: DataConfig, path: Path) -> np.ndarray:
    # with ignore_index 255, a 0/1/255 mask keeps 255 as "ignore" rather than foreground
    zero_one = (0, 1) if cfg.ignore_index is None else (0, 1, cfg.ignore_index)
    if _only(values, zero_one):
        return labels
    if _only(values, (0, 255)):
        return (labels == 255).astype(np.uint8)
    values = _value_list(values)
    raise MaskValuesError(f"{path}: binary mask has values {values} (expected 0/1 or 0/255)")


def check_mask_values(mask: np.ndarray, cfg: DataConfig, path: str | Path = "") -> None:
    if mask.size and 0 <= mask.min() and mask.max() < cfg.num_classes:
        return
    values = np.unique(mask)
    bad = values[(values < 0) | (values >= cfg.num_classes)]
    if cfg.ignore_index is not None:
        bad = bad[bad != cfg.ignore_index]
    if bad.size:
        ignore = f", ignore_index={cfg.ignore_index}" if cfg.ignore_index is not None else ""
        raise MaskValuesError(f"{path}: mask values {_value_list(bad)} outside the classes 0..{cfg.num_classes - 1}"
                              f"{ignore} (num_classes={cfg.num_classes})")


def _value_list(values: np.ndarray, limit: int = 8) -> str:
    shown = ", ".join(str(int(v)) for v in values[:limit])
    return f"[{shown}{', ...' if len(values) > limit else ''}]"
