"""The segmentation model: `smp.create_model` plus encoder weights, early validation, freezing and parameter groups.

Encoder weights (`model.encoder_weights`):
- none: random initialisation.
- a hub name such as 'imagenet': smp's own download (Hugging Face hub); offline this is a `ModelError` naming the
  local-file option. For `tu-` (timm) encoders the pretrained tag belongs in the name (`tu-resnet18.a1_in1k`) and
  the only accepted value is 'imagenet' (= timm's default tag).
- a path to a local state dict (.pth/.pt/.bin/.safetensors): the model is created without weights and the file is
  loaded into `model.encoder`. Accepted: an encoder state dict, a full classifier state dict from torchvision or timm
  (head tensors such as `fc.*`/`classifier.*` are skipped), a full smp model or a checkpoint dict with a `model` /
  `state_dict` entry. Tensors are matched by name (also with the `model.` prefix that smp's timm encoders add), or,
  when names differ but the encoder's tensors are an in-order, same-shape prefix of the file's (e.g. TF-ported
  EfficientNet-Lite0 onto `tu-tf_efficientnet_lite0`), by position. At least `MIN_MATCHED_FRACTION` of the encoder's
  tensors must be found; a 3-channel first convolution is adapted to other `data.in_channels` the way timm does.

`encoder_depth` is applied to every architecture (dpt: at most DPT_MAX_DEPTH); decoder arguments whose smp default
assumes one depth are derived from it unless given in `model.kwargs` (see `_depth_defaults`).
"""

from __future__ import annotations

import difflib
import inspect
import logging
import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

import segmentation_models_pytorch as smp
import torch
from torch import nn

from .config import Config
from .errors import ModelError, one_line

log = logging.getLogger(__name__)

MIN_MATCHED_FRACTION = 0.9
# DPT is designed around 4 tapped ViT blocks (smp's default); a 5th needs sides divisible by 64, so the config's
# generic default depth 5 means 4 for dpt
DPT_MAX_DEPTH = 4
WEIGHT_FILE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors")
# create_model arguments owned by other config fields, or that would break losses/metrics (they expect raw logits of
# one tensor)
RESERVED_KWARGS = {
    "encoder_name": "model.encoder", "encoder_weights": "model.encoder_weights", "encoder_depth": "model.encoder_depth",
    "in_channels": "data.in_channels", "classes": "data.num_classes",
    "activation": "nothing: the model must return logits (losses and metrics apply sigmoid/softmax)",
    "aux_params": "nothing: an auxiliary classification head is not supported",
}


# ------------------------------------------------------------------------------------------------------ building
def build_model(cfg: Config) -> nn.Module:
    """The smp model of `cfg`, with its encoder weights. Output: logits (N, 1 or num_classes, H, W)."""
    source = weights_source(cfg.model.encoder_weights)
    hub_weights = _hub_weights_argument(cfg) if source == "hub" else None
    model = _create(cfg, hub_weights)
    if source == "file":
        log.info(load_encoder_weights(model, cfg.model.encoder_weights, cfg.model.encoder, cfg.data.in_channels))
    return model


def num_outputs(cfg: Config) -> int:
    return 1 if cfg.data.binary else cfg.data.num_classes


def create_model_kwargs(cfg: Config) -> dict:
    """Everything `smp.create_model` receives except arch, encoder name and weights."""
    m = cfg.model
    bad = [k for k in m.kwargs if k in RESERVED_KWARGS]
    if bad:
        raise ModelError(f"model.kwargs.{bad[0]} is not allowed here; use {RESERVED_KWARGS[bad[0]]}")
    _check_kwargs_are_used(m.arch, m.encoder, m.kwargs)
    depth = min(m.encoder_depth, DPT_MAX_DEPTH) if m.arch == "dpt" else m.encoder_depth
    return dict(in_channels=cfg.data.in_channels, classes=num_outputs(cfg), encoder_depth=depth,
                **{**_depth_defaults(m.arch, depth), **m.kwargs})


