"""The driver's view of a run: a progress bar fed by rank 0 through a Ray queue, and one line per epoch."""

from __future__ import annotations

import math
import queue as _queue
import threading

from .config import Config


def format_epoch(m: dict, epochs: int, monitor: str) -> str:
    parts = [f"epoch {int(m['epoch'])}/{epochs}", f"train_loss {m['train_loss']:.4f}"]
    if "val_loss" in m:
        parts.append(f"val_loss {m['val_loss']:.4f}")
    if monitor in m:
        parts.append(f"{monitor} {m[monitor]:.4f}")
    best = m.get(f"best_{monitor}")
    if best is not None and math.isfinite(best):
        parts.append(f"(best {best:.4f} @ {int(m['best_epoch'])})")
    parts.append(f"{m.get('images_per_s', float('nan')):.1f} img/s")
    if "data_wait_share" in m:  # the share of the epoch spent waiting for the input pipeline
        parts.append(f"data wait {100 * m['data_wait_share']:.0f}%")
    parts.append(f"{m.get('epoch_time_s', float('nan')):.1f}s")
    return "  ".join(parts)


class ProgressDisplay:
    """Context manager: while open, a thread drains rank 0's queue. MODE "bar": a rich progress bar plus one line per
    epoch; "lines": the lines only (logs, CI); None: nothing."""

    def __init__(self, cfg: Config, mode: str | None = "bar", console=None):
        self.cfg = cfg
        self.mode = mode
        self.enabled = mode is not None
        self.queue = None
        if self.enabled:
            import ray
            from ray.util.queue import Queue
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            # on the driver's node: losing a worker node must not silence the display
            here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
            self.queue = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": here})
        self._console = console
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self):
        if not self.enabled:
            return self
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
            TimeRemainingColumn

        self.console = self._console or Console(stderr=True)
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                 console=self.console, transient=False, disable=self.mode != "bar")
        self.progress.start()
        self.epoch_task = self.progress.add_task("epochs", total=self.cfg.train.epochs, info="starting workers...")
        self.step_task = None
        self._thread = threading.Thread(target=self._drain, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if not self.enabled:
            return False
        self._stop.set()
        self._thread.join(timeout=5)
        self._drain_once()
        self.progress.stop()
        try:
            self.queue.shutdown()
        except Exception:
            pass
        return False

    def _drain(self) -> None:
        while not self._stop.is_set():
            if not self._drain_once():
                self._stop.wait(0.2)

    def _drain_once(self) -> bool:
        try:
            items = self.queue.get_nowait_batch(self.queue.qsize())
        except (_queue.Empty, Exception):
            return False
        for item in items:
            self._handle(item)
        return bool(items)

    def _handle(self, item) -> None:
        kind = item[0]
        if kind == "start":
            self.console.print(f"  on {item[1]}")
        elif kind == "epoch_start":
            _, epoch, epochs, steps = item
            self.progress.update(self.epoch_task, completed=epoch, info="")
            if self.step_task is None:
                self.step_task = self.progress.add_task(f"epoch {epoch + 1}", total=steps, info="")
            else:
                self.progress.reset(self.step_task, total=steps, description=f"epoch {epoch + 1}")
        elif kind == "step" and self.step_task is not None:
            _, epoch, step, steps, loss, lr = item
            shown = f"loss {loss:.4f} lr {lr:.2e}" if math.isfinite(loss) else f"lr {lr:.2e}"  # nan: none landed yet
            self.progress.update(self.step_task, completed=step, info=shown)
        elif kind == "epoch_end":
            m = item[1]
            monitor = self.cfg.train.monitor
            self.progress.update(self.epoch_task, completed=int(m["epoch"]),
                                 info=f"{monitor} {m[monitor]:.4f}" if monitor in m else "")
            self.console.print(format_epoch(m, self.cfg.train.epochs, monitor))
