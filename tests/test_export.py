"""export: ONNX and TorchScript files that agree with PyTorch at sizes and batches other than the traced one,
refusal to overwrite, a parity failure that leaves nothing behind, registration in the MLflow model registry."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from raysegtrain.cli import main
from raysegtrain.inference import load
from tests.test_predict import one_error_line, trained_checkpoint

# none of these is the traced (1, 3, 64, 64): batch and both sides must be dynamic
OTHER_SHAPES = [(3, 3, 128, 96), (1, 3, 32, 160)]


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    return trained_checkpoint(tmp_path_factory)


@pytest.fixture(scope="session")
def model(checkpoint):
    return load(checkpoint, device="cpu").model


def max_diff(model, run, shape) -> float:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(x).numpy()
    got = run(x.numpy())
    assert got.shape == expected.shape
    return float(np.abs(got - expected).max())


def test_onnx_export_matches_pytorch_at_dynamic_sizes(checkpoint, model, tmp_path, capsys):
    import onnx
    import onnxruntime as ort

    out = tmp_path / "model.onnx"
    assert main(["export", str(checkpoint), "--format", "onnx", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "max |onnx - pytorch|" in err and "(2, 3, 96, 128)" in err  # both sizes, both batches reported

    onnx.checker.check_model(str(out))
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(meta["mean"]) == pytest.approx([0.485, 0.456, 0.406]) and meta["binary"] == "true"
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for shape in OTHER_SHAPES:
        assert max_diff(model, lambda x: session.run(None, {"image": x})[0], shape) < 1e-3


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit.load is deprecated upstream, still the loader
def test_torchscript_export_matches_pytorch_at_dynamic_sizes(checkpoint, model, tmp_path):
    out = tmp_path / "model.pt"
    assert main(["export", str(checkpoint), "--format", "torchscript", "--out", str(out)]) == 0
    extra = {"raysegtrain.json": ""}
    loaded = torch.jit.load(str(out), _extra_files=extra)
    assert json.loads(extra["raysegtrain.json"])["num_classes"] == 2

    def run(x):
        with torch.no_grad():
            return loaded(torch.from_numpy(x)).numpy()

    for shape in OTHER_SHAPES:
        assert max_diff(model, run, shape) < 1e-3


def test_export_never_overwrites_and_a_failed_parity_check_leaves_nothing(checkpoint, tmp_path, capsys):
    existing = tmp_path / "model.pt"
    existing.write_bytes(b"mine")
    assert main(["export", str(checkpoint), "--format", "torchscript", "--out", str(existing)]) == 2
    assert "--overwrite" in one_error_line(capsys) and existing.read_bytes() == b"mine"

    assert main(["export", "/no/such/checkpoint.pt", "--format", "onnx", "--out", str(tmp_path / "x.onnx")]) == 2
    assert "no such checkpoint" in one_error_line(capsys)

    # ONNX differs from PyTorch by float rounding (~1e-5): an impossible tolerance must fail, exit 1, one line
    strict = tmp_path / "strict.onnx"
    assert main(["export", str(checkpoint), "--format", "onnx", "--out", str(strict), "--tolerance", "1e-12"]) == 1
    assert "differs from PyTorch" in one_error_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]  # no output, no temporary file


def test_register_in_the_mlflow_model_registry(checkpoint, tmp_path, capsys):
    from raysegtrain import tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "model.pt"
    assert main(["export", str(checkpoint), "--format", "torchscript", "--out", str(out), "--register", "defects",
                 "--tracking-uri", uri]) == 0
    assert "registered as MLflow model 'defects' version 1" in capsys.readouterr().err
    c = tracking.client(uri)
    (version,) = c.search_model_versions("name='defects'")
    run = c.get_run(version.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["raysegtrain.export_of"] == str(checkpoint)
