"""Everything we can check before Ray starts a worker: a user mistake costs a second, not a cluster start-up."""

from __future__ import annotations

from .config import Config
from .errors import DataError


def check_data(cfg: Config) -> None:
    from .data.dataset import list_split
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


def check_fit(cfg: Config) -> None:
    check_augment(cfg)
    check_model(cfg)
    check_data(cfg)
