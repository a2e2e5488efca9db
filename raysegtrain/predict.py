"""`predict`: masks and overlays for a set of images, in this process or as Ray Data batch inference.

Outputs per input image: OUT/<stem>_mask.png (class ids; 0/255 for binary models) and OUT/<stem>_overlay.png.
Problems with the inputs or the outputs are found before the first file is written: no images, files that do not
open as images, two inputs with the same stem, outputs that already exist (unless `overwrite`). A file whose header
reads but whose pixels do not (truncated) still stops the run with a one-line error, when its turn comes.
"""

from __future__ import annotations

import glob
import logging
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import cv2
import numpy as np

from .data.io import IMAGE_EXTENSIONS, read_pixels
from .errors import DataError, UserError
from .inference import InferenceOptions, LoadedModel, Predictor, model_from_state

MASK_SUFFIX, OVERLAY_SUFFIX = "_mask.png", "_overlay.png"
CPU_THREADS_PER_RAY_WORKER = 4


@dataclass
class PredictSummary:
    images: int
    out_dir: Path
    engine: str  # "local" or "ray"


# ------------------------------------------------------------------------------------------------------- inputs
def collect_inputs(items: Sequence[str]) -> list[Path]:
    """Image files named by files, folders (their images, not recursive) or glob patterns; first occurrence wins."""
    found: dict[Path, None] = {}
    for item in items:
        paths = _expand(item)
        if not paths:
            raise DataError(f"no images found for input {item!r} (image types: {', '.join(IMAGE_EXTENSIONS)})")
        found.update(dict.fromkeys(p.resolve() for p in paths))
    images = list(found)
    _check_unique_stems(images)
    for image in images:
        check_readable(image)
    return images


def _expand(item: str) -> list[Path]:
    p = Path(item).expanduser()
    if p.is_dir():
        return sorted(f for f in p.iterdir() if f.is_file() and _is_image_name(f))
    if p.is_file():
        if not _is_image_name(p):
            raise DataError(f"{p}: not an image file (image types: {', '.join(IMAGE_EXTENSIONS)})")
        return [p]
    return sorted(Path(m) for m in glob.glob(str(p), recursive=True) if Path(m).is_file() and _is_image_name(Path(m)))


def _is_image_name(p: Path) -> bool:
    return p.suffix.lower() in IMAGE_EXTENSIONS


def _check_unique_stems(images: list[Path]) -> None:
    seen: dict[str, Path] = {}
    for image in images:
        if image.stem in seen:
            raise DataError(f"two inputs share the name {image.stem!r} ({seen[image.stem]} and {image}): their "
                            f"outputs would collide; predict them into separate --out folders")
        seen[image.stem] = image


