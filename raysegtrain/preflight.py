"""Everything we can check before Ray starts a worker: a user mistake costs a second, not a cluster start-up."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from .config import Config, SyntheticConfig
from .errors import ConfigError, DataError


FULL_SCAN_MAX_PAIRS = 2000  # train + val pairs up to which `data.preflight: auto` reads every file
SAMPLE_PAIRS = 200  # pairs `sample` reads (the first of each split among them)


def check_data(cfg: Config) -> None:
    """The splits are listed and their files read before Ray starts: all of them (`data.preflight: full`, or auto
    up to FULL_SCAN_MAX_PAIRS pairs), a seeded sample of SAMPLE_PAIRS (`sample`, or auto above that), or only the
    first train pair (`first`). The first problem found is a DataError naming its file."""
    import random

    from .data.check import check_pairs
    from .data.splits import list_split, resolve_root

    d = cfg.data
    listed = {split: list_split(d, split) for split in (d.train_split, d.val_split)}  # raises on an empty split
    pairs = list(dict.fromkeys(p for split in listed.values() for p in split))
    mode = d.preflight if d.preflight != "auto" else ("full" if len(pairs) <= FULL_SCAN_MAX_PAIRS else "sample")
    if mode == "first":
        chosen = pairs[:1]
    elif mode == "sample" and len(pairs) > SAMPLE_PAIRS:
        firsts = [split[0] for split in listed.values()]
        rest = random.Random(0).sample([p for p in pairs if p not in firsts], SAMPLE_PAIRS - len(firsts))
        chosen = firsts + rest
    else:
        chosen = pairs
    problems = check_pairs(d, chosen, resolve_root(d))
    if problems:
        scanned = "every file" if len(chosen) == len(pairs) else f"{len(chosen)} of {len(pairs)} pairs read"
        more = f"; {len(problems) - 1} more" if len(problems) > 1 else ""
        raise DataError(f"{problems[0]} ({scanned}{more}; `raysegtrain data check` lists every problem)")


def check_augment(cfg: Config) -> None:
    if isinstance(cfg.data.augment, list):
        from .data.transforms import validate_augment

        validate_augment(cfg.data.augment)


def check_compile(cfg: Config) -> None:
    """A compile backend torch does not have, or a compile cache folder this machine cannot write to, would only
    show up in a worker, after the compile fell back to eager; both are config mistakes."""
    t = cfg.train
    if t.compile == "off":
        return
    if t.compile_backend != "inductor":  # inductor is always there; listing the others imports torch._dynamo
        import torch._dynamo

        known = torch._dynamo.list_backends(exclude_tags=())
        if t.compile_backend not in known:
            raise ConfigError(f"train.compile_backend {t.compile_backend!r} is not a torch.compile backend here "
                              f"(one of: {', '.join(sorted(known))})")
    if t.compile_cache != "auto":
        from .compiling import unwritable_reason

        reason = unwritable_reason(Path(t.compile_cache).expanduser())
        if reason:
            raise ConfigError(f"train.compile_cache {t.compile_cache!r}: {reason}; give a writable folder, or auto")


def train_images(cfg: Config) -> int:
    """Images in the train split: the synthetic set's num_train, else the split's listed pairs."""
    d = cfg.data
    if d.root is None or str(d.root) == "":
        return d.synthetic.num_train
    from .data.splits import list_split

    return len(list_split(d, d.train_split))


def resolve_augment(cfg: Config) -> Config:
    """`data.augment: auto` as the preset it means for the train split's size (augment_presets.auto_preset); CFG as
    it is for any other value. The resolved config is what fit writes into the run's folder, logs to MLflow (param
    data.augment) and checkpoints, like the other `auto`s; `augment_note` is fit's line about it."""
    if cfg.data.augment != "auto":
        return cfg
    from .data.augment_presets import auto_preset

    chosen = auto_preset(train_images(cfg))
    return cfg.model_copy(update={"data": cfg.data.model_copy(update={"augment": chosen})})


def augment_note(resolved: Config) -> str:
    """The line fit prints when `data.augment: auto` chose RESOLVED's preset: which, and why."""
    from .data.augment_presets import auto_reason

    return f"data.augment=auto: {resolved.data.augment} ({auto_reason(train_images(resolved))})"


def check_model(cfg: Config) -> None:
    from .model import check_model_config

    check_model_config(cfg)


def check_fit(cfg: Config, generation: Callable[[SyntheticConfig], Any] | None = None) -> None:
    """Every check, the cheap ones first. GENERATION(syn), if given, is called before the data check of a run on
    the synthetic dataset, to generate the set if it is missing while showing its progress; the other checks come
    before it, so that their mistakes are reported without waiting for the generation."""
    check_augment(cfg)
    check_compile(cfg)
    check_model(cfg)
    if generation is not None and (cfg.data.root is None or str(cfg.data.root) == ""):
        generation(cfg.data.synthetic)
    check_data(cfg)
