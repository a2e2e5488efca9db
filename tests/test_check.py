"""check_dataset: one test per problem class, and a clean set gives []."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from raysegtrain.config import DataConfig, SyntheticConfig
from raysegtrain.data import synthetic
from raysegtrain.data.check import MAX_PER_KIND, check_dataset


def write(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), array)


def write_pair(images: Path, masks: Path, stem: str, hw=(16, 16), seed=0) -> None:
    rng = np.random.default_rng(seed)
    write(images / f"{stem}.png", rng.integers(0, 256, (*hw, 3), dtype=np.uint8))
    mask = np.zeros(hw, np.uint8)
    mask[2:6, 2:6] = 1
    write(masks / f"{stem}.png", mask)


def split_files_set(root: Path, splits=None) -> DataConfig:
    splits = splits or {"train": ["a", "b", "c"], "val": ["d"], "test": ["e"]}
    (root / "splits").mkdir(parents=True)
    for split, stems in splits.items():
        (root / "splits" / f"{split}.txt").write_text("".join(f"{s}\n" for s in stems))
        for stem in stems:
            write_pair(root / "images", root / "masks", stem, seed=sum(map(ord, stem)))
    return DataConfig(root=root)


def folders_set(root: Path) -> DataConfig:
    for split, stems in {"train": ["a", "b"], "val": ["c"]}.items():
        for i, stem in enumerate(stems):
            write_pair(root / "images" / split, root / "masks" / split, stem, seed=len(split) * 10 + i)
    return DataConfig(root=root)


@pytest.fixture
def clean(tmp_path) -> DataConfig:
    return split_files_set(tmp_path)


def only(problems: list[str], *fragments: str) -> None:
    assert len(problems) == 1, problems
    assert all(f in problems[0] for f in fragments), problems


def test_clean_sets_report_nothing(tmp_path, monkeypatch):
    assert check_dataset(split_files_set(tmp_path / "a")) == []
    assert check_dataset(folders_set(tmp_path / "b")) == []
    monkeypatch.setenv("RAYSEGTRAIN_CACHE", str(tmp_path / "cache"))
    syn = {"size": 32, "num_train": 6, "num_val": 2, "num_test": 2, "variant": "multiclass"}
    assert check_dataset(DataConfig(synthetic=syn)) == []


def test_missing_image(clean):
    (clean.root / "images" / "b.png").unlink()
    only(check_dataset(clean), "train", "'b'", "no image")


def test_missing_mask(clean):
    (clean.root / "masks" / "d.png").unlink()
    only(check_dataset(clean), "val", "'d'", "no mask")


def test_missing_split_file(clean):
    (clean.root / "splits" / "val.txt").unlink()
    problems = check_dataset(clean)
    assert "splits/val.txt: split file not found" in problems
    assert "warning: images/d.png is in no split" in problems


def test_extra_files_are_warnings(clean):
    write_pair(clean.root / "images", clean.root / "masks", "stray")
    assert check_dataset(clean) == ["warning: images/stray.png is in no split",
                                    "warning: masks/stray.png is in no split"]


def test_unreadable_image_and_mask(clean):
    (clean.root / "images" / "a.png").write_bytes(b"\x89PNG\r\n\x1a\ngarbage")
    (clean.root / "masks" / "e.png").write_bytes(b"")
    problems = check_dataset(clean)
    assert len(problems) == 2
    assert any(p.startswith("images/a.png:") and "not a readable image" in p for p in problems)
    assert any(p.startswith("masks/e.png:") for p in problems)


def test_size_mismatch(clean):
    write(clean.root / "masks" / "c.png", np.zeros((16, 20), np.uint8))
    only(check_dataset(clean), "images/c.png is 16x16", "masks/c.png is 20x16")


def test_mask_values_outside_the_classes(clean):
    mask = np.zeros((16, 16), np.uint8)
    mask[0, 0], mask[0, 1] = 2, 255
    write(clean.root / "masks" / "a.png", mask)
    only(check_dataset(clean), "masks/a.png", "[2, 255]", "num_classes=2")
    # with ignore_index 255 only the 2 is wrong
    only(check_dataset(clean.model_copy(update={"ignore_index": 255})), "masks/a.png", "[2]")


def test_empty_split_file(clean):
    (clean.root / "splits" / "test.txt").write_text("\n")
    problems = check_dataset(clean)
    assert problems[0] == "splits/test.txt: lists no images"
    assert problems[1:] == ["warning: images/e.png is in no split", "warning: masks/e.png is in no split"]


def test_empty_entry(clean):
    (clean.root / "splits" / "train.txt").write_text("a\n\nb\nc\n\n")
    only(check_dataset(clean), "splits/train.txt line 2", "empty entry")


def test_duplicate_entry(clean):
    (clean.root / "splits" / "train.txt").write_text("a\nb\nc\na.png\n")
    only(check_dataset(clean), "splits/train.txt", "'a' listed 2 times", "lines 1, 4")


def test_train_val_and_val_test_overlap(clean):
    (clean.root / "splits" / "val.txt").write_text("d\nb\n")
    (clean.root / "splits" / "test.txt").write_text("e\nd\n")
    problems = check_dataset(clean)
    assert problems == ["'b' is in both train and val", "'d' is in both val and test"]


def test_overlap_in_folders_layout_is_by_content(tmp_path):
    cfg = folders_set(tmp_path)
    same = cv2.imread(str(tmp_path / "images" / "train" / "a.png"))
    write(tmp_path / "images" / "val" / "q.png", same)
    write(tmp_path / "masks" / "val" / "q.png", np.zeros((16, 16), np.uint8))
    only(check_dataset(cfg), "train/a.png", "val/q.png")


def test_folders_layout_missing_mask_and_orphan_mask(tmp_path):
    cfg = folders_set(tmp_path)
    (tmp_path / "masks" / "train" / "b.png").rename(tmp_path / "masks" / "train" / "zz.png")
    assert check_dataset(cfg) == ["train: no mask for b.png in masks/train/",
                                  "warning: masks/train/zz.png mask has no image"]


def test_channel_count_incompatible(clean):
    write(clean.root / "images" / "b.png", np.zeros((16, 16, 4), np.uint8))  # RGBA
    only(check_dataset(clean), "images/b.png", "4 channels", "in_channels=3")


def test_no_foreground_warning(clean):
    for stem in "abc":
        write(clean.root / "masks" / f"{stem}.png", np.zeros((16, 16), np.uint8))
    only(check_dataset(clean), "warning: no train mask has any foreground pixel")


def test_each_kind_is_capped(tmp_path):
    cfg = split_files_set(tmp_path, {"train": ["a"], "val": ["b"]})
    (tmp_path / "splits" / "train.txt").write_text("a\n" + "".join(f"ghost{i}\n" for i in range(MAX_PER_KIND + 5)))
    problems = check_dataset(cfg)
    assert len([p for p in problems if "no image" in p]) == MAX_PER_KIND
    assert "... and 5 more missing images" in problems
    assert "... and 5 more missing masks" in problems


def test_no_dataset_at_all(tmp_path):
    only(check_dataset(DataConfig(root=tmp_path / "nope")), "not a folder")
    only(check_dataset(DataConfig(root=tmp_path)), "no dataset layout")


def test_synthetic_root_is_clean_on_disk(tmp_path):
    syn = SyntheticConfig(variant="multiclass", size=32, num_train=5, num_val=2, num_test=0)
    root = synthetic.generate(tmp_path / "syn", syn)
    assert check_dataset(DataConfig(root=root, num_classes=4)) == []
