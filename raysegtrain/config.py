"""The typed configuration: the single documented source of every knob.

A config is YAML (or a dict) validated into `Config`. Dotted `key=value` overrides apply to the raw mapping before
validation, so the override and the file are checked by the same rules. Unknown keys are rejected with their full
dotted path and the closest valid name. `Config.to_yaml()` writes the resolved config (credentials
redacted: redaction.py); loading it gives back an equal object, once the credentials are given again. Every default lives here, with its meaning in the field's description (`raysegtrain config --defaults`
prints them all).
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, Optional, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError

ARCHITECTURES = (
    "unet", "unetplusplus", "fpn", "deeplabv3", "deeplabv3plus", "pspnet", "pan", "linknet", "manet", "upernet",
    "segformer", "dpt",
)
ARCH_ALIASES = {"u-net": "unet", "unet++": "unetplusplus", "deeplabv3+": "deeplabv3plus", "link-net": "linknet"}
LOSS_TERMS = ("dice", "jaccard", "focal", "lovasz", "tversky", "bce")
MONITORABLE = ("val_iou", "val_dice", "val_loss", "val_precision", "val_recall", "val_pixel_acc", "val_fg_iou",
               "val_image_iou")


# The keys `fit --resume NAME` may change, and what a change does. A resume trains the run's own config (kept in its
# folder); these keys leave what is trained alone (data, model, loss, optimiser, schedule, batch, workers): they say
# how long it trains, when it stops early, where it is stored, and how the machine feeds and records it. Any other
# key on a resume's command line is refused before Ray starts.
RESUME_SAFE_KEYS: dict[str, str] = {
    "train.epochs": "train for more (or fewer) epochs",
    "train.early_stopping.patience": "stop early after more or fewer epochs without improvement",
    "train.early_stopping.min_delta": "what counts as an improvement for early stopping",
    "data.loader_workers": "DataLoader processes: speed only",
    "data.preflight": "how many files are read before the run continues",
    "data.cache": "decoded images kept in memory or not: speed only",
    "train.compile": "the compiled training step or eager: speed only",
    "train.compile_mode": "torch.compile's mode: speed only",
    "train.compile_backend": "torch.compile's backend",
    "train.compile_cache": "where the compile caches are",
    "optim.fused": "the optimizer's fused kernel or not: speed only",
    "scaling.cpus_per_worker": "CPUs reserved per worker: speed only",
    "scaling.wait_for_resources": "wait for an autoscaler instead of checking the cluster now",
    "run.storage_path": "where to look for the run's folder (where it already is)",
    "run.max_failures": "worker-group restarts after a failure",
    "run.keep_checkpoints": "how many checkpoints stay",
    "run.checkpoint_every": "how often a checkpoint is written",
    "tracking.num_overlays": "validation images drawn with predictions at the end",
    "tracking.log_checkpoint": "whether the best checkpoint goes to MLflow",
}


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _yaml_booleans_as_words(cls, data):
        """YAML 1.1 reads on/off/yes/no/true/false as booleans: give a word-valued field its word back
        (`channels_last: on` means "on", `use_gpu: true` means "true")."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for name, value in data.items():
            field = cls.model_fields.get(name)
            if isinstance(value, bool) and field is not None:
                words = _literal_words(field.annotation)
                for word in (("on", "yes", "true") if value else ("off", "no", "false")):
                    if word in words:
                        data[name] = word
                        break
        return data


def _literal_words(annotation) -> set[str]:
    """The string values a field's type allows as Literal choices (inside Optional/Union too)."""
    if get_origin(annotation) is Literal:
        return {a for a in get_args(annotation) if isinstance(a, str)}
    return set().union(*(_literal_words(a) for a in get_args(annotation))) if get_args(annotation) else set()


# --------------------------------------------------------------------------------------------------------- data
class SyntheticConfig(Section):
    """The embedded procedural industrial-surface defect dataset (used when `data.root` is empty)."""

    variant: Literal["binary", "multiclass"] = Field(
        "binary", description="binary: defect vs background; multiclass: background, scratch, crack, spot")
    size: int = Field(256, ge=32, le=2048, description="side of the generated square images, pixels")
    num_train: int = Field(160, ge=1, description="training images")
    num_val: int = Field(40, ge=1, description="validation images")
    num_test: int = Field(40, ge=0, description="test images")
    seed: int = Field(0, description="generator seed; the same seed always gives the same images")


