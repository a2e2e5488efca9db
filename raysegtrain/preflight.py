"""Everything we can check before Ray starts a worker: a user mistake costs a second, not a cluster start-up."""

from __future__ import annotations

from typing import Any, Callable

from .config import Config, SyntheticConfig
from .errors import DataError


def check_data(cfg: Config) -> None:
    from .data.splits import list_split
    from .data.io import read_image, read_mask

    d = cfg.data
    listed = {split: list_split(d, split) for split in (d.train_split, d.val_split)}  # raises on an empty split
    image, mask = listed[d.train_split][0]
    img = read_image(image, d.in_channels)
    m = read_mask(mask, d)
    if img.shape[:2] != m.shape[:2]:
        raise DataError(f"{image.name}: image {img.shape[1]}x{img.shape[0]} but mask {m.shape[1]}x{m.shape[0]} "
                        f"(run `raysegtrain data check` for every problem)")


def check_augment(cfg: Config) -> None:
    if isinstance(cfg.data.augment, list):
        from .data.transforms import validate_augment

        validate_augment(cfg.data.augment)


def check_model(cfg: Config) -> None:
    from .model import check_model_config

    check_model_config(cfg)


def check_fit(cfg: Config, generation: Callable[[SyntheticConfig], Any] | None = None) -> None:
    """Every check, the cheap ones first. GENERATION(syn), if given, is called before the data check of a run on
    the synthetic dataset, to generate the set if it is missing while showing its progress; the other checks come
    before it, so that their mistakes are reported without waiting for the generation."""
    check_augment(cfg)
    check_model(cfg)
    if generation is not None and (cfg.data.root is None or str(cfg.data.root) == ""):
        generation(cfg.data.synthetic)
    check_data(cfg)
