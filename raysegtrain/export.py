"""`export`: a trained model as ONNX or TorchScript, with dynamic batch and image size, checked before it is kept.

The model is exported on the CPU in fp32 (logits out: sigmoid for binary models, softmax otherwise). The export goes
to a temporary file next to OUT; both it and the PyTorch model then run the same random inputs at two sizes (the
training size and a larger, non-square one; sides multiples of 32) with batch 1 and 2, and the file takes its final
name only when the largest absolute difference is within the tolerance. ONNX files also pass `onnx.checker` and run
in onnxruntime's CPU provider; TorchScript files are traced, saved and loaded back with `torch.jit.load`.
The preprocessing a caller must apply (size, mean/std, threshold, class names) is stored in the file: ONNX
`metadata_props`, TorchScript extra file `raysegtrain.json`.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import torch

from .errors import ReportedError, UserError
from .inference import SIZE_DIVISOR, LoadedModel

Format = Literal["onnx", "torchscript"]
DEFAULT_OPSET = 17
DEFAULT_TOLERANCE = 1e-3
INPUT_NAME, OUTPUT_NAME = "image", "logits"
METADATA_FILE = "raysegtrain.json"  # TorchScript extra file


class ExportMismatchError(ReportedError):
    """The exported model disagrees with PyTorch beyond the tolerance. Not the user's mistake, so exit 1, but
    reported in one line like every failure the user can act on (a looser --tolerance, another opset)."""

    exit_code = 1


@dataclass
class ExportResult:
    path: Path
    format: str
    diffs: list[tuple[tuple[int, ...], float]]  # (input shape, max |exported - pytorch|)
    registered: tuple[str, str] | None = None  # (registered model name, version)
    metadata: dict = field(default_factory=dict)

    @property
    def max_diff(self) -> float:
        return max(d for _, d in self.diffs)


def parity_shapes(loaded: LoadedModel) -> list[tuple[int, int, int, int]]:
    c = loaded.cfg.data.in_channels
    h, w = (-(-s // SIZE_DIVISOR) * SIZE_DIVISOR for s in loaded.cfg.data.size_hw)
    sizes = [(h, w), (h + SIZE_DIVISOR, w + 2 * SIZE_DIVISOR)]
    return [(n, c, sh, sw) for sh, sw in sizes for n in (1, 2)]


def model_metadata(loaded: LoadedModel) -> dict:
    from .version import __version__

    cfg = loaded.cfg
    return {"raysegtrain_version": __version__, "arch": cfg.model.arch, "encoder": cfg.model.encoder,
            "input": f"{INPUT_NAME}: float32 (N, {cfg.data.in_channels}, H, W), H and W multiples of "
                     f"{SIZE_DIVISOR}; RGB 0..1 normalised with mean/std",
            "output": f"{OUTPUT_NAME}: (N, {1 if cfg.data.binary else cfg.data.num_classes}, H, W); "
                      + ("sigmoid > threshold" if cfg.data.binary else "argmax over classes"),
            "in_channels": cfg.data.in_channels, "num_classes": cfg.data.num_classes,
            "class_names": cfg.data.names(), "binary": cfg.data.binary, "threshold": cfg.train.threshold,
            "mean": list(loaded.mean), "std": list(loaded.std), "image_size": list(cfg.data.size_hw),
            "resize_policy": cfg.data.resize_policy}


# -------------------------------------------------------------------------------------------------- formats
def export_onnx(model: torch.nn.Module, example: torch.Tensor, path: Path, opset: int, metadata: dict) -> None:
    import onnx

    dynamic = {0: "batch", 2: "height", 3: "width"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript-based exporter is deprecated in torch >= 2.9 but works
        torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=opset,
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: dynamic, OUTPUT_NAME: dynamic})
    proto = onnx.load(str(path))
    for key, value in metadata.items():
        proto.metadata_props.add(key=key, value=json.dumps(value) if not isinstance(value, str) else value)
    onnx.save(proto, str(path))
    onnx.checker.check_model(str(path))


def export_torchscript(model: torch.nn.Module, example: torch.Tensor, path: Path, metadata: dict) -> None:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # jit is deprecated upstream but present in every supported torch
        traced = torch.jit.trace(model, example, check_trace=False)  # our parity check replaces trace's own
        torch.jit.save(traced, str(path), _extra_files={METADATA_FILE: json.dumps(metadata)})


def onnx_runner(path: Path) -> Callable[[np.ndarray], np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda x: session.run([OUTPUT_NAME], {INPUT_NAME: x})[0]


def load_torchscript(path: Path) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.jit.load is deprecated" (torch >= 2.10), still the way to load it
        return torch.jit.load(str(path), map_location="cpu")


def torchscript_runner(path: Path) -> Callable[[np.ndarray], np.ndarray]:
    module = load_torchscript(path).eval()

    def run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return module(torch.from_numpy(x)).numpy()

    return run


def compare(model: torch.nn.Module, run: Callable[[np.ndarray], np.ndarray], shapes, seed: int = 0
            ) -> list[tuple[tuple[int, ...], float]]:
    """Max |exported - pytorch| per input shape, on the same standard-normal inputs (≈ normalised images)."""
    generator = torch.Generator().manual_seed(seed)
    diffs = []
    for shape in shapes:
        x = torch.randn(shape, generator=generator)
        with torch.no_grad():
            expected = model(x).numpy()
        got = run(x.numpy())
        if got.shape != expected.shape:
            diffs.append((tuple(shape), float("inf")))
        else:
            diffs.append((tuple(shape), float(np.abs(got - expected).max())))
    return diffs


def require_format_packages(fmt: str) -> None:
    """ONNX export needs onnx and onnxruntime, which are an optional extra: say which extra before any work."""
    if fmt != "onnx":
        return
    import importlib

    missing = []
    for module in ("onnx", "onnxruntime"):
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise UserError(f"ONNX export needs {' and '.join(missing)}, which are not installed: install the export "
                        f"extra with pip install 'raysegtrain[export]' (pip install -e '.[export]' in a checkout)")


# ---------------------------------------------------------------------------------------------------- command
def export(loaded: LoadedModel, fmt: Format, out: str | Path, opset: int = DEFAULT_OPSET,
           tolerance: float = DEFAULT_TOLERANCE, overwrite: bool = False) -> ExportResult:
    require_format_packages(fmt)
    out = Path(out)
    if out.exists() and not overwrite:
        raise UserError(f"{out} already exists (pass --overwrite to replace it)")
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; name the file to write")
    out.parent.mkdir(parents=True, exist_ok=True)
    model = loaded.model.to("cpu").float().eval()
    shapes = parity_shapes(loaded)
    example = torch.randn(shapes[0])
    metadata = model_metadata(loaded)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        if fmt == "onnx":
            export_onnx(model, example, tmp, opset, metadata)
            run = onnx_runner(tmp)
        elif fmt == "torchscript":
            export_torchscript(model, example, tmp, metadata)
            run = torchscript_runner(tmp)
        else:
            raise UserError(f"unknown export format {fmt!r} (onnx or torchscript)")
        diffs = compare(model, run, shapes)
        worst_shape, worst = max(diffs, key=lambda d: d[1])
        if not worst <= tolerance:
            raise ExportMismatchError(f"{fmt} export differs from PyTorch by {worst:.3g} (> tolerance "
                                      f"{tolerance:g}) on input {worst_shape}; nothing was written to {out}")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return ExportResult(out, fmt, diffs, metadata=metadata)


def register(result: ExportResult, name: str, loaded: LoadedModel, tracking_uri: str | None = None
             ) -> tuple[str, str]:
    """Log the exported file as an MLflow model (onnx / pytorch flavour) and register it as NAME; returns
    (name, version). It goes into the model's own run when MODEL was an MLflow run, else into a new run."""
    from . import tracking

    uri = loaded.tracking_uri or tracking.resolve_tracking_uri(tracking_uri)
    run_id = loaded.run_id or tracking.create_run(uri, loaded.cfg.tracking.experiment, f"export-{name}",
                                                  tags={"raysegtrain.export_of": loaded.source})
    if result.format == "onnx":
        import onnx

        model = onnx.load(str(result.path))
    else:
        model = load_torchscript(result.path)
    version = tracking.register_model(uri, run_id, model, result.format, name, result.metadata)
    result.registered = (name, version)
    return result.registered
