"""The named augmentation presets of `data.augment` (none, light, default, strong), written as the explicit list form a
user can write in YAML, so a preset is documented, built and validated exactly like a user's list.

Each preset is a function of the two things that decide what is safe: whether the training output is square (a
90-degree turn of a non-square crop would break batching) and whether the image has 3 channels (hue and saturation
exist only for colour). `describe_presets()` writes the table in docs/augmentation.md, and a test checks the two agree.

Why these four: `light` is flips and right-angle turns only, which change no pixel statistics and cost nothing, and is
what small datasets (tens of images) train best with (issue 16: flips-only beat the default pipeline by 0.03-0.07 IoU
on a 28-tile nuclei set); `default` adds mild affine, photometric and noise/blur changes for medium sets; `strong` is
for larger or varied sets where the model can afford harder examples.
"""

from __future__ import annotations

from typing import Any

import cv2

PRESET_NAMES = ("none", "light", "default", "strong")
# `data.augment: auto` (the default): `light` for a train split of fewer than this many images, `default` from it on.
# Issue 16's measurements: flips-only beat `default` on a 28-tile nuclei set (and tied with it on stardist's nuclei
# image cut in 28 tiles, docs/benchmarks.md 2026-12-04), while `default` did better on a 104-tile aerial set.
AUTO_LIGHT_BELOW = 64
REFLECT = int(cv2.BORDER_REFLECT_101)  # rotations and shifts reflect the border: no unlabeled pixels invented


def _flips(square: bool) -> list[dict[str, Any]]:
    steps: list[dict[str, Any]] = [{"name": "HorizontalFlip", "p": 0.5}, {"name": "VerticalFlip", "p": 0.5}]
    if square:
        steps.append({"name": "RandomRotate90", "p": 0.5})
    return steps


def _photometric(brightness: float, contrast: float, hue: int, sat: int, val: int, in_channels: int,
                 p: float) -> dict[str, Any]:
    options: list[dict[str, Any]] = [{"name": "RandomBrightnessContrast", "brightness_limit": brightness,
                                      "contrast_limit": contrast, "p": 1.0}]
    if in_channels == 3:
        options.append({"name": "HueSaturationValue", "hue_shift_limit": hue, "sat_shift_limit": sat,
                        "val_shift_limit": val, "p": 1.0})
    return {"name": "OneOf", "transforms": options, "p": p}


def _noise_or_blur(noise: list[float], sigma: list[float], p: float) -> dict[str, Any]:
    return {"name": "OneOf", "p": p, "transforms": [
        {"name": "GaussNoise", "std_range": noise, "p": 1.0},
        {"name": "GaussianBlur", "blur_limit": 0, "sigma_limit": sigma, "p": 1.0}]}


def preset_spec(name: str, in_channels: int = 3, square: bool = True) -> list[dict[str, Any]]:
    """The transforms of preset NAME as the `data.augment` list form ([] for none)."""
    if name == "none":
        return []
    if name == "light":
        return _flips(square)
    if name == "default":
        return [*_flips(square),
                {"name": "Affine", "scale": [0.85, 1.15], "translate_percent": [-0.06, 0.06], "rotate": [-20, 20],
                 "border_mode": REFLECT, "p": 0.5},
                _photometric(0.2, 0.2, 8, 15, 10, in_channels, p=0.6),
                _noise_or_blur([0.01, 0.05], [0.3, 1.2], p=0.3)]
    if name == "strong":
        return [*_flips(square),
                {"name": "Affine", "scale": [0.75, 1.3], "translate_percent": [-0.1, 0.1], "rotate": [-45, 45],
                 "shear": [-8, 8], "border_mode": REFLECT, "p": 0.7},
                {"name": "OneOf", "p": 0.3, "transforms": [
                    {"name": "ElasticTransform", "alpha": 30, "sigma": 6, "border_mode": REFLECT, "p": 1.0},
                    {"name": "GridDistortion", "distort_limit": 0.2, "border_mode": REFLECT, "p": 1.0}]},
                _photometric(0.3, 0.3, 12, 25, 15, in_channels, p=0.8),
                {"name": "RandomGamma", "gamma_limit": [80, 120], "p": 0.3},
                _noise_or_blur([0.02, 0.08], [0.3, 1.8], p=0.4)]
    raise ValueError(f"unknown augmentation preset {name!r}; choose one of {PRESET_NAMES}")


def auto_preset(num_train: int) -> str:
    """The preset `data.augment: auto` means for a train split of NUM_TRAIN images."""
    return "light" if num_train < AUTO_LIGHT_BELOW else "default"


def auto_reason(num_train: int) -> str:
    """Why auto_preset(NUM_TRAIN) chose what it chose, in a few words for the user."""
    side = "fewer than" if num_train < AUTO_LIGHT_BELOW else "at least"
    return f"{num_train} training image{'' if num_train == 1 else 's'}, {side} {AUTO_LIGHT_BELOW}"


def describe(spec: list[dict[str, Any]], indent: str = "") -> list[str]:
    """One markdown bullet per transform: its name, probability and arguments; compositions nest their children."""
    lines = []
    for item in spec:
        args = {k: v for k, v in item.items() if k not in ("name", "p", "transforms")}
        if args.get("border_mode") == REFLECT:
            args["border_mode"] = "reflect"
        shown = ", ".join(f"{k}={v}" for k, v in args.items())
        lines.append(f"{indent}- `{item['name']}` p={item.get('p', 1.0)}" + (f": {shown}" if shown else ""))
        if "transforms" in item:
            lines.extend(describe(item["transforms"], indent + "  "))
    return lines


def describe_presets() -> str:
    """The presets for 3-channel square training images, as markdown (docs/augmentation.md holds this text)."""
    out = []
    for name in PRESET_NAMES:
        out.append(f"#### `{name}`")
        out.extend(describe(preset_spec(name)) or ["- no augmentation"])
        out.append("")
    return "\n".join(out).rstrip() + "\n"
