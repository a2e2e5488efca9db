"""predict / evaluate on a tiny model trained in this process (no Ray): metric parity with validation, sliding
windows, TTA, post-processing, one-line errors, no overwriting, Ray Data batch inference, MLflow run models."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from raysegtrain import config
from raysegtrain.cli import main
from raysegtrain.data.io import read_image, read_mask
from raysegtrain.data.splits import list_split
from raysegtrain.engine import train_local
from raysegtrain.evaluate import evaluate_checkpoint
from raysegtrain.inference import (InferenceOptions, Predictor, fill_holes, load, postprocess, predict_probs,
                                   remove_small_components, sliding_window_probs)
from tests.conftest import TINY

_TRAINED: dict[str, Path] = {}


def trained_checkpoint(tmp_path_factory) -> Path:
    """One tiny binary model per test session (shared with test_export): TINY config, 2 epochs, in-process."""
    if "best" not in _TRAINED:
        out = tmp_path_factory.mktemp("trained")
        train_local(config.load(None, TINY), out, device="cpu")
        _TRAINED["best"] = out / "best"
    return _TRAINED["best"]


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    return trained_checkpoint(tmp_path_factory)


@pytest.fixture(scope="session")
def loaded(checkpoint):
    return load(checkpoint, device="cpu")


@pytest.fixture(scope="session")
def val_pairs(loaded):
    return list_split(loaded.cfg.data, "val")


def predict_cli(*args) -> int:
    return main(["predict", *map(str, args), "--no-progress"])


def read_png(path) -> np.ndarray:
    array = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert array is not None, path
    return array


def mean_iou(preds, targets, num_classes: int = 2) -> float:
    """Split IoU the way ConfusionMeter computes it: one confusion matrix over all pixels, mean over classes."""
    cm = np.zeros((num_classes, num_classes), np.int64)
    for p, t in zip(preds, targets):
        cm += np.bincount(t.ravel() * num_classes + p.ravel(), minlength=num_classes ** 2).reshape(cm.shape)
    tp = np.diag(cm).astype(np.float64)
    union = cm.sum(0) + cm.sum(1) - tp
    return float(np.nanmean(np.where(union > 0, tp / np.maximum(union, 1), np.nan)))


def mosaic(images: list[np.ndarray]) -> np.ndarray:
    """2x2 tiles of four images: an image twice the training size that still looks like the data."""
    return np.concatenate([np.concatenate(images[:2], 1), np.concatenate(images[2:4], 1)], 0)


# ------------------------------------------------------------------------------------------- parity with metrics
def test_predict_reproduces_evaluate_iou_and_evaluate_writes_its_report(checkpoint, loaded, val_pairs, tmp_path,
                                                                        capsys):
    out = tmp_path / "pred"
    assert predict_cli(checkpoint, *[image for image, _ in val_pairs], "--out", out) == 0
    assert f"of {len(val_pairs)} image(s)" in capsys.readouterr().err
    preds, targets = [], []
    for image, mask in val_pairs:
        written = read_png(out / f"{image.stem}_mask.png")
        assert set(np.unique(written)) <= {0, 255}  # binary masks are 0/255
        assert read_png(out / f"{image.stem}_overlay.png").shape == (*written.shape, 3)
        preds.append((written == 255).astype(np.int64))
        targets.append(read_mask(mask, loaded.cfg.data))

    reference = evaluate_checkpoint(checkpoint)
    assert mean_iou(preds, targets) == pytest.approx(reference["val_iou"], abs=1e-6)

    report = tmp_path / "report"
    assert main(["evaluate", str(checkpoint), "--out", str(report)]) == 0
    printed = capsys.readouterr()
    assert loaded.cfg.data.names()[1] in printed.out and "mean" in printed.out  # the per-class table
    document = json.loads((report / "metrics.json").read_text())
    assert document["metrics"]["iou"] == pytest.approx(reference["val_iou"], abs=1e-9)
    assert document["images"] == len(val_pairs) and len(document["confusion_matrix"]) == 2
    rows = (report / "per_image.csv").read_text().splitlines()
    assert rows[0] == "stem,iou,dice" and [r.split(",")[0] for r in rows[1:]] == [i.stem for i, _ in val_pairs]
    per_image_iou = [float(r.split(",")[1]) for r in rows[1:]]
    assert np.mean(per_image_iou) == pytest.approx(reference["val_image_iou"], abs=1e-9)
    assert read_png(report / "confusion_matrix.png").ndim == 3

    assert main(["evaluate", str(checkpoint), "--split", "test", "--out", str(tmp_path / "test")]) == 0
    assert json.loads((tmp_path / "test" / "metrics.json").read_text())["images"] == 4


# ----------------------------------------------------------------------------------------------- sliding window
def test_sliding_window_at_training_size_equals_plain_inference(loaded, val_pairs):
    images = [read_image(p, 3) for p, _ in val_pairs[:3]]
    plain = Predictor.from_loaded(loaded).probabilities(images)
    sliding = Predictor.from_loaded(loaded, InferenceOptions(sliding_window=True)).probabilities(images)
    for a, b in zip(plain, sliding):
        assert a.shape == b.shape == (1, 64, 64)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_blending_hides_window_borders_of_a_local_model():
    """A 3x3 convolution is exact inside a window and wrong only on the window's 1-pixel border (zero padding
    there instead of the neighbours). Blended windows must reproduce whole-image inference; plain tiling must not
    (so the check can fail). 160x96 is no multiple of the 64-pixel window: the last windows sit flush."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 1, 3, padding=1)).eval()
    with torch.no_grad():
        model[0].weight.mul_(20)
    image = torch.randn(1, 3, 160, 96)
    whole = predict_probs(model, image)
    blended = sliding_window_probs(model, image, (64, 64), overlap=0.5)
    tiled = sliding_window_probs(model, image, (64, 64), overlap=0.0)
    assert blended.shape == whole.shape == (1, 1, 160, 96)
    assert (blended - whole).abs().max() < 2e-3
    assert (tiled - whole).abs().max() > 0.1
    linear = sliding_window_probs(model, image, (64, 64), overlap=0.5, blend="linear")
    assert (linear - whole).abs().max() < 0.05  # a tent weighs the border more than a Gaussian, still small


