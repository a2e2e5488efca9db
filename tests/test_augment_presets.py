"""`data.augment` presets: each builds exactly the transforms docs/augmentation.md lists, adapts to the output shape
and channels, is a choice a search space can sample, and runs on real samples."""

from __future__ import annotations

import re
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import pytest

from raysegtrain import config
from raysegtrain.config import DataConfig
from raysegtrain.data.augment_presets import PRESET_NAMES, auto_preset, auto_reason, describe_presets
from raysegtrain.data.transforms import build_augment, build_train_transform
from raysegtrain.errors import ConfigError
from raysegtrain.search_space import load_space, space_from_dict

DOC = Path(__file__).resolve().parents[1] / "docs" / "augmentation.md"
SPACES = Path(__file__).resolve().parents[1] / "search_spaces"


def _flat_names(transforms) -> list[str]:
    out = []
    for t in transforms:
        out.append(type(t).__name__)
        if isinstance(t, A.BaseCompose):
            out.extend(_flat_names(t.transforms))
    return out


def _documented() -> dict[str, list[str]]:
    """{preset: transform names in order} as docs/augmentation.md lists them."""
    text = DOC.read_text()
    sections = re.split(r"^#### `(\w+)`$", text, flags=re.M)[1:]
    return {name: re.findall(r"^\s*- `(\w+)`", body, flags=re.M) for name, body in zip(sections[::2], sections[1::2])}


def test_the_doc_is_the_generated_description():
    assert describe_presets() in DOC.read_text()


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_each_preset_builds_the_documented_transforms(name):
    built = build_augment(DataConfig(root=".", augment=name, image_size=64))
    names = _flat_names(built.transforms) if built is not None else []
    assert names == _documented()[name]
    assert (built is None) == (name == "none")


def test_presets_grow_in_strength_and_light_is_flips_only():
    docs = _documented()
    assert set(docs["light"]) == {"HorizontalFlip", "VerticalFlip", "RandomRotate90"}
    assert set(docs["light"]) < set(docs["default"]) < set(docs["strong"])


def test_presets_adapt_to_non_square_output_and_gray_images():
    wide = _flat_names(build_augment(DataConfig(root=".", augment="strong", image_size=[64, 96])).transforms)
    assert "RandomRotate90" not in wide and "HorizontalFlip" in wide
    gray = _flat_names(build_augment(DataConfig(root=".", augment="default", in_channels=1, image_size=64)).transforms)
    assert "HueSaturationValue" not in gray and "RandomBrightnessContrast" in gray


@pytest.mark.parametrize("name", ["light", "strong"])
@pytest.mark.parametrize("channels", [1, 3])
def test_presets_run_on_uint8_and_float_samples_and_keep_mask_values(name, channels):
    cfg = DataConfig(root=".", augment=name, augment_p=1.0, image_size=64, in_channels=channels, num_classes=3)
    transform = build_train_transform(cfg)
    rng = np.random.default_rng(0)
    mask = rng.integers(0, 3, (80, 80)).astype(np.uint8)
    for image in ((rng.random((80, 80, channels)) * 255).astype(np.uint8), rng.random((80, 80, channels), np.float32)):
        for seed in range(5):
            transform.set_random_seed(seed)
            out = transform(image=image, mask=mask)
            assert tuple(out["image"].shape) == (channels, 64, 64)
            assert set(np.unique(out["mask"].numpy()).tolist()) <= {0, 1, 2}


def test_unknown_preset_is_a_config_error_naming_the_choices():
    with pytest.raises(ConfigError, match="data.augment.*'auto'.*'light'"):
        config.load(None, ["data.augment=medium"])


def test_a_space_can_search_the_preset_and_the_shipped_spaces_do():
    space = space_from_dict({"space": {"data.augment": {"choice": list(PRESET_NAMES)}}})
    seen = {cfg.data.augment for _, cfg in space.example_configs()}
    assert seen == set(PRESET_NAMES)
    for path in ("smoke.yaml", "combined.yaml", "lr_schedules.yaml"):
        values = {cfg.data.augment for _, cfg in load_space(SPACES / path).example_configs()}
        assert len(values) >= 2 and values <= set(PRESET_NAMES), (path, values)


# ------------------------------------------------------------------------------------------------ data.augment: auto
def test_auto_is_the_default_and_means_light_below_64_training_images():
    assert DataConfig().augment == "auto" and config.load(None, []).data.augment == "auto"
    assert [auto_preset(n) for n in (1, 28, 63)] == ["light"] * 3
    assert [auto_preset(n) for n in (64, 104, 160, 10_000)] == ["default"] * 4
    assert auto_reason(28) == "28 training images, fewer than 64" and auto_reason(64).endswith("at least 64")


def test_fit_resolves_auto_from_the_train_split_and_writes_the_preset_into_the_run(tiny_cfg, tmp_path):
    from raysegtrain import train
    from raysegtrain.preflight import augment_note

    def prepared(name: str, *overrides: str):
        cfg = tiny_cfg(f"run.storage_path={tmp_path}", f"run.name={name}", "tracking.enabled=false", *overrides)
        return train.prepare(cfg, None, None, False, None, None, custom_data=False)

    small, folder, _, _ = prepared("small")  # the tiny synthetic set: 12 training images
    assert small.data.augment == "light" and small.flat()["data.augment"] == "light"  # what MLflow's params get
    assert folder.read_config().data.augment == "light"  # what a resume trains
    assert augment_note(small) == "data.augment=auto: light (12 training images, fewer than 64)"
    large, _, _, _ = prepared("large", "data.synthetic.num_train=64", "data.synthetic.size=32", "data.image_size=32")
    assert large.data.augment == "default"
    assert augment_note(large) == "data.augment=auto: default (64 training images, at least 64)"
    chosen, _, _, _ = prepared("chosen", "data.augment=strong")
    assert chosen.data.augment == "strong"


def test_a_folder_set_counts_its_train_split_and_datasets_resolve_auto_themselves(tmp_path):
    """fit resolves auto before training; a study's trials (and any other caller) get the same rule when their
    training set is built."""
    from raysegtrain.data.dataset import build_dataset
    from raysegtrain.preflight import augment_note, resolve_augment

    rng = np.random.default_rng(0)
    for split, n in (("train", 5), ("val", 2)):
        (tmp_path / "images" / split).mkdir(parents=True)
        (tmp_path / "masks" / split).mkdir(parents=True)
        for i in range(n):
            cv2.imwrite(str(tmp_path / "images" / split / f"{i}.png"), rng.integers(0, 256, (32, 32, 3), np.uint8))
            cv2.imwrite(str(tmp_path / "masks" / split / f"{i}.png"), (rng.random((32, 32)) < 0.3).astype(np.uint8))
    cfg = config.load(None, [f"data.root={tmp_path}", "data.image_size=32"])
    resolved = resolve_augment(cfg)
    assert resolved.data.augment == "light" and augment_note(resolved).endswith("(5 training images, fewer than 64)")
    assert resolve_augment(resolved) is resolved
    for split in ("train", "val"):  # the val split augments nothing, but a train transform built on it counts train
        names = _flat_names(build_dataset(cfg.data, split, train=True).transform.transforms)
        assert "HorizontalFlip" in names and "Affine" not in names, names
    names = _flat_names(build_dataset(cfg.data.model_copy(update={"augment": "default"}), "train", True).transform
                        .transforms)
    assert "Affine" in names
    with pytest.raises(ValueError, match="auto is resolved"):
        build_augment(cfg.data)
