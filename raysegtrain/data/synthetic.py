"""The embedded default dataset: procedural industrial-surface defect images.

Each image is a textured surface (brushed metal, woven fabric or concrete) under an uneven illumination, with 0-4
defects painted onto it before the light and the sensor noise: scratches (thin curved lines), cracks (branching
random walks) and spots/stains (irregular blobs). Defects are dark or bright, often low-contrast, and the textures
carry look-alikes (metal streaks, fabric threads, concrete pits), so a model has to learn shape, not brightness.
About 15% of the images are defect-free.

Image j of a split depends only on (seed, split, j): changing the counts adds or removes images, never alters one.
The binary and multiclass variants of one seed share their images; only the masks differ:
binary = 0/255 PNG, multiclass = class-index PNG with the ids of `CLASS_NAMES`.

Layout (the reference format): root/images/<stem>.png, root/masks/<stem>.png, root/splits/{train,val,test}.txt.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import cv2
import numpy as np

from ..config import SyntheticConfig
from ..errors import DataError

CLASS_NAMES = ("background", "scratch", "crack", "spot")
BINARY_CLASS_NAMES = ("background", "defect")
SCRATCH, CRACK, SPOT = 1, 2, 3
MARKER = "synthetic.json"  # written last into every generated root; names the parameters

DEFECT_FREE_FRACTION = 0.15
_SPLIT_CODE = {"train": 0, "val": 1, "test": 2}
_PNG = [cv2.IMWRITE_PNG_COMPRESSION, 1]

Progress = Callable[[int, int], None]  # (images done, images in all)


def class_names(variant: str) -> tuple[str, ...]:
    return CLASS_NAMES if variant == "multiclass" else BINARY_CLASS_NAMES


# ------------------------------------------------------------------------------------------------- on-disk dataset
def generate(out_dir: str | Path, syn: SyntheticConfig, overwrite: bool = False,
             progress: Progress | None = None) -> Path:
    """Write the dataset into out_dir (created if needed; must be empty). Returns out_dir.

    overwrite=True replaces a folder that generate() itself wrote (it holds `synthetic.json`); any other non-empty
    folder is refused, so user files are never touched. PROGRESS(done, total), if given, is called with 0 before the
    first image and after each image, in the calling thread; the library itself prints nothing.
    """
    out = Path(out_dir)
    _prepare_empty_folder(out, overwrite)
    (out / "images").mkdir()
    (out / "masks").mkdir()
    (out / "splits").mkdir()
    def write(split: str, j: int, name: str) -> None:
        image, labels = render(syn.seed, split, j, syn.size)
        _write_png(out / "images" / f"{name}.png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        _write_png(out / "masks" / f"{name}.png", encode_mask(labels, syn.variant))

    # each image depends only on (seed, split, index), and numpy/OpenCV release the GIL for most of the work:
    # threads give the cores' speed-up (4096 images of 512² in seconds on a many-core GPU host, not minutes)
    total, done = sum(split_counts(syn).values()), 0
    if progress is not None:
        progress(0, total)
    with ThreadPoolExecutor(max_workers=min(32, os.cpu_count() or 1)) as pool:
        for split, count in split_counts(syn).items():
            if count == 0:  # no file rather than an empty one: the test split is optional
                continue
            stems = [stem(split, j, count) for j in range(count)]
            for _ in pool.map(write, [split] * count, range(count), stems):  # re-raises a worker's error
                done += 1
                if progress is not None:
                    progress(done, total)
            (out / "splits" / f"{split}.txt").write_text("".join(f"{s}\n" for s in stems))
    meta = {**syn.model_dump(), "class_names": list(class_names(syn.variant))}
    (out / MARKER).write_text(json.dumps(meta, indent=1) + "\n")
    return out


def cached_root(syn: SyntheticConfig, progress: Progress | None = None) -> Path:
    """The dataset's folder in the cache, generated on first use (PROGRESS as in `generate`, called only then).

    Generation goes into a temporary sibling that is renamed into place, so the final folder is complete whenever it
    exists; when several processes race, the first rename wins and the others discard their copies.
    """
    final = cache_path(syn)
    base = final.parent
    if final.is_dir():
        return final
    try:
        base.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=base))
    except OSError as e:
        raise DataError(f"cannot create the dataset cache in {base} ({e.strerror}); set RAYSEGTRAIN_CACHE "
                        f"to a writable folder") from None
    try:
        generate(tmp, syn, progress=progress)
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():  # not a lost race: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def cache_path(syn: SyntheticConfig) -> Path:
    """Where `cached_root` keeps the dataset of SYN (it exists once generated)."""
    name = f"{syn.variant}-{syn.size}-{syn.num_train}-{syn.num_val}-{syn.num_test}-s{syn.seed}"
    return cache_dir() / "synthetic" / name


def cache_dir() -> Path:
    return Path(os.environ.get("RAYSEGTRAIN_CACHE") or Path.home() / ".cache" / "raysegtrain").expanduser()


def split_counts(syn: SyntheticConfig) -> dict[str, int]:
    return {"train": syn.num_train, "val": syn.num_val, "test": syn.num_test}


def stem(split: str, j: int, count: int) -> str:
    return f"{split}_{j:0{max(4, len(str(count - 1)))}d}"


def encode_mask(labels: np.ndarray, variant: str) -> np.ndarray:
    return np.where(labels > 0, 255, 0).astype(np.uint8) if variant == "binary" else labels.astype(np.uint8)


def _prepare_empty_folder(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise DataError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not (overwrite and (out / MARKER).is_file()):
            why = " (overwrite replaces only a folder written by generate)" if overwrite else ""
            raise DataError(f"{out} is not empty; refusing to write the synthetic dataset into it{why}")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def _write_png(path: Path, array: np.ndarray) -> None:
    if not cv2.imwrite(str(path), array, _PNG):
        raise DataError(f"cannot write {path}")


# ---------------------------------------------------------------------------------------------------- one image
def render(seed: int, split: str, j: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Image j of a split: (HxWx3 uint8 RGB, HxW uint8 class ids of CLASS_NAMES)."""
    rng = np.random.default_rng([seed % 2**64, _SPLIT_CODE[split], j])
    surface = _colourise(rng, _texture(rng, size))
    labels = np.zeros((size, size), np.uint8)
    for kind in _defect_kinds(rng):
        hard, soft, tint = _DEFECTS[kind](rng, size)
        polarity = _polarity(rng, kind)
        contrast = rng.uniform(0.05, 0.28)
        surface += (polarity * contrast) * soft[:, :, None] * tint
        labels[hard] = kind
    surface *= _illumination(rng, size)[:, :, None]
    image = _sensor(rng, surface)
    return image, labels


