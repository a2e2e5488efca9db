"""Albumentations pipelines: size policy, augmentation, conversion to tensors. Normalisation is not here.

Images enter as io.read_pixels gives them: HxWxC uint8 for 8-bit files, float32 in 0..1 for other depths, and every
transform keeps that type (Albumentations 2 takes limits such as GaussNoise's std_range or brightness on the 0..1
scale for both, so one pipeline means the same on either). The pipeline ends with ToTensorV2: a CxHxW tensor of
the same type, which the engine normalises on the device (statistics.Normalizer) after copying a quarter of the
bytes float32 would take. Masks enter as integer class ids (uint8 when the class set fits, else int32) and are always
resampled with nearest neighbour: every pipeline is a Compose with mask_interpolation=INTER_NEAREST, which overrides
whatever a user-listed transform asks for.

Padding (resize_policy pad / pad_crop) fills the image with 0 and the mask with `ignore_index` when one is set, so
padded pixels count in neither loss nor metrics; without ignore_index they are background (0), which is what a
black border is, at the price of a few easy background pixels in the metrics. Affine rotations and shifts reflect
the border (image and mask alike), so they never invent unlabeled pixels.
"""

from __future__ import annotations

import difflib
from typing import Any

import albumentations as A
import cv2
import numpy as np
from albumentations.pytorch import ToTensorV2
from pydantic import ValidationError

from ..config import DataConfig
from ..errors import ConfigError, one_line
from .augment_presets import PRESET_NAMES, preset_spec

SIZE_DIVISOR = 32  # smp encoders downsample 5 times


# ------------------------------------------------------------------------------------------------------ pipelines
def build_train_transform(cfg: DataConfig) -> A.Compose:
    """Size policy, then augmentation; image out as a CxHxW tensor of the input's type (not normalised)."""
    augment = build_augment(cfg)
    steps = [*_train_size_steps(cfg), *([augment] if augment else []), ToTensorV2()]
    return A.Compose(steps, mask_interpolation=cv2.INTER_NEAREST)


def build_eval_transform(cfg: DataConfig) -> A.Compose:
    """Size policy only; image out as a CxHxW tensor of the input's type (not normalised)."""
    return A.Compose([*_eval_size_steps(cfg), ToTensorV2()], mask_interpolation=cv2.INTER_NEAREST)


def _mask_fill(cfg: DataConfig) -> int:
    return cfg.ignore_index if cfg.ignore_index is not None else 0


def _pad_to_divisor(cfg: DataConfig) -> A.PadIfNeeded:
    return A.PadIfNeeded(min_height=None, min_width=None, pad_height_divisor=SIZE_DIVISOR,
                         pad_width_divisor=SIZE_DIVISOR, border_mode=cv2.BORDER_CONSTANT, fill=0,
                         fill_mask=_mask_fill(cfg))


def _pad_to_size(cfg: DataConfig) -> A.PadIfNeeded:
    h, w = cfg.size_hw
    return A.PadIfNeeded(min_height=h, min_width=w, border_mode=cv2.BORDER_CONSTANT, fill=0,
                         fill_mask=_mask_fill(cfg))


def _resize(cfg: DataConfig) -> A.Resize:
    h, w = cfg.size_hw
    return A.Resize(h, w, interpolation=cv2.INTER_LINEAR, mask_interpolation=cv2.INTER_NEAREST,
                    area_for_downscale="image")


def _train_size_steps(cfg: DataConfig) -> list:
    if cfg.resize_policy == "resize":
        return [_resize(cfg)]
    if cfg.resize_policy == "pad_crop":
        return [_pad_to_size(cfg), A.RandomCrop(*cfg.size_hw)]
    return [_pad_to_divisor(cfg)]


def _eval_size_steps(cfg: DataConfig) -> list:
    if cfg.resize_policy == "resize":
        return [_resize(cfg)]
    if cfg.resize_policy == "pad_crop":
        # no crop at evaluation: every pixel is scored; same-size images still batch together
        return [_pad_to_size(cfg), _pad_to_divisor(cfg)]
    return [_pad_to_divisor(cfg)]


# --------------------------------------------------------------------------------------------------- augmentation
def build_augment(cfg: DataConfig) -> A.Compose | None:
    """The augmentation block (applied with probability augment_p), or None for augment: none. A preset name
    (augment_presets.PRESET_NAMES) is its list form built like a user's list; `auto` must have been resolved to one
    (build_dataset does, from the train split's size)."""
    if cfg.augment_p == 0:
        return None
    if cfg.augment == "auto":
        raise ValueError("data.augment=auto is resolved from the train split's size before the transforms are built "
                         "(augment_presets.auto_preset)")
    steps = preset_augment(cfg, cfg.augment) if isinstance(cfg.augment, str) else build_augment_list(
        cfg.augment, cfg.in_channels)
    return A.Compose(steps, p=cfg.augment_p) if steps else None


