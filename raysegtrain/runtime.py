"""Where the loop runs: ranks, device, precision, seeds, CPUs, and a stopwatch for start-up stages."""

from __future__ import annotations

import os
import random
import threading
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_mean(total: torch.Tensor, count: int) -> float:
    """sum(TOTAL) / sum(COUNT) over all ranks (this rank's alone without a process group); nan when nothing was
    counted. Every rank must call it."""
    t = torch.stack([total.double(), torch.tensor(float(count), device=total.device, dtype=torch.float64)])
    if rank_and_world()[1] > 1:
        dist.all_reduce(t)
    return float(t[0] / t[1]) if t[1] > 0 else float("nan")


def default_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def resolve_amp(setting: str, device: torch.device) -> torch.dtype | None:
    if device.type != "cuda" or setting == "off":
        return None
    if setting == "fp16":
        return torch.float16
    if setting == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def autocast(device: torch.device, amp_dtype: torch.dtype | None):
    """The mixed-precision context for AMP_DTYPE on DEVICE (none for None)."""
    if amp_dtype is None:
        return nullcontext()
    return torch.autocast(device.type, dtype=amp_dtype)


def seed_everything(seed: int, deterministic: bool = False, cudnn_benchmark: str = "auto") -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    # both ways: these are process-wide, and a process may train several runs (a warm study's trials)
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    autotune = cudnn_benchmark == "on" or (cudnn_benchmark == "auto" and not deterministic)
    torch.backends.cudnn.benchmark = autotune and not deterministic and torch.cuda.is_available()


def usable_cpus() -> int:
    """CPUs this process may run on (a container's or Slurm's CPU set), not the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 2


class Stopwatch:
    """Calling it with a name records the seconds since the previous call (or since START, a time.time()) under that
    name in `laps`, and returns the time of the call."""

    def __init__(self, start: float | None = None):
        self.laps: dict[str, float] = {}
        self._last = time.time() if start is None else start

    def __call__(self, name: str) -> float:
        now = time.time()
        self.laps[name] = now - self._last
        self._last = now
        return now


class CudaWarmUp(threading.Thread):
    """Creates DEVICE's CUDA context and loads cuBLAS and cuDNN (a matrix product and a convolution) in the
    background, while the caller builds the model on the CPU; `seconds` is how long that took. Anything that fails
    here fails again, with its real message, where the caller first uses the device."""

    def __init__(self, device: torch.device):
        super().__init__(name="cuda-warm-up", daemon=True)
        self.device = device
        self.seconds: float | None = None

    def run(self) -> None:
        start = time.perf_counter()
        try:
            with torch.cuda.device(self.device):
                a = torch.ones(64, 64, device=self.device)
                (a @ a).sum()
                torch.nn.functional.conv2d(torch.ones(1, 3, 8, 8, device=self.device),
                                           torch.ones(4, 3, 3, 3, device=self.device))
                torch.cuda.synchronize(self.device)
        except Exception:
            return
        self.seconds = time.perf_counter() - start
