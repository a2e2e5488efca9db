"""The Ray set-up that `fit` (train.py) and studies (tune.py) share: connecting to Ray, the workers' resources
checked against the cluster, a run's `TorchTrainer`, where runs are stored, and the user-level error inside Ray's
wrappers. Ray-internal workarounds live in `ray_internal.py`; the one-line error text is `errors.one_line`.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from .config import Config
from .errors import ReportedError, ResourceError, one_line
from .ray_internal import local_ray_on_loopback, prestart_train_helpers
from .runtime import Stopwatch
from .train_worker import train_loop_per_worker

import ray
from ray.train import CheckpointConfig, FailureConfig
from ray.train import RunConfig as RayRunConfig
from ray.train import ScalingConfig as RayScalingConfig
from ray.train.torch import TorchTrainer

class RayStartError(ReportedError):
    """A local Ray that did not come up (not a mistake in the user's input: exit 1)."""


__all__ = ["RayStartError", "build_trainer", "init_ray", "prestart_train_helpers", "range_test_on_worker",
           "ray_scaling", "root_cause", "storage_root"]


def init_ray(address: str | None = None, verbose: bool = False) -> None:
    """Join the Ray cluster at ADDRESS (or $RAY_ADDRESS), else start a local one that listens on loopback only (a
    cluster keeps its own set-up). A Ray that cannot start is a one-line `RayStartError` naming its logs."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    kwargs: dict[str, Any] = dict(log_to_driver=verbose, configure_logging=True,
                                  logging_level="INFO" if verbose else "ERROR")
    if address:
        ray.init(address=address, **kwargs)
        return
    local_ray_on_loopback()
    dead = dead_recorded_cluster()
    if dead:  # ray.init() would join it and retry for minutes: start this run's own Ray instead
        import sys

        print(f"note: the Ray cluster that `ray start` recorded on this machine ({dead}) does not answer; starting a "
              f"local Ray for this run", file=sys.stderr, flush=True)
    try:
        ray.init(address="local" if dead else None, include_dashboard=verbose or None, **kwargs)
    except Exception as e:  # e.g. Ray's "The current node timed out during startup", as a 20-line traceback
        raise RayStartError(f"Ray could not start on this machine ({one_line(e)}); its logs are in "
                            f"{ray_logs_folder()}") from None


def dead_recorded_cluster() -> str | None:
    """The address a `ray start` on this machine recorded (Ray's ray_current_cluster file, which a plain ray.init
    joins) when nothing listens there any more, e.g. after the head was killed; None when there is none or it
    answers."""
    import socket

    from ray._private.services import parse_address
    from ray._private.utils import read_ray_address

    recorded = read_ray_address()
    parsed = parse_address(recorded) if recorded else None
    if not parsed:
        return None
    try:
        socket.create_connection((parsed[0], int(parsed[1])), timeout=2).close()
        return None
    except OSError:
        return recorded


def ray_logs_folder() -> str:
    """Where a local Ray started here writes its logs: <Ray's temp folder>/session_latest/logs."""
    root = os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp"  # Ray's order, on Linux
    return str(Path(root) / "ray" / "session_latest" / "logs")


def storage_root(cfg: Config) -> str:
    s = cfg.run.storage_path
    return s if "://" in s else str(Path(s).expanduser().resolve())


def ray_scaling(cfg: Config) -> RayScalingConfig:
    """Ray's ScalingConfig for CFG; a ResourceError when the cluster cannot hold it now (unless the config says to
    wait for an autoscaler to add the nodes)."""
    s = cfg.scaling
    use_gpu = s.use_gpu != "false" if s.wait_for_resources else _check_resources(s)
    resources: dict[str, float] = {"CPU": s.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = s.gpus_per_worker
    return RayScalingConfig(num_workers=s.num_workers, use_gpu=use_gpu, resources_per_worker=resources,
                            placement_strategy=s.placement_strategy)


def _check_resources(s) -> bool:
    """Whether the workers use GPUs, checked against what the cluster has now."""
    have = ray.cluster_resources()
    gpus = have.get("GPU", 0)
    if s.use_gpu == "true" and gpus == 0:
        raise ResourceError("scaling.use_gpu=true but the Ray cluster has no GPU (use scaling.use_gpu=auto or false)")
    use_gpu = s.use_gpu == "true" or (s.use_gpu == "auto" and gpus > 0)
    need_gpu = s.num_workers * s.gpus_per_worker
    if use_gpu and need_gpu > gpus:
        raise ResourceError(f"{s.num_workers} workers x {s.gpus_per_worker} GPU need {need_gpu:g} GPUs; the cluster "
                            f"has {gpus:g}")
    cpus = have.get("CPU", 0)
    if s.num_workers * s.cpus_per_worker > cpus:
        raise ResourceError(f"{s.num_workers} workers x {s.cpus_per_worker:g} CPU need "
                            f"{s.num_workers * s.cpus_per_worker:g} CPUs; the cluster has {cpus:g}")
    return use_gpu


def range_test_on_worker(cfg: Config, scaling: RayScalingConfig, datasets=None):
    """The LR range test of CFG (lr_finder.run_range_test) as a Ray task holding one training worker's CPUs and GPU,
    so it runs where training would (a GPU node, not the driver). Returns its `lr_finder.RangeTest`."""
    from .lr_finder import run_range_test

    res = scaling.resources_per_worker or {}
    task = ray.remote(num_cpus=res.get("CPU", 1), num_gpus=res.get("GPU", 0) if scaling.use_gpu else 0,
                      max_retries=0)(run_range_test)
    return ray.get(task.remote(cfg, "cuda" if scaling.use_gpu else "cpu", datasets))


def root_cause(err: BaseException) -> BaseException:
    """The user-level exception inside Ray's wrappers (WorkerGroupError → RayTaskError → ...)."""
    seen = set()
    while id(err) not in seen:
        seen.add(id(err))
        failures = getattr(err, "worker_failures", None)
        if failures:
            err = failures[min(failures)]
            continue
        inner = getattr(err, "cause", None) or getattr(err, "controller_failure", None) or err.__cause__
        if isinstance(inner, BaseException):
            err = inner
            continue
        break
    return err


def build_trainer(cfg: Config, name: str, callbacks: list, progress=None, hooks=(), datasets=None,
                  t0: float | None = None, scaling: RayScalingConfig | None = None,
                  driver_stages: Stopwatch | None = None) -> TorchTrainer:
    """The TorchTrainer of one run. DRIVER_STAGES, the caller's stopwatch since T0, gets its last lap ("trainer")
    here, at the hand-over to Ray Train; its laps reach the first epoch's metrics as startup_driver_<stage>_s."""
    mode = cfg.train.monitor_mode
    t_submit = driver_stages("trainer") if driver_stages is not None else time.time()
    return TorchTrainer(
        train_loop_per_worker,
        # the workers need no credential (they never talk to the tracking store; Ray Train writes the checkpoints
        # through the storage_path below), and Ray keeps the loop config in its run metadata: redacted
        train_loop_config={"config": cfg.redacted_dict(), "progress": progress, "hooks": list(hooks), "datasets": datasets,
                           "t0": t0 if t0 is not None else t_submit, "t_submit": t_submit,
                           "driver_stages": dict(driver_stages.laps) if driver_stages is not None else {}},
        scaling_config=scaling or ray_scaling(cfg),
        run_config=RayRunConfig(
            name=name,
            storage_path=storage_root(cfg),
            failure_config=FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints,
                                               checkpoint_score_attribute="checkpoint_score",
                                               checkpoint_score_order=mode),
            callbacks=callbacks,
        ),
    )
