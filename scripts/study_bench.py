"""Study throughput: the same study (scripts/study_bench.yaml: same space, seed and time budget) with each trial
runtime, `trainer` (a TorchTrainer per trial) and `warm` (trials in reused Tune actors). Prints a table, writes JSON.

Per runtime: trials started and ended, trial-epochs, the study's wall time and trial-epochs per GPU-hour; per-trial
start-up (trial start to its first training batch; for warm, a trial's first on its actor and the reused ones apart);
the share of trial time inside epochs (sum of epoch_wall_s over the trial's run from its start to its last report,
as its MLflow child run records them), the share of the study's trial slots (max_concurrent_trials x wall time) inside epochs; nvidia-smi's GPU
utilisation over the study; images/s per trial (median of each trial's median epoch).

Usage (on a GPU host): python3 scripts/study_bench.py [--runtimes trainer,warm] [--budget 300] [--out study.json]
On a CPU machine (a smoke of the script itself): --cpu shrinks the study to run on CPU workers.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SPACE = ROOT / "scripts" / "study_bench.yaml"
CPU_SMOKE = ["budget.num_samples=4", "max_concurrent_trials=2", "trial.use_gpu=false", "trial.cpus_per_worker=1",
             "asha.max_epochs=3", "asha.grace_period=1", "data.synthetic.size=64", "data.image_size=64",
             "data.synthetic.num_train=12", "data.synthetic.num_val=6", "data.loader_workers=0"]


def run_study(runtime: str, work: Path, budget: float, extra: list[str]) -> dict:
    """One study in its own folder and MLflow store; the figures above."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from benchmark import GpuSampler

    work = work / runtime
    work.mkdir(parents=True)
    cmd = [sys.executable, "-m", "raysegtrain", "tune", str(SPACE), f"trial.runtime={runtime}",
           f"budget.time_budget_s={budget}", f"run.storage_path={work / 'runs'}",
           f"tracking.tracking_uri=sqlite:///{work / 'mlflow.db'}", *extra, "--no-progress"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    sampler = GpuSampler() if "trial.use_gpu=false" not in extra else None
    start = time.time()
    proc = subprocess.run(cmd, env=env, cwd=work, capture_output=True, text=True)
    wall = time.time() - start
    if sampler is not None:
        sampler.proc.terminate()
    logs = Path(os.environ.get("OUT", work))
    (logs / f"tune_{runtime}.log").write_text(proc.stdout + proc.stderr)
    out: dict = {"runtime": runtime, "study_wall_s": round(wall, 1)}
    if proc.returncode:
        return {**out, "error": (proc.stderr.strip().splitlines() or [str(proc.returncode)])[-1]}
    out.update(trial_figures(work / "mlflow.db", wall, concurrent=concurrency(extra)))
    dump_epochs(work / "mlflow.db", logs / f"epochs_{runtime}.csv")
    if sampler is not None:
        out["gpu_util"] = sampler.busy([(start, start + wall)], 1)
    return out


def concurrency(extra: list[str]) -> int:
    given = [a.split("=", 1)[1] for a in extra if a.startswith("max_concurrent_trials=")]
    if given:
        return int(given[-1])
    import yaml

    return int(yaml.safe_load(SPACE.read_text())["max_concurrent_trials"])


def trial_figures(db: Path, wall: float, concurrent: int) -> dict:
    con = sqlite3.connect(db)
    children = con.execute("select r.run_uuid, r.start_time, r.end_time, r.status, t.value from runs r join tags t "
                           "on r.run_uuid = t.run_uuid and t.key = 'state' "
                           "where r.run_uuid in (select run_uuid from tags where key = 'raysegtrain.trial_id')").fetchall()

    def series(run: str, key: str) -> list[float]:
        return [v for (v,) in con.execute("select value from metrics where run_uuid = ? and key = ? order by step",
                                          (run, key))]

    epochs = inside = 0.0
    shares, cold, reused, img_s = [], [], [], []
    for run, t_start, _, _, _ in children:
        walls = series(run, "epoch_wall_s")
        epochs += len(walls)
        inside += sum(walls)
        last = con.execute("select max(timestamp) from metrics where run_uuid = ?", (run,)).fetchone()[0]
        if last and t_start and walls:  # the trial's run: from its start to its last report
            shares.append(sum(walls) / max(1e-9, (last - t_start) / 1000))
        startup = series(run, "trial_startup_s")
        if startup:
            (reused if (series(run, "actor_trials_before") or [0])[0] > 0 else cold).append(startup[0])
        rates = series(run, "images_per_s")[1:]
        if rates:
            img_s.append(statistics.median(rates))
    ended = [s for *_, s in children if not s.startswith(("stopped:", "running"))]

    def med(v):
        return round(statistics.median(v), 2) if v else None

    return {"trials_started": len(children), "trials_ended": len(ended), "trial_epochs": int(epochs),
            "trial_epochs_per_gpu_hour": round(epochs / (wall / 3600), 1),
            "startup_cold_s": med(cold), "startup_cold_n": len(cold),
            "startup_reused_s": med(reused), "startup_reused_n": len(reused),
            "share_in_epochs": med(shares), "slot_share_in_epochs": round(inside / (concurrent * wall), 3),
            "img_s_per_trial": med(img_s)}


def dump_epochs(db: Path, path: Path) -> None:
    """Every trial's per-epoch figures (for a closer look than the table): run, epoch, key, value, time (ms)."""
    con = sqlite3.connect(db)
    rows = con.execute("select r.name, m.step, m.key, m.value, m.timestamp, r.start_time from metrics m join runs r "
                       "on m.run_uuid = r.run_uuid where m.key in ('epoch_wall_s', 'epoch_time_s', 'images_per_s', "
                       "'trial_startup_s', 'first_step_s', 'startup_setup_s', 'actor_trials_before', "
                       "'actor_gpu_mib', 'data_wait_share', 'val_iou') order by r.name, m.step").fetchall()
    with open(path, "w") as f:
        f.write("run,epoch,key,value,time_ms,run_start_ms\n")
        f.writelines(",".join(str(v) for v in row) + "\n" for row in rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runtimes", default="trainer,warm")
    ap.add_argument("--budget", type=float, default=300)
    ap.add_argument("--cpu", action="store_true", help="a tiny CPU study: checks the script, measures nothing")
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "study_bench.json"))
    ap.add_argument("overrides", nargs="*", help="more key=value overrides of the study")
    args = ap.parse_args()
    extra = [*(CPU_SMOKE if args.cpu else []), *args.overrides]
    rows = []
    with tempfile.TemporaryDirectory(prefix="study-bench-") as work:
        os.environ.setdefault("RAYSEGTRAIN_CACHE", str(Path(work) / "cache"))
        for runtime in args.runtimes.split(","):
            rows.append(run_study(runtime, Path(work), args.budget, extra))
            print(json.dumps(rows[-1]), flush=True)
    Path(args.out).write_text(json.dumps(rows, indent=1))
    keys = ["study_wall_s", "trials_started", "trials_ended", "trial_epochs", "trial_epochs_per_gpu_hour",
            "startup_cold_s", "startup_reused_s", "share_in_epochs", "slot_share_in_epochs", "gpu_util",
            "img_s_per_trial"]
    print(f"\n{'figure':28}" + "".join(f"{r['runtime']:>12}" for r in rows))
    for k in keys:
        print(f"{k:28}" + "".join(f"{str(r.get(k, r.get('error', '-'))):>12}" for r in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
