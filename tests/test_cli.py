"""The command line without Ray: data synth / data check / config, their exit codes and one-line errors."""

import os
import subprocess
import sys

import numpy as np

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
    assert "optim.lr = 0.001" in capsys.readouterr().out
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
        line = ""
        while "/#/" not in line and proc.poll() is None:  # MLflow's own server lines come first
            line = proc.stdout.readline()
        assert f"http://127.0.0.1:{port}/#/experiments/{exp}/runs?workflowType=machine_learning" in line
        # the link comes once the server answers: one request, no waiting
        assert urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10).status == 200
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_data_check_takes_a_dataset_folder_like_data_root(tmp_path, capsys):
    out = tmp_path / "defects"
    assert main(["data", "synth", str(out), "--size", "64", "--num-train", "4", "--num-val", "2",
                 "--num-test", "0"]) == 0
    capsys.readouterr()
    assert main(["data", "check", str(out), "data.image_size=64"]) == 0
    assert capsys.readouterr().out.strip() == f"ok: {out}"
    (out / "masks" / sorted(p.name for p in (out / "masks").glob("*.png"))[0]).write_bytes(b"garbage")
    assert main(["data", "check", str(out), "data.image_size=64"]) == 2
    assert "problem(s)" in capsys.readouterr().err


def test_a_path_that_is_neither_config_nor_folder_is_one_line(tmp_path):
    p = run("data", "check", str(tmp_path / "nowhere"), cwd=tmp_path)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1
    assert "no such config file or dataset folder" in p.stderr and "Traceback" not in p.stderr


def test_help_says_a_folder_is_accepted():
    p = subprocess.run([sys.executable, "-m", "raysegtrain", "data", "check", "--help"], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0 and "DATASET_DIR" in p.stdout and "data.root=FOLDER" in p.stdout


def test_defaults_describe_when_schedules_step():
    from raysegtrain.config import describe_defaults

    line = next(ln for ln in describe_defaults().splitlines() if ln.startswith("schedule.name ="))
    assert "optimizer step" in line and "per epoch; onecycle" not in line


def test_output_into_a_closed_pipe_is_not_an_error(tmp_path):
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before anything is written: every write meets a broken pipe
    try:
        p = subprocess.run([sys.executable, "-m", "raysegtrain", "config", "--defaults"], stdout=write_end,
                           stderr=subprocess.PIPE, text=True, timeout=120, cwd=tmp_path)
    finally:
        os.close(write_end)
    assert p.returncode == 0 and p.stderr == ""


def test_ui_refuses_a_busy_port_in_one_line_before_printing_a_link(tmp_path):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        p = run("ui", "--port", str(port), "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", cwd=tmp_path)
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.startswith(f"error: port {port} on 127.0.0.1 is already in use")
    assert len(p.stderr.strip().splitlines()) == 1


def test_ui_default_port_moves_to_a_free_one_when_taken(monkeypatch):
    import socket

    from raysegtrain import cli

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        monkeypatch.setattr(cli, "DEFAULT_UI_PORT", taken)
        chosen = cli.ui_port("127.0.0.1", None)
        assert chosen != taken and cli.port_is_free("127.0.0.1", chosen)
        assert not cli.port_is_free("127.0.0.1", taken)


def test_onnx_export_without_the_extra_names_it_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if the export extra were not installed
    code = main(["export", str(tmp_path / "any-checkpoint"), "--format", "onnx", "--out", str(tmp_path / "m.onnx")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "onnxruntime" in err and "pip install -e '.[export]'" in err
    assert not (tmp_path / "m.onnx").exists()
