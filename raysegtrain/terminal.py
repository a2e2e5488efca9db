"""The console every command writes through: on a terminal rich's own; into a file or a pipe (a log, CI) lines are
never wrapped, and tables get the room a log line has."""

from __future__ import annotations

LOG_WIDTH = 240  # columns tables are drawn to when output is not a terminal (rich would assume 80)


def console(stderr: bool = True):
    from rich.console import Console

    probe = Console(stderr=stderr)
    if probe.is_terminal:
        return probe
    return Console(stderr=stderr, soft_wrap=True, width=max(probe.width, LOG_WIDTH))