class DataConfig(Section):
    root: Optional[Path] = Field(
        None, description="dataset folder; empty = the embedded synthetic dataset (generated into the cache)")
    layout: Literal["auto", "split_files", "folders"] = Field(
        "auto", description="split_files: split_dir/{train,val,test}.txt + images_dir + masks_dir; "
                            "folders: images/{split}/ + masks/{split}/; auto: whichever exists")
    images_dir: str = Field("images", description="images folder, relative to root")
    masks_dir: str = Field("masks", description="masks folder, relative to root")
    split_dir: str = Field("splits", description="folder of {split}.txt stem lists, relative to root")
    train_split: str = Field("train", description="name of the training split")
    val_split: str = Field("val", description="name of the validation split")
    test_split: str = Field("test", description="name of the test split")
    num_classes: int = Field(2, ge=2, description="classes including background; 2 = binary segmentation")
    class_names: Optional[list[str]] = Field(None, description="one name per class (metrics, plots, MLflow); default "
                                                                "class_0, class_1, ... (the synthetic set: its own)")
    mask_format: Literal["auto", "binary", "index", "palette"] = Field(
        "auto", description="binary: 0/1 or 0/255; index: pixel = class id; palette: P-mode PNG indices, or RGB "
                            "masks mapped through `palette`; auto: decided per file")
    palette: Optional[list[tuple[int, int, int]]] = Field(
        None, description="RGB colour of each class, for RGB colour masks")
    ignore_index: Optional[int] = Field(
        None, ge=0, le=65535, description="mask value excluded from loss and metrics (e.g. 255 for index masks)")
    in_channels: int = Field(3, ge=1, le=16, description="image channels the model sees (1 = gray, 3 = RGB)")
    image_size: Union[int, tuple[int, int]] = Field(
        256, description="training size (H, W) or one side; multiple of 32 unless resize_policy handles it")
    resize_policy: Literal["resize", "pad_crop", "pad"] = Field(
        "resize", description="resize: scale to image_size; pad_crop: pad to at least image_size then crop "
                              "(random when training); pad: keep native size, pad to a multiple of 32 (batch 1 "
                              "or same-size images)")
    normalize: Literal["imagenet", "dataset", "none"] = Field(
        "imagenet", description="imagenet statistics, the dataset's own (computed on train), or none (0..1)")
    mean: Optional[list[float]] = Field(None, description="explicit per-channel mean (0..1 scale); overrides normalize")
    std: Optional[list[float]] = Field(None, description="explicit per-channel std (0..1 scale); overrides normalize")
    augment: Union[Literal["auto", "none", "light", "default", "strong"], list[dict[str, Any]]] = Field(
        "auto", description="a preset or a list of Albumentations transforms ([{name: HorizontalFlip, p: 0.5}, "
                            "...]). none; light: flips and 90-degree turns only (small datasets); default: "
                            "light + mild affine, brightness/contrast/hue and noise/blur; strong: larger affine "
                            "with shear, elastic/grid distortion, stronger photometry, gamma, noise/blur; auto: "
                            "light when the train split has fewer than 64 images, else default (fit resolves it "
                            "before training, says which, and records the preset in the config it trains, logs "
                            "and checkpoints). docs/augmentation.md lists each preset transform by transform")
    augment_p: float = Field(0.8, ge=0.0, le=1.0, description="probability that the augmentation pipeline is applied")
    class_weights: Union[Literal["none", "auto"], list[float]] = Field(
        "none", description="per-class loss weights: none, auto (inverse sqrt frequency from train masks) or a list")
    loader_workers: Union[int, Literal["auto"]] = Field(
        "auto", description="DataLoader worker processes per training worker; auto = from the CPUs available")
    preflight: Literal["auto", "full", "sample", "first"] = Field(
        "auto", description="files read before a run starts: full = every train/val pair, sample = 200 of them, "
                            "first = one; auto = full up to 2000 pairs, else sample (`data check` reads all)")
    cache: Literal["none", "memory"] = Field(
        "none", description="memory: decode each image once and keep it (small datasets, epoch > decode cost)")
    synthetic: SyntheticConfig = Field(default_factory=SyntheticConfig)

    @field_validator("image_size")
    @classmethod
    def _size_positive(cls, v):
        sides = (v, v) if isinstance(v, int) else v
        if any(s < 32 for s in sides):
            raise ValueError("each side must be at least 32")
        return v

    @property
    def size_hw(self) -> tuple[int, int]:
        return (self.image_size, self.image_size) if isinstance(self.image_size, int) else tuple(self.image_size)

    @property
    def binary(self) -> bool:
        return self.num_classes == 2

    @model_validator(mode="after")
    def _consistent(self):
        if self.resize_policy != "pad" and any(s % 32 for s in self.size_hw):
            raise ValueError(f"image_size {self.image_size} must be a multiple of 32 for smp models "
                             f"(or set resize_policy: pad)")
        if self.class_names is not None and len(self.class_names) != self.num_classes:
            raise ValueError(f"class_names has {len(self.class_names)} names for num_classes={self.num_classes}")
        if isinstance(self.class_weights, list) and len(self.class_weights) != self.num_classes:
            raise ValueError(f"class_weights has {len(self.class_weights)} values for num_classes={self.num_classes}")
        if isinstance(self.class_weights, list) and any(w < 0 for w in self.class_weights):
            raise ValueError("class_weights must be >= 0")
        if self.palette is not None and len(self.palette) != self.num_classes:
            raise ValueError(f"palette has {len(self.palette)} colours for num_classes={self.num_classes}")
        for name in ("mean", "std"):
            v = getattr(self, name)
            if v is not None and len(v) != self.in_channels:
                raise ValueError(f"{name} has {len(v)} values for in_channels={self.in_channels}")
        if self.std is not None and any(s <= 0 for s in self.std):
            raise ValueError("std values must be > 0")
        if self.ignore_index is not None and self.ignore_index < self.num_classes:
            raise ValueError(f"ignore_index {self.ignore_index} collides with a class id (num_classes="
                             f"{self.num_classes})")
        return self

    @model_validator(mode="before")
    @classmethod
    def _synthetic_classes(cls, data):
        # the multiclass synthetic set has 4 classes: follow it unless the user gave num_classes
        if isinstance(data, dict) and not data.get("root") and "num_classes" not in data:
            syn = data.get("synthetic")
            variant = syn.get("variant") if isinstance(syn, dict) else getattr(syn, "variant", None)
            if variant == "multiclass":
                data = {**data, "num_classes": 4}
        return data

    def names(self) -> list[str]:
        """class_names; for the embedded synthetic set its own (background, defect / scratch, crack, spot); else
        class_0, class_1, ..."""
        if self.class_names:
            return list(self.class_names)
        if not self.root:
            from .data.synthetic import class_names

            names = class_names(self.synthetic.variant)
            if len(names) == self.num_classes:
                return list(names)
        return [f"class_{i}" for i in range(self.num_classes)]


