"""`train.compile`: the training step (forward, loss mix, backward) and validation's forward under `torch.compile`,
with a persistent compile cache and an eager fallback.

What is compiled is the trainer's own `training_step` and the model's forward for validation; the optimizer stays
eager (fused where torch offers it, `optim.fused`): a fused AdamW is one kernel already, so compiling it gains nothing
and would tie the graph to the learning rate's value. Under DDP dynamo splits the model's graph at DDP's bucket
boundaries (torch's DDPOptimizer), so the gradient all-reduce still overlaps the backward pass.

The warm-up is paid once per machine (or per cluster): inductor's FX-graph/AOT-autograd caches and Triton's kernel
cache live under `train.compile_cache` (default: the raysegtrain cache's `compile/`). `CompileWatch` counts the
seconds spent in steps that compiled and the cache's hits and misses, which the trainer reports as metrics.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

# auto compiles runs that train at least this many images. Compiling saves a fixed time per image and costs a fixed
# warm-up per run: small with a warm cache (every run after the first on those shapes, on a machine or a shared
# cache), several times larger with a cold one. This threshold is repaid by a warm compile several times over and
# costs a cold first run at most a fraction of a minute once; docs/benchmarks.md ("the compiled training step on one
# H200") has the measured saving and warm-ups behind it
AUTO_MIN_IMAGES = 40_000


def compile_decision(setting: str, device: torch.device, planned_images: int) -> tuple[bool, str]:
    """Whether to compile, and why in words. SETTING is train.compile (auto/on/off); PLANNED_IMAGES the training
    images the run will see (all ranks, all epochs)."""
    if setting == "off":
        return False, "off"
    if setting == "on":
        return True, "on"
    if device.type != "cuda":
        return False, "auto: off on CPU"
    if planned_images < AUTO_MIN_IMAGES:
        return False, f"auto: off, {planned_images} training images, compiling pays from {AUTO_MIN_IMAGES}"
    return True, f"auto: on, {planned_images} training images"


def cache_folder(setting: str) -> Path:
    """The folder of inductor's and Triton's caches: SETTING (train.compile_cache) unless it is "auto"."""
    if setting != "auto":
        return Path(setting).expanduser()
    from .data.synthetic import cache_dir

    return cache_dir() / "compile"


def unwritable_reason(folder: Path) -> str | None:
    """Why FOLDER cannot hold the compile caches on this machine, or None. A folder that does not exist yet is
    judged by the nearest one above it that does (the run creates the rest)."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    return None


def use_cache_folder(folder: Path) -> None:
    """Point inductor's and Triton's on-disk caches at FOLDER (they read these variables whenever they look up or
    store an entry). A folder the user chose through these variables stays theirs; inductor writes its own default
    (a folder in /tmp) into TORCHINDUCTOR_CACHE_DIR the first time it looks, and that one is replaced."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    folder.mkdir(parents=True, exist_ok=True)
    torch_default = os.path.abspath(default_cache_dir())
    for var, sub in (("TORCHINDUCTOR_CACHE_DIR", "inductor"), ("TRITON_CACHE_DIR", "triton")):
        current = os.environ.get(var)
        if current is None or os.path.abspath(current) == torch_default:
            os.environ[var] = str(folder / sub)


def cache_counts() -> dict[str, int]:
    """Hits and misses so far in this process of inductor's FX-graph cache and the AOT-autograd cache."""
    from torch._dynamo.utils import counters

    ind, aot = counters["inductor"], counters["aot_autograd"]
    return {"hits": int(ind["fxgraph_cache_hit"] + aot["autograd_cache_hit"]),
            "misses": int(ind["fxgraph_cache_miss"] + aot["autograd_cache_miss"])}


def graphs_compiled() -> int:
    """Graphs dynamo has compiled in this process so far."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


class CompileWatch:
    """Seconds spent in calls that compiled a graph (compilation blocks the host, so the host's clock around such a
    call is the compile time plus one step's queueing), and the cache's hits/misses since the last `take`."""

    def __init__(self):
        self.seconds = 0.0
        self.graphs = 0
        self._counts = cache_counts()

    def call(self, body: Callable, *args) -> Any:
        before, start = graphs_compiled(), time.perf_counter()
        out = body(*args)
        if graphs_compiled() != before:
            self.seconds += time.perf_counter() - start
            self.graphs += graphs_compiled() - before
        return out

    def take(self) -> dict[str, float]:
        """The figures since the last take, as metrics (empty when nothing compiled)."""
        counts = cache_counts()
        hits, misses = (counts[k] - self._counts[k] for k in ("hits", "misses"))
        self._counts = counts
        if not self.graphs and not hits and not misses:
            return {}
        out = {"compile_s": self.seconds, "compile_graphs": float(self.graphs), "compile_cache_hits": float(hits),
               "compile_cache_misses": float(misses)}
        self.seconds, self.graphs = 0.0, 0
        return out


class CompiledOrEager:
    """FN compiled, run through `run(body)`: BODY gets the function to use (compiled, or FN itself) and may do more
    with its result (the backward pass, whose graph compiles on its first call). If compiling or running the compiled
    code raises, it says so in one line and runs BODY again with FN, as it does from then on. An error that eager FN
    raises too is the caller's, and propagates."""

    def __init__(self, fn: Callable, name: str, mode: str, backend: str, watch: CompileWatch,
                 on_fallback: Callable[[str], None] | None = None):
        self.fn, self.name, self.watch = fn, name, watch
        options = {} if mode == "default" else {"mode": mode}
        # static shapes: a run has a few (the full batch, a last partial one), each compiled once, and static
        # kernels are the fast ones
        self.compiled: Callable | None = torch.compile(fn, backend=backend, dynamic=False, **options)
        self.on_fallback = on_fallback or _print_stderr
        self.failure: str | None = None

    @property
    def active(self) -> bool:
        return self.compiled is not None

    def run(self, body: Callable[[Callable], Any]) -> Any:
        if self.compiled is None:
            return body(self.fn)
        try:
            return self.watch.call(body, self.compiled)
        except torch.cuda.OutOfMemoryError:
            raise  # not a compiler fault: eager would run out too
        except Exception as e:  # dynamo/inductor/triton raise many types; any of them means "run eager"
            self.compiled = None
            self.failure = failure_reason(e)
            self.on_fallback(f"warning: compiling the {self.name} failed ({self.failure}); continuing eager")
            return body(self.fn)


def failure_reason(e: BaseException) -> str:
    """One line saying why compiling failed: torch's wrapper (e.g. BackendCompilerFailed) and the error inside it,
    whose message the wrapper's first line leaves out."""
    root = e
    while getattr(root, "inner_exception", None) is not None or root.__cause__ is not None:
        root = getattr(root, "inner_exception", None) or root.__cause__
    first = (str(root).strip().splitlines() or [""])[0][:200]
    inner = f"{type(root).__name__}: {first}"
    return inner if root is e else f"{type(e).__name__}, {inner}"


def _print_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
