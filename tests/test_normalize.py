"""uint8 from decoding to the device, normalised there: the Normalizer, and parity of every path (dataset, loader,
engine, predictor) with the float pipeline it replaced (read_image 0..1 -> A.Normalize on the CPU)."""

from __future__ import annotations

import pickle
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import pytest
import torch
from albumentations.pytorch import ToTensorV2

from raysegtrain.config import DataConfig
from raysegtrain.data.dataset import build_dataset
from raysegtrain.data.io import read_image, read_pixels
from raysegtrain.data.statistics import (IMAGENET_MEAN, IMAGENET_STD, ConfigNormalizer, Normalizer, input_normalizer,
                                         model_input)
from raysegtrain.data.transforms import _eval_size_steps

GRAY_MEAN, GRAY_STD = (float(np.mean(IMAGENET_MEAN)),), (float(np.mean(IMAGENET_STD)),)


def old_eval_transform(cfg: DataConfig, mean, std) -> A.Compose:
    """The evaluation pipeline as it was: float 0..1 in, A.Normalize on the CPU, float tensor out."""
    return A.Compose([*_eval_size_steps(cfg), A.Normalize(mean=tuple(mean), std=tuple(std), max_pixel_value=1.0),
                      ToTensorV2()], mask_interpolation=cv2.INTER_NEAREST)


def old_input(path: Path, cfg: DataConfig, mean, std) -> torch.Tensor:
    image = read_image(path, cfg.in_channels)
    return old_eval_transform(cfg, mean, std)(image=image, mask=np.zeros(image.shape[:2], np.int32))["image"]