# -------------------------------------------------------------------------------------------------------- model
class ModelConfig(Section):
    arch: str = Field("unet", description=f"smp architecture: {', '.join(ARCHITECTURES)}")
    encoder: str = Field("resnet34", description="any smp encoder name, or a timm one as tu-<name>")
    encoder_weights: Optional[str] = Field(
        None, description="none, 'imagenet' (downloads: needs network), or a path to a local encoder state dict")
    encoder_depth: int = Field(5, ge=3, le=5, description="encoder stages used by the decoder")
    freeze_encoder_epochs: int = Field(0, ge=0, description="train only the decoder for this many first epochs")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="extra keyword arguments for smp.create_model")

    @field_validator("arch")
    @classmethod
    def _arch(cls, v: str) -> str:
        key = ARCH_ALIASES.get(v.lower(), v.lower())
        if key not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {v!r}{suggest(v.lower(), ARCHITECTURES)}")
        return key

    @field_validator("encoder_weights")
    @classmethod
    def _weights(cls, v):
        return None if v is None or str(v).lower() in ("", "none", "null") else v


# --------------------------------------------------------------------------------------------------------- loss
class LossConfig(Section):
    """Weighted sum of smp.losses terms. Naming any weight sets the whole mix: unnamed terms get 0."""

    dice: float = Field(0.5, ge=0, description="smp DiceLoss weight")
    jaccard: float = Field(0.0, ge=0, description="smp JaccardLoss (soft IoU) weight")
    focal: float = Field(0.0, ge=0, description="smp FocalLoss weight")
    lovasz: float = Field(0.0, ge=0, description="smp LovaszLoss weight")
    tversky: float = Field(0.0, ge=0, description="smp TverskyLoss weight")
    bce: float = Field(0.5, ge=0, description="cross-entropy weight: BCE for binary, CE for multiclass (class-weighted)")
    focal_gamma: float = Field(2.0, ge=0, description="focal loss gamma")
    focal_alpha: Optional[float] = Field(None, ge=0, le=1, description="focal loss alpha (binary)")
    tversky_alpha: float = Field(0.5, ge=0, le=1, description="Tversky false-positive weight")
    tversky_beta: float = Field(0.5, ge=0, le=1, description="Tversky false-negative weight")
    smooth: float = Field(0.0, ge=0, description="smoothing added to Dice/Jaccard/Tversky numerator and denominator")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="label smoothing of the cross-entropy term")

    @model_validator(mode="before")
    @classmethod
    def _mix(cls, data):
        if isinstance(data, dict) and any(t in data for t in LOSS_TERMS):
            data = {**{t: 0.0 for t in LOSS_TERMS}, **data}
        return data

    @model_validator(mode="after")
    def _nonzero(self):
        if not any(getattr(self, t) > 0 for t in LOSS_TERMS):
            raise ValueError(f"at least one loss weight ({', '.join(LOSS_TERMS)}) must be > 0")
        return self

    def terms(self) -> dict[str, float]:
        return {t: getattr(self, t) for t in LOSS_TERMS if getattr(self, t) > 0}