def _check_kwargs_are_used(arch: str, encoder: str, kwargs: dict) -> None:
    # create_model passes unknown keyword arguments on to the encoder; smp's own encoders drop them silently, timm's
    # (tu-) reject what they do not know
    if encoder.startswith("tu-"):
        return
    known = inspect.signature(smp.MODEL_ARCHITECTURES_MAPPING[arch].__init__).parameters
    unknown = [k for k in kwargs if k not in known]
    if unknown:
        hint = difflib.get_close_matches(unknown[0], list(known), n=1)
        raise ModelError(f"model.kwargs.{unknown[0]} is not an argument of {arch} (encoder {encoder} takes none)"
                         + (f"; did you mean {hint[0]!r}?" if hint else ""))


def _depth_defaults(arch: str, depth: int) -> dict:
    """smp defaults that only fit one encoder depth, rewritten for `depth` (model.kwargs still wins).

    unet/unetplusplus/manet want one decoder channel count per stage; pspnet upsamples by a fixed 8 (its default
    depth is 3), which would return 1/4-size masks at depth 5; dpt wants one intermediate channel count per tapped
    ViT block.
    """
    if arch in ("unet", "unetplusplus", "manet"):
        return {"decoder_channels": tuple(_arch_default(arch, "decoder_channels"))[:depth]}
    if arch == "pspnet":
        return {"upsampling": 2 ** depth}
    if arch == "dpt":
        return {"decoder_intermediate_channels": tuple(_arch_default(arch, "decoder_intermediate_channels"))[:depth]}
    return {}


def _arch_default(arch: str, parameter: str):
    return inspect.signature(smp.MODEL_ARCHITECTURES_MAPPING[arch].__init__).parameters[parameter].default


def _create(cfg: Config, encoder_weights) -> nn.Module:
    m = cfg.model
    try:
        return smp.create_model(m.arch, encoder_name=m.encoder, encoder_weights=encoder_weights,
                                **create_model_kwargs(cfg))
    except ModelError:
        raise
    except Exception as e:
        if encoder_weights is not None and _is_network_error(e):
            raise ModelError(
                f"model.encoder_weights={m.encoder_weights!r} for {m.encoder} must be downloaded and that failed "
                f"(it needs network access): {one_line(e, with_type=False)}. Offline, copy the weights file here and "
                f"set model.encoder_weights=/path/to/encoder.pth") from None
        raise ModelError(f"cannot build {m.arch} with encoder {m.encoder}: {one_line(e, with_type=False)}") from None


def _is_network_error(exc: BaseException) -> bool:
    # URLError, ConnectionError, socket errors and every huggingface_hub download error are OSErrors
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


# ------------------------------------------------------------------------------------------------------ weights
def weights_source(weights: str | None) -> Literal["none", "hub", "file"]:
    """'file' for anything that looks like a path (a separator, a weights suffix, or an existing file)."""
    if weights is None:
        return "none"
    text = str(weights)
    looks_like_path = "/" in text or os.sep in text or text.lower().endswith(WEIGHT_FILE_SUFFIXES)
    if looks_like_path or Path(text).expanduser().is_file():
        return "file"
    return "hub"


def _hub_weights_argument(cfg: Config):
    """The `encoder_weights` value smp expects; raises ModelError for a name the encoder has no weights for."""
    name, weights = cfg.model.encoder, cfg.model.encoder_weights
    if name.startswith("tu-"):
        if weights != "imagenet":
            raise ModelError(f"model.encoder_weights={weights!r}: for timm encoders use 'imagenet' and put the "
                             f"pretrained tag in the name (e.g. tu-resnet18.a1_in1k)")
        import timm

        if not timm.is_model_pretrained(name[3:]):
            raise ModelError(f"model.encoder_weights=imagenet: timm has no pretrained weights for {name[3:]!r}")
        return True  # smp's documented switch for timm encoders ("True = timm's pretrained weights")
    available = list(smp.encoders.encoders[name]["pretrained_settings"])
    if weights not in available:
        raise ModelError(f"model.encoder_weights={weights!r}: encoder {name} has {available or 'no'} pretrained "
                         f"weights (or give a path to a local .pth file)")
    return weights


