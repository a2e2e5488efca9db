"""Everyday failures caught before Ray starts, each with one line and exit 2: an MLflow store that cannot be used, a
bad file anywhere in the train/val splits (not only the first)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from raysegtrain import preflight
from raysegtrain.cli import main
from raysegtrain.errors import DataError

from .conftest import TINY


@pytest.mark.parametrize("how", ["config", "environment"])
def test_unreachable_tracking_server_is_one_line_before_ray(tmp_path, monkeypatch, capsys, no_ray, how):
    uri = "http://127.0.0.1:9"  # the discard port: nothing listens there
    given = [f"tracking.tracking_uri={uri}"] if how == "config" else []
    if how == "environment":
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    rc = main(["fit", *TINY, f"run.storage_path={tmp_path}", *given, "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert f"MLflow tracking server {uri} is not reachable" in err[0] and "tracking.enabled=false" in err[0]


def test_unwritable_tracking_folder_is_one_line_before_ray(tmp_path, capsys, no_ray):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    rc = main(["fit", *TINY, f"tracking.tracking_uri=sqlite:///{blocker}/sub/mlflow.db", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "cannot create" in err[0], err


@pytest.fixture
def folder_set(tmp_path) -> Path:
    out = tmp_path / "set"
    assert main(["data", "synth", str(out), "--size", "64", "--num-train", "12", "--num-val", "6",
                 "--num-test", "0"]) == 0
    return out


@pytest.mark.parametrize("damage", ["zero_bytes", "truncated", "wrong_size", "bad_values"])
def test_preflight_reads_every_file_of_a_small_set(folder_set, tiny_cfg, damage):
    """A bad mask that is not the first of its split stops the run before Ray, naming the file."""
    import cv2

    victim = sorted((folder_set / "masks").glob("*.png"))[7]
    if damage == "zero_bytes":
        victim.write_bytes(b"")
    elif damage == "truncated":
        victim.write_bytes(victim.read_bytes()[:40])
    elif damage == "wrong_size":
        cv2.imwrite(str(victim), np.zeros((32, 48), np.uint8))
    else:
        cv2.imwrite(str(victim), np.full((64, 64), 7, np.uint8))
    cfg = tiny_cfg(f"data.root={folder_set}")
    with pytest.raises(DataError, match=victim.stem) as caught:
        preflight.check_data(cfg)
    assert "every file" in str(caught.value) and "\n" not in str(caught.value)
    preflight.check_data(tiny_cfg(f"data.root={folder_set}", "data.preflight=first"))  # the first pair is fine


def test_preflight_samples_a_large_set(folder_set, tiny_cfg, monkeypatch):
    """Above the full-scan size a seeded sample is read, the first pair of each split among it; the message says
    how much was read."""
    monkeypatch.setattr(preflight, "FULL_SCAN_MAX_PAIRS", 4)
    monkeypatch.setattr(preflight, "SAMPLE_PAIRS", 5)
    read = []
    import raysegtrain.data.check as check

    real = check.check_pairs

    def recording(cfg, pairs, root):
        read.extend(pairs)
        return real(cfg, pairs, root)

    monkeypatch.setattr(check, "check_pairs", recording)
    cfg = tiny_cfg(f"data.root={folder_set}")
    preflight.check_data(cfg)
    assert len(read) == 5 and len(set(read)) == 5
    from raysegtrain.data.splits import list_split

    assert {list_split(cfg.data, "train")[0], list_split(cfg.data, "val")[0]} <= set(read)


def test_a_dead_cluster_left_by_ray_start_is_not_joined(tmp_path):
    """ray.init() joins the cluster a `ray start` recorded on the machine and, when its head is gone, retries for
    minutes; fit starts its own local Ray instead, and says so."""
    import socket
    import tempfile

    raytmp = tempfile.mkdtemp(prefix="rsd")  # Ray's socket paths must stay short
    with socket.socket() as s:  # a port nothing listens on once closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (Path(raytmp) / "ray").mkdir()
    (Path(raytmp) / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{port}")
    code = ("from raysegtrain.ray_support import init_ray; import ray; init_ray(); "
            "print('cpus', ray.cluster_resources()['CPU']); ray.shutdown()")
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "RAY_TMPDIR": raytmp}
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0 and "cpus" in p.stdout, p.stderr[-2000:]
    assert f"(127.0.0.1:{port}) does not answer; starting a local Ray" in p.stderr
