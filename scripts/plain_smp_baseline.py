#!/usr/bin/env python3
"""The plain segmentation-models-pytorch script of issue 16, the bar `raysegtrain fit`'s defaults are measured against
(docs/benchmarks.md): U-Net/ResNet-18 from scratch, Adam lr 1e-3, cosine schedule over the epochs (stepped per
epoch), loss 0.5 Dice + 0.5 BCE, horizontal and vertical flips (p 0.5 each) and nothing else, batch 8. No Ray, no
MLflow, no early stopping. It reads a binary dataset in raysegtrain's `folders` layout (images/{split}/*.png,
masks/{split}/*.png with 0 = background and anything else = foreground; e.g. scripts/real_small_data.py's output),
gray images replicated to 3 channels and normalised with the ImageNet statistics (as fit's defaults do).

    python3 scripts/plain_smp_baseline.py DATA_ROOT --epochs 30 --seed 0

It prints one line per epoch and at the end a JSON line with the validation foreground IoU of the last epoch
(`val_fg_iou_last`, the issue's number), the best epoch's, and the test split's at the last epoch when there is one.
The foreground IoU is the dataset-level one (intersection and union summed over the split's pixels, threshold 0.5),
as raysegtrain's val_fg_iou.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


def load_split(root: Path, split: str) -> tuple[np.ndarray, np.ndarray] | None:
    folder = root / "images" / split
    if not folder.is_dir():
        return None
    images, masks = [], []
    for path in sorted(folder.glob("*.png")):
        rgb = np.asarray(Image.open(path).convert("RGB"), np.float32) / 255.0
        images.append(((rgb - MEAN) / STD).transpose(2, 0, 1))
        masks.append((np.asarray(Image.open(root / "masks" / split / path.name)) > 0).astype(np.float32)[None])
    return np.stack(images), np.stack(masks)


def foreground_iou(model, images: np.ndarray, masks: np.ndarray, batch: int = 8) -> float:
    model.eval()
    inter = union = 0.0
    with torch.no_grad():
        for i in range(0, len(images), batch):
            pred = torch.sigmoid(model(torch.from_numpy(images[i:i + batch]))) > 0.5
            target = torch.from_numpy(masks[i:i + batch]) > 0.5
            inter += (pred & target).sum().item()
            union += (pred | target).sum().item()
    return inter / union if union else 1.0


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("root", type=Path, help="dataset folder (folders layout: images/train, masks/train, ...)")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--encoder", default="resnet18")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args(argv)

    import segmentation_models_pytorch as smp

    if args.threads:
        torch.set_num_threads(args.threads)
    random.seed(args.seed), np.random.seed(args.seed), torch.manual_seed(args.seed)
    train = load_split(args.root, "train")
    val = load_split(args.root, "val")
    if train is None or val is None:
        raise SystemExit(f"error: {args.root} has no images/train and images/val folders")
    test = load_split(args.root, "test")

    model = smp.Unet(args.encoder, encoder_weights=None, in_channels=3, classes=1)
    dice = smp.losses.DiceLoss("binary", from_logits=True)
    bce = torch.nn.BCEWithLogitsLoss()
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.epochs)
    rng = np.random.default_rng(args.seed)
    x_all, y_all = train
    best = (-1.0, 0)
    for epoch in range(1, args.epochs + 1):
        t = time.time()
        model.train()
        order = rng.permutation(len(x_all))
        losses = []
        for i in range(0, len(order), args.batch):
            idx = order[i:i + args.batch]
            x, y = x_all[idx].copy(), y_all[idx].copy()
            for k in range(len(idx)):  # flips only: horizontal and vertical, p 0.5 each
                if rng.random() < 0.5:
                    x[k], y[k] = x[k][:, :, ::-1], y[k][:, :, ::-1]
                if rng.random() < 0.5:
                    x[k], y[k] = x[k][:, ::-1, :], y[k][:, ::-1, :]
            x, y = torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(y))
            logits = model(x)
            loss = 0.5 * dice(logits, y) + 0.5 * bce(logits, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        sched.step()
        iou = foreground_iou(model, *val)
        best = max(best, (iou, epoch))
        print(f"epoch {epoch}/{args.epochs} loss {np.mean(losses):.4f} val_fg_iou {iou:.4f} ({time.time() - t:.1f}s)",
              flush=True)
    out = {"seed": args.seed, "epochs": args.epochs, "val_fg_iou_last": round(iou, 4),
           "val_fg_iou_best": round(best[0], 4), "best_epoch": best[1]}
    if test is not None:
        out["test_fg_iou_last"] = round(foreground_iou(model, *test), 4)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