# ---------------------------------------------------------------------------------------------------- optimizer
class LRFinderConfig(Section):
    """The LR range test (`raysegtrain lr-find`, and `optim.lr: auto`): lr_finder.py has the rule."""

    min_lr: float = Field(1e-7, gt=0, description="learning rate of the range test's first step")
    max_lr: float = Field(1.0, gt=0, le=100, description="learning rate of its last step")
    steps: int = Field(100, ge=10, le=1000, description="optimizer steps at most (it stops earlier on divergence)")
    smoothing: float = Field(0.8, ge=0, lt=1, description="loss smoothing: exponential moving average factor")
    diverge: float = Field(4.0, gt=1, description="stop once the smoothed loss exceeds this multiple of its minimum")

    @model_validator(mode="after")
    def _range(self):
        if self.max_lr <= self.min_lr:
            raise ValueError(f"max_lr ({self.max_lr}) must be > min_lr ({self.min_lr})")
        return self


class OptimConfig(Section):
    name: Literal["adam", "adamw", "sgd"] = Field("adamw", description="optimizer")
    lr: Union[float, Literal["auto"]] = Field(
        1e-3, description="base learning rate (per worker; not scaled with workers; the default suits training "
                          "from scratch, docs/benchmarks.md 2026-12-04); auto: an LR range test "
                          "(optim.lr_finder) runs first and its suggestion (the lr at the smoothed loss's minimum / "
                          "10) is used and recorded (MLflow param lr_find.suggestion)")
    lr_finder: LRFinderConfig = Field(default_factory=LRFinderConfig)
    weight_decay: float = Field(1e-4, ge=0, description="weight decay")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum")
    nesterov: bool = Field(False, description="SGD Nesterov momentum")
    betas: tuple[float, float] = Field((0.9, 0.999), description="Adam/AdamW betas")
    encoder_lr_mult: float = Field(1.0, gt=0, description="encoder learning rate = lr * encoder_lr_mult")
    fused: Literal["auto", "on", "off"] = Field(
        "auto", description="the optimizer's fused CUDA kernel (one launch for every parameter); auto: on GPUs")


    @field_validator("lr")
    @classmethod
    def _lr_range(cls, v):
        if v != "auto" and not 0 < v <= 10:
            raise ValueError(f"Input should be greater than 0 and at most 10, or auto (got {v})")
        return v


class ScheduleConfig(Section):
    name: Literal["none", "plateau", "cosine", "step", "poly", "onecycle"] = Field(
        "cosine", description="learning-rate schedule, stepped after every optimizer step (so warm-up and cosine are smooth within "
                    "an epoch); plateau steps after each validation")
    warmup_epochs: float = Field(0.0, ge=0, description="linear warm-up from lr*warmup_start_factor (not onecycle)")
    warmup_start_factor: float = Field(0.1, gt=0, le=1, description="lr fraction at the start of warm-up")
    min_lr: float = Field(1e-6, ge=0, description="floor for cosine/poly/plateau")
    step_size: int = Field(10, ge=1, description="step: epochs between decays")
    gamma: float = Field(0.1, gt=0, le=1, description="step/plateau: decay factor")
    patience: int = Field(3, ge=0, description="plateau: epochs without improvement before decay")
    power: float = Field(0.9, gt=0, description="poly: exponent")
    pct_start: float = Field(0.3, gt=0, lt=1, description="onecycle: fraction of steps spent increasing lr")


