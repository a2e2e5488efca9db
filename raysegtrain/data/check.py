"""`check_dataset`: every data problem, found before any worker starts.

One line per problem, naming the file or stem (paths relative to the data root). Lines that start with
"warning:" (files in no split, classes never seen) do not stop training; all others would make it fail or lie.
Each kind is capped at MAX_PER_KIND lines plus a "... and N more" line.
"""

from __future__ import annotations

import hashlib
import os
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from ..config import DataConfig
from ..errors import DataError
from .io import (IMAGE_EXTENSIONS, MASK_EXTENSIONS, ChannelsError, MaskValuesError, UnreadableFileError,
                 check_mask_values, decode, decode_mask, to_channels)
from .splits import detect_layout, find_file, folder_images, resolve_root, split_name, strip_image_extension

MAX_PER_KIND = 20
KINDS = {  # kind -> what "... and N more" calls it; also the output order
    "layout": "layout problems",
    "empty_split": "empty splits",
    "empty_entry": "empty entries",
    "duplicate": "duplicate entries",
    "overlap": "split overlaps",
    "missing_image": "missing images",
    "missing_mask": "missing masks",
    "unreadable": "unreadable files",
    "channels": "channel problems",
    "size": "size mismatches",
    "mask_values": "masks with bad values",
    "coverage": "class coverage warnings",
    "extra": "files in no split",
}


@dataclass
class Entry:
    """One listed item of a split: its stem, and the files found for it (None = missing)."""

    split: str
    stem: str
    image: Path | None
    mask: Path | None


@dataclass
class Report:
    root: Path
    problems: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))

    def add(self, kind: str, message: str) -> None:
        self.problems[kind].append(message)

    def rel(self, path: Path) -> str:
        try:
            return str(Path(path).relative_to(self.root))
        except ValueError:
            return str(path)

    def lines(self) -> list[str]:
        out: list[str] = []
        for kind, label in KINDS.items():
            found = self.problems.get(kind, [])
            out += found[:MAX_PER_KIND]
            if len(found) > MAX_PER_KIND:
                out.append(f"... and {len(found) - MAX_PER_KIND} more {label}")
        return out


def check_pairs(cfg: DataConfig, pairs: list[tuple[Path, Path]], root: Path) -> list[str]:
    """The problems of these (image, mask) files alone (what preflight scans before a run), one line each, paths
    relative to ROOT; warnings aside."""
    report = Report(root)
    with _quiet_cv2(), ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        for found in pool.map(lambda pair: _check_pair(cfg, *pair, report), pairs):
            for kind, message in found.problems:
                report.add(kind, message)
    return report.lines()


def check_dataset(cfg: DataConfig) -> list[str]:
    """Every problem of the dataset `cfg` describes, one line each; [] when it is clean."""
    try:
        root = resolve_root(cfg)
        layout = detect_layout(cfg, root)
    except DataError as e:
        return [str(e)]
    report = Report(root)
    if layout == "split_files":
        splits = _split_file_entries(cfg, root, report)
        _check_overlap_by_stem(splits, report)
    else:
        splits = _folder_entries(cfg, root, report)
        _check_overlap_by_content(splits, report)
    _check_files(cfg, splits, report)
    _check_extra_files(cfg, root, layout, splits, report)
    return report.lines()


def _wanted_splits(cfg: DataConfig) -> list[tuple[str, bool]]:
    """(split name, required): train and val must exist, test may."""
    return [(split_name(cfg, "train"), True), (split_name(cfg, "val"), True), (split_name(cfg, "test"), False)]


# ------------------------------------------------------------------------------------------- split_files layout
def _split_file_entries(cfg: DataConfig, root: Path, report: Report) -> dict[str, list[Entry]]:
    splits: dict[str, list[Entry]] = {}
    for name, required in _wanted_splits(cfg):
        path = root / cfg.split_dir / f"{name}.txt"
        if not path.is_file():
            if required:
                report.add("layout", f"{report.rel(path)}: split file not found")
            continue
        stems = _read_entries(path, report)
        if not stems:
            report.add("empty_split", f"{report.rel(path)}: lists no images")
        splits[name] = [_locate(cfg, root, name, stem, report) for stem in stems]
    return splits


