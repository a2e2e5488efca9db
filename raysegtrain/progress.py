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


RUN_SPEED_PERIOD_S = 24 * 3600.0  # rich keeps the samples of this window (and at most its last 1000 updates)


class ProgressDisplay:
    """Context manager: while open, a thread drains rank 0's queue. MODE "bar": a rich progress bar plus one line per
    epoch; "lines": the lines only (logs, CI); None: nothing."""

    def __init__(self, cfg: Config, mode: str | None = "bar", console=None, queue=None):
        self.cfg = cfg
        self.mode = mode
        self.enabled = mode is not None
        # rank 0 writes to it; default a new Ray queue (anything with its qsize, get_nowait_batch and shutdown)
        self.queue = queue if self.enabled else None
        if self.enabled and self.queue is None:
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
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
            TimeRemainingColumn

        from .terminal import console as make_console

        self.console = self._console or make_console()
        # the epochs row advances by fractions of an epoch on every step message: its speed, hence the run's ETA,
        # is known from the first steps on. The speed is averaged over the whole run (not rich's last 30 s), so
        # validation and epoch boundaries are counted in it, and epochs longer than the window still get an ETA.
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                 console=self.console, transient=False, disable=self.mode != "bar",
                                 speed_estimate_period=RUN_SPEED_PERIOD_S)
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
        elif kind == "notice":
            self.console.print(f"  {item[1]}")
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
            self.progress.update(self.epoch_task, completed=epoch + step / max(steps, 1))  # "M/N" shows whole ones
        elif kind == "epoch_end":
            m = item[1]
            monitor = self.cfg.train.monitor
            self.progress.update(self.epoch_task, completed=int(m["epoch"]),
                                 info=f"{monitor} {m[monitor]:.4f}" if monitor in m else "")
            self.console.print(format_epoch(m, self.cfg.train.epochs, monitor))


def driver_output(preset_note: str | None, mode: str, console=None):
    """For a fit someone watches (MODE "bar" or "lines"): prints the preset `run.preset=auto` chose, and returns
    the console for the rest of the run and the callback that generates a missing synthetic dataset showing its
    progress (`preflight.check_fit` calls it; otherwise its checks would sit silent while the set is written)."""
    if console is None:
        from .terminal import console as make_console

        console = make_console()
    if preset_note:
        console.print(preset_note, soft_wrap=True, markup=False, highlight=False)
    return console, lambda syn: show_generation(syn, console, bar=mode == "bar")


def show_generation(syn, console, bar: bool = True):
    """The synthetic dataset's folder in the cache, generated now if it is not there yet, saying so on CONSOLE: a
    transient progress bar on a terminal (BAR), else one line finished when the generation is."""
    import time

    from .data import synthetic

    path = synthetic.cache_path(syn)
    if path.is_dir():
        return path
    total = sum(synthetic.split_counts(syn).values())
    what = f"generating the synthetic dataset ({total} images, {syn.size}²) into {path} ..."
    if bar and console.is_terminal:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        console.print(what, soft_wrap=True, markup=False, highlight=False)
        with Progress(TextColumn("images"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                      console=console, transient=True) as bar_:
            task = bar_.add_task("images", total=total)
            return synthetic.cached_root(syn, progress=lambda done, _: bar_.update(task, completed=done))
    t0 = time.monotonic()
    # one line per generation in a log: finished below, when the generation is
    console.print(what, end="", soft_wrap=True, markup=False, highlight=False)
    try:
        root = synthetic.cached_root(syn)
    except BaseException:
        console.print(" failed")
        raise
    console.print(f" done in {time.monotonic() - t0:.0f} s")
    return root