# ----------------------------------------------------------------------------------------------------- training
class EarlyStoppingConfig(Section):
    patience: Optional[int] = Field(10, ge=0, description="epochs without improvement before stopping; null = never")
    min_delta: float = Field(0.0, ge=0, description="smallest change that counts as improvement")


class TrainConfig(Section):
    epochs: int = Field(30, ge=1, le=100000, description="maximum epochs")
    batch_size: int = Field(8, ge=1, description="batch size per worker (global = batch_size * scaling.num_workers)")
    val_batch_size: Optional[int] = Field(None, ge=1, description="validation batch size; default = batch_size")
    grad_accum: int = Field(1, ge=1, description="optimizer step every N batches")
    grad_clip: Optional[float] = Field(None, gt=0, description="clip gradient norm to this value")
    amp: Literal["auto", "bf16", "fp16", "off"] = Field(
        "auto", description="mixed precision: auto = bf16 on GPUs that support it, fp16 on older GPUs, off on CPU")
    channels_last: Literal["auto", "on", "off"] = Field("auto", description="channels_last memory format (GPU)")
    monitor: str = Field(
        "auto", description=f"metric for best checkpoint and early stopping: {MONITORABLE}, val_iou_<class> or "
                            "val_dice_<class>. auto: val_fg_iou (the foreground class's IoU) for binary tasks, "
                            "val_iou for multi-class. val_iou and val_dice are macro means over every class, "
                            "background included, that the split's targets or predictions hold (a model that "
                            "predicts background everywhere scores ~0.5 val_iou on a binary task)")
    mode: Literal["auto", "max", "min"] = Field("auto", description="auto: min for losses, max otherwise")
    early_stopping: EarlyStoppingConfig = Field(default_factory=EarlyStoppingConfig)
    seed: int = Field(42, description="seed for weights, sampling and augmentation")
    deterministic: bool = Field(False, description="deterministic algorithms (slower)")
    cudnn_benchmark: Literal["auto", "on", "off"] = Field(
        "auto", description="cuDNN autotuning: each new input shape and layer is timed once per process, then runs "
                            "its fastest algorithm. auto: on unless deterministic; a study's default is off (a short "
                            "trial can spend longer autotuning than training)")
    val_every: int = Field(1, ge=1, description="validate every N epochs (and on the last)")
    threshold: float = Field(0.5, gt=0, lt=1, description="binary: probability threshold for metrics")
    max_steps_per_epoch: Optional[int] = Field(None, ge=1, description="cap on training steps per epoch (smoke runs)")
    compile: Literal["auto", "on", "off"] = Field(
        "auto", description="torch.compile the training step (forward, loss mix, backward) and validation's forward. "
                            "auto: on for GPU runs that train at least 40000 images (enough to repay a first "
                            "compile; later runs on the same shapes start from the compile cache), off on CPU. If "
                            "compiling fails the run says so and continues eager")
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = Field(
        "default", description="torch.compile mode (max-autotune: slower warm-up, sometimes faster steps)")
    compile_backend: str = Field(
        "inductor", description="torch.compile backend (inductor; aot_eager or eager only to debug the capture)")
    compile_cache: str = Field(
        "auto", description="folder of the compile caches (inductor, Triton), so that a later run on the same shapes "
                            "starts warm; auto: compile/ in the raysegtrain cache (RAYSEGTRAIN_CACHE). On a cluster, "
                            "a folder every node shares")

    @field_validator("monitor")
    @classmethod
    def _monitor(cls, v: str) -> str:
        if v != "auto" and v not in MONITORABLE and not v.startswith("val_iou_") and not v.startswith("val_dice_"):
            raise ValueError(f"unknown metric {v!r}{suggest(v, MONITORABLE)}")
        return v

    @property
    def monitor_mode(self) -> str:
        return monitor_mode(self.monitor, None if self.mode == "auto" else self.mode)


def default_monitor(num_classes: int) -> str:
    """`train.monitor: auto`: the foreground IoU for binary tasks (a macro mean with background in it rewards
    predicting nothing), the macro-mean IoU for multi-class."""
    return "val_fg_iou" if num_classes == 2 else "val_iou"


def monitor_mode(metric: str, mode: str | None = None) -> str:
    """Whether METRIC is better high ("max") or low ("min"): MODE when given, else min for losses, max otherwise.
    The one rule for fit's monitor and a study's objective."""
    return mode or ("min" if metric.endswith("loss") else "max")