def test_sliding_window_on_a_twice_larger_image_runs_without_seams(checkpoint, loaded, val_pairs, tmp_path):
    big = mosaic([read_image(p, 3) for p, _ in val_pairs[:4]])  # 128x128, training size 64
    sliding = Predictor.from_loaded(loaded, InferenceOptions(sliding_window=True)).probabilities([big])[0][0]
    whole_image = Predictor.from_loaded(loaded, InferenceOptions(sliding_window=True))
    whole_image.window = (128, 128)  # one window = the fully convolutional model on the whole image
    whole = whole_image.probabilities([big])[0][0]
    assert sliding.shape == whole.shape == (128, 128)

    # windows start at 0, 32, 64: their borders are rows/columns 32, 64, 96. A seam is a jump between
    # neighbouring pixels there that whole-image inference does not have.
    def jumps_at(probs, line):
        return max((probs[line] - probs[line - 1]).abs().max(), (probs[:, line] - probs[:, line - 1]).abs().max())

    excess = max(float(jumps_at(sliding, b) - jumps_at(whole, b)) for b in (32, 64, 96))
    assert excess < 0.06, excess
    # windows see less context than the whole image, so values differ somewhat, but not wholesale
    assert float((sliding - whole).abs().mean()) < 0.1

    # through the command line, with TTA: a mask of the input's own size
    path = tmp_path / "big.png"
    cv2.imwrite(str(path), cv2.cvtColor((big * 255).round().astype(np.uint8), cv2.COLOR_RGB2BGR))
    assert predict_cli(checkpoint, path, "--out", tmp_path / "out", "--sliding-window", "--tta") == 0
    assert read_png(tmp_path / "out" / "big_mask.png").shape == (128, 128)


# ------------------------------------------------------------------------------------------------ TTA, cleanup
def test_tta_keeps_the_input_shape_and_is_flip_equivariant(loaded, val_pairs):
    image = read_image(val_pairs[0][0], 3)[:, :48]  # 64x48: not the training size, not square
    tta = Predictor.from_loaded(loaded, InferenceOptions(tta=True))
    probs = tta.probabilities([image])[0]
    assert probs.shape == (1, 64, 48) and 0 <= float(probs.min()) and float(probs.max()) <= 1
    mirrored = tta.probabilities([np.ascontiguousarray(image[:, ::-1])])[0]
    # the mean over all four flips is the same for an image and its mirror, mirrored
    torch.testing.assert_close(mirrored.flip(-1), probs, atol=1e-5, rtol=0)
    assert tta.masks([image])[0].shape == (64, 48)


def test_postprocessing_removes_small_components_and_fills_holes():
    mask = np.zeros((20, 20), np.uint8)
    mask[2:12, 2:12] = 1
    mask[5:7, 5:7] = 0  # a hole
    mask[15:17, 15:17] = 1  # a 4-pixel speck
    mask[0:5, 15:20] = 2  # another class touching the border, with a notch open to the border
    mask[0:2, 17] = 0
    cleaned = remove_small_components(mask, 5)
    assert cleaned[15:17, 15:17].sum() == 0 and cleaned[2:12, 2:12].astype(bool).sum() == 96
    filled = fill_holes(cleaned)
    assert (filled[2:12, 2:12] == 1).all()  # hole filled
    assert (filled[0:2, 17] == 0).all()  # an opening to the border is no hole
    assert (postprocess(mask, 5, True) == filled).all()
    assert (postprocess(mask) == mask).all()