def _read_entries(path: Path, report: Report) -> list[str]:
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        report.add("unreadable", f"{report.rel(path)}: cannot read ({e})")
        return []
    while lines and not lines[-1].strip():  # trailing blank lines are harmless
        lines.pop()
    stems: list[str] = []
    seen: dict[str, list[int]] = defaultdict(list)
    for number, line in enumerate(lines, 1):
        entry = line.strip()
        if not entry:
            report.add("empty_entry", f"{report.rel(path)} line {number}: empty entry")
            continue
        if entry.startswith("#"):
            continue
        stem = strip_image_extension(entry)
        seen[stem].append(number)
        if len(seen[stem]) == 1:
            stems.append(stem)
    for stem, numbers in seen.items():
        if len(numbers) > 1:
            report.add("duplicate", f"{report.rel(path)}: {stem!r} listed {len(numbers)} times "
                                    f"(lines {', '.join(map(str, numbers))})")
    return stems


def _locate(cfg: DataConfig, root: Path, split: str, stem: str, report: Report) -> Entry:
    image = find_file(root / cfg.images_dir, stem, IMAGE_EXTENSIONS)
    mask = find_file(root / cfg.masks_dir, stem, MASK_EXTENSIONS)
    if image is None:
        report.add("missing_image", f"{split}: no image for {stem!r} in {cfg.images_dir}/")
    if mask is None:
        report.add("missing_mask", f"{split}: no mask for {stem!r} in {cfg.masks_dir}/")
    return Entry(split, stem, image, mask)


def _check_overlap_by_stem(splits: dict[str, list[Entry]], report: Report) -> None:
    names = list(splits)
    for i, first in enumerate(names):
        for second in names[i + 1:]:
            shared = sorted({e.stem for e in splits[first]} & {e.stem for e in splits[second]})
            for stem in shared:
                report.add("overlap", f"{stem!r} is in both {first} and {second}")


# ----------------------------------------------------------------------------------------------- folders layout
def _folder_entries(cfg: DataConfig, root: Path, report: Report) -> dict[str, list[Entry]]:
    splits: dict[str, list[Entry]] = {}
    for name, required in _wanted_splits(cfg):
        images, masks = root / cfg.images_dir / name, root / cfg.masks_dir / name
        if not images.is_dir():
            if required:
                report.add("layout", f"{report.rel(images)}/: folder not found")
            continue
        if not masks.is_dir():
            report.add("layout", f"{report.rel(masks)}/: folder not found")
        files = folder_images(images)
        if not files:
            report.add("empty_split", f"{report.rel(images)}/: no images")
        by_stem: dict[str, list[Path]] = defaultdict(list)
        for f in files:
            by_stem[f.stem].append(f)
        entries = []
        for stem, same in by_stem.items():
            if len(same) > 1:
                report.add("duplicate", f"{report.rel(images)}/: {stem!r} appears as "
                                        f"{', '.join(p.name for p in same)}")
            mask = find_file(masks, stem, MASK_EXTENSIONS)
            if mask is None and masks.is_dir():
                report.add("missing_mask", f"{name}: no mask for {same[0].name} in {report.rel(masks)}/")
            entries.append(Entry(name, stem, same[0], mask))
        splits[name] = entries
    return splits


def _check_overlap_by_content(splits: dict[str, list[Entry]], report: Report) -> None:
    """In the folders layout names may repeat across splits by chance; the same image bytes do not."""
    owners: dict[str, list[Entry]] = defaultdict(list)
    for entries in splits.values():
        for entry in entries:
            owners[_digest(entry.image)].append(entry)
    for same in owners.values():
        if len({e.split for e in same}) > 1:
            listed = " and ".join(f"{e.split}/{e.image.name}" for e in same)
            report.add("overlap", f"the same image is in {listed}")


def _digest(path: Path) -> str:
    try:
        return hashlib.blake2b(path.read_bytes(), digest_size=16).hexdigest()
    except OSError:
        return f"unreadable:{path}"


# ---------------------------------------------------------------------------------------------------- the files
@dataclass
class FileFindings:
    problems: list[tuple[str, str]] = field(default_factory=list)
    class_counts: np.ndarray | None = None


