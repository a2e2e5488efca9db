"""The command line without Ray: data synth / data check / config, their exit codes and one-line errors."""

import subprocess
import sys

import numpy as np
import pytest

from raysegtrain.cli import main


def run(*args, cwd):
    return subprocess.run([sys.executable, "-m", "raysegtrain", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_synth_then_check_clean_then_broken(tmp_path, capsys):
    out = tmp_path / "defects"
    assert main(["data", "synth", str(out), "--size", "64", "--num-train", "6", "--num-val", "3",
                 "--num-test", "0"]) == 0
    assert f"raysegtrain fit data.root={out}" in capsys.readouterr().out
    assert main(["data", "check", f"data.root={out}", "data.image_size=64"]) == 0
    assert capsys.readouterr().out.startswith("ok: ")

    masks = sorted((out / "masks").glob("*.png"))
    (out / "masks" / masks[0].name).write_bytes(b"garbage")  # corrupt mask
    import cv2

    cv2.imwrite(str(masks[1]), np.full((64, 64), 7, np.uint8))  # value outside {0, 1}/{0, 255}
    (out / "images" / sorted((out / "images").glob("*.png"))[2].name).unlink()  # missing image
    assert main(["data", "check", f"data.root={out}", "data.image_size=64"]) == 2
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) >= 3
    text = "\n".join(lines)
    assert masks[0].stem in text and masks[1].stem in text


def test_synth_refuses_to_overwrite(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("user data")
    p = run("data", "synth", str(tmp_path / "mine"), "--size", "64", "--num-train", "2", "--num-val", "1", cwd=tmp_path)
    assert p.returncode == 2 and p.stderr.startswith("error: ") and len(p.stderr.strip().splitlines()) == 1
    assert (tmp_path / "mine" / "keep.txt").read_text() == "user data"


def test_config_defaults_and_resolved(tmp_path, capsys):
    assert main(["config", "--defaults"]) == 0
    assert "optim.lr = 0.0003" in capsys.readouterr().out
    assert main(["config", "model.arch=fpn"]) == 0
    assert "arch: fpn" in capsys.readouterr().out
    assert main(["config", "model.arch=nope"]) == 2
    assert "unknown architecture 'nope'" in capsys.readouterr().err


def test_fit_print_config_is_reloadable(tmp_path, capsys):
    from raysegtrain import config

    assert main(["fit", "train.epochs=3", "--print-config"]) == 0
    path = tmp_path / "c.yaml"
    path.write_text(capsys.readouterr().out)
    assert config.load(path).train.epochs == 3


def test_ui_serves_on_loopback_and_prints_the_runs_table_link(tmp_path):
    import socket
    import time
    import urllib.request

    from raysegtrain import tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = tracking.client(uri)
    exp = tracking.ensure_experiment(c, "raysegtrain")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "raysegtrain", "ui", "--port", str(port), "--tracking-uri", uri],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        first = proc.stdout.readline() + proc.stdout.readline()
        assert f"http://127.0.0.1:{port}/#/experiments/{exp}/runs" in first
        deadline, status = time.monotonic() + 120, None
        while status is None and time.monotonic() < deadline and proc.poll() is None:
            try:  # wait for the server by polling it, bounded by the deadline
                status = urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).status
            except OSError:
                time.sleep(0.5)
        assert status == 200
    finally:
        proc.terminate()
        proc.wait(timeout=30)