def preset_augment(cfg: DataConfig, name: str) -> list:
    """The transforms of preset NAME (augment_presets.py) for CFG's channels and output shape."""
    return build_augment_list(preset_spec(name, cfg.in_channels, _output_is_square(cfg)), cfg.in_channels,
                              where=f"data.augment={name}")


def _output_is_square(cfg: DataConfig) -> bool:
    h, w = cfg.size_hw
    return cfg.resize_policy != "pad" and h == w


def validate_augment(spec: Any, in_channels: int = 3, size_hw: tuple[int, int] = (256, 256)) -> None:
    """Raise ConfigError (naming list index and transform) unless `data.augment` builds, and each listed transform
    runs once on a random image of in_channels x size_hw (pass cfg.in_channels and cfg.size_hw)."""
    if isinstance(spec, str) and (spec in PRESET_NAMES or spec == "auto"):
        return
    if not isinstance(spec, list):
        raise ConfigError(f"data.augment must be one of auto, {', '.join(PRESET_NAMES)} or a list of transforms "
                          f"(got {spec!r})")
    build_augment_list(spec, in_channels, dry_run_hw=tuple(size_hw))


def build_augment_list(spec: list, in_channels: int = 3, dry_run_hw: tuple[int, int] | None = None,
                       where: str = "data.augment") -> list:
    """[{name: HorizontalFlip, p: 0.5}, ...] -> transforms. Compositions (OneOf, SomeOf, Sequential, Compose)
    take their children under `transforms:`. With dry_run_hw, each is also run once on a sample of that size."""
    return [_build_one(item, in_channels, dry_run_hw, f"{where}[{i}]") for i, item in enumerate(spec)]


def _build_one(item: Any, in_channels: int, dry_run_hw, where: str):
    if not isinstance(item, dict) or not isinstance(item.get("name"), str):
        raise ConfigError(f"{where}: each entry needs a transform name, like {{name: HorizontalFlip, p: 0.5}} "
                          f"(got {item!r})")
    name, args = item["name"], {k: v for k, v in item.items() if k != "name"}
    cls = _transform_class(name, where)
    label = f"{where} ({name})"
    if issubclass(cls, A.BaseCompose):
        children = args.pop("transforms", None)
        if not isinstance(children, list) or not children:
            raise ConfigError(f"{label}: needs a non-empty list under 'transforms'")
        args["transforms"] = build_augment_list(children, in_channels, dry_run_hw, f"{where}.transforms")
        transform = _construct(cls, args, label, strict=False)
    else:
        transform = _construct(cls, args, label, strict=True)
    if dry_run_hw:
        _try_on_sample(cls, args, label, in_channels, dry_run_hw)
    return transform


def _transform_class(name: str, where: str) -> type:
    cls = getattr(A, name, None)
    if isinstance(cls, type) and issubclass(cls, (A.BasicTransform, A.BaseCompose)):
        return cls
    choices = [n for n in dir(A) if isinstance(getattr(A, n), type)
               and issubclass(getattr(A, n), (A.BasicTransform, A.BaseCompose))]
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
    if not close:
        lowered = {c.lower(): c for c in choices}
        close = [lowered[name.lower()]] if name.lower() in lowered else []
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ConfigError(f"{where}: unknown Albumentations transform {name!r}{hint}")


def _construct(cls: type, args: dict, label: str, strict: bool):
    try:
        try:
            return cls(**args, strict=True) if strict else cls(**args)
        except TypeError as e:  # a transform without Albumentations' `strict` (e.g. RandomRotate90): build it plain
            if not strict or "'strict'" not in str(e):
                raise
            return cls(**args)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{label}: {_one_line(e)}") from None


def _one_line(e: Exception) -> str:
    cause = e.__cause__ if isinstance(e.__cause__, ValidationError) else e
    if isinstance(cause, ValidationError):
        err = cause.errors()[0]
        loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith(("tuple[", "list[", "function")))
        msg = err["msg"].removeprefix("Value error, ")
        return f"{loc}: {msg}" if loc else msg
    return one_line(e, with_type=False)


def _try_on_sample(cls: type, args: dict, label: str, in_channels: int, size_hw: tuple[int, int]) -> None:
    """Run the transform once (forced on) on a random image and mask, to catch errors that only show then: on
    uint8 (8-bit files) and on float32 0..1 (16-bit files), the two kinds of image the pipeline sees."""
    rng = np.random.default_rng(0)
    unit = rng.random((*size_hw, in_channels), dtype=np.float32)
    mask = rng.integers(0, 2, size_hw).astype(np.uint8)
    for kind, image in (("uint8", (unit * 255).astype(np.uint8)), ("float", unit)):
        try:
            forced = cls(**{**args, "p": 1.0})
            A.Compose([forced], mask_interpolation=cv2.INTER_NEAREST)(image=image, mask=mask)
        except Exception as e:  # any failure here is the user's transform failing on data like theirs
            raise ConfigError(f"{label}: fails on a {in_channels}-channel {kind} image: {_one_line(e)}") from None
