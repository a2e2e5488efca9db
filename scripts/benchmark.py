"""GPU benchmark: raysegtrain against the bare PyTorch + smp loop, in one run. Prints a table, writes JSON.

For each model (default U-Net/ResNet-34, DeepLabV3+/ResNet-50, FPN/EfficientNet-B0 at 512², bf16, channels_last):
  1. ceiling   the bare loop on random tensors already on the GPU (same model, precision, batch, optimizer, loss)
  2. overhead  `fit` on an in-memory tensor dataset (no decode, no augmentation)
  3. real      `fit` on a folder of 512² PNG images + masks with the default augmentation pipeline
  4. pipeline  decode + augment + collate alone: images/s with 1 loader worker (per core) and with the default count
  5. scaling   `fit` on the real data with 1, 2, 4 ... GPUs (same per-GPU batch): efficiency = X_N / (N * X_1)
  (profile) with --only ...,profile: a torch-profiler window of 20 steps on every rank of the largest in-memory
               scaling run, written to $OUT/profile-<N>gpu/rank<r>.{json,txt} (GPU busy from kernel intervals, host ops)
  (variants) with --only ...,variants: the largest scaling run again with one change each (batches resident on the
               GPU, a side copy stream, DDP bucket views, no buffer broadcast) to locate a multi-GPU gap
  6. startup   seconds from the `raysegtrain fit` command to its first training step (split into the driver's part,
               launching the worker, building data/model, the first batch), with a local Ray and against a running
               head, next to Ray's own floor (a TorchTrainer whose train function does nothing); with --only
               ...,setup also the worker's setup stages; Ray Train's logs go to $OUT/startup-logs.tar.
  7. study     scripts/study_bench.py: one study (study_bench.yaml, 300 s budget) with a TorchTrainer per trial and
               with warm trials: trial-epochs per GPU-hour, per-trial start-up, share of time inside epochs
Throughput of a fit is the median images/s of its epochs after the first (warm-up, cudnn autotuning); "GPU busy" is
nvidia-smi's utilisation of the fit's GPUs sampled every 100 ms inside those epochs' training windows; "data wait"
the share of those epochs the loop stood waiting for the loader. The dataset holds --steps batches per GPU at the
largest GPU count, so every row of one run trains on the same images.

Usage (on a GPU host): python3 scripts/benchmark.py [--models unet:resnet34,...] [--gpus 1,2,4] [--out bench.json]
"""

from __future__ import annotations

import argparse
import json
import os
import glob
import gzip
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raysegtrain import config  # noqa: E402
from raysegtrain.hooks import Hook  # noqa: E402

SIZE = 512
STARTUP_KEYS = ("first_step_s", "first_step_done_s", "startup_launch_s", "startup_driver_s", "startup_workers_s", "startup_setup_s",
                "startup_first_batch_s", *(f"startup_driver_{k}_s" for k in ("imports", "checks", "ray", "tracking",
                                                                             "trainer")))
ROOT = Path(__file__).resolve().parents[1]
VAL_KEYS = ("val_loss", "val_fg_iou", "val_iou", "val_dice")
COMPILE_KEYS = ("compile_s", "compile_graphs", "compile_cache_hits", "compile_cache_misses", "compiled")


class GpuSampler:
    """nvidia-smi's utilisation of every GPU, every 100 ms, stamped on arrival (background thread)."""

    def __init__(self):
        self.samples: list[tuple[float, int, float]] = []  # (time, gpu index, utilisation %)
        self.proc = subprocess.Popen(["nvidia-smi", "--query-gpu=index,utilization.gpu", "--format=csv,noheader,nounits",
                                      "-lms", "100"], stdout=subprocess.PIPE, text=True)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            try:
                gpu, util = (float(v) for v in line.split(","))
                self.samples.append((time.time(), int(gpu), util))
            except ValueError:
                pass

    def busy(self, windows: list[tuple[float, float]], n_gpus: int) -> float | None:
        """Mean utilisation (0..1) of the N_GPUS busiest GPUs over the samples inside WINDOWS."""
        per_gpu: dict[int, list[float]] = {}
        for t, gpu, util in list(self.samples):
            if any(a <= t <= b for a, b in windows):
                per_gpu.setdefault(gpu, []).append(util)
        means = sorted((statistics.mean(v) for v in per_gpu.values()), reverse=True)[:n_gpus]
        return round(statistics.mean(means) / 100, 3) if means else None