# ------------------------------------------------------------------------------------------ scaling / run / mlflow
class ScalingSettings(Section):
    """The `scaling` section (named so as not to be read as Ray's `ScalingConfig`, which fit builds from it)."""

    num_workers: int = Field(1, ge=1, description="Ray Train workers (DDP ranks)")
    use_gpu: Literal["auto", "true", "false"] = Field(
        "auto", description="auto: GPUs when the cluster has them; true: require them; false: CPU (gloo)")
    gpus_per_worker: float = Field(1.0, gt=0, description="GPUs per worker; fractions share a GPU")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved per worker (loader workers use more)")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="how workers are placed across nodes")
    sync_batchnorm: bool = Field(False, description="SyncBatchNorm across GPU workers (GPU only)")
    wait_for_resources: bool = Field(
        False, description="skip the check against what the cluster has now and let the autoscaler add nodes "
                           "(use_gpu=auto then means GPUs)")


class RunSettings(Section):
    """The `run` section (named so as not to be read as Ray's `RunConfig`, which fit builds from it)."""

    preset: Literal["auto", "full", "cpu"] = Field(
        "auto", description="run size. full: the defaults as they stand (sized for a GPU); cpu: a run of a few "
                            "minutes on CPU (unet/resnet18, 128² synthetic images and image_size, 96 train / 32 val "
                            "/ 16 test images, batch 4, lr 0.001, 12 epochs; a local Ray's CPUs for the workers) for "
                            "each of those keys not set explicitly; auto: cpu when the run will have no GPU and none "
                            "of those keys (the CPUs aside) nor data.root is set, else full. fit records what it "
                            "chose (cpu or full) in the config it trains, logs and checkpoints")
    name: Optional[str] = Field(None, description="run name; default fit-<date>-<time>-<4 hex>; reserved when the run "
                                                  "starts (its folder created), reused only with --resume")
    storage_path: str = Field("runs", description="checkpoints and Ray results: local folder, NFS path, s3:// or gs://; "
                                                  "keys in the URL are used, and written nowhere (shown as ***)")
    max_failures: int = Field(0, ge=-1, description="worker-group restarts after a failure (-1 = unlimited)")
    keep_checkpoints: int = Field(2, ge=1, description="checkpoints kept by Ray (best by monitor and the latest)")
    checkpoint_every: int = Field(
        1, ge=0, description="epochs between checkpoints; an improvement of the monitored metric and the run's last "
                             "epoch always checkpoint, 0 = only those (a study's default: its trials' epochs are "
                             "short, and a resume replays the epochs since the best exactly)")

    @field_validator("name")
    @classmethod
    def _name(cls, v):
        if v is not None and (not v or "/" in v or v.startswith(".")):
            raise ValueError(f"run name {v!r} must be non-empty, without '/', not starting with '.'")
        return v


class TrackingConfig(Section):
    enabled: bool = Field(True, description="log runs to MLflow")
    tracking_uri: Optional[str] = Field(
        None, description="MLflow tracking URI; default $MLFLOW_TRACKING_URI or sqlite:///mlflow.db. A password in it "
                          "(http://user:password@host) is used, and written nowhere (shown as ***)")
    experiment: str = Field("raysegtrain", description="MLflow experiment name")
    study_experiment: Optional[str] = Field(
        None, description="MLflow experiment of a study's runs (tune); default <experiment>/<study name>: each study "
                          "in its own experiment, apart from fits (set it to the experiment's name to share one)")
    log_checkpoint: bool = Field(True, description="log the best checkpoint as an artifact")
    num_overlays: int = Field(4, ge=0, le=64, description="validation images drawn with predictions")