def write_set(root: Path, images: dict[str, np.ndarray]) -> Path:
    """A split_files dataset, train = val = the given images (written as they are: 8 or 16 bit, gray or RGB)."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "splits").mkdir()
    for stem, pixels in images.items():
        stored = cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR) if pixels.ndim == 3 else pixels
        assert cv2.imwrite(str(root / "images" / f"{stem}.png"), stored)
        assert cv2.imwrite(str(root / "masks" / f"{stem}.png"), (pixels.reshape(*pixels.shape[:2], -1)[..., 0]
                                                                  > pixels.max() // 2).astype(np.uint8))
    for split in ("train", "val"):
        (root / "splits" / f"{split}.txt").write_text("".join(f"{s}\n" for s in images))
    return root


def pictures(hw=(40, 56)) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    return {"rgb8": rng.integers(0, 256, (*hw, 3), dtype=np.uint8),
            "gray8": rng.integers(0, 256, hw, dtype=np.uint8),
            "rgb16": rng.integers(0, 65536, (*hw, 3), dtype=np.uint16),
            "gray16": rng.integers(0, 65536, hw, dtype=np.uint16)}


# ------------------------------------------------------------------------------------------------ the Normalizer
def test_normalizer_arithmetic_memory_format_and_device_copies():
    n = Normalizer(IMAGENET_MEAN, IMAGENET_STD)
    x = torch.randint(0, 256, (2, 3, 8, 6), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    expected = (x.double() / 255 - mean.double()) / std.double()
    y = n(x)
    assert y.dtype == torch.float32 and y.shape == x.shape
    torch.testing.assert_close(y.double(), expected, rtol=0, atol=1e-6)
    unit = x.float() / 255
    before = unit.clone()
    torch.testing.assert_close(n(unit), y, rtol=0, atol=1e-6)  # float is taken as 0..1
    assert torch.equal(unit, before)  # never modified in place
    torch.testing.assert_close(n(x[0]), y[0], rtol=0, atol=0)  # CxHxW as well
    last = x.contiguous(memory_format=torch.channels_last)
    assert n(last).is_contiguous(memory_format=torch.channels_last)
    assert n(last.float()).is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(n(last), y, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        n(torch.zeros(1, 1, 4, 4, dtype=torch.uint8))
    assert len(n._stats) == 1  # the statistics went to the CPU once
    copy = pickle.loads(pickle.dumps(n))  # loader workers, Ray: numbers only
    assert copy.mean == n.mean and copy.std == n.std and copy._stats == {}
    torch.testing.assert_close(copy(x), y, rtol=0, atol=0)


def test_model_input_normalises_uint8_and_passes_float():
    n = Normalizer((0.5,), (0.25,))
    assert torch.allclose(model_input(torch.zeros(1, 1, 2, 2, dtype=torch.uint8), n), torch.tensor(-2.0))
    ready = torch.randn(1, 1, 2, 2)  # a custom source's float images are model input already (as before)
    assert model_input(ready, n) is ready


def test_input_normalizer_from_the_dataset_or_the_config(tmp_path):
    write_set(tmp_path, {"a": pictures()["rgb8"]})
    cfg = DataConfig(root=tmp_path, image_size=32, normalize="dataset")
    dataset = build_dataset(cfg, "val", train=False)
    own = input_normalizer(dataset, cfg)
    assert isinstance(own, Normalizer) and own is not dataset.normalizer and own.mean == dataset.normalizer.mean
    deferred = input_normalizer(object(), DataConfig(root=tmp_path / "nowhere", normalize="none"))
    assert isinstance(deferred, ConfigNormalizer) and deferred._normalizer is None  # nothing read yet
    x = torch.full((1, 3, 2, 2), 51, dtype=torch.uint8)
    assert torch.allclose(deferred(x), torch.tensor(0.2))  # normalize none: 0..1


# --------------------------------------------------------------------------------- parity with the float path
@pytest.mark.parametrize("policy", ["resize", "pad"])
@pytest.mark.parametrize("stem, in_channels", [("rgb8", 3), ("gray8", 1), ("gray8", 3), ("rgb16", 3), ("gray16", 1),
                                               ("gray16", 3)])
def test_new_path_equals_the_old_float_path_on_real_pngs(tmp_path, stem, in_channels, policy):
    """Decode -> (uint8 through the eval transform) -> Normalizer equals read_image -> A.Normalize within 1e-6,
    where no pixel is interpolated: the image at the training size (resize), or padded (pad)."""
    hw = (64, 64) if policy == "resize" else (40, 56)
    write_set(tmp_path, {stem: pictures(hw)[stem]})
    cfg = DataConfig(root=tmp_path, image_size=64, resize_policy=policy, in_channels=in_channels, augment="none")
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if in_channels == 3 else (GRAY_MEAN, GRAY_STD)
    dataset = build_dataset(cfg, "val", train=False)
    item = dataset[0]
    eight_bit = stem.endswith("8")
    assert item["image"].dtype == (torch.uint8 if eight_bit else torch.float32)  # 16-bit: normalised on the CPU
    assert read_pixels(dataset.pairs[0][0], in_channels).dtype == (np.uint8 if eight_bit else np.float32)
    old = old_input(dataset.pairs[0][0], cfg, mean, std)
    assert old.shape == item["image"].shape == (in_channels, 64, 64)
    new = model_input(item["image"], Normalizer(mean, std))
    assert new.dtype == torch.float32
    torch.testing.assert_close(new, old, rtol=0, atol=1e-6)


def test_16_bit_images_keep_the_float_path_even_when_resized(tmp_path):
    write_set(tmp_path, {"rgb16": pictures((48, 80))["rgb16"]})
    cfg = DataConfig(root=tmp_path, image_size=64, augment="none")
    dataset = build_dataset(cfg, "val", train=False)
    torch.testing.assert_close(dataset[0]["image"], old_input(dataset.pairs[0][0], cfg, IMAGENET_MEAN, IMAGENET_STD),
                               rtol=0, atol=1e-6)


def test_resized_8_bit_images_differ_from_the_float_path_by_rounding_only(tmp_path):
    """Interpolating uint8 rounds to whole levels: within half a level (plus cv2's fixed point), never more."""
    write_set(tmp_path, {"rgb8": pictures((48, 80))["rgb8"]})
    for size in (32, 96):  # down (area) and up (linear)
        cfg = DataConfig(root=tmp_path, image_size=size, augment="none")
        dataset = build_dataset(cfg, "val", train=False)
        new = model_input(dataset[0]["image"], dataset.normalizer)
        old = old_input(dataset.pairs[0][0], cfg, IMAGENET_MEAN, IMAGENET_STD)
        level = (new - old).abs() * torch.tensor(IMAGENET_STD).view(3, 1, 1) * 255  # in 8-bit levels
        assert float(level.max()) <= 1.0 and float(level.mean()) < 0.3, size


def test_loader_batch_through_to_device_equals_the_old_path(tmp_path, tiny_cfg):
    """The training loop's own path: a uint8 batch from the val loader, copied, normalised, masks widened."""
    from raysegtrain.engine import SegmentationTrainer

    trainer = SegmentationTrainer(tiny_cfg("train.val_batch_size=3"), device="cpu")
    trainer.setup()
    batch = next(iter(trainer.val_loader))
    assert batch["image"].dtype == torch.uint8 and batch["mask"].dtype == torch.uint8
    x, y = trainer.to_device(batch)
    assert x.dtype == torch.float32 and y.dtype == torch.int64 and torch.equal(y, batch["mask"].long())
    d = trainer.cfg.data
    old = torch.stack([old_input(trainer.val_set.pairs[i][0], d, IMAGENET_MEAN, IMAGENET_STD)
                       for i in batch["index"].tolist()])
    torch.testing.assert_close(x, old, rtol=0, atol=1e-6)

    trainer.meter.reset()
    samples = trainer.visual_samples(2)
    assert samples["images"].dtype == np.uint8 and samples["images"].shape == (2, 64, 64, 3)
    assert np.array_equal(samples["images"][0], read_pixels(trainer.val_set.pairs[0][0], 3))  # true colours
    assert samples["masks"].dtype == np.int64 and samples["preds"].shape == (2, 64, 64)


def test_predictor_takes_uint8_and_float_images_alike(tiny_cfg, tmp_path):
    """predict feeds uint8 (read_pixels); callers with read_image's floats get the same probabilities, and both
    equal the model on the old path's input."""
    from raysegtrain.inference import InferenceOptions, Predictor, predict_probs

    cfg = tiny_cfg()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 1, 3, padding=1)).eval()
    write_set(tmp_path, pictures((64, 64)))
    paths = [tmp_path / "images" / f"{s}.png" for s in ("rgb8", "gray8")]
    pixels, unit = [read_pixels(p, 3) for p in paths], [read_image(p, 3) for p in paths]
    old = [predict_probs(model, old_input(p, cfg.data, IMAGENET_MEAN, IMAGENET_STD)[None])[0] for p in paths]
    for options in (InferenceOptions(), InferenceOptions(sliding_window=True)):
        predictor = Predictor(model, cfg, IMAGENET_MEAN, IMAGENET_STD, options)
        a, b = predictor.probabilities(pixels), predictor.probabilities(unit)
        mixed = predictor.probabilities([pixels[0], unit[1]])  # one of each in a batch: grouped by type
        for p, q, r, o in zip(a, b, mixed, old):
            torch.testing.assert_close(p, o, rtol=0, atol=1e-6)
            torch.testing.assert_close(q, o, rtol=0, atol=1e-6)
            torch.testing.assert_close(r, o, rtol=0, atol=1e-6)


def test_display_of_uint8_images():
    from raysegtrain.plots import to_display
    from raysegtrain.predict import display_rgb

    gray = np.arange(12, dtype=np.uint8).reshape(1, 1, 3, 4)
    shown = to_display(gray)
    assert shown.shape == (1, 3, 4, 3) and np.array_equal(shown[0, ..., 1], gray[0, 0])  # no stretch
    rgb = np.random.default_rng(0).integers(0, 256, (5, 4, 3), dtype=np.uint8)
    assert np.array_equal(display_rgb(rgb), rgb)
    assert np.array_equal(display_rgb(rgb.astype(np.float32) / 255), rgb)