def _check_files(cfg: DataConfig, splits: dict[str, list[Entry]], report: Report) -> None:
    pairs = {(e.image, e.mask) for entries in splits.values() for e in entries}
    train = {(e.image, e.mask) for e in splits.get(split_name(cfg, "train"), [])}
    jobs = sorted(pairs, key=lambda p: (str(p[0]), str(p[1])))
    with _quiet_cv2(), ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        findings = list(pool.map(lambda pair: _check_pair(cfg, *pair, report), jobs))
    counts = np.zeros(cfg.num_classes, np.int64)
    bad_masks = False
    for pair, found in zip(jobs, findings):
        for kind, message in found.problems:
            report.add(kind, message)
            bad_masks |= kind == "mask_values"
        if pair in train and found.class_counts is not None:
            counts += found.class_counts
    if train and not bad_masks:
        _check_coverage(cfg, counts, report)


def _check_pair(cfg: DataConfig, image_path: Path | None, mask_path: Path | None, report: Report) -> FileFindings:
    found = FileFindings()
    image_hw = _check_image(cfg, image_path, report, found) if image_path else None
    mask = _check_mask(cfg, mask_path, report, found) if mask_path else None
    if image_hw is not None and mask is not None:
        if image_hw != mask.shape:
            found.problems.append(("size", f"{report.rel(image_path)} is {image_hw[1]}x{image_hw[0]} but "
                                           f"{report.rel(mask_path)} is {mask.shape[1]}x{mask.shape[0]}"))
    return found


def _check_image(cfg: DataConfig, path: Path, report: Report, found: FileFindings) -> tuple[int, int] | None:
    try:
        array = decode(path)
    except UnreadableFileError as e:
        found.problems.append(("unreadable", _relative_message(e, path, report)))
        return None
    try:
        to_channels(array[:1, :1], cfg.in_channels, path)
    except ChannelsError as e:
        found.problems.append(("channels", _relative_message(e, path, report)))
    return array.shape[:2]


def _check_mask(cfg: DataConfig, path: Path, report: Report, found: FileFindings) -> np.ndarray | None:
    try:
        mask = decode_mask(path, cfg)
    except UnreadableFileError as e:
        found.problems.append(("unreadable", _relative_message(e, path, report)))
        return None
    except MaskValuesError as e:
        found.problems.append(("mask_values", _relative_message(e, path, report)))
        return None
    try:
        check_mask_values(mask, cfg, path)
    except MaskValuesError as e:
        found.problems.append(("mask_values", _relative_message(e, path, report)))
        return mask
    valid = mask[mask < cfg.num_classes]
    found.class_counts = np.bincount(valid.ravel(), minlength=cfg.num_classes)
    return mask


def _relative_message(error: Exception, path: Path, report: Report) -> str:
    return str(error).replace(str(path), report.rel(path), 1)


def _check_coverage(cfg: DataConfig, counts: np.ndarray, report: Report) -> None:
    names = cfg.names()
    if counts[1:].sum() == 0:
        why = (f" (with ignore_index {cfg.ignore_index}, a mask value of {cfg.ignore_index} reads as ignore, "
               f"not foreground)" if cfg.ignore_index == 255 else "")
        report.add("coverage", f"warning: no train mask has any foreground pixel{why}")
        return
    absent = [names[i] for i in range(1, cfg.num_classes) if counts[i] == 0]
    if absent:
        report.add("coverage", f"warning: classes never present in the train masks: {', '.join(absent)}")


@contextmanager
def _quiet_cv2():
    """cv2 prints its own complaint for every corrupt file; ours name the file already."""
    logging = cv2.utils.logging
    before = logging.getLogLevel()
    logging.setLogLevel(logging.LOG_LEVEL_SILENT)
    try:
        yield
    finally:
        logging.setLogLevel(before)


# -------------------------------------------------------------------------------------------------- extra files
def _check_extra_files(cfg: DataConfig, root: Path, layout: str, splits: dict[str, list[Entry]],
                       report: Report) -> None:
    used = {p for entries in splits.values() for e in entries for p in (e.image, e.mask) if p is not None}
    if layout == "split_files":
        candidates = [(root / cfg.images_dir, IMAGE_EXTENSIONS), (root / cfg.masks_dir, MASK_EXTENSIONS)]
        files = [p for folder, exts in candidates if folder.is_dir()
                 for p in sorted(folder.rglob("*")) if p.is_file() and p.suffix.lower() in exts]
    else:
        files = [p for name in splits for p in sorted((root / cfg.masks_dir / name).glob("*"))
                 if p.is_file() and p.suffix.lower() in MASK_EXTENSIONS]
    for path in files:
        if path not in used:
            what = "mask has no image" if layout == "folders" else "is in no split"
            report.add("extra", f"warning: {report.rel(path)} {what}")
