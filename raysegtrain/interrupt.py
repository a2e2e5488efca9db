"""Ctrl-C and SIGTERM for commands that drive Ray: the first signal asks for a clean stop, a second one interrupts at
once."""

from __future__ import annotations

import signal
import threading
from typing import Callable

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """Run RUN_NAME was stopped by signal SIGNUM; its checkpoints are kept and it can be resumed."""

    def __init__(self, signum: int, run_name: str):
        super().__init__(f"run {run_name} interrupted by {signal_name(signum)}")
        self.signum = signum
        self.run_name = run_name

    @property
    def exit_code(self) -> int:
        # 128 + the signal, the shell's own status for "ended by signal N": whoever sent SIGTERM (a scheduler's
        # preemption, Kubernetes, systemd, `kill`) sees 143 and can tell it from a user's Ctrl-C (130)
        return 128 + self.signum


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


class StopOnSignal:
    """While open: the first SIGINT or SIGTERM is recorded in `signum` and passed to ON_SIGNAL (run in the main thread,
    where Python runs signal handlers); from then on either signal raises KeyboardInterrupt at once, so a second
    Ctrl-C never waits for the clean stop. Signals only reach the main thread's handlers: elsewhere it does nothing."""

    def __init__(self, on_signal: Callable[[int], None] | None = None):
        self.on_signal = on_signal
        self.signum: int | None = None
        self._previous: dict = {}

    def _handler(self, signum, frame) -> None:
        self.signum = signum
        for sig in SIGNALS:
            signal.signal(sig, signal.default_int_handler)
        if self.on_signal is not None:
            self.on_signal(signum)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handler) for sig in SIGNALS}
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            # None: the previous handler was not installed from Python; the default is the closest equivalent
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}
        return False