def load_encoder_weights(model: nn.Module, path: str | Path, encoder_name: str = "encoder",
                         in_channels: int = 3) -> str:
    """Load a local weights file into `model.encoder`; returns the one-line report. Raises ModelError."""
    encoder = unwrap(model).encoder
    state = read_state_dict(path)
    mapping, how = match_encoder_tensors(state, encoder.state_dict(), in_channels, path, encoder_name)
    target = encoder.state_dict()
    tensors = {dst: _fit_input_conv(state[src], target[dst].shape, in_channels) for src, dst in mapping.items()}
    encoder.load_state_dict(tensors, strict=False)
    total = len(_countable(target))
    skipped = len(_countable(state)) - len(_countable(mapping))
    return (f"encoder weights {Path(path).name}: loaded {len(_countable(mapping))}/{total} tensors of {encoder_name} "
            f"({how}); {skipped} tensors of the file not used (e.g. a classifier head)")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A flat name → tensor dict from a .pth/.pt/.bin (torch.load, weights_only) or .safetensors file."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ModelError(f"model.encoder_weights: file not found: {p}")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(p), device="cpu")
        else:
            obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ModelError(f"model.encoder_weights: {p} is not a PyTorch weights file "
                         f"({one_line(e, with_type=False)})") from None
    for key in ("state_dict", "model", "model_state_dict"):  # common checkpoint wrappers
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelError(f"model.encoder_weights: {p} does not hold a state dict (a mapping of names to tensors)")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def match_encoder_tensors(state: dict[str, torch.Tensor], encoder_state: dict[str, torch.Tensor], in_channels: int,
                          path: str | Path = "weights", encoder_name: str = "encoder") -> tuple[dict[str, str], str]:
    """Map file tensor names onto encoder tensor names ({file_name: encoder_name}, 'by name'|'by position').

    Only shapes of `encoder_state` are used, so a meta-device encoder works. Raises ModelError when shapes disagree
    or fewer than MIN_MATCHED_FRACTION of the encoder's tensors are found.
    """
    shapes = {k: tuple(v.shape) for k, v in encoder_state.items()}
    needed = len(_countable(shapes))
    mapping = _match_by_name(state, shapes)
    wrong = [(src, dst) for src, dst in mapping.items()
             if not _shape_fits(tuple(state[src].shape), shapes[dst], in_channels)]
    if wrong:
        src, dst = wrong[0]
        raise ModelError(f"model.encoder_weights: {path} does not fit encoder {encoder_name}: {len(wrong)} tensors "
                         f"differ in shape, e.g. {dst}: file {tuple(state[src].shape)} vs encoder {shapes[dst]}")
    if len(_countable(mapping)) >= MIN_MATCHED_FRACTION * needed:
        return mapping, "by name"
    by_position = _match_by_position(state, shapes, in_channels)
    if by_position:
        return by_position, "by position"
    raise ModelError(f"model.encoder_weights: {path} has only {len(_countable(mapping))} of the {needed} tensors of "
                     f"encoder {encoder_name} (need {MIN_MATCHED_FRACTION:.0%}); weights of another network?")


def _match_by_name(state: dict, shapes: dict) -> dict[str, str]:
    # the same names, names inside a full smp model ("encoder.*"), or a timm classifier for smp's timm wrapper
    # (whose tensors live under "model.")
    renamings = (lambda k: k, lambda k: k[len("encoder."):] if k.startswith("encoder.") else None,
                 lambda k: "model." + k)
    best: dict[str, str] = {}
    for rename in renamings:
        mapping = {k: rename(k) for k in state if rename(k) in shapes}
        if len(mapping) > len(best):
            best = mapping
    return best


def _match_by_position(state: dict, shapes: dict, in_channels: int) -> dict[str, str]:
    file_keys, encoder_keys = _countable(state), _countable(shapes)
    if len(file_keys) < len(encoder_keys):
        return {}
    pairs = list(zip(file_keys, encoder_keys))
    if all(_shape_fits(tuple(state[f].shape), shapes[e], in_channels) for f, e in pairs):
        return dict(pairs)
    return {}