def check_readable(path: Path) -> None:
    """Header check (cheap): the file opens as an image. Decoding errors later are still one-line DataErrors."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.size
        return
    except Exception:
        pass
    if path.suffix.lower() in (".tif", ".tiff"):
        import tifffile

        try:
            with tifffile.TiffFile(path) as tif:
                if tif.pages:
                    return
        except Exception:
            pass
    raise DataError(f"{path}: not a readable image (corrupt or unsupported)")


# ------------------------------------------------------------------------------------------------------ outputs
def output_paths(out_dir: Path, image: Path) -> tuple[Path, Path]:
    return out_dir / f"{image.stem}{MASK_SUFFIX}", out_dir / f"{image.stem}{OVERLAY_SUFFIX}"


def check_outputs(out_dir: Path, images: Iterable[Path], overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} is a file, not a folder")
    if overwrite:
        return
    existing = [p for image in images for p in output_paths(out_dir, image) if p.exists()]
    if existing:
        raise UserError(f"{len(existing)} output file(s) already exist, e.g. {existing[0]}; nothing was written "
                        f"(pass --overwrite to replace them)")


def mask_png(mask: np.ndarray, binary: bool) -> np.ndarray:
    return (mask > 0).astype(np.uint8) * 255 if binary else mask


def display_rgb(image: np.ndarray) -> np.ndarray:
    """HxWxC uint8, or float 0..1 → uint8 RGB (gray repeated; extra channels dropped)."""
    rgb = image[:, :, :3] if image.shape[2] >= 3 else np.repeat(image[:, :, :1], 3, axis=2)
    if rgb.dtype == np.uint8:
        return np.ascontiguousarray(rgb)
    return (np.clip(rgb, 0, 1) * 255).round().astype(np.uint8)


def write_outputs(image_path: Path, image: np.ndarray, mask: np.ndarray, out_dir: Path, num_classes: int) -> None:
    from .plots import overlay

    mask_path, overlay_path = output_paths(out_dir, image_path)
    if not cv2.imwrite(str(mask_path), mask_png(mask, num_classes == 2)):
        raise UserError(f"cannot write {mask_path}")
    picture = overlay(display_rgb(image), mask.astype(np.int64), num_classes)
    if not cv2.imwrite(str(overlay_path), cv2.cvtColor(picture, cv2.COLOR_RGB2BGR)):
        raise UserError(f"cannot write {overlay_path}")


def predict_and_write(predictor: Predictor, paths: Sequence[Path], out_dir: Path) -> None:
    cfg = predictor.cfg
    images = [read_pixels(p, cfg.data.in_channels) for p in paths]  # 8-bit stays uint8, as in validation
    for path, image, mask in zip(paths, images, predictor.masks(images)):
        write_outputs(path, image, mask, out_dir, cfg.data.num_classes)


# -------------------------------------------------------------------------------------------------------- local
def predict_local(loaded: LoadedModel, options: InferenceOptions, images: Sequence[Path], out_dir: Path,
                  advance: Callable[[int], None] = lambda n: None) -> None:
    predictor = Predictor.from_loaded(loaded, options)
    for i in range(0, len(images), options.batch_size):
        chunk = images[i:i + options.batch_size]
        predict_and_write(predictor, chunk, out_dir)
        advance(len(chunk))


# ---------------------------------------------------------------------------------------------------------- ray
class RayMaskWriter:
    """Ray Data actor: holds the model, reads its batch of image paths, predicts, writes the outputs.

    The model travels once through the object store (`model_ref`: weights, config, mean/std); OUT must be a folder
    every node can write (local disk on one node, a shared file system on a cluster)."""

    def __init__(self, model_ref, options: InferenceOptions, out_dir: str, threads: int = 0):
        import ray
        import torch

        from .config import Config

        if threads:
            torch.set_num_threads(threads)
        payload = ray.get(model_ref) if isinstance(model_ref, ray.ObjectRef) else model_ref
        cfg = Config.model_validate(payload["config"])
        device = "cuda" if torch.cuda.is_available() else "cpu"
        model = model_from_state(cfg, payload["weights"], device)
        self.predictor = Predictor(model, cfg, payload["mean"], payload["std"], options)
        self.out_dir = Path(out_dir)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        paths = [Path(p) for p in batch["path"]]
        errors = [""] * len(paths)
        try:
            predict_and_write(self.predictor, paths, self.out_dir)
        except UserError as e:
            errors = [str(e)] * len(paths)
        return {"path": np.array([str(p) for p in paths]), "error": np.array(errors)}


def predict_ray(loaded: LoadedModel, options: InferenceOptions, images: Sequence[Path], out_dir: Path,
                workers: int | None = None, use_gpu: bool | None = None, address: str | None = None,
                advance: Callable[[int], None] = lambda n: None) -> None:
    """Ray Data batch inference: `map_batches` over an actor pool (one GPU per actor when the cluster has GPUs)."""
    import ray

    if not ray.is_initialized():
        ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # ours is the one the user sees
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.ERROR)  # per-run INFO lines and a note on the disabled bars

    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    use_gpu = gpus > 0 if use_gpu is None else use_gpu
    if use_gpu and gpus == 0:
        raise UserError("--device cuda with --ray: the Ray cluster has no GPU")
    cpus = int(resources.get("CPU", 1))
    workers = workers or (gpus if use_gpu else max(1, cpus // CPU_THREADS_PER_RAY_WORKER))
    cpus_per_worker = 1 if use_gpu else max(1, min(CPU_THREADS_PER_RAY_WORKER, cpus // workers))

    payload = {"config": loaded.cfg.to_dict(), "mean": list(loaded.mean), "std": list(loaded.std),
               "weights": {k: v.detach().cpu() for k, v in loaded.model.state_dict().items()}}
    ds = ray.data.from_items([{"path": str(p)} for p in images],
                             override_num_blocks=max(1, min(len(images), workers * 4)))
    ds = ds.map_batches(
        RayMaskWriter,
        fn_constructor_kwargs={"model_ref": ray.put(payload), "options": options, "out_dir": str(out_dir),
                               "threads": 0 if use_gpu else cpus_per_worker},
        batch_size=options.batch_size,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=workers),
        num_gpus=1 if use_gpu else 0,
        num_cpus=cpus_per_worker,
    )
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        failed = [e for e in batch["error"] if e]
        if failed:
            raise DataError(failed[0])
        advance(len(batch["path"]))


# ------------------------------------------------------------------------------------------------------ command
def predict(loaded: LoadedModel, inputs: Sequence[str], out_dir: str | Path,
            options: InferenceOptions = InferenceOptions(), overwrite: bool = False, use_ray: bool = False,
            workers: int | None = None, address: str | None = None, device: str = "auto",
            progress: bool = True) -> PredictSummary:
    """Check inputs and outputs, then predict every image. With USE_RAY, DEVICE picks the actors' device
    (auto: GPUs when the cluster has them); without, the model's own device is used."""
    out_dir = Path(out_dir)
    images = collect_inputs(inputs)
    check_outputs(out_dir, images, overwrite)
    out_dir.mkdir(parents=True, exist_ok=True)
    with progress_bar(len(images), "predict", progress) as advance:
        if use_ray:
            use_gpu = None if device == "auto" else device.startswith("cuda")
            predict_ray(loaded, options, images, out_dir, workers, use_gpu, address, advance)
        else:
            predict_local(loaded, options, images, out_dir, advance)
    return PredictSummary(len(images), out_dir, "ray" if use_ray else "local")


@contextmanager
def progress_bar(total: int, label: str, enabled: bool = True):
    """Yields `advance(n)`; a rich bar on stderr when enabled."""
    if not enabled:
        yield lambda n: None
        return
    from .terminal import console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
        TimeRemainingColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TimeRemainingColumn(), console=console()) as bar:
        task = bar.add_task(label, total=total)
        yield lambda n: bar.advance(task, n)