def _defect_kinds(rng: np.random.Generator) -> list[int]:
    if rng.random() < DEFECT_FREE_FRACTION:
        return []
    count = min(4, 1 + rng.poisson(0.9))
    return [int(k) for k in rng.choice([SCRATCH, CRACK, SPOT], size=count, p=[0.35, 0.3, 0.35])]


def _polarity(rng: np.random.Generator, kind: int) -> float:
    dark_share = {SCRATCH: 0.4, CRACK: 0.85, SPOT: 0.6}[kind]
    return -1.0 if rng.random() < dark_share else 1.0


# --------------------------------------------------------------------------------------------------------- textures
def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    kind = rng.integers(3)
    return (_brushed_metal, _fabric, _concrete)[kind](rng, size)


def _noise(rng: np.random.Generator, shape: tuple[int, int], cells: tuple[int, int]) -> np.ndarray:
    """Smooth value noise, about unit std: random cells interpolated up to shape."""
    grid = rng.standard_normal((max(2, cells[0]), max(2, cells[1]))).astype(np.float32)
    return cv2.resize(grid, (shape[1], shape[0]), interpolation=cv2.INTER_CUBIC)


def _fractal(rng: np.random.Generator, size: int, octaves=(4, 8, 16, 32)) -> np.ndarray:
    out = np.zeros((size, size), np.float32)
    for k, cells in enumerate(octaves):
        out += _noise(rng, (size, size), (cells, cells)) * (0.6 ** k)
    return out / 1.6


