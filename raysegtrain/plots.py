"""PNG figures for a run: loss/metric curves, confusion matrix, predictions overlaid on validation images."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

VIZ_FILE = "viz.npz"  # written next to a checkpoint: a few validation images, masks, predictions, confusion matrix


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def curves(history: Sequence[dict], monitor: str, path: str | Path) -> None:
    plt = _pyplot()
    epochs = [h["epoch"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for key in ("train_loss", "val_loss"):
        pts = [(e, h[key]) for e, h in zip(epochs, history) if key in h]
        if pts:
            ax1.plot(*zip(*pts), marker="o", label=key)
    ax1.set_xlabel("epoch"), ax1.set_title("loss"), ax1.legend()
    for key in dict.fromkeys(("val_iou", "val_dice", monitor)):
        pts = [(e, h[key]) for e, h in zip(epochs, history) if key in h]
        if pts:
            ax2.plot(*zip(*pts), marker="o", label=key)
    ax2.set_xlabel("epoch"), ax2.set_title("validation"), ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def confusion_matrix(cm: np.ndarray, names: Sequence[str], path: str | Path) -> None:
    plt = _pyplot()
    cm = np.asarray(cm, dtype=np.float64)
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    n = len(names)
    fig, ax = plt.subplots(figsize=(2 + 0.8 * n, 1.5 + 0.8 * n))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), names, rotation=45, ha="right"), ax.set_yticks(range(n), names)
    ax.set_xlabel("predicted"), ax.set_ylabel("true"), ax.set_title("confusion (row-normalised)")
    for i in range(n):
        for j in range(n):
            ax.text(j, i, f"{norm[i, j]:.2f}", ha="center", va="center", color="white" if norm[i, j] > .5 else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def class_colours(num_classes: int) -> np.ndarray:
    base = np.array([[0, 0, 0], [255, 64, 64], [64, 255, 64], [64, 128, 255], [255, 220, 0], [255, 0, 255],
                     [0, 255, 255], [255, 128, 0]], dtype=np.uint8)
    reps = -(-num_classes // len(base))
    return np.tile(base, (reps, 1))[:num_classes]


def overlay(image: np.ndarray, mask: np.ndarray, num_classes: int, alpha: float = 0.45) -> np.ndarray:
    """Colour the non-background classes of MASK over IMAGE (uint8 HxWx3)."""
    colours = class_colours(num_classes)
    out = image.astype(np.float32).copy()
    fg = (mask > 0) & (mask < num_classes)
    out[fg] = (1 - alpha) * out[fg] + alpha * colours[mask[fg]]
    return out.astype(np.uint8)


def overlays(images: np.ndarray, masks: np.ndarray, preds: np.ndarray, num_classes: int, path: str | Path) -> None:
    plt = _pyplot()
    n = len(images)
    fig, axes = plt.subplots(n, 2, figsize=(6, 3 * n), squeeze=False)
    for i in range(n):
        axes[i, 0].imshow(overlay(images[i], masks[i], num_classes)), axes[i, 0].set_title("ground truth")
        axes[i, 1].imshow(overlay(images[i], preds[i], num_classes)), axes[i, 1].set_title("prediction")
        for ax in axes[i]:
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def to_display(images: np.ndarray) -> np.ndarray:
    """NCHW images → uint8 NHWC (gray repeated to RGB). uint8 images are the pixels themselves and are shown as they
    are; float images (normalised model input) are stretched per image (min-max)."""
    if images.dtype == np.uint8:
        x = np.transpose(images, (0, 2, 3, 1))
        if x.shape[-1] == 1:
            x = np.repeat(x, 3, axis=-1)
        return np.ascontiguousarray(x[..., :3])
    x = images.astype(np.float32)
    lo = x.min(axis=(1, 2, 3), keepdims=True)
    hi = x.max(axis=(1, 2, 3), keepdims=True)
    x = (x - lo) / np.maximum(hi - lo, 1e-6)
    x = np.transpose(x, (0, 2, 3, 1))
    if x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    return (x[..., :3] * 255).round().astype(np.uint8)


def from_viz_file(viz: str | Path, names: Sequence[str], out_dir: str | Path) -> None:
    data = np.load(viz)
    out_dir = Path(out_dir)
    confusion_matrix(data["confusion"], names, out_dir / "confusion_matrix.png")
    if len(data["images"]):
        overlays(data["images"], data["masks"], data["preds"], len(names), out_dir / "overlays.png")


def lr_range_test(lrs: Sequence[float], losses: Sequence[float], smoothed: Sequence[float], suggestion: float,
                  min_loss_lr: float, path: str | Path) -> None:
    """Loss against learning rate (log scale): raw and smoothed, the minimum and the suggestion marked."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(lrs, losses, alpha=0.35, label="loss")
    ax.plot(lrs, smoothed, label="smoothed loss")
    ax.axvline(min_loss_lr, color="grey", linestyle=":", label=f"min smoothed loss ({min_loss_lr:.2g})")
    ax.axvline(suggestion, color="red", linestyle="--", label=f"suggestion ({suggestion:.2g})")
    finite = [s for s in smoothed if np.isfinite(s)]
    if finite:  # a diverging tail would squash the curve
        ax.set_ylim(min(finite) * 0.9, min(max(finite), 4 * min(finite)) * 1.1)
    ax.set_xscale("log"), ax.set_xlabel("learning rate"), ax.set_ylabel("training loss")
    ax.set_title("LR range test"), ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def repeat_plot(labels: Sequence[str], values: Sequence[Sequence[float]], means: Sequence[float | None],
                intervals: Sequence, metric: str, path: str | Path) -> None:
    """Each config's runs over seeds (dots), its mean (bar) and 95 % interval (error bar), best first."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * max(1, len(labels)), 4))
    for i, (vals, mean, ci) in enumerate(zip(values, means, intervals)):
        ax.scatter([i] * len(vals), vals, color="grey", alpha=0.7, zorder=3)
        if mean is not None:
            err = [[mean - ci[0]], [ci[1] - mean]] if ci else None
            ax.errorbar([i], [mean], yerr=err, fmt="o", color="red", capsize=6, zorder=4)
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    ax.set_ylabel(metric), ax.set_title("repeat-best: runs over seeds, mean and 95 % interval")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