class ProfileSteps(Hook):
    """Diagnosis: a torch-profiler window of STEPS training steps in epoch 2 on every rank. Each rank writes
    rank<r>.json (GPU busy share inside the window from the kernels' own intervals, and the host ops that took the
    most time) and rank<r>.txt (the profiler's table) into FOLDER."""

    def __init__(self, folder: str, skip: int = 5, steps: int = 20):
        self.folder, self.skip, self.steps = folder, skip, steps
        self.prof = None

    def after_step(self, info):
        if info.epoch != 1:
            return
        if info.step == self.skip:
            from torch.profiler import ProfilerActivity, profile

            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            self.prof = profile(activities=acts)
            self.prof.__enter__()
            self.t = time.perf_counter()
        elif self.prof is not None and info.step == self.skip + self.steps:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            wall = time.perf_counter() - self.t
            self.prof.__exit__(None, None, None)
            self._write(wall)
            self.prof = None

    def _write(self, wall: float) -> None:
        rank = self.trainer.rank
        events = [e for e in self.prof.events() if getattr(e, "device_type", None) is not None
                  and str(e.device_type).endswith("CUDA") and e.time_range.end > e.time_range.start]
        spans = sorted((e.time_range.start, e.time_range.end) for e in events)
        busy, end = 0.0, float("-inf")
        for a, b in spans:  # union of kernel intervals (us)
            if b > end:
                busy += b - max(a, end)
                end = b
        window = (spans[-1][1] - spans[0][0]) if spans else 0.0
        avg = self.prof.key_averages()
        top = sorted(avg, key=lambda e: e.self_cpu_time_total, reverse=True)[:15]
        out = {"rank": rank, "steps": self.steps, "wall_s": wall, "gpu_busy_in_window": busy / window if window else None,
               "top_host_ops_ms": {e.key: round(e.self_cpu_time_total / 1e3, 2) for e in top}}
        Path(self.folder).mkdir(parents=True, exist_ok=True)
        (Path(self.folder) / f"rank{rank}.json").write_text(json.dumps(out, indent=1))
        sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        (Path(self.folder) / f"rank{rank}.txt").write_text(avg.table(sort_by=sort, row_limit=40))
        trace = Path(self.folder) / f"rank{rank}.trace.json"
        self.prof.export_chrome_trace(str(trace))  # the timeline, for the gaps between kernels (chrome://tracing)
        with open(trace, "rb") as src, gzip.open(f"{trace}.gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
        trace.unlink()


class DdpVariant(Hook):
    """Diagnosis of the multi-GPU gap: one change to how a fit feeds or wraps the model, at the largest GPU count.
    gpu-resident  every step trains on one batch already on the GPU (no loader, pinning or copy in the loop)
    side-stream  batches copied and normalised on a side stream during the previous step (the 1-GPU default; the
                 multi-GPU default copies on the compute stream)
    bucket-view  DDP with gradient_as_bucket_view=True (gradients live in the all-reduce buckets: no copy-back)
    no-buffer-sync  DDP with broadcast_buffers=False (no BatchNorm-buffer broadcast before every forward)"""

    NAMES = ("gpu-resident", "side-stream", "bucket-view", "no-buffer-sync")

    def __init__(self, name: str):
        assert name in self.NAMES, name
        self.name = name

    def before_train(self):
        t = self.trainer
        if self.name in ("bucket-view", "no-buffer-sync") and t.world_size > 1:
            kw = {"gradient_as_bucket_view": True} if self.name == "bucket-view" else {"broadcast_buffers": False}
            ids = [t.device] if t.device.type == "cuda" else None
            t.model = torch.nn.parallel.DistributedDataParallel(t.module, device_ids=ids, **kw)
        elif self.name == "side-stream":
            t.copy_on_side_stream = t.device.type == "cuda"
        elif self.name == "gpu-resident":
            fixed = t.to_device(next(iter(t.train_loader)))

            def resident(batches):
                n = min(t.steps_per_epoch * t.grad_accum, len(t.train_loader))
                return iter([fixed] * n)  # the loader's iterator is left alone

            t.device_batches = resident


class SetupTimes(Hook):
    """Puts the trainer's setup stages (seconds each: datasets, loader start, model, ...) into epoch 1's metrics."""

    def after_epoch(self, metrics):
        if metrics is self.trainer.history[0]:
            metrics.update({f"setup_{k}_s": v for k, v in getattr(self.trainer, "setup_times", {}).items()})


class EpochClock(Hook):
    """Puts each epoch's wall-clock start into its metrics, to match GPU samples to the training windows."""

    def before_epoch(self):
        self.t = time.time()

    def after_epoch(self, metrics):
        metrics["train_start_t"] = self.t


def bare_loop(arch: str, encoder: str, batch: int, steps: int = 30, warm: int = 10, amp: bool = True,
              channels_last: bool = True, rank: int | None = None, compiled: bool = False) -> dict:
    """The plain PyTorch + smp loop on random tensors already on the GPU. RANK set: one process of a plain DDP run
    (process group already initialised). COMPILED: what a user who knows torch.compile writes: the whole step
    (forward, loss, backward, fused AdamW step) under torch.compile; its warm-up (the first steps) is warmup_s."""
    import segmentation_models_pytorch as smp

    torch.manual_seed(0)
    torch.backends.cudnn.benchmark = True
    device = torch.device("cuda", rank or 0)
    model = smp.create_model(arch, encoder_name=encoder, encoder_weights=None, classes=1).to(device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    if rank is not None:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[rank])
    opt = torch.optim.AdamW(model.parameters(), 3e-4, fused=compiled)
    dice, bce = smp.losses.DiceLoss("binary"), torch.nn.BCEWithLogitsLoss()
    x = torch.randn(batch, 3, SIZE, SIZE, device=device).contiguous(memory_format=fmt)
    y = (torch.rand(batch, 1, SIZE, SIZE, device=device) > 0.5).float()

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            out = model(x)
        loss = 0.5 * dice(out.float(), y) + 0.5 * bce(out.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    if compiled:
        step = torch.compile(step)
    t_warm = time.perf_counter()
    for _ in range(warm):
        step()
    torch.cuda.synchronize(device)
    warmup_s = time.perf_counter() - t_warm
    torch.cuda.reset_peak_memory_stats(device)
    t = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize(device)
    dt = time.perf_counter() - t
    out = {"img_s": batch * steps / dt, "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30,
           "warmup_s": round(warmup_s, 1)}
    del model, opt, x, y
    torch.cuda.empty_cache()
    return out


def _ddp_process(rank: int, world: int, port: int, arch: str, encoder: str, batch: int, results) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world, device_id=torch.device("cuda", rank))
    r = bare_loop(arch, encoder, batch, steps=60, rank=rank)
    results.put((rank, r["img_s"]))
    dist.destroy_process_group()


def plain_ddp(arch: str, encoder: str, batch: int, world: int) -> float:
    """The bare loop in plain DDP over WORLD GPUs (one process each, NCCL, as torchrun runs it): total images/s."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = torch.multiprocessing.get_context("spawn")
    results = ctx.SimpleQueue()
    torch.multiprocessing.spawn(_ddp_process, args=(world, port, arch, encoder, batch, results), nprocs=world)
    return sum(results.get()[1] for _ in range(world))


class RandomTensors(torch.utils.data.Dataset):
    """N random (image, mask) pairs in host memory, returned as the real dataset returns them: uint8 CxHxW images
    (normalised on the GPU by the engine) and uint8 HxW binary masks (widened to long on the GPU)."""

    def __init__(self, n: int, distinct: int = 64, size: int = SIZE):
        g = torch.Generator().manual_seed(0)
        self.n = n
        self.images = torch.randint(0, 256, (distinct, 3, size, size), generator=g, dtype=torch.uint8)
        self.masks = (torch.rand(distinct, size, size, generator=g) > 0.5).to(torch.uint8)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        j = i % len(self.images)
        return {"image": self.images[j], "mask": self.masks[j], "index": i}


def in_memory_datasets(cfg):
    return RandomTensors(cfg.data.synthetic.num_train), RandomTensors(cfg.data.synthetic.num_val)


class Bf16GradientAllReduce(Hook):
    """Experiment: DDP all-reduces gradients in bf16 (half the bytes) through torch's own communication hook."""

    def before_train(self):
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import bf16_compress_hook

        if hasattr(self.trainer.model, "register_comm_hook"):
            self.trainer.model.register_comm_hook(None, bf16_compress_hook)


def fit_throughput(overrides: list[str], sampler: GpuSampler | None, gpus: int = 1, datasets=None,
                   hooks=()) -> dict:
    from raysegtrain.train import fit

    cfg = config.load(None, overrides)
    t0 = time.time()
    result = fit(cfg, datasets=datasets, hooks=[EpochClock(), SetupTimes(), *hooks])
    hist = result.history
    steady = hist[1:] or hist
    first = hist[0] if hist else {}
    windows = [(h["train_start_t"], h["train_start_t"] + h["epoch_time_s"]) for h in steady if "train_start_t" in h]
    return {"img_s": statistics.median(h["images_per_s"] for h in steady),
            "epochs": [round(h["images_per_s"], 1) for h in hist],
            "gpu_busy": sampler.busy(windows, gpus) if sampler else None,
            "data_wait": round(statistics.median(h.get("data_wait_share", float("nan")) for h in steady), 3),
            **{k: round(first[k], 2) for k in STARTUP_KEYS if k in first},
            **{k: round(v, 2) for k, v in first.items() if k.startswith("setup_")}, "wall_s": round(time.time() - t0, 1),
            **{k: round(sum(h.get(k, 0) for h in hist), 1) for k in COMPILE_KEYS if any(k in h for h in hist)},
            "peak_gib": max((h.get("peak_gpu_gib", 0) for h in hist), default=None),
            # the last epoch's validation numbers: a compiled fit must match an eager one within seed noise
            **{k: round(hist[-1][k], 4) for k in VAL_KEYS if hist and k in hist[-1]}}


def pipeline_throughput(overrides: list[str], workers: int, batches: int = 40) -> dict:
    from raysegtrain.data.dataset import build_dataset
    from raysegtrain.data.loading import SeededSampler, iterate, seed_loader_worker

    cfg = config.load(None, overrides)
    ds = build_dataset(cfg.data, cfg.data.train_split, train=True)
    sampler = SeededSampler(torch.utils.data.DistributedSampler(ds, num_replicas=1, rank=0, shuffle=True), 0)
    loader = torch.utils.data.DataLoader(ds, batch_size=cfg.train.batch_size, sampler=sampler, num_workers=workers,
                                         worker_init_fn=seed_loader_worker, persistent_workers=workers > 0,
                                         prefetch_factor=4 if workers else None, drop_last=True)
    it = iterate(loader)  # as the trainer starts its workers (OpenCV one thread each)
    next(it)  # worker start-up out of the number
    t = time.perf_counter()
    n = 0
    for i, batch in enumerate(it):
        n += batch["image"].shape[0]
        if i + 1 >= batches:
            break
    return {"workers": workers, "img_s": n / (time.perf_counter() - t)}


def command_startup(common: list[str], work: Path, extra_env: dict | None = None, address: str | None = None,
                    label: str = "command") -> dict:
    """`python3 -m raysegtrain fit` as a user types it (MLflow tracking on), from the moment it is launched; with
    ADDRESS, against that running Ray cluster. Ray Train's logs go to $OUT/startup-logs.tar under LABEL/."""
    extra_env = extra_env or {}
    storage = work / f"startup-runs-{label}"
    cmd = [sys.executable, "-m", "raysegtrain", "fit", *common, "train.epochs=1", "train.max_steps_per_epoch=2",
           "tracking.enabled=true", f"run.storage_path={storage}", "--no-progress",
           *(["--address", address] if address else [])]
    env = {**os.environ, **extra_env, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "RAYSEGTRAIN_T0": str(time.time())}
    t = time.time()
    proc = subprocess.run(cmd, env=env, cwd=work, capture_output=True, text=True)
    wall = time.time() - t
    keep_train_logs(label)
    if proc.returncode:
        return {"error": proc.stderr.strip().splitlines()[-1:] or proc.returncode}
    from raysegtrain.checkpoint import load_checkpoint

    newest = max(glob.glob(str(storage / "**" / "checkpoint.pt"), recursive=True), key=os.path.getmtime)
    first = load_checkpoint(newest)["history"][0]
    return {**{k: round(first[k], 2) for k in STARTUP_KEYS if k in first}, "command_wall_s": round(wall, 1)}


def keep_train_logs(label: str) -> None:
    """Ray Train's system logs of the latest Ray session (the controller's worker-group stages, timestamped), added
    under LABEL/ to $OUT/startup-logs.tar: one file, so that it comes back whatever the number of runs."""
    import tarfile

    logs = Path(tempfile.gettempdir()) / "ray" / "session_latest" / "logs" / "train"
    with tarfile.open(Path(os.environ.get("OUT", ".")) / "startup-logs.tar", "a") as tar:
        for f in sorted(logs.glob("ray-train-sys-*.log")):
            tar.add(f, arcname=f"{label}/{f.name}")


BARE_TRAINER = """
import sys, time, ray
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
t0 = time.time()
ray.init(address=sys.argv[1] or None, include_dashboard=False, logging_level="ERROR")
t_init = time.time()

def train_fn(config):
    import json, time
    print("BARE " + json.dumps({"ray_init_s": config["init"] - config["t0"], "launch_s": time.time() - config["init"]}))

TorchTrainer(train_fn, train_loop_config={"t0": t0, "init": t_init},
             scaling_config=ScalingConfig(num_workers=1, use_gpu=__import__("torch").cuda.is_available()),
             run_config=RunConfig(storage_path=sys.argv[2], name=f"bare-{int(t0)}")).fit()
"""


def bare_trainer_startup(work: Path, address: str | None = None) -> dict:
    """Ray's own floor: a TorchTrainer of one GPU worker whose train function does nothing, from `fit()` to that
    function (and ray.init before it), in a fresh process."""
    proc = subprocess.run([sys.executable, "-c", BARE_TRAINER, address or "", str(work / "bare-runs")],
                          capture_output=True, text=True)
    keep_train_logs("bare-" + ("head" if address else "local"))
    for line in (proc.stdout + proc.stderr).splitlines():
        if "BARE " in line:
            return {k: round(v, 2) for k, v in json.loads(line.split("BARE ", 1)[1]).items()}
    return {"error": (proc.stderr.strip().splitlines() or [proc.returncode])[-1]}


def setup_split(common: list[str]) -> dict:
    """`fit()` in this process against the running head (RAY_ADDRESS=auto): the first step's parts and the worker's
    setup stages (datasets, loader start, model, ...)."""
    from raysegtrain.train import fit

    os.environ["RAY_ADDRESS"] = "auto"
    try:
        result = fit(config.load(None, common + ["train.epochs=1", "train.max_steps_per_epoch=2"]),
                     hooks=[SetupTimes()])
    finally:
        del os.environ["RAY_ADDRESS"]
    first = result.history[0]
    return {k: round(v, 2) for k, v in first.items() if k in STARTUP_KEYS or k.startswith("setup_")}


def ray_cli(*args: str, check: bool = True) -> None:
    subprocess.run([sys.executable, "-m", "ray.scripts.scripts", *args], capture_output=True, text=True, check=check)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="unet:resnet34,deeplabv3plus:resnet50,fpn:efficientnet-b0")
    ap.add_argument("--gpus", default="1", help="comma-separated GPU counts for the scaling rows")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--steps", type=int, default=32,
                    help="batches per GPU and epoch at the largest GPU count (sets the dataset's size)")
    ap.add_argument("--only", default="ceiling,compiled,fp32,overhead,real,pipeline,ddp,scaling,startup,study")
    ap.add_argument("--scaling-data", default="real", help="real and/or memory (comma-separated): the scaling rows' data")
    ap.add_argument("--startup-model", default="unet:resnet34", help="the model of the command start-up row")
    ap.add_argument("--head-runs", type=int, default=2, help="command start-up rows against a running head")
    ap.add_argument("--val", type=int, default=128, help="validation images in the dataset")
    ap.add_argument("--preload", default="", help="also time the command start-up with RAY_preload_python_modules=THIS")
    ap.add_argument("--out", default="benchmark.json")
    ap.add_argument("--cpu", action="store_true",
                    help="dry run without a GPU (CPU workers, no GPU sampling): checks the script's paths, e.g. with "
                         "--only startup --size 64 --batch 4 --steps 1 --val 8 --startup-model unet:resnet18")
    ap.add_argument("--size", type=int, default=SIZE, help="image side")
    args = ap.parse_args()
    size = args.size
    only = set(args.only.split(","))
    os.environ.setdefault("RAYSEGTRAIN_CACHE", str(Path(tempfile.gettempdir()) / "raysegtrain-bench-cache"))
    card = "CPU (dry run)" if args.cpu else torch.cuda.get_device_name()
    gpu_counts = [n for n in (int(g) for g in args.gpus.split(",")) if args.cpu or n <= torch.cuda.device_count()]
    num_train = args.steps * args.batch * max(gpu_counts or [1])
    work = Path(tempfile.mkdtemp(prefix="rsbench-"))
    os.chdir(work)
    common = [f"data.synthetic.size={size}", f"data.image_size={size}", f"data.synthetic.num_train={num_train}",
              f"data.synthetic.num_val={args.val}", "data.synthetic.num_test=0", f"train.batch_size={args.batch}",
              f"train.epochs={args.epochs}", "train.early_stopping.patience=null", "tracking.enabled=false",
              "data.augment=default",  # the pipeline the rows measure, whatever auto would choose for num_train
              "train.compile=off",
              f"scaling.use_gpu={str(not args.cpu).lower()}", "tracking.num_overlays=0"]
    rows = []
    report = {"card": card, "gpus_visible": torch.cuda.device_count(), "cpus": os.cpu_count(),
              "torch": torch.__version__, "num_train": num_train, "batch_per_gpu": args.batch, "rows": rows}
    t = time.time()
    from raysegtrain.data.synthetic import cached_root

    cached_root(config.load(None, common).data.synthetic)  # generated once, outside every timing
    report["dataset_generation_s"] = round(time.time() - t, 1)
    sampler = None if args.cpu else GpuSampler()

    def emit(row):
        rows.append(row)
        print(json.dumps(row), flush=True)
        Path(args.out if os.path.isabs(args.out) else Path(os.environ.get("OUT", work)) / args.out).write_text(
            json.dumps(report, indent=1))

    for spec in args.models.split(","):
        arch, enc = spec.split(":")
        model = [f"model.arch={arch}", f"model.encoder={enc}"]
        ceiling = None
        if "ceiling" in only:
            ceiling = bare_loop(arch, enc, args.batch)["img_s"]
            emit({"model": spec, "row": "1 ceiling", "gpus": 1, "img_s": ceiling})
        if "compiled" in only:  # compiled-fit: only the cold-cache fit (no bare compiled loop, no warm fit)
            r = bare_loop(arch, enc, args.batch, compiled=True)
            emit({"model": spec, "row": "1 ceiling, compiled step + fused AdamW", "gpus": 1, **r,
                  "ratio": r["img_s"] / ceiling if ceiling else None})
        overhead = None
        if "overhead" in only:
            overhead = r = fit_throughput(common + model, sampler, datasets=in_memory_datasets)
            emit({"model": spec, "row": "2 overhead", "gpus": 1, **r,
                  "ratio": r["img_s"] / ceiling if ceiling else None})
        real = None
        if "real" in only:
            real = r = fit_throughput(common + model, sampler)
            emit({"model": spec, "row": "3 real", "gpus": 1, **r, "ratio": r["img_s"] / ceiling if ceiling else None})
        if "compiled" in only or "compiled-fit" in only:
            # the compile cache starts empty (cold), then the same fit again (warm: the cache of the first)
            cache = work / f"compile-cache-{arch}-{enc}"
            shutil.rmtree(cache, ignore_errors=True)
            for label in ("cold", "warm") if "compiled" in only else ("cold",):
                r = fit_throughput(common + model + ["train.compile=on", f"train.compile_cache={cache}"], sampler)
                emit({"model": spec, "row": f"3 real, compiled ({label} cache)", "gpus": 1, **r,
                      "ratio": r["img_s"] / ceiling if ceiling else None,
                      "vs_eager_fit": r["img_s"] / real["img_s"] if real else None})
        if "fp32" in only and spec == args.models.split(",")[0]:
            # what most scripts run: fp32, NCHW, batch 16 (../shared/gpu/baseline_bench.py's setting)
            r = bare_loop(arch, enc, 16, amp=False, channels_last=False)
            emit({"model": spec, "row": "7 fp32 NCHW script", "gpus": 1, "img_s": r["img_s"],
                  "real_fit_speedup": real["img_s"] / r["img_s"] if real else None})
        if "ddp" in only and spec == args.models.split(",")[0]:
            one = None
            for n in gpu_counts:
                try:
                    total = plain_ddp(arch, enc, args.batch, n)
                except Exception as e:  # a baseline that cannot run here must not cost the other rows
                    emit({"model": spec, "row": "5 plain DDP (random)", "gpus": n, "error": repr(e)[:300]})
                    break
                one = one or total
                emit({"model": spec, "row": "5 plain DDP (random)", "gpus": n, "img_s": total,
                      "efficiency": total / (n * one)})
        if "scaling" in only and spec == args.models.split(",")[0]:
            for data in args.scaling_data.split(","):
                base = None
                for n in gpu_counts:
                    if n == 1 and (real if data == "real" else overhead):
                        r = real if data == "real" else overhead  # the 1-GPU point is row 3 / row 2 when it ran
                    else:
                        r = fit_throughput(common + model + [f"scaling.num_workers={n}"], sampler, gpus=n,
                                           datasets=in_memory_datasets if data == "memory" else None)
                    base = base or r["img_s"]
                    emit({"model": spec, "row": f"5 scaling ({data})", "gpus": n, **r,
                          "efficiency": r["img_s"] / (n * base)})
                if "profile" in only and data == "memory":
                    n = max(gpu_counts)
                    folder = str(Path(os.environ.get("OUT", work)) / f"profile-{n}gpu")
                    fit_throughput(common + model + [f"scaling.num_workers={n}"], sampler, gpus=n,
                                   datasets=in_memory_datasets, hooks=[ProfileSteps(folder)])
                    for f in sorted(Path(folder).glob("rank*.json")):
                        r = json.loads(f.read_text())
                        emit({"model": spec, "row": f"profile, rank {r['rank']}", "gpus": n,
                              "gpu_busy": r["gpu_busy_in_window"], "window_s": r["wall_s"],
                              "img_s": r["steps"] * args.batch * n / r["wall_s"]})
                if "variants" in only and max(gpu_counts) > 1:
                    n = max(gpu_counts)
                    for name in DdpVariant.NAMES:
                        r = fit_throughput(common + model + [f"scaling.num_workers={n}"], sampler, gpus=n,
                                           datasets=in_memory_datasets if data == "memory" else None,
                                           hooks=[DdpVariant(name)])
                        emit({"model": spec, "row": f"5 scaling ({data}), {name}", "gpus": n, **r,
                              "efficiency": r["img_s"] / (n * base)})
                if "bf16grad" in only and max(gpu_counts) > 1:
                    n = max(gpu_counts)
                    r = fit_throughput(common + model + [f"scaling.num_workers={n}"], sampler, gpus=n,
                                       datasets=in_memory_datasets if data == "memory" else None,
                                       hooks=[Bf16GradientAllReduce()])
                    emit({"model": spec, "row": f"5 scaling ({data}), bf16 all-reduce", "gpus": n, **r,
                          "efficiency": r["img_s"] / (n * base)})
    if "pipeline" in only:
        for w in (1, max(1, (os.cpu_count() or 2) - 1)):
            emit({"model": "-", "row": "4 pipeline", **pipeline_throughput(common, w, batches=8 if w == 1 else 60)})
    if "startup" in only:
        # most telling first, so that a run cut by a time limit still has the rows that matter
        arch, enc = args.startup_model.split(":")
        first_model = [f"model.arch={arch}", f"model.encoder={enc}"]
        import ray

        ray.shutdown()  # the benchmark's own Ray must not run beside the command's
        emit({"model": args.startup_model, "row": "6 command start-up", "gpus": 1,
              **command_startup(common + first_model, work)})
        if args.preload:
            emit({"model": args.startup_model, "row": "6 command start-up, preload", "gpus": 1,
                  **command_startup(common + first_model, work, {"RAY_preload_python_modules": args.preload},
                                    label="preload")})
        try:
            ray_cli("start", "--head", "--include-dashboard=false", "--disable-usage-stats")
            for i in range(1, args.head_runs + 1):
                emit({"model": args.startup_model, "row": f"6 command start-up, running head ({i})", "gpus": 1,
                      **command_startup(common + first_model, work, address="auto", label=f"head-{i}")})
                if i == 1:
                    emit({"model": "-", "row": "6 bare TorchTrainer, running head", "gpus": 1,
                          **bare_trainer_startup(work, "auto")})
            if "setup" in only:
                emit({"model": args.startup_model, "row": "6 fit() on the running head, setup split", "gpus": 1,
                      **setup_split(common + first_model)})
        except subprocess.CalledProcessError as e:
            emit({"model": "-", "row": "6 running head", "error": (e.stderr or "").strip().splitlines()[-1:]})
        finally:
            ray.shutdown()
            ray_cli("stop", "--force", check=False)
        emit({"model": "-", "row": "6 bare TorchTrainer, local Ray", "gpus": 1, **bare_trainer_startup(work)})
        if "study" in only:  # scripts/study_bench.py: the same study with each trial runtime
            from study_bench import run_study as study_throughput

            for runtime in ("trainer", "warm"):
                emit({"model": "study_bench.yaml", "row": f"7 study, {runtime} trials",
                      **study_throughput(runtime, work / "study", 300, [])})

    print(f"\n{card} x {torch.cuda.device_count()}, {os.cpu_count()} CPUs, torch {torch.__version__}")
    print(f"{'model':28} {'row':44} {'gpus':>4} {'img/s':>8} {'ratio':>6} {'eff':>5} {'busy':>5} {'wait':>5} "
          f"{'first step s':>12}")
    for r in rows:
        first = r.get("first_step_s")
        first = first.get("median") if isinstance(first, dict) else first
        print(f"{r['model']:28} {r['row']:44} {r.get('gpus', ''):>4} {r.get('img_s') or 0:8.1f} "
              f"{r.get('ratio') or 0:6.2f} {r.get('efficiency') or 0:5.2f} {r.get('gpu_busy') or 0:5.2f} "
              f"{r.get('data_wait') or 0:5.2f} {first or 0:12.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