def _brushed_metal(rng: np.random.Generator, size: int) -> np.ndarray:
    big = int(size * 1.5)
    streaks = _noise(rng, (big, big), (big // 2, max(2, big // 48)))
    grain = cv2.blur(rng.standard_normal((big, big), dtype=np.float32), (1, 21))
    tex = 0.035 * streaks + 0.05 * grain
    turn = cv2.getRotationMatrix2D((big / 2, big / 2), rng.uniform(0, 180), 1.0)
    tex = cv2.warpAffine(tex, turn, (big, big))
    lo = (big - size) // 2
    tex = tex[lo:lo + size, lo:lo + size]
    return rng.uniform(0.45, 0.7) + tex + 0.03 * _noise(rng, (size, size), (3, 3))


def _fabric(rng: np.random.Generator, size: int) -> np.ndarray:
    yy, xx = _grid(size)
    angle = rng.uniform(0, np.pi)
    u = xx * np.cos(angle) + yy * np.sin(angle)
    v = -xx * np.sin(angle) + yy * np.cos(angle)
    period = rng.uniform(4.0, 9.0) * max(1.0, size / 256)
    wobble = 1.5 * _noise(rng, (size, size), (6, 6))
    warp, weft = np.sin(2 * np.pi * (u + wobble) / period), np.sin(2 * np.pi * (v - wobble) / period)
    over = np.sin(np.pi * u / period) * np.sin(np.pi * v / period) > 0  # which thread lies on top
    weave = np.where(over, np.abs(warp), np.abs(weft))
    fuzz = cv2.GaussianBlur(rng.standard_normal((size, size), dtype=np.float32), (0, 0), 0.8)
    return rng.uniform(0.35, 0.65) + 0.07 * weave + 0.02 * fuzz + 0.04 * _noise(rng, (size, size), (4, 4))


def _concrete(rng: np.random.Generator, size: int) -> np.ndarray:
    tex = rng.uniform(0.45, 0.65) + 0.06 * _fractal(rng, size)
    tex += 0.03 * rng.standard_normal((size, size), dtype=np.float32)
    pits = np.zeros((size, size), np.float32)
    scale = size / 256
    for _ in range(rng.integers(size * size // 2500, size * size // 700 + 1)):
        centre = tuple(int(c) for c in rng.integers(0, size, 2))
        cv2.circle(pits, centre, max(1, int(rng.uniform(0.8, 2.2) * scale)), float(rng.uniform(0.4, 1.0)), -1)
    return tex - 0.12 * cv2.GaussianBlur(pits, (0, 0), 0.7)


def _grid(size: int) -> np.ndarray:
    return np.indices((size, size), dtype=np.float32)


def _colourise(rng: np.random.Generator, tex: np.ndarray) -> np.ndarray:
    gains = 1.0 + rng.uniform(-0.12, 0.12, 3).astype(np.float32)
    return tex[:, :, None] * gains


def _illumination(rng: np.random.Generator, size: int) -> np.ndarray:
    yy, xx = _grid(size) / size - 0.5
    angle = rng.uniform(0, 2 * np.pi)
    ramp = rng.uniform(0.0, 0.45) * (xx * np.cos(angle) + yy * np.sin(angle))
    cx, cy = rng.uniform(-0.3, 0.3, 2)
    vignette = rng.uniform(0.0, 0.6) * ((xx - cx) ** 2 + (yy - cy) ** 2)
    return rng.uniform(0.85, 1.2) * (1.0 + ramp - vignette)


def _sensor(rng: np.random.Generator, surface: np.ndarray) -> np.ndarray:
    blur = rng.uniform(0.0, 0.9)
    if blur > 0.3:
        surface = cv2.GaussianBlur(surface, (0, 0), blur)
    size = surface.shape[:2]
    sigma = rng.uniform(0.004, 0.025)
    noise = rng.standard_normal(size, dtype=np.float32)[:, :, None]
    noise = noise + 0.3 * rng.standard_normal(surface.shape, dtype=np.float32)
    return np.clip((surface + sigma * noise) * 255 + 0.5, 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------------------- defects
# each returns (hard: bool mask of the labelled pixels, soft: float32 visual strength 0..1, tint: per-channel gains)
_NEUTRAL = np.ones(3, np.float32)


def _scratch(rng: np.random.Generator, size: int):
    start = rng.uniform(0.1, 0.9, 2) * size
    angle = rng.uniform(0, 2 * np.pi)
    length = rng.uniform(0.2, 0.7) * size
    end = start + length * np.array([np.cos(angle), np.sin(angle)])
    bend = (start + end) / 2 + rng.normal(0, 0.15, 2) * length
    t = np.linspace(0, 1, 48)[:, None]
    curve = (1 - t) ** 2 * start + 2 * (1 - t) * t * bend + t ** 2 * end
    width = max(1, round(rng.uniform(0.8, 2.2) * size / 256))
    hard = _polyline([curve], size, width)
    fade = np.clip(0.75 + 0.35 * _noise(rng, (size, size), (5, 5)), 0.5, 1.0)
    return hard, _soften(hard) * fade, _NEUTRAL


def _crack(rng: np.random.Generator, size: int):
    """A jagged walk that keeps its general direction and forks into thinner branches."""
    step = 2.0 * max(1.0, size / 256)
    width = max(1, round(rng.uniform(1.2, 2.8) * size / 256))
    hard = np.zeros((size, size), bool)
    todo = [(rng.uniform(0.15, 0.85, 2) * size, rng.uniform(0, 2 * np.pi), int(rng.uniform(0.25, 0.6) * size / step),
             width)]
    while todo:
        point, course, steps, thickness = todo.pop()
        points, jag = [point], 0.0
        for _ in range(steps):
            course += rng.normal(0, 0.04)
            jag = 0.6 * jag + rng.normal(0, 0.45)
            point = point + step * np.array([np.cos(course + jag), np.sin(course + jag)])
            points.append(point)
            if rng.random() < (0.02 if thickness > 1 else 0.01):
                fork = course + rng.choice([-1.0, 1.0]) * rng.uniform(0.4, 1.1)
                todo.append((point, fork, int(steps * rng.uniform(0.2, 0.5)), max(1, thickness - 1)))
        hard |= _polyline([np.array(points)], size, thickness)
    return hard, _soften(hard), _NEUTRAL


def _spot(rng: np.random.Generator, size: int):
    yy, xx = _grid(size)
    cx, cy = rng.uniform(0.1, 0.9, 2) * size
    radius = rng.uniform(0.03, 0.11) * size
    stretch, angle = rng.uniform(0.5, 1.0), rng.uniform(0, np.pi)
    dx, dy = xx - cx, yy - cy
    a = (dx * np.cos(angle) + dy * np.sin(angle)) / radius
    b = (-dx * np.sin(angle) + dy * np.cos(angle)) / (radius * stretch)
    blob = np.exp(-0.5 * (a * a + b * b)) * (1.0 + 0.35 * _noise(rng, (size, size), (size // 12, size // 12)))
    hard = blob > 0.5
    soft = np.clip((blob - 0.25) / 0.45, 0.0, 1.0).astype(np.float32)
    rust = np.array([1.0, 0.65, 0.35], np.float32)
    tint = rust if rng.random() < 0.4 else _NEUTRAL
    return hard, soft, tint


_DEFECTS = {SCRATCH: _scratch, CRACK: _crack, SPOT: _spot}


def _polyline(paths: list[np.ndarray], size: int, width: int) -> np.ndarray:
    canvas = np.zeros((size, size), np.uint8)
    cv2.polylines(canvas, [np.round(p).astype(np.int32) for p in paths], False, 255, width, cv2.LINE_8)
    return canvas > 0


def _soften(hard: np.ndarray) -> np.ndarray:
    halo = cv2.GaussianBlur(hard.astype(np.float32), (0, 0), 0.7)
    return np.clip(np.maximum(hard, 1.5 * halo), 0.0, 1.0).astype(np.float32)