class Config(Section):
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    scaling: ScalingSettings = Field(default_factory=ScalingSettings)
    run: RunSettings = Field(default_factory=RunSettings)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="after")
    def _cross(self):
        if self.schedule.warmup_epochs >= self.train.epochs and self.schedule.warmup_epochs > 0:
            raise ValueError(f"schedule.warmup_epochs ({self.schedule.warmup_epochs}) must be < train.epochs "
                             f"({self.train.epochs})")
        if self.train.monitor == "auto":
            self.train.monitor = default_monitor(self.data.num_classes)
        m = self.train.monitor
        if m == "val_fg_iou" and self.data.num_classes != 2:
            raise ValueError(f"train.monitor val_fg_iou is for binary tasks (data.num_classes=2); with "
                             f"{self.data.num_classes} classes use val_iou or val_iou_<class>")
        for prefix in ("val_iou_", "val_dice_"):
            if m.startswith(prefix) and m[len(prefix):] not in self.data.names():
                raise ValueError(f"train.monitor {m!r}: no class {m[len(prefix):]!r} in {self.data.names()}")
        return self

    # -- I/O ---------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return self.model_dump(mode="json")

    def redacted_dict(self) -> dict:
        """`to_dict` with every credential replaced by the placeholder (redaction.py): what is written anywhere."""
        from .redaction import redact_config_dict

        return redact_config_dict(self.to_dict())

    def to_yaml(self, path: str | Path | None = None) -> str:
        """The config as YAML, credentials redacted (a config that is written is read by others); loading it asks
        for them again (`redaction.supply_redacted`)."""
        text = yaml.safe_dump(self.redacted_dict(), sort_keys=False)
        if path is not None:
            Path(path).write_text(text)
        return text

    def flat(self) -> dict[str, Any]:
        """Dotted-key view, e.g. {'model.arch': 'unet', ...} (MLflow params), credentials redacted."""
        return flatten(self.redacted_dict())


# ------------------------------------------------------------------------------------------------------ loading
def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def parse_value(text: str) -> Any:
    """`key=value` right-hand sides are YAML scalars/lists: 3e-4, true, null, [256, 256], unet."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(raw: dict, overrides: list[str] | dict[str, Any]) -> dict:
    """Set dotted keys in a nested mapping (a copy). Accepts ['a.b=1', ...] or {'a.b': 1}."""
    import copy

    raw = copy.deepcopy(raw)
    items = overrides.items() if isinstance(overrides, dict) else [split_override(o) for o in overrides]
    for key, value in items:
        parts = key.split(".")
        node = raw
        for i, p in enumerate(parts[:-1]):
            nxt = node.get(p)
            if nxt is None:
                nxt = node[p] = {}
            elif not isinstance(nxt, dict):
                raise ConfigError(f"{'.'.join(parts[:i + 1])} is a value, not a section (in override {key!r})")
            node = nxt
        node[parts[-1]] = value
    return raw


def split_override(text: str) -> tuple[str, Any]:
    """`key=value` as (key, parsed value)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value (e.g. optim.lr=3e-4)")
    key, value = text.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key")
    return key, parse_value(value)


def load_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{p}: not valid YAML{where}: {getattr(e, 'problem', e)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of sections (data:, model:, ...)")
    return data


def build(raw: dict | None = None, overrides: list[str] | dict | None = None, source: str = "config",
          supply_redacted: bool = True) -> Config:
    """The config of RAW plus OVERRIDES. A value saved with its credential redacted must be given again (on the
    command line or in the environment: `redaction.supply_redacted`) unless SUPPLY_REDACTED is false, for a
    caller that uses none of the keys that carry credentials (evaluate)."""
    raw = apply_overrides(raw or {}, overrides or [])
    if supply_redacted:
        from .redaction import supply_redacted as supply

        raw = supply(raw, source)
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(f"{source}: {format_validation_error(e)}") from None


def load(path: str | Path | None = None, overrides: list[str] | dict | None = None) -> Config:
    """Config from an optional YAML file plus dotted overrides."""
    raw = load_yaml(path) if path else {}
    return build(raw, overrides, source=str(path) if path else "config")


def format_validation_error(e: ValidationError, root: type[BaseModel] = Config,
                            misplaced: Mapping[str, str] | None = None) -> str:
    """First error only, as `dotted.path: message`, with a close-match hint for an unknown key. `root` is the model
    that was validated (`Config`, or a space file's settings); `misplaced` maps top-level keys that belong somewhere
    else to where they go, said instead of a close match."""
    err = e.errors()[0]
    # pydantic puts validator and union branch names (e.g. 'function-after[...]', 'int', 'list[...]') into loc
    loc = [str(p) for p in err["loc"] if not str(p).startswith("function-") and not is_type_tag(str(p))]
    path = ".".join(loc) or "(top level)"
    if err["type"] == "extra_forbidden":
        if len(loc) == 1 and misplaced and loc[0] in misplaced:
            return f"unknown key {path!r}: {misplaced[loc[0]]}"
        parent = _model_at(root, loc[:-1])
        prefix = ".".join(loc[:-1]) + "." if len(loc) > 1 else ""
        hint = suggest(loc[-1], list(parent.model_fields), prefix) if parent else ""
        return f"unknown key {path!r}{hint}"
    if err["type"] == "missing":
        return f"{path}: required"
    msg = err["msg"].removeprefix("Value error, ")
    return f"{path}: {msg}" if err["type"] == "value_error" else f"{path}: {msg} (got {err.get('input')!r})"


def is_type_tag(p: str) -> bool:
    """A union branch name that pydantic puts into an error's loc ('int', 'list[...]'), not a key."""
    return p in ("int", "str", "float", "bool") or p.startswith(("list[", "dict[", "tuple[", "literal["))


def _model_at(model: type[BaseModel], loc: list[str]) -> type[BaseModel] | None:
    """The section model at `loc` under `model` (through Optional/Union fields), or None if `loc` is not a section."""
    for key in loc:
        ann = getattr(model.model_fields.get(key), "annotation", None)
        ann = next((a for a in get_args(ann) if is_section(a)), ann)
        if not is_section(ann):
            return None
        model = ann
    return model


def suggest(word: str, options, prefix: str = "") -> str:
    """' (did you mean PREFIX+closest?)', or '' when nothing in `options` is close to `word`."""
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.5)
    return f" (did you mean {prefix + close[0]!r}?)" if close else ""


