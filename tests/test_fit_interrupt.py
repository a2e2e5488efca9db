"""Ctrl-C / SIGTERM of the real `raysegtrain fit` command while it trains: one line with the resume hint, exit
128 + the signal, MLflow run KILLED, checkpoints kept, no Ray process of the command left behind."""

from __future__ import annotations

import os
import queue
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from raysegtrain import tracking
from raysegtrain.checkpoint import load_checkpoint
from tests.conftest import TINY


def _descendants(root: int) -> set[tuple[int, str]]:
    """(pid, start time) of every process below ROOT, from /proc (the start time tells a reused pid apart)."""
    parent: dict[int, int] = {}
    started: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state ppid ... starttime is field 22
        parent[int(entry)] = int(fields[1])
        started[int(entry)] = fields[19]
    found, todo = set(), [root]
    while todo:
        p = todo.pop()
        for child, ppid in parent.items():
            if ppid == p:
                found.add((child, started[child]))
                todo.append(child)
    return found


def _alive(procs: set[tuple[int, str]]) -> set[tuple[int, str]]:
    alive = set()
    for pid, start in procs:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if fields[19] == start and fields[0] != "Z":
            alive.add((pid, start))
    return alive


def _checkpoints(run_dir: Path) -> list[Path]:
    return sorted(run_dir.glob("checkpoint_*/checkpoint.pt"))


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_signal_during_fit_stops_workers_marks_run_killed_and_prints_resume_hint(sig, code, tmp_path):
    name = f"interrupted-{sig.name.lower()}"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_dir = tmp_path / "runs" / name
    raytmp = tempfile.mkdtemp(prefix="rst")  # Ray's socket paths must stay under 107 bytes
    env = {**os.environ, "RAY_TMPDIR": raytmp}
    env.pop("MLFLOW_TRACKING_URI", None)
    overrides = [*TINY, "scaling.num_workers=1", "scaling.use_gpu=false", "train.epochs=500", f"run.name={name}",
                 f"run.storage_path={tmp_path / 'runs'}", f"tracking.tracking_uri={uri}"]
    args = [sys.executable, "-m", "raysegtrain", "fit", *overrides, "--no-progress"]
    with open(tmp_path / "stdout.txt", "w") as out:
        p = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue = queue.Queue()
    reader = threading.Thread(target=lambda: [*map(lines.put, p.stderr), lines.put(None)], daemon=True)
    reader.start()
    seen: list[str] = []
    try:
        # the condition: training is under way (an epoch line) and a checkpoint has been written
        deadline = time.monotonic() + 600
        while not (any(ln.startswith("epoch ") for ln in seen) and _checkpoints(run_dir)):
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            assert line is not None, "fit ended before training:\n" + "".join(seen)
            seen.append(line)
        before = len(seen)
        ray_procs = _descendants(p.pid)
        assert ray_procs, "no Ray processes under the command"
        p.send_signal(sig)
        t_signal = time.monotonic()
        p.wait(timeout=300)
        stopped_in = time.monotonic() - t_signal
        reader.join(timeout=60)  # EOF once every process holding the pipe (Ray's too) has ended
        while not lines.empty() and (line := lines.get_nowait()) is not None:
            seen.append(line)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    rest = "".join(seen[before:])
    stderr = "".join(seen)

    assert p.returncode == code, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    after = [ln for ln in rest.splitlines() if ln.strip()]
    # the run's folder keeps its config: the hint names only the run and where its folder is
    again = shlex.join(["raysegtrain", "fit", "--resume", name, f"run.storage_path={tmp_path / 'runs'}"])
    assert [ln for ln in after if "interrupted" in ln] == [f"interrupted: continue with {again}"], stderr[-3000:]
    assert after[-1].startswith("interrupted: "), stderr[-3000:]  # after the epoch lines still in flight: nothing
    assert not [ln for ln in after if "error" in ln.lower() or "warning" in ln.lower()], stderr[-3000:]
    assert stopped_in < 120, f"stopping took {stopped_in:.0f}s"

    c = tracking.client(uri)
    runs = c.search_runs([c.get_experiment_by_name("raysegtrain").experiment_id],
                         filter_string=f"attributes.run_name = '{name}'")
    assert len(runs) == 1 and runs[0].info.status == "KILLED", [r.info for r in runs]
    assert runs[0].data.tags.get("stop_reason", "").startswith(f"interrupted ({sig.name})"), runs[0].data.tags

    assert load_checkpoint(_checkpoints(run_dir)[0].parent)["epoch"] >= 1

    # nothing the command started keeps running: workers, controller, raylet and the rest are gone
    deadline = time.monotonic() + 60
    while _alive(ray_procs) and time.monotonic() < deadline:
        time.sleep(0.5)  # polling for the condition, not a wait for it
    assert not _alive(ray_procs), [Path(f"/proc/{pid}/cmdline").read_bytes()[:200] for pid, _ in _alive(ray_procs)]
