"""The data pipeline: reading, layouts, the synthetic set, transforms, normalisation, class weights."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from raysegtrain.config import DataConfig, SyntheticConfig
from raysegtrain.data import synthetic
from raysegtrain.data.dataset import SegmentationDataset, build_dataset
from raysegtrain.data.io import read_image, read_mask, read_pixels
from raysegtrain.data.splits import has_split, list_split, resolve_root
from raysegtrain.data.statistics import (IMAGENET_MEAN, IMAGENET_STD, Normalizer, class_weights, mean_std,
                                         weights_from_counts)
from raysegtrain.data.transforms import build_eval_transform, build_train_transform, preset_augment, validate_augment
from raysegtrain.errors import ConfigError, DataError

TINY = SyntheticConfig(size=32, num_train=4, num_val=2, num_test=1, seed=3)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RAYSEGTRAIN_CACHE", str(tmp_path / "cache"))


def write_rgb(path: Path, rgb: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    return path


def write_gray(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), array)
    return path


def make_split_files_set(root: Path, splits: dict[str, list[str]], hw=(16, 16)) -> Path:
    rng = np.random.default_rng(0)
    for split, stems in splits.items():
        (root / "splits").mkdir(parents=True, exist_ok=True)
        (root / "splits" / f"{split}.txt").write_text("".join(f"{s}\n" for s in stems))
        for stem in stems:
            write_rgb(root / "images" / f"{stem}.png", rng.integers(0, 256, (*hw, 3), dtype=np.uint8))
            write_gray(root / "masks" / f"{stem}.png", (rng.random(hw) < 0.3).astype(np.uint8))
    return root


# ------------------------------------------------------------------------------------------------------- masks
def test_binary_masks_zero_one_and_zero_255(tmp_path):
    cfg = DataConfig(root=tmp_path)
    pattern = np.array([[0, 1], [1, 0]], np.uint8)
    for fmt in ("auto", "binary"):
        c = cfg.model_copy(update={"mask_format": fmt})
        assert read_mask(write_gray(tmp_path / "a.png", pattern), c).tolist() == pattern.tolist()
        assert read_mask(write_gray(tmp_path / "b.png", pattern * 255), c).tolist() == pattern.tolist()
    assert read_mask(tmp_path / "a.png", cfg).dtype == np.int64


def test_binary_mask_keeps_ignore_index(tmp_path):
    cfg = DataConfig(root=tmp_path, ignore_index=255)
    mask = read_mask(write_gray(tmp_path / "m.png", np.array([[0, 1, 255]], np.uint8)), cfg)
    assert mask.tolist() == [[0, 1, 255]]


def test_binary_mask_with_other_values_is_an_error(tmp_path):
    path = write_gray(tmp_path / "m.png", np.array([[0, 7]], np.uint8))
    with pytest.raises(DataError, match="m.png"):
        read_mask(path, DataConfig(root=tmp_path, mask_format="binary"))


def test_index_mask(tmp_path):
    labels = np.array([[0, 1, 2, 3]], np.uint8)
    for fmt in ("auto", "index"):
        cfg = DataConfig(root=tmp_path, num_classes=4, mask_format=fmt)
        assert read_mask(write_gray(tmp_path / "m.png", labels), cfg).tolist() == [[0, 1, 2, 3]]


def test_index_mask_out_of_range_is_an_error(tmp_path):
    path = write_gray(tmp_path / "m.png", np.array([[0, 5]], np.uint8))
    with pytest.raises(DataError, match=r"m\.png.*\[5\]"):
        read_mask(path, DataConfig(root=tmp_path, num_classes=4))


def test_palette_png_gives_indices(tmp_path):
    labels = np.array([[0, 1], [2, 255]], np.uint8)
    image = Image.fromarray(labels, mode="P")
    image.putpalette([0, 0, 0, 200, 0, 0, 0, 200, 0] + [255, 255, 255] * 253)
    image.save(tmp_path / "m.png")
    for fmt in ("auto", "palette"):
        cfg = DataConfig(root=tmp_path, num_classes=3, ignore_index=255, mask_format=fmt)
        assert read_mask(tmp_path / "m.png", cfg).tolist() == [[0, 1], [2, 255]]


def test_rgb_mask_through_palette(tmp_path):
    palette = [(0, 0, 0), (255, 0, 0), (0, 0, 255)]
    rgb = np.array([[palette[0], palette[1]], [palette[2], palette[1]]], np.uint8)
    path = write_rgb(tmp_path / "m.png", rgb)
    cfg = DataConfig(root=tmp_path, num_classes=3, palette=palette)
    assert read_mask(path, cfg).tolist() == [[0, 1], [2, 1]]
    write_rgb(tmp_path / "bad.png", np.array([[[0, 0, 0], [9, 9, 9]]], np.uint8))
    with pytest.raises(DataError, match=r"bad\.png.*\(9, 9, 9\)"):
        read_mask(tmp_path / "bad.png", cfg)
    with pytest.raises(DataError, match="palette"):  # a colour mask without a palette
        read_mask(path, DataConfig(root=tmp_path, num_classes=3))


def test_gray_mask_stored_as_rgb(tmp_path):
    path = write_rgb(tmp_path / "m.png", np.stack([np.array([[0, 255]], np.uint8)] * 3, axis=2))
    assert read_mask(path, DataConfig(root=tmp_path)).tolist() == [[0, 1]]


def test_tiff_mask(tmp_path):
    tifffile.imwrite(tmp_path / "m.tif", np.array([[0, 2], [1, 0]], np.uint16))
    assert read_mask(tmp_path / "m.tif", DataConfig(root=tmp_path, num_classes=3)).tolist() == [[0, 2], [1, 0]]


# ------------------------------------------------------------------------------------------------------ images
def test_rgb_order_and_scaling(tmp_path):
    red = np.zeros((4, 5, 3), np.uint8)
    red[..., 0] = 255
    image = read_image(write_rgb(tmp_path / "r.png", red), 3)
    assert image.shape == (4, 5, 3) and image.dtype == np.float32
    assert image[..., 0].min() == 1.0 and image[..., 1:].max() == 0.0


def test_read_pixels_keeps_8_bit_images_uint8(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (4, 5, 3), dtype=np.uint8)
    path = write_rgb(tmp_path / "c.png", rgb)
    pixels = read_pixels(path, 3)
    assert pixels.dtype == np.uint8 and np.array_equal(pixels, rgb)  # RGB order, values as stored
    assert np.array_equal(pixels.astype(np.float32) / np.float32(255), read_image(path, 3))
    gray = write_gray(tmp_path / "g.png", rgb[..., 0])
    assert read_pixels(gray, 1).dtype == np.uint8 and read_pixels(gray, 1).shape == (4, 5, 1)
    assert np.array_equal(read_pixels(gray, 3), np.repeat(rgb[..., :1], 3, axis=2))
    to_gray = read_pixels(path, 1)  # RGB file, 1-channel model: gray in 8 bits, within half a level of float
    assert to_gray.dtype == np.uint8 and np.abs(to_gray / 255 - read_image(path, 1)).max() <= 0.5 / 255 + 1e-6
    jpeg = tmp_path / "j.jpg"
    assert cv2.imwrite(str(jpeg), rgb) and read_pixels(jpeg, 3).dtype == np.uint8


def test_read_pixels_gives_other_depths_as_float_0_to_1(tmp_path):
    sixteen = write_gray(tmp_path / "g16.png", np.full((6, 7), 65535 // 5, np.uint16))
    assert read_pixels(sixteen, 3).dtype == np.float32
    assert np.array_equal(read_pixels(sixteen, 3), read_image(sixteen, 3))
    tifffile.imwrite(tmp_path / "f.tif", np.full((5, 4, 3), 0.25, np.float32), photometric="rgb")
    assert read_pixels(tmp_path / "f.tif", 3).dtype == np.float32 and np.allclose(read_pixels(tmp_path / "f.tif", 3),
                                                                                  0.25)
    tifffile.imwrite(tmp_path / "a.tif", np.full((5, 4, 3), 51, np.uint8), photometric="rgb")
    assert read_pixels(tmp_path / "a.tif", 3).dtype == np.uint8


def test_16bit_gray_image_to_rgb_and_gray(tmp_path):
    gray = np.full((6, 7), 65535 // 5, np.uint16)
    path = write_gray(tmp_path / "g.png", gray)
    rgb = read_image(path, 3)
    assert rgb.shape == (6, 7, 3) and np.allclose(rgb, 0.2, atol=1e-4)
    assert read_image(path, 1).shape == (6, 7, 1)


def test_rgb_to_gray(tmp_path):
    path = write_rgb(tmp_path / "c.png", np.full((3, 3, 3), 128, np.uint8))
    gray = read_image(path, 1)
    assert gray.shape == (3, 3, 1) and np.allclose(gray, 128 / 255, atol=1e-2)


def test_tiff_images_8_and_16_bit(tmp_path):
    tifffile.imwrite(tmp_path / "a.tif", np.full((5, 4, 3), 51, np.uint8), photometric="rgb")
    tifffile.imwrite(tmp_path / "b.tiff", np.full((5, 4), 65535, np.uint16))
    assert np.allclose(read_image(tmp_path / "a.tif", 3), 0.2)
    assert np.allclose(read_image(tmp_path / "b.tiff", 3), 1.0)


def test_jpeg_image(tmp_path):
    path = tmp_path / "j.jpg"
    assert cv2.imwrite(str(path), np.full((8, 8, 3), 100, np.uint8))
    assert read_image(path, 3).shape == (8, 8, 3)


def test_corrupt_and_missing_files_name_the_file(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(DataError, match="broken.png"):
        read_image(tmp_path / "broken.png", 3)
    with pytest.raises(DataError, match="nothere.png"):
        read_mask(tmp_path / "nothere.png", DataConfig(root=tmp_path))


def test_rgba_is_a_channel_error(tmp_path):
    path = tmp_path / "rgba.png"
    assert cv2.imwrite(str(path), np.zeros((4, 4, 4), np.uint8))
    with pytest.raises(DataError, match="4 channels"):
        read_image(path, 3)


# ----------------------------------------------------------------------------------------------------- layouts
def test_split_files_layout(tmp_path):
    make_split_files_set(tmp_path, {"train": ["a", "b"], "val": ["c"]})
    cfg = DataConfig(root=tmp_path)
    pairs = list_split(cfg, "train")
    assert [(i.name, m.name) for i, m in pairs] == [("a.png", "a.png"), ("b.png", "b.png")]
    assert pairs[0][0].parent.name == "images" and pairs[0][1].parent.name == "masks"
    assert has_split(cfg, "val") and not has_split(cfg, "test")


def test_split_files_find_any_image_extension(tmp_path):
    make_split_files_set(tmp_path, {"train": ["a"], "val": ["b"]})
    (tmp_path / "images" / "a.png").unlink()
    tifffile.imwrite(tmp_path / "images" / "a.tif", np.zeros((16, 16, 3), np.uint8), photometric="rgb")
    assert list_split(DataConfig(root=tmp_path), "train")[0][0].name == "a.tif"


def test_split_files_missing_pieces(tmp_path):
    make_split_files_set(tmp_path, {"train": ["a"], "val": ["b"]})
    cfg = DataConfig(root=tmp_path)
    with pytest.raises(DataError, match="test.txt"):
        list_split(cfg, "test")
    (tmp_path / "masks" / "a.png").unlink()
    with pytest.raises(DataError, match="no mask for 'a'"):
        list_split(cfg, "train")


def test_folders_layout(tmp_path):
    rng = np.random.default_rng(1)
    for split, names in {"train": ["x", "y"], "val": ["z"]}.items():
        for n in names:
            write_rgb(tmp_path / "images" / split / f"{n}.jpg", rng.integers(0, 255, (8, 8, 3), dtype=np.uint8))
            write_gray(tmp_path / "masks" / split / f"{n}.png", np.zeros((8, 8), np.uint8))
    cfg = DataConfig(root=tmp_path)
    assert [i.name for i, _ in list_split(cfg, "train")] == ["x.jpg", "y.jpg"]
    assert list_split(cfg.model_copy(update={"layout": "folders"}), "val")[0][1] == tmp_path / "masks/val/z.png"
    (tmp_path / "masks" / "train" / "y.png").unlink()
    with pytest.raises(DataError, match="y.jpg"):
        list_split(cfg, "train")


def test_unknown_layout_and_missing_root(tmp_path):
    with pytest.raises(DataError, match="no dataset layout"):
        list_split(DataConfig(root=tmp_path), "train")
    with pytest.raises(DataError, match="not a folder"):
        resolve_root(DataConfig(root=tmp_path / "nope"))


# --------------------------------------------------------------------------------------------------- synthetic
def folder_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_synthetic_is_deterministic_and_seed_dependent(tmp_path):
    a = folder_bytes(synthetic.generate(tmp_path / "a", TINY))
    b = folder_bytes(synthetic.generate(tmp_path / "b", TINY))
    c = folder_bytes(synthetic.generate(tmp_path / "c", TINY.model_copy(update={"seed": 4})))
    assert a == b
    images = [k for k in a if k.startswith("images/")]
    assert len(images) == 7 and all(a[k] != c[k] for k in images)
    assert (tmp_path / "a" / "splits" / "train.txt").read_text().split() == [f"train_{j:04d}" for j in range(4)]


def test_synthetic_image_does_not_depend_on_the_counts():
    small = synthetic.render(5, "val", 2, 48)
    assert all(np.array_equal(x, y) for x, y in zip(small, synthetic.render(5, "val", 2, 48)))
    assert not np.array_equal(small[0], synthetic.render(5, "train", 2, 48)[0])


def test_synthetic_has_defects_of_every_class_and_clean_images():
    labels = [synthetic.render(0, "train", j, 64)[1] for j in range(40)]
    present = set(np.unique(np.stack(labels)).tolist())
    assert present == {0, 1, 2, 3}
    with_defects = sum(bool((lab > 0).any()) for lab in labels)
    assert 25 <= with_defects < 40  # most images, not all
    assert all((lab > 0).mean() < 0.3 for lab in labels)


def test_synthetic_defects_are_not_just_bright_pixels():
    darker = brighter = 0
    for j in range(40):
        image, labels = synthetic.render(1, "train", j, 64)
        gray = image.astype(np.float32).mean(2)
        if (labels > 0).any():
            near = cv2.dilate((labels > 0).astype(np.uint8), np.ones((7, 7), np.uint8)) > 0
            ring = near & (labels == 0)
            inside, outside = gray[labels > 0].mean(), gray[ring].mean()
            darker += inside < outside
            brighter += inside > outside
    assert darker >= 5 and brighter >= 3


def test_synthetic_masks_on_disk(tmp_path):
    for variant, values in (("binary", {0, 255}), ("multiclass", {0, 1, 2, 3})):
        root = synthetic.generate(tmp_path / variant, TINY.model_copy(update={"variant": variant, "num_train": 12}))
        masks = [cv2.imread(str(p), cv2.IMREAD_UNCHANGED) for p in sorted((root / "masks").glob("*.png"))]
        assert all(m.ndim == 2 and m.dtype == np.uint8 for m in masks)
        assert set(np.unique(np.stack(masks)).tolist()) <= values
        image = cv2.imread(str(next((root / "images").glob("*.png"))), cv2.IMREAD_UNCHANGED)
        assert image.shape == (32, 32, 3) and image.dtype == np.uint8


def test_generate_refuses_a_non_empty_folder(tmp_path):
    user = tmp_path / "user"
    user.mkdir()
    (user / "precious.txt").write_text("keep me")
    for overwrite in (False, True):
        with pytest.raises(DataError, match="not empty"):
            synthetic.generate(user, TINY, overwrite=overwrite)
    assert (user / "precious.txt").read_text() == "keep me"
    made = synthetic.generate(tmp_path / "made", TINY)
    with pytest.raises(DataError):
        synthetic.generate(made, TINY)
    synthetic.generate(made, TINY.model_copy(update={"num_train": 2}), overwrite=True)
    assert len(list((made / "images").iterdir())) == 5


def _cached_root_in_child(cache: str, queue) -> None:
    import os

    os.environ["RAYSEGTRAIN_CACHE"] = cache
    queue.put(str(synthetic.cached_root(TINY)))


def test_cached_root_is_generated_once_and_race_safe(tmp_path):
    cache = tmp_path / "race"
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    workers = [ctx.Process(target=_cached_root_in_child, args=(str(cache), queue)) for _ in range(3)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    roots = {queue.get(timeout=5) for _ in workers}
    assert roots == {str(cache / "synthetic" / "binary-32-4-2-1-s3")}
    assert [p.name for p in (cache / "synthetic").iterdir()] == ["binary-32-4-2-1-s3"]  # no temp folder left
    assert len(list((cache / "synthetic" / "binary-32-4-2-1-s3" / "images").iterdir())) == 7


def test_resolve_root_defaults_to_the_synthetic_cache(tmp_path):
    cfg = DataConfig(synthetic=TINY)
    root = resolve_root(cfg)
    assert root == (tmp_path / "cache" / "synthetic" / "binary-32-4-2-1-s3").resolve()
    assert len(list_split(cfg, "train")) == 4 and len(list_split(cfg, "test")) == 1


# -------------------------------------------------------------------------------------------------- transforms
def multiclass_sample(h=48, w=64, dtype=np.float32):
    rng = np.random.default_rng(0)
    image = rng.random((h, w, 3), dtype=np.float32)
    image = (image * 255).astype(np.uint8) if dtype == np.uint8 else image
    mask = np.zeros((h, w), np.int32)
    mask[5:20, 5:30], mask[25:40, 10:20], mask[10:30, 40:60], mask[0:3, :] = 1, 2, 3, 255
    return image, mask


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
@pytest.mark.parametrize("policy", ["resize", "pad_crop", "pad"])
def test_default_augmentation_keeps_mask_values_and_shapes(policy, dtype):
    cfg = DataConfig(root=".", num_classes=4, ignore_index=255, image_size=32, resize_policy=policy, augment="default",
                     augment_p=1.0)
    transform = build_train_transform(cfg)
    image, mask = multiclass_sample(dtype=dtype)
    mask = mask.astype(np.uint8)  # as the dataset sends it: the class set and 255 fit in uint8
    expected = {"resize": (32, 32), "pad_crop": (32, 32), "pad": (64, 64)}[policy]
    torch_dtype = torch.uint8 if dtype == np.uint8 else torch.float32
    seen: set[int] = set()
    for seed in range(30):
        transform.set_random_seed(seed)
        out = transform(image=image, mask=mask)
        assert tuple(out["image"].shape) == (3, *expected) and out["image"].dtype == torch_dtype  # type kept
        assert tuple(out["mask"].shape) == expected and out["mask"].dtype == torch.uint8
        values = set(np.unique(out["mask"].numpy()).tolist())
        assert values <= {0, 1, 2, 3, 255}
        seen |= values
    assert seen == {0, 1, 2, 3, 255}


def test_default_augmentation_means_the_same_on_uint8_and_float():
    """Albumentations takes its limits on the 0..1 scale for both types: with one seed, each default transform's
    uint8 output is its float output rounded to 8 bits (within 1 level: noise and brightness round twice). Chained,
    the roundings add up, and HueSaturationValue (8-bit inside, even for float input) turns a 1-level difference
    into a few levels on some saturated pixels; on average the two stay within a level."""
    import albumentations as A

    cfg = DataConfig(root=".", num_classes=4, ignore_index=255, image_size=32, augment="default", augment_p=1.0)
    image8, mask = multiclass_sample(dtype=np.uint8)
    image, mask = image8.astype(np.float32) / 255, mask.astype(np.uint8)
    singles = [t for step in preset_augment(cfg, "default") for t in (step.transforms if isinstance(step, A.OneOf) else [step])]
    assert {type(t).__name__ for t in singles} >= {"Affine", "RandomBrightnessContrast", "HueSaturationValue",
                                                    "GaussNoise", "GaussianBlur"}
    for t in singles:
        for seed in range(10):
            a = A.Compose([t], seed=seed)(image=image8)["image"]
            b = A.Compose([t], seed=seed)(image=image)["image"]
            assert a.dtype == np.uint8 and b.dtype == np.float32
            assert np.abs(a / np.float32(255) - b).max() <= 1 / 255 + 1e-6, type(t).__name__
    transform = build_train_transform(cfg)
    for seed in range(20):
        transform.set_random_seed(seed)
        a = transform(image=image8, mask=mask)
        transform.set_random_seed(seed)
        b = transform(image=image, mask=mask)
        assert torch.equal(a["mask"], b["mask"])  # the same geometry
        assert float((a["image"].float() / 255 - b["image"]).abs().mean()) < 1 / 255


def test_resize_uses_nearest_for_masks():
    cfg = DataConfig(root=".", num_classes=4, image_size=96, augment="none")
    _, mask = multiclass_sample()
    mask[mask == 255] = 0
    out = build_eval_transform(cfg)(image=np.zeros((48, 64, 3), np.uint8), mask=mask)
    assert set(np.unique(out["mask"].numpy()).tolist()) == {0, 1, 2, 3}
    assert out["image"].dtype == torch.uint8 and int(out["image"].max()) == 0  # not normalised on the CPU
    assert np.allclose(Normalizer((0.5,) * 3, (0.25,) * 3)(out["image"]).numpy(), -2.0)  # (0 - 0.5) / 0.25


def test_padding_fills_the_mask_with_ignore_index_or_background():
    image, mask = np.ones((40, 50, 3), np.float32), np.ones((40, 50), np.int32)
    for ignore, fill in ((255, 255), (None, 0)):
        cfg = DataConfig(root=".", ignore_index=ignore, resize_policy="pad", augment="none")
        out = build_eval_transform(cfg)(image=image, mask=mask)
        m = out["mask"].numpy()
        assert m.shape == (64, 64) and (m == 1).sum() == 40 * 50 and (m == fill).sum() == 64 * 64 - 40 * 50


def test_pad_crop_evaluation_keeps_every_pixel():
    cfg = DataConfig(root=".", image_size=32, resize_policy="pad_crop")
    image, mask = np.ones((40, 70, 3), np.float32), np.ones((40, 70), np.int32)
    out = build_eval_transform(cfg)(image=image, mask=mask)
    assert tuple(out["mask"].shape) == (64, 96) and int(out["mask"].sum()) == 40 * 70


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_gray_default_pipeline(dtype):
    cfg = DataConfig(root=".", in_channels=1, image_size=32, augment="default", augment_p=1.0)
    transform = build_train_transform(cfg)
    image = np.random.default_rng(0).random((40, 40, 1), dtype=np.float32)
    image = (image * 255).astype(np.uint8) if dtype == np.uint8 else image
    for seed in range(10):
        transform.set_random_seed(seed)
        out = transform(image=image, mask=np.zeros((40, 40), np.uint8))
        assert tuple(out["image"].shape) == (1, 32, 32) and out["image"].numpy().dtype == dtype


def test_yaml_augment_list_builds():
    spec = [{"name": "HorizontalFlip", "p": 0.5},
            {"name": "OneOf", "p": 0.5, "transforms": [{"name": "GaussNoise", "std_range": [0.01, 0.03]},
                                                        {"name": "GaussianBlur"}]}]
    validate_augment(spec)
    cfg = DataConfig(root=".", augment=spec, image_size=32)
    image, mask = multiclass_sample()
    out = build_train_transform(cfg)(image=image, mask=mask)
    assert tuple(out["image"].shape) == (3, 32, 32)


@pytest.mark.parametrize("spec, message", [
    ([{"name": "HorizontalFlip"}, {"name": "HorizontalFlp"}], r"data\.augment\[1\].*'HorizontalFlp'.*'HorizontalFlip'"),
    ([{"name": "GaussNoise", "std_range": [2, 1]}], r"data\.augment\[0\] \(GaussNoise\): std_range"),
    ([{"name": "Affine", "rotat": 10}], r"data\.augment\[0\] \(Affine\).*rotat"),
    ([{"p": 0.5}], r"data\.augment\[0\]: each entry needs a transform name"),
    ([{"name": "OneOf", "transforms": [{"name": "Nope"}]}], r"data\.augment\[0\]\.transforms\[0\]"),
    ([{"name": "RandomCrop", "height": 512, "width": 512}], r"data\.augment\[0\] \(RandomCrop\): fails"),
    ("sometimes", r"data\.augment must be"),
])
def test_yaml_augment_list_errors(spec, message):
    with pytest.raises(ConfigError, match=message):
        validate_augment(spec, 3, (64, 64))


# ------------------------------------------------------------------------------------------ mean/std, datasets
def test_mean_std_policies(tmp_path):
    make_split_files_set(tmp_path, {"train": ["a"], "val": ["b"]})
    for stem, value in (("a", 51), ("b", 204)):  # train is all 0.2; val must not count
        write_rgb(tmp_path / "images" / f"{stem}.png", np.full((16, 16, 3), value, np.uint8))
    cfg = DataConfig(root=tmp_path)
    assert mean_std(cfg, tmp_path) == (IMAGENET_MEAN, IMAGENET_STD)
    gray_mean, gray_std = mean_std(cfg.model_copy(update={"in_channels": 1}), tmp_path)
    assert gray_mean == pytest.approx([np.mean(IMAGENET_MEAN)]) and gray_std == pytest.approx([np.mean(IMAGENET_STD)])
    assert mean_std(cfg.model_copy(update={"normalize": "none"}), tmp_path) == ((0.0,) * 3, (1.0,) * 3)
    mean, std = mean_std(cfg.model_copy(update={"normalize": "dataset"}), tmp_path)
    assert mean == pytest.approx([0.2] * 3, abs=1e-6) and std == pytest.approx([1e-3] * 3)  # floored
    explicit = cfg.model_copy(update={"normalize": "dataset", "mean": [0.1, 0.2, 0.3]})
    assert mean_std(explicit, tmp_path)[0] == (0.1, 0.2, 0.3)


def test_dataset_items_and_memory_cache(tmp_path):
    make_split_files_set(tmp_path, {"train": ["a", "b"], "val": ["c"]}, hw=(40, 40))
    cfg = DataConfig(root=tmp_path, image_size=32, cache="memory")
    train = build_dataset(cfg, "train", train=True)
    item = train[1]
    assert item["index"] == 1 and item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.uint8
    assert item["mask"].shape == (32, 32) and item["mask"].dtype == torch.uint8  # .long() on the device
    assert set(item["mask"].unique().tolist()) <= {0, 1}
    assert train.normalizer.mean == IMAGENET_MEAN and train.normalizer.std == IMAGENET_STD
    assert train.raw(1)[0].dtype == np.uint8 and train.raw(1)[1].dtype == np.int64
    (tmp_path / "images" / "b.png").unlink()  # served from the cache now
    assert train[1]["mask"].shape == (32, 32)
    val = build_dataset(cfg.model_copy(update={"cache": "none"}), "val", train=False)
    assert len(val) == 1 and val.stems == ["c"]
    plain = SegmentationDataset(list_split(cfg, "val"), cfg)
    assert plain[0]["image"].shape == (3, 40, 40) and plain[0]["image"].dtype == torch.uint8
    stored = read_pixels(list_split(cfg, "val")[0][0], 3)
    assert torch.equal(plain[0]["image"], torch.from_numpy(stored).permute(2, 0, 1))


def test_mask_dtype_follows_the_class_set(tmp_path):
    from raysegtrain.data.dataset import mask_dtype

    assert mask_dtype(DataConfig(root=".")) == np.uint8
    assert mask_dtype(DataConfig(root=".", num_classes=256, ignore_index=None)) == np.uint8
    assert mask_dtype(DataConfig(root=".", num_classes=4, ignore_index=255)) == np.uint8
    assert mask_dtype(DataConfig(root=".", num_classes=4, ignore_index=256)) == np.int32
    assert mask_dtype(DataConfig(root=".", num_classes=300)) == np.int32
    rng = np.random.default_rng(0)
    (tmp_path / "splits").mkdir()
    (tmp_path / "splits" / "train.txt").write_text("a\n")
    (tmp_path / "splits" / "val.txt").write_text("a\n")
    write_rgb(tmp_path / "images" / "a.png", rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    labels = rng.integers(0, 4, (32, 32)).astype(np.uint16)
    labels[:4] = 65535
    write_gray(tmp_path / "masks" / "a.png", labels)
    cfg = DataConfig(root=tmp_path, num_classes=4, ignore_index=65535, image_size=32, resize_policy="pad",
                     mask_format="index", augment="default", augment_p=1.0)
    assert torch.equal(build_dataset(cfg, "train", train=False)[0]["mask"], torch.from_numpy(labels.astype(np.int32)))
    augmented = build_dataset(cfg, "train", train=True)
    for seed in range(10):
        mask = augmented[(0, seed)]["mask"]
        assert mask.dtype == torch.int32 and set(mask.unique().tolist()) <= {0, 1, 2, 3, 65535}


def test_loader_batches_are_uint8_and_mixed_depths_come_out_normalised(tmp_path):
    make_split_files_set(tmp_path, {"train": ["a", "b", "c", "d"], "val": ["e"]}, hw=(32, 32))
    cfg = DataConfig(root=tmp_path, image_size=32, augment="default", augment_p=1.0)
    dataset = build_dataset(cfg, "train", train=True)
    for workers in (0, 2):
        loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=workers,
                                             multiprocessing_context=multiprocessing.get_context("fork")
                                             if workers else None)
        batches = list(loader)
        assert len(batches) == 2
        for batch in batches:
            assert batch["image"].dtype == torch.uint8 and batch["image"].shape == (2, 3, 32, 32)
            assert batch["mask"].dtype == torch.uint8 and batch["mask"].shape == (2, 32, 32)
    # one 16-bit file among 8-bit ones: that batch is all float, normalised on the CPU as before
    write_gray(tmp_path / "images" / "b.png", np.full((32, 32), 65535 // 5, np.uint16))
    dataset = build_dataset(cfg.model_copy(update={"augment": "none"}), "train", train=True)
    mixed, plain = torch.utils.data.DataLoader(dataset, batch_size=2)
    assert plain["image"].dtype == torch.uint8
    assert mixed["image"].dtype == torch.float32
    expected = Normalizer(IMAGENET_MEAN, IMAGENET_STD)
    torch.testing.assert_close(mixed["image"][0], expected(dataset[0]["image"]), rtol=0, atol=1e-6)
    torch.testing.assert_close(mixed["image"][1], expected(torch.full((3, 32, 32), 0.2)), rtol=0, atol=1e-4)


def test_augmentations_differ_across_loader_workers_and_epochs(tmp_path):
    make_split_files_set(tmp_path, {"train": ["a", "b", "c", "d"], "val": ["e"]}, hw=(32, 32))
    dataset = build_dataset(DataConfig(root=tmp_path, image_size=32, augment="default", augment_p=1.0), "train",
                            train=True)
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=2,
                                         multiprocessing_context=multiprocessing.get_context("fork"))
    first, second = (torch.cat([b["image"] for b in loader]) for _ in range(2))
    assert not torch.equal(first, second)


def test_class_weights_from_a_known_histogram(tmp_path):
    assert weights_from_counts([900, 100]) == pytest.approx([0.5, 1.5])
    assert weights_from_counts([100, 0, 100]) == pytest.approx([1.0, 1.0, 1.0])  # absent class: largest weight
    make_split_files_set(tmp_path, {"train": ["a", "b"], "val": ["c"]})
    mask = np.zeros((16, 16), np.uint8)
    mask.flat[:16] = 1  # 16 fg vs 240 bg per image
    mask.flat[16:32] = 255  # ignored, in neither count
    for stem in ("a", "b"):
        write_gray(tmp_path / "masks" / f"{stem}.png", mask)
    cfg = DataConfig(root=tmp_path, ignore_index=255, class_weights="auto")
    expected = weights_from_counts([2 * 224, 2 * 16])
    assert class_weights(cfg) == pytest.approx(expected)
    assert expected[1] / expected[0] == pytest.approx(np.sqrt(224 / 16))
    assert class_weights(cfg.model_copy(update={"class_weights": "none"})) is None
    assert class_weights(cfg.model_copy(update={"class_weights": [1.0, 3.0]})) == [1.0, 3.0]