# ------------------------------------------------------------------------------------------------------- key schema
@lru_cache(maxsize=1)
def all_config_keys() -> tuple[str, ...]:
    """Every dotted leaf key of `Config` (data.synthetic.size, model.arch, ...)."""
    def walk(model: type[BaseModel], prefix: str):
        for name, f in model.model_fields.items():
            if is_section(f.annotation):
                yield from walk(f.annotation, f"{prefix}{name}.")
            else:
                yield f"{prefix}{name}"

    return tuple(walk(Config, ""))


def is_section(annotation) -> bool:
    """A field annotation that is a nested model (a config section), not a value."""
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def is_mapping_field(annotation) -> bool:
    """A dict-valued field (e.g. model.kwargs), whose own keys are free."""
    return get_origin(annotation) is dict or annotation is dict


def check_config_key(key: str, loc: str) -> None:
    """A dotted key must name a leaf of `Config` (or a key inside a dict-valued field such as model.kwargs)."""
    model: type[BaseModel] = Config
    parts = key.split(".")
    for i, part in enumerate(parts):
        f = model.model_fields.get(part)
        if f is None:
            raise ConfigError(f"{loc}: unknown config key {key!r}{close_key(key)}")
        if is_section(f.annotation):
            model = f.annotation
            if i == len(parts) - 1:
                raise ConfigError(f"{loc}: {key!r} is a config section, not a key; search its keys "
                                  f"(e.g. {next(k for k in all_config_keys() if k.startswith(key + '.'))!r})")
            continue
        if i < len(parts) - 1 and not is_mapping_field(f.annotation):
            prefix = ".".join(parts[:i + 1])
            raise ConfigError(f"{loc}: {prefix!r} is a value, not a section (in {key!r})")
        return


def close_key(key: str) -> str:
    """' (did you mean KEY?)' for the closest dotted key, else one with the same last part; '' when none."""
    close = difflib.get_close_matches(key, all_config_keys(), n=1, cutoff=0.6)
    if not close:
        leaf = key.rsplit(".", 1)[-1]
        close = [k for k in all_config_keys() if k.rsplit(".", 1)[-1] == leaf][:1]
    return f" (did you mean {close[0]!r}?)" if close else ""


def describe_defaults() -> str:
    """Every field, its default and its description, as commented YAML-ish text."""
    lines: list[str] = []

    def walk(model: type[BaseModel], prefix: str):
        for name, f in model.model_fields.items():
            ann = f.annotation
            if is_section(ann):
                walk(ann, f"{prefix}{name}.")
                continue
            default = f.get_default(call_default_factory=True)
            if isinstance(default, float) and (default == 0 or 1e-3 <= abs(default) < 1e4):
                shown = repr(default)
            elif isinstance(default, float) and math.isfinite(default):
                shown = f"{default:g}"
            else:
                shown = yaml.safe_dump(default, default_flow_style=True).strip().removesuffix("...").strip()
            on_resume = " [fit --resume may change it]" if f"{prefix}{name}" in RESUME_SAFE_KEYS else ""
            lines.append(f"{prefix}{name} = {shown}    # {f.description or ''}{on_resume}")

    walk(Config, "")
    return "\n".join(lines)