def _countable(named: dict) -> list[str]:
    """Names that carry weights: BatchNorm's step counters (0-d integers) are absent from older files and say
    nothing."""
    return [k for k, v in named.items() if not _is_step_counter(k, v)]


def _is_step_counter(name: str, value) -> bool:
    is_integer_scalar = isinstance(value, torch.Tensor) and value.dim() == 0 and not value.is_floating_point()
    return name.endswith("num_batches_tracked") or is_integer_scalar


def _shape_fits(file_shape: tuple, encoder_shape: tuple, in_channels: int) -> bool:
    return file_shape == encoder_shape or _is_adaptable_input_conv(file_shape, encoder_shape, in_channels)


def _is_adaptable_input_conv(file_shape: tuple, encoder_shape: tuple, in_channels: int) -> bool:
    return (in_channels != 3 and len(file_shape) == 4 and len(encoder_shape) == 4 and file_shape[1] == 3
            and encoder_shape[1] == in_channels and file_shape[0] == encoder_shape[0]
            and file_shape[2:] == encoder_shape[2:])


def _fit_input_conv(tensor: torch.Tensor, encoder_shape: torch.Size, in_channels: int) -> torch.Tensor:
    if tuple(tensor.shape) == tuple(encoder_shape):
        return tensor
    from timm.models import adapt_input_conv  # sums RGB for 1 channel, repeats and rescales for more

    return adapt_input_conv(in_channels, tensor)


# --------------------------------------------------------------------------------------------------- validation
def check_model_config(cfg: Config) -> None:
    """Cheap, honest validation before any worker starts; raises ModelError with one line.

    Checks the encoder name (with close matches), reserved kwargs, the weights name or file (a local file is read
    and matched against the encoder), and builds the model on the meta device (no memory, no weights) and runs one
    meta forward pass at `data.image_size`: that catches arch/encoder incompatibilities, bad kwargs, inputs too small
    for the architecture, fixed-size ViTs and wrong output sizes.
    """
    m = cfg.model
    check_encoder_name(m.encoder)
    create_model_kwargs(cfg)
    source = weights_source(m.encoder_weights)
    if source == "hub":
        _hub_weights_argument(cfg)
        check_hub_weights_at_hand(cfg)
    if source == "file":
        state = read_state_dict(m.encoder_weights)
    model = _skeleton(cfg)
    _check_forward(model, cfg)
    if source == "file":
        match_encoder_tensors(state, model.encoder.state_dict(), cfg.data.in_channels, m.encoder_weights, m.encoder)


def check_hub_weights_at_hand(cfg: Config, timeout_s: float = 5.0) -> None:
    """Pretrained weights named by the hub ('imagenet') must be in the local Hugging Face cache or the hub must
    answer; else a ModelError now, before Ray starts, rather than in every worker after the cluster came up."""
    from huggingface_hub import constants, try_to_load_from_cache

    m = cfg.model
    if m.encoder.startswith("tu-"):
        cfg_ = getattr(__import__("timm").models.get_pretrained_cfg(m.encoder[3:]), "hf_hub_id", None)
        repo, revision = (cfg_.split("@")[0] if cfg_ else None), None
        files = ("model.safetensors", "pytorch_model.bin")
    else:
        settings = smp.encoders.encoders[m.encoder]["pretrained_settings"].get(m.encoder_weights, {})
        repo, revision, files = settings.get("repo_id"), settings.get("revision"), ("model.safetensors",)
    if repo is None:  # weights from elsewhere than the hub: smp's own download reports a failure
        return
    if any(isinstance(try_to_load_from_cache(repo, f, cache_dir=constants.HF_HUB_CACHE, revision=revision), str)
           for f in files):
        return
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(f"{constants.ENDPOINT}/api/models/{repo}", timeout=timeout_s).close()
    except urllib.error.HTTPError:
        return  # the hub answered
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise ModelError(f"model.encoder_weights={m.encoder_weights!r} for {m.encoder}: not in the local cache "
                         f"({constants.HF_HUB_CACHE}) and {constants.ENDPOINT} cannot be reached "
                         f"({getattr(e, 'reason', e)}). Offline, copy the weights file here and set "
                         f"model.encoder_weights=/path/to/encoder.pth, or use model.encoder_weights=null") from None