# ------------------------------------------------------------------------------------------------------ errors
def one_error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_bad_model_or_inputs_give_one_line_and_exit_2(checkpoint, val_pairs, tmp_path, capsys):
    image = val_pairs[0][0]
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG but not really")
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("hello")
    run = tmp_path / "run"  # a run's folder given for one of its checkpoints
    shutil.copytree(checkpoint, run / "checkpoint_000003")
    (run / "checkpoint_manager_snapshot.json").write_text("{}")
    cases = [
        ([run, image], f"MODEL {run} holds checkpoint folders, not a checkpoint: pass one of them (checkpoint_000003)"),
        ([tmp_path / "missing.pt", image], "missing.pt"),
        ([garbage, image], "garbage.pt is not a checkpoint (not a file torch.save writes)"),
        (["0123456789abcdef0123456789abcdef", image, "--tracking-uri", f"sqlite:///{tmp_path / 'none.db'}"],
         "no MLflow store"),
        ([checkpoint, tmp_path / "nothing" / "*.png"], "no images found"),
        ([checkpoint, tmp_path / "empty"], "no images found"),
        ([checkpoint, corrupt], "not a readable image"),
        ([checkpoint, tmp_path / "notes.txt"], "not an image file"),
        ([checkpoint, image, "--overlap", "1.5"], "--overlap"),
    ]
    for args, message in cases:
        out = tmp_path / "out"
        assert predict_cli(*args, "--out", out) == 2, args
        assert message in one_error_line(capsys), args
        assert not out.exists() or not any(out.iterdir())
    assert not (tmp_path / "none.db").exists()  # a wrong store is reported, not created

    # the real process: exit status 2, one line, no traceback
    p = subprocess.run([sys.executable, "-m", "raysegtrain", "predict", str(tmp_path / "missing.pt"), str(image),
                        "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and p.stderr.startswith("error: ") and len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_existing_outputs_are_never_overwritten_without_flag(checkpoint, val_pairs, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    mine = out / f"{val_pairs[3][0].stem}_overlay.png"
    mine.write_bytes(b"my own file")
    images = [image for image, _ in val_pairs]
    assert predict_cli(checkpoint, *images, "--out", out) == 2
    assert "--overwrite" in one_error_line(capsys)
    assert mine.read_bytes() == b"my own file" and sorted(out.iterdir()) == [mine]  # nothing else written either

    assert predict_cli(checkpoint, *images, "--out", out, "--overwrite") == 0
    assert read_png(mine).shape == (64, 64, 3) and len(list(out.iterdir())) == 2 * len(images)


# ---------------------------------------------------------------------------------------------- Ray, MLflow
def test_ray_data_batch_inference_writes_the_same_masks(loaded, val_pairs, tmp_path, ray_local):
    from raysegtrain.predict import predict

    images = [str(image) for image, _ in val_pairs]
    predict(loaded, images, tmp_path / "local", InferenceOptions(batch_size=4), progress=False)
    summary = predict(loaded, images, tmp_path / "ray", InferenceOptions(batch_size=4), use_ray=True,
                      progress=False)
    assert summary.engine == "ray" and summary.images == len(images)
    for image, _ in val_pairs:
        for suffix in ("_mask.png", "_overlay.png"):
            assert np.array_equal(read_png(tmp_path / "ray" / f"{image.stem}{suffix}"),
                                  read_png(tmp_path / "local" / f"{image.stem}{suffix}")), image.stem


def test_mlflow_run_as_model_for_predict_and_evaluate(checkpoint, loaded, val_pairs, tmp_path, capsys,
                                                      monkeypatch):
    from raysegtrain import tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = tracking.start_run(loaded.cfg, "trained", uri=uri)
    c = tracking.client(uri)
    c.log_artifacts(run_id, str(checkpoint), "best_checkpoint")  # what fit logs for its best checkpoint
    c.set_terminated(run_id)

    image = val_pairs[0][0]
    capsys.readouterr()
    assert predict_cli(checkpoint, image, "--out", tmp_path / "from_file") == 0
    assert predict_cli(run_id, image, "--out", tmp_path / "from_run", "--tracking-uri", uri) == 0
    assert "Downloading" not in capsys.readouterr().err  # no MLflow progress bars beside ours
    name = f"{image.stem}_mask.png"
    assert np.array_equal(read_png(tmp_path / "from_run" / name), read_png(tmp_path / "from_file" / name))

    assert predict_cli("f" * 32, image, "--out", tmp_path / "none", "--tracking-uri", uri) == 2
    assert "no such MLflow run" in one_error_line(capsys)

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert main(["evaluate", f"runs:/{run_id}", "--out", str(tmp_path / "eval"), "--log-mlflow"]) == 0
    capsys.readouterr()
    logged = c.get_run(run_id).data.metrics
    assert logged["eval_val_iou"] == pytest.approx(evaluate_checkpoint(checkpoint)["val_iou"], abs=1e-9)
    assert {a.path for a in c.list_artifacts(run_id, "eval_val")} == {
        "eval_val/metrics.json", "eval_val/per_image.csv", "eval_val/confusion_matrix.png"}

    assert main(["evaluate", str(checkpoint), "--out", str(tmp_path / "e2"), "--log-mlflow"]) == 2
    assert "MLflow run" in one_error_line(capsys)
