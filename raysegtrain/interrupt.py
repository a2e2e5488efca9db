"""Ctrl-C and SIGTERM for commands that drive Ray: the first signal asks for a clean stop, a second one interrupts at
once (`StopOnSignal`, for fit). A study (`StopTuneOnSignal`) lets Ray Tune save its state on the first, and only a
second Ctrl-C interrupts it at once."""

from __future__ import annotations

import os
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

    escalating = SIGNALS  # the signals that, once one signal came, raise KeyboardInterrupt at once

    def __init__(self, on_signal: Callable[[int], None] | None = None):
        self.on_signal = on_signal
        self.signum: int | None = None
        self._previous: dict = {}

    def _handler(self, signum, frame) -> None:
        self.signum = signum
        for sig in self.escalating:
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


_study_stop_signal: int | None = None


def study_stop_signal() -> int | None:
    """The signal that stopped the study running in this process (None: it was not stopped by one)."""
    return _study_stop_signal


class StopTuneOnSignal(StopOnSignal):
    """For a Ray Tune study: the first SIGINT or SIGTERM sends SIGUSR1 to this process, on which Tune stops its trials
    and saves the experiment's state, so that the study can be resumed; `requested` then tells the caller that the
    study was stopped, not finished. Tune's own SIGINT handler is switched off meanwhile (TUNE_DISABLE_SIGINT_HANDLER)
    so that the first Ctrl-C is ours. A second Ctrl-C interrupts at once; a repeated SIGTERM asks Tune again instead,
    leaving it to finish saving."""

    escalating = (signal.SIGINT,)
    TUNE_SIGINT_ENV = "TUNE_DISABLE_SIGINT_HANDLER"

    def __init__(self):
        super().__init__(self._ask_tune_to_stop)
        self._env: str | None = None

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @staticmethod
    def _ask_tune_to_stop(signum: int) -> None:
        global _study_stop_signal
        _study_stop_signal = signum
        os.kill(os.getpid(), signal.SIGUSR1)

    def __enter__(self):
        global _study_stop_signal
        _study_stop_signal = None
        self._env = os.environ.get(self.TUNE_SIGINT_ENV)
        os.environ[self.TUNE_SIGINT_ENV] = "1"
        return super().__enter__()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        if self._env is None:
            os.environ.pop(self.TUNE_SIGINT_ENV, None)
        else:
            os.environ[self.TUNE_SIGINT_ENV] = self._env
        return False
