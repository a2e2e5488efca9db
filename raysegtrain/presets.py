"""Run-size presets (`run.preset`): the zero-argument `fit` sized to the machine it will train on.

The defaults are sized for a GPU; on CPU workers they take hours. `auto` swaps in the CPU preset when the run will
have no GPU and the user chose none of the sizes the preset sets; `cpu` applies it to every such key not set
explicitly; `full` keeps the defaults. "Set explicitly" is pydantic's `model_fields_set`: a key given in YAML or as
`key=value` counts, a default does not. The resolved config names what was chosen (`cpu` or `full`), so that its
YAML dump, the MLflow params and the checkpoints describe the run that was trained, and a re-run or a resume from
that dump trains the same thing (every key of a dump is explicit, so nothing shrinks twice).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable

from pydantic import BaseModel, ValidationError

from .config import Config, apply_overrides, format_validation_error
from .errors import ConfigError

# small enough for minutes on two CPU cores, large enough that the defects are learnt visibly: from scratch (no
# pretrained encoder), more optimizer steps at a higher rate beat more images or larger batches for the same time
CPU_PRESET: dict[str, Any] = {
    "data.synthetic.size": 128,
    "data.synthetic.num_train": 96,
    "data.synthetic.num_val": 32,
    "data.synthetic.num_test": 16,
    "data.image_size": 128,
    "model.encoder": "resnet18",
    "train.batch_size": 4,
    "optim.lr": 1e-3,
    "train.epochs": 12,
}
# not a size: Ray gives a worker as many torch threads as it reserves CPUs for it, one by default, which would
# leave the other cores of a CPU machine idle. The preset reserves the machine's CPUs when fit starts Ray itself.
CPUS_KEY = "scaling.cpus_per_worker"


@dataclass(frozen=True)
class Cluster:
    """What the run's workers will get, as far as fit can tell before its checks."""

    gpu: bool  # whether use_gpu=auto will give the workers GPUs
    local_cpus: int | None = None  # CPUs of the one-node Ray that fit is to start here; None: another cluster


def is_set(cfg: BaseModel, dotted: str) -> bool:
    """Whether the user gave DOTTED (in YAML or as an override), as opposed to it taking its default."""
    node = cfg
    for part in dotted.split("."):
        if part not in node.model_fields_set:
            return False
        node = getattr(node, part)
    return True


def explicit_keys(cfg: Config) -> list[str]:
    """The keys that make `auto` keep the config as given: a size the user chose, or their own data (a deliberate
    run, whose sizes the preset's are not)."""
    keys = [k for k in CPU_PRESET if is_set(cfg, k)]
    return keys + ["data.root"] if cfg.data.root is not None and str(cfg.data.root) != "" else keys


def resolve(cfg: Config, cluster: Callable[[], Cluster], custom_data: bool = False) -> tuple[Config, str | None]:
    """CFG with `run.preset` resolved to `cpu` or `full` (and the CPU preset applied for `cpu`), plus a one-line
    note for the user when the preset changed something (None otherwise).

    CLUSTER says what the workers will get; it is called only when the answer matters, at most once (it may have
    to ask a Ray cluster). CUSTOM_DATA: fit's DATASETS replaces the configured data, so `auto` keeps the config."""
    cluster = lru_cache(maxsize=1)(cluster)
    preset = cfg.run.preset
    if preset == "auto":
        preset = "full" if custom_data or explicit_keys(cfg) or _will_use_gpu(cfg, cluster) else "cpu"
    if preset == "full":
        return _with_preset(cfg, "full"), None
    changes = {k: v for k, v in CPU_PRESET.items() if not is_set(cfg, k)}
    if not is_set(cfg, CPUS_KEY) and cfg.scaling.use_gpu != "true" and cluster().local_cpus:
        changes[CPUS_KEY] = max(1, cluster().local_cpus // cfg.scaling.num_workers)
    try:
        resolved = Config.model_validate(apply_overrides(cfg.to_dict(), {**changes, "run.preset": "cpu"}))
    except ValidationError as e:
        if cfg.run.preset == "cpu":  # asked for by name: say what conflicts
            raise ConfigError(f"run.preset=cpu: {format_validation_error(e)}") from None
        return _with_preset(cfg, "full"), None  # auto: the user's other settings do not fit the small run
    return resolved, note(resolved, auto=cfg.run.preset == "auto") if changes else None


def note(cfg: Config, auto: bool) -> str:
    """One line: what the CPU preset trains, and how to train the full size instead."""
    full = Config()
    return (f"{'no GPU, so ' if auto else ''}the CPU preset: {_size(cfg)}; for the full size ({_size(full)}, "
            f"sized for a GPU) add run.preset=full")


def _size(cfg: Config) -> str:
    d = cfg.data
    h, w = d.size_hw
    side = f"{h}²" if h == w else f"{h}x{w}"
    images = f", {d.synthetic.num_train} training images" if d.root is None else ""
    epochs = f"{cfg.train.epochs} epoch{'' if cfg.train.epochs == 1 else 's'}"
    return f"{cfg.model.arch}/{cfg.model.encoder}, {side}, {epochs}{images}"


def _with_preset(cfg: Config, preset: str) -> Config:
    return cfg.model_copy(update={"run": cfg.run.model_copy(update={"preset": preset})})


def _will_use_gpu(cfg: Config, cluster: Callable[[], Cluster]) -> bool:
    """What `ray_support.ray_scaling` will decide, known before any data is generated."""
    s = cfg.scaling
    if s.use_gpu != "auto":
        return s.use_gpu == "true"
    if s.wait_for_resources:  # the autoscaler is to add the nodes: use_gpu=auto then means GPUs
        return True
    return cluster().gpu


def probe(address: str | None = None, verbose: bool = False) -> Cluster:
    """What the cluster `fit` will train on offers. A local Ray, not started yet, will get the GPUs torch sees and
    the CPUs Ray counts here; a given cluster (ADDRESS or $RAY_ADDRESS) is asked, connecting to it now (a connection,
    not a cluster start-up: fit connects right after its checks anyway)."""
    import ray

    if not ray.is_initialized() and not (address or os.environ.get("RAY_ADDRESS")):
        import torch

        return Cluster(gpu=torch.cuda.is_available(), local_cpus=_local_ray_cpus())
    from .ray_support import init_ray

    init_ray(address, verbose)
    return Cluster(gpu=ray.cluster_resources().get("GPU", 0) > 0)


def _local_ray_cpus() -> int:
    """The CPUs a local Ray will register (its count honours container quotas), within this process's CPU set."""
    from .ray_internal import ray_cpu_count
    from .runtime import usable_cpus

    cpus, rays = usable_cpus(), ray_cpu_count()
    return max(1, min(cpus, rays) if rays else cpus)
