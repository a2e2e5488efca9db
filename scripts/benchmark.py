"""GPU benchmark: raysegtrain against the bare PyTorch + smp loop, in one run. Prints a table, writes JSON.

For each model (default U-Net/ResNet-34, DeepLabV3+/ResNet-50, FPN/EfficientNet-B0 at 512², bf16, channels_last):
  1. ceiling   the bare loop on random tensors already on the GPU (same model, precision, batch, optimizer, loss)
  2. overhead  `fit` on an in-memory tensor dataset (no decode, no augmentation)
  3. real      `fit` on a folder of 512² PNG images + masks with the default augmentation pipeline
  4. pipeline  decode + augment + collate alone: images/s with 1 loader worker (per core) and with the default count
  5. scaling   `fit` on the real data with 1, 2, 4 ... GPUs (same per-GPU batch): efficiency = X_N / (N * X_1)
  6. startup   seconds from `fit()` to the first training step
Throughput of a fit is the median images/s of its epochs after the first (warm-up, cudnn autotuning).

Usage (on a GPU host): python3 scripts/benchmark.py [--models unet:resnet34,...] [--gpus 1,2,4] [--out bench.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raysegtrain import config  # noqa: E402

SIZE = 512


def bare_loop(arch: str, encoder: str, batch: int, steps: int = 30, warm: int = 10) -> dict:
    import segmentation_models_pytorch as smp

    torch.manual_seed(0)
    torch.backends.cudnn.benchmark = True
    model = smp.create_model(arch, encoder_name=encoder, encoder_weights=None, classes=1).cuda()
    model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), 3e-4)
    dice, bce = smp.losses.DiceLoss("binary"), torch.nn.BCEWithLogitsLoss()
    x = torch.randn(batch, 3, SIZE, SIZE, device="cuda").contiguous(memory_format=torch.channels_last)
    y = (torch.rand(batch, 1, SIZE, SIZE, device="cuda") > 0.5).float()

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(x)
        loss = 0.5 * dice(out.float(), y) + 0.5 * bce(out.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(warm):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    dt = time.perf_counter() - t
    out = {"img_s": batch * steps / dt, "peak_gib": torch.cuda.max_memory_allocated() / 2**30}
    del model, opt, x, y
    torch.cuda.empty_cache()
    return out


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


def fit_throughput(overrides: list[str], datasets=None) -> dict:
    from raysegtrain.train import fit

    cfg = config.load(None, overrides)
    t0 = time.time()
    result = fit(cfg, datasets=datasets)
    hist = result.history
    rates = [h["images_per_s"] for h in hist[1:]] or [h["images_per_s"] for h in hist]
    first = hist[0] if hist else {}
    return {"img_s": statistics.median(rates), "epochs": [round(h["images_per_s"], 1) for h in hist],
            "first_step_s": first.get("first_step_s"), "wall_s": time.time() - t0,
            "peak_gib": max((h.get("peak_gpu_gib", 0) for h in hist), default=None)}


def pipeline_throughput(overrides: list[str], workers: int, batches: int = 40) -> dict:
    from raysegtrain.data.dataset import build_dataset

    cfg = config.load(None, overrides)
    ds = build_dataset(cfg.data, cfg.data.train_split, train=True)
    loader = torch.utils.data.DataLoader(ds, batch_size=cfg.train.batch_size, shuffle=True, num_workers=workers,
                                         persistent_workers=workers > 0, prefetch_factor=4 if workers else None,
                                         drop_last=True)
    it = iter(loader)
    next(it)  # worker start-up out of the number
    t = time.perf_counter()
    n = 0
    for i, batch in enumerate(it):
        n += batch["image"].shape[0]
        if i + 1 >= batches:
            break
    return {"workers": workers, "img_s": n / (time.perf_counter() - t)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="unet:resnet34,deeplabv3plus:resnet50,fpn:efficientnet-b0")
    ap.add_argument("--gpus", default="1", help="comma-separated GPU counts for the scaling rows")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--num-train", type=int, default=1024)
    ap.add_argument("--only", default="ceiling,overhead,real,pipeline,scaling")
    ap.add_argument("--out", default="benchmark.json")
    args = ap.parse_args()
    only = set(args.only.split(","))
    os.environ.setdefault("RAYSEGTRAIN_CACHE", str(Path(tempfile.gettempdir()) / "raysegtrain-bench-cache"))
    card = torch.cuda.get_device_name()
    work = Path(tempfile.mkdtemp(prefix="rsbench-"))
    os.chdir(work)
    common = [f"data.synthetic.size={SIZE}", f"data.image_size={SIZE}", f"data.synthetic.num_train={args.num_train}",
              "data.synthetic.num_val=64", "data.synthetic.num_test=0", f"train.batch_size={args.batch}",
              f"train.epochs={args.epochs}", "train.early_stopping.patience=null", "tracking.enabled=false",
              "scaling.use_gpu=true", "tracking.num_overlays=0"]
    rows = []
    report = {"card": card, "torch": torch.__version__, "gpus_visible": torch.cuda.device_count(), "rows": rows}

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
        if "overhead" in only:
            r = fit_throughput(common + model, datasets=in_memory_datasets)
            emit({"model": spec, "row": "2 overhead", "gpus": 1, **r,
                  "ratio": r["img_s"] / ceiling if ceiling else None})
        real = None
        if "real" in only:
            real = r = fit_throughput(common + model)
            emit({"model": spec, "row": "3 real", "gpus": 1, **r, "ratio": r["img_s"] / ceiling if ceiling else None})
        if "scaling" in only and spec == args.models.split(",")[0]:
            base = None
            for n in [int(g) for g in args.gpus.split(",") if int(g) <= torch.cuda.device_count()]:
                # the 1-GPU point is the real row itself when it ran
                r = real if n == 1 and real else fit_throughput(common + model + [f"scaling.num_workers={n}"])
                base = base or r["img_s"]
                emit({"model": spec, "row": "5 scaling", "gpus": n, **r, "efficiency": r["img_s"] / (n * base)})
    if "pipeline" in only:
        for w in (1, max(1, (os.cpu_count() or 2) - 1)):
            emit({"model": "-", "row": "4 pipeline", **pipeline_throughput(common, w)})

    print(f"\n{card}, torch {torch.__version__}")
    print(f"{'model':34} {'row':12} {'gpus':>4} {'img/s':>8} {'ratio':>6} {'eff':>5} {'first step s':>12}")
    for r in rows:
        print(f"{r['model']:34} {r['row']:12} {r.get('gpus', ''):>4} {r['img_s']:8.1f} "
              f"{r.get('ratio') or 0:6.2f} {r.get('efficiency') or 0:5.2f} {r.get('first_step_s') or 0:12.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