def check_encoder_name(name: str) -> None:
    if name.startswith("tu-"):
        import timm

        if timm.is_model(name[3:]):
            return
    elif name in smp.encoders.get_encoder_names():
        return
    close = difflib.get_close_matches(name, _all_encoder_names(), n=3, cutoff=0.6)
    hint = (f"; did you mean {', '.join(close)}?" if close
            else "; see smp.encoders.get_encoder_names(), or tu-<name> for timm models")
    raise ModelError(f"unknown encoder {name!r}{hint}")


@lru_cache(maxsize=1)
def _all_encoder_names() -> tuple[str, ...]:
    import timm

    return tuple(smp.encoders.get_encoder_names()) + tuple(f"tu-{n}" for n in timm.list_models())


def _skeleton(cfg: Config) -> nn.Module:
    """The model without weights on the meta device; falls back to CPU for encoders that read values while built."""
    try:
        with torch.device("meta"):
            return _create(cfg, None)
    except Exception:
        return _create(cfg, None).to("meta")  # raises the real ModelError if the config itself is wrong


def _check_forward(model: nn.Module, cfg: Config) -> None:
    h, w = cfg.data.size_hw
    if cfg.data.resize_policy == "pad":  # images are padded up to a multiple of 32
        h, w = -(-h // 32) * 32, -(-w // 32) * 32
    m = cfg.model
    x = torch.empty(1, cfg.data.in_channels, h, w, device="meta")
    try:
        with torch.no_grad():
            out = model.eval()(x)
    except NotImplementedError:  # an op without a meta kernel: nothing to conclude
        log.debug("meta forward not possible for %s/%s", m.arch, m.encoder)
        return
    except Exception as e:
        raise ModelError(f"{m.arch} with encoder {m.encoder} cannot process {h}x{w} inputs (data.image_size): "
                         f"{one_line(e, with_type=False)}") from None
    expected = (1, num_outputs(cfg), h, w)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != expected:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ModelError(f"{m.arch} with encoder {m.encoder} returns {got} for a {h}x{w} input, expected {expected}; "
                         f"check model.kwargs")


# ------------------------------------------------------------------------------------------- training helpers
def unwrap(model: nn.Module) -> nn.Module:
    """The module under DistributedDataParallel / DataParallel / torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def set_encoder_trainable(model: nn.Module, trainable: bool) -> None:
    """Freeze or unfreeze the encoder (smp's freeze_encoder / unfreeze_encoder).

    Frozen: encoder parameters get requires_grad=False and its normalisation layers stay in eval mode (running
    statistics are not updated) even across later `model.train()` calls. Under DDP, freezing after wrapping needs
    `find_unused_parameters=True`; freezing before wrapping and unfreezing later leaves the encoder unsynchronised.
    """
    m = unwrap(model)
    if trainable:
        m.unfreeze_encoder()
        m.encoder.train(m.training)  # unfreeze_encoder puts the norm layers in train mode even during eval
    else:
        m.freeze_encoder()


def param_groups(model: nn.Module, lr: float, encoder_lr_mult: float = 1.0) -> list[dict]:
    """Two optimizer groups: {'name': 'encoder', lr * encoder_lr_mult} and {'name': 'decoder', lr} (decoder + heads).

    Frozen parameters are included, so unfreezing later needs no new optimizer (params without grad are skipped).
    """
    m = unwrap(model)
    encoder_params = list(m.encoder.parameters())
    in_encoder = {id(p) for p in encoder_params}
    rest = [p for p in m.parameters() if id(p) not in in_encoder]
    return [{"name": "encoder", "params": encoder_params, "lr": lr * encoder_lr_mult},
            {"name": "decoder", "params": rest, "lr": lr}]
