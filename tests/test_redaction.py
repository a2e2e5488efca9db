"""Credentials never leave the user's environment: the redaction rule, and one real fit that logs to an MLflow server
behind basic auth with the password in the tracking URI and a token in the storage URL, after which no console line,
MLflow param/tag/artifact, checkpoint or file under the run folder holds either."""

from __future__ import annotations

import base64
import http.client
import shlex
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
import yaml

from raysegtrain import config, tracking
from raysegtrain.checkpoint import load_checkpoint, save_checkpoint
from raysegtrain.cli import main
from raysegtrain.errors import ConfigError, one_line
from raysegtrain.redaction import (PLACEHOLDER, is_secret_name, redact_config_dict, redact_text, redact_uri,
                                   supply_redacted)

ROOT = Path(__file__).resolve().parents[1]
PASSWORD = "pw-Zq81xVb3kLm0"       # the tracking server's password
STORAGE_TOKEN = "st-Hh27sPq9wE4r"  # a storage URL's token parameter
ENV_TOKEN = "env-Rt55uYc2nNa7"     # a credential in the environment


# ------------------------------------------------------------------------------------------------ the rule itself
@pytest.mark.parametrize("uri, expected", [
    ("http://alice:s3cr3t@127.0.0.1:5091", "http://alice:***@127.0.0.1:5091"),
    ("https://ghp_token@example.com/x", "https://***@example.com/x"),
    ("s3://AKIA:SECRET@bucket/runs", "s3://AKIA:***@bucket/runs"),
    ("s3://bucket/runs?endpoint_override=h:9000&access_key=AK&secret_key=SK&scheme=http",
     "s3://bucket/runs?endpoint_override=h:9000&access_key=***&secret_key=***&scheme=http"),
    ("https://b.s3.amazonaws.com/k.pt?X-Amz-Algorithm=AWS4&X-Amz-Credential=AKIA%2F2026&X-Amz-Signature=ab12&"
     "X-Amz-Expires=60", "https://b.s3.amazonaws.com/k.pt?X-Amz-Algorithm=AWS4&X-Amz-Credential=***&"
                         "X-Amz-Signature=***&X-Amz-Expires=60"),
    ("https://acc.blob.core.windows.net/c/x?sv=2024&sig=xyz", "https://acc.blob.core.windows.net/c/x?sv=2024&sig=***"),
    ("gs://bucket/p?token=abc&x=1", "gs://bucket/p?token=***&x=1"),
    ("http://h:8265/#access_token=abc", "http://h:8265/#access_token=***"),
    ("sqlite:////tmp/mlflow.db", "sqlite:////tmp/mlflow.db"),
    ("ray://10.0.0.1:10001", "ray://10.0.0.1:10001"),
    ("/plain/path/runs", "/plain/path/runs"),
])
def test_redact_uri(uri, expected):
    assert redact_uri(uri) == expected


def test_secret_names_and_names_that_are_not():
    for name in ("token", "sig", "X-Amz-Signature", "X-Amz-Credential", "access_key", "secret", "password", "key",
                 "AWS_SECRET_ACCESS_KEY", "RAY_AUTH_TOKEN", "MLFLOW_TRACKING_PASSWORD", "api_key"):
        assert is_secret_name(name), name
    # PWD is the working directory; *_PATH names a file, not the secret; config keys are none of them
    for name in ("PWD", "RAY_AUTH_TOKEN_PATH", "storage_path", "tracking_uri", "monitor", "keep_checkpoints"):
        assert not is_secret_name(name), name
    assert not [k for k in config.Config().flat() if is_secret_name(k.rsplit(".", 1)[-1])]


def test_redact_text_covers_uris_in_sentences_and_environment_credentials(monkeypatch):
    monkeypatch.setenv("SOME_SERVICE_TOKEN", ENV_TOKEN)
    text = f"error: server http://alice:{PASSWORD}@h:1/api failed (token {ENV_TOKEN})"
    out = redact_text(text)
    assert PASSWORD not in out and ENV_TOKEN not in out
    assert out == "error: server http://alice:***@h:1/api failed (token ***)"
    assert one_line(RuntimeError(text)) == "RuntimeError: " + out


def test_config_written_anywhere_is_redacted_and_the_one_in_memory_is_not(tiny_cfg, tmp_path):
    uri = f"http://alice:{PASSWORD}@127.0.0.1:5091"
    cfg = tiny_cfg(f"tracking.tracking_uri={uri}", f"run.storage_path=file:///r?token={STORAGE_TOKEN}",
                   "model.kwargs={api_key: abcdef}")
    assert cfg.tracking.tracking_uri == uri  # what the run uses
    text = cfg.to_yaml(tmp_path / "c.yaml")
    flat = cfg.flat()
    for written in (text, (tmp_path / "c.yaml").read_text(), repr(flat), repr(cfg.redacted_dict())):
        assert PASSWORD not in written and STORAGE_TOKEN not in written and "abcdef" not in written
    assert flat["tracking.tracking_uri"] == "http://alice:***@127.0.0.1:5091"
    assert flat["run.storage_path"] == "file:///r?token=***" and flat["model.kwargs.api_key"] == PLACEHOLDER

    # a checkpoint's config is redacted at the file boundary, whatever the caller passed
    save_checkpoint({"model": {"w": torch.zeros(1)}, "config": cfg.to_dict()}, tmp_path / "ck")
    raw = (tmp_path / "ck" / "checkpoint.pt").read_bytes()
    assert PASSWORD.encode() not in raw and STORAGE_TOKEN.encode() not in raw
    assert load_checkpoint(tmp_path / "ck")["config"]["tracking"]["tracking_uri"] == "http://alice:***@127.0.0.1:5091"


def test_a_redacted_config_asks_for_the_credential_again(tiny_cfg, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RAYSEGTRAIN_TRACKING_TRACKING_URI", raising=False)
    saved = tmp_path / "best_config.yaml"
    tiny_cfg(f"tracking.tracking_uri=http://alice:{PASSWORD}@127.0.0.1:5091").to_yaml(saved)

    # missing: one line naming the key and where to give it
    with pytest.raises(ConfigError) as e:
        config.load(saved)
    msg = str(e.value)
    assert "\n" not in msg and "tracking.tracking_uri" in msg and "$MLFLOW_TRACKING_URI" in msg
    assert main(["fit", str(saved), "--print-config"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "tracking.tracking_uri was saved with its credential redacted" in err

    # the command line gives it again
    again = f"http://alice:{PASSWORD}@10.0.0.2:5000"
    assert config.load(saved, [f"tracking.tracking_uri={again}"]).tracking.tracking_uri == again
    # the environment gives it again: raysegtrain's own name for the key, or MLflow's variable
    monkeypatch.setenv("RAYSEGTRAIN_TRACKING_TRACKING_URI", again)
    assert config.load(saved).tracking.tracking_uri == again
    monkeypatch.delenv("RAYSEGTRAIN_TRACKING_TRACKING_URI")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", again)
    assert config.load(saved).tracking.tracking_uri == again
    # a redacted value in the environment does not count
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://alice:***@h")
    with pytest.raises(ConfigError, match="tracking.tracking_uri"):
        supply_redacted(yaml.safe_load(saved.read_text()))


def test_text_artifacts_go_to_mlflow_redacted(tmp_path, monkeypatch):
    monkeypatch.setenv("SOME_SERVICE_TOKEN", ENV_TOKEN)
    space = tmp_path / "space.yaml"
    space.write_text(f"base:\n  tracking: {{tracking_uri: 'http://alice:{PASSWORD}@h:1'}}   # the team's server\n"
                     f"  model:\n    kwargs:\n      api_key: {ENV_TOKEN}x\n"
                     f"overrides: [run.storage_path=s3://b/r?secret_key={STORAGE_TOKEN}]\n")
    c = tracking.client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = c.create_run(tracking.ensure_experiment(c, "e")).info.run_id
    tracking.log_artifact(c, run_id, space, "study")
    tracking.set_tag(c, run_id, "storage_path", f"s3://b/r?secret_key={STORAGE_TOKEN}")
    tracking.log_params(c, run_id, {"study.note": f"uses {ENV_TOKEN}"})
    logged = Path(c.download_artifacts(run_id, "study/space.yaml", str(tmp_path / "dl"))).read_text()
    run = c.get_run(run_id)
    everything = logged + repr(run.data.tags) + repr(run.data.params)
    for secret in (PASSWORD, STORAGE_TOKEN, ENV_TOKEN):
        assert secret not in everything
    assert "# the team's server" in logged and "api_key: ***" in logged  # comments and layout kept
    assert space.read_text().count(PASSWORD) == 1  # the user's own file is left as it was


def test_submit_study_sends_and_prints_no_credential():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import submit_study
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    args = submit_study.parse_args([
        "--address", f"http://ray:{PASSWORD}@127.0.0.1:8265", "--python", "/venv/bin/python",
        "--mlflow-uri", f"http://alice:{PASSWORD}@head:5000", "--storage", f"s3://b/r?secret_key={STORAGE_TOKEN}",
        "smoke.yaml", "budget.num_samples=2", f"model.kwargs.api_key={STORAGE_TOKEN}"])
    entry = submit_study.entrypoint(args)
    shown = submit_study.guidance(args.address, "job-1", args) + submit_study.credentials_note(args)
    for text in (entry, shown):
        assert PASSWORD not in text and STORAGE_TOKEN not in text
    assert "tracking.tracking_uri=http://alice:***@head:5000" in shlex.split(entry)
    assert "budget.num_samples=2" in shlex.split(entry)
    assert "$RAYSEGTRAIN_RUN_STORAGE_PATH" in shown and "$MLFLOW_TRACKING_URI" in shown


def test_the_interrupt_hint_shows_no_address_token(monkeypatch, capsys):
    """`fit --address` with a token, interrupted: the line that says how to continue shows it redacted."""
    import raysegtrain.train as train
    from raysegtrain.interrupt import Interrupted

    def interrupted(*a, **kw):
        raise Interrupted(2, "fit-x")

    monkeypatch.setattr(train, "fit", interrupted)
    address = f"ray://ray:{PASSWORD}@10.0.0.1:10001"
    assert main(["fit", f"tracking.tracking_uri=http://alice:{PASSWORD}@h:1", "--address", address]) == 130
    err = capsys.readouterr().err
    assert PASSWORD not in err and "--address ray://ray:***@10.0.0.1:10001" in err and "--resume fit-x" in err


def test_a_bug_keeps_its_traceback_without_the_credential(monkeypatch, capsys):
    import raysegtrain.train as train

    def bug(*a, **kw):
        raise RuntimeError(f"unexpected answer from http://alice:{PASSWORD}@h:1/api")

    monkeypatch.setattr(train, "fit", bug)
    assert main(["fit", "train.epochs=1"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "http://alice:***@h:1/api" in err and PASSWORD not in err


# ------------------------------------------------------------------------- one real fit, with real credentials
class BasicAuthProxy:
    """A local HTTP proxy that lets through only requests with `Authorization: Basic alice:PASSWORD` to a plain
    MLflow server behind it (MLflow's own basic-auth app needs Flask-WTF, which the project does not install)."""

    def __init__(self, upstream_port: int):
        expected = "Basic " + base64.b64encode(f"alice:{PASSWORD}".encode()).decode()
        self.authorized = 0
        self.refused: list[str] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _forward(self):
                if self.headers.get("Authorization") != expected:
                    proxy.refused.append(self.path)
                    self.send_response(401)
                    self.send_header("WWW-Authenticate", 'Basic realm="mlflow"')
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                proxy.authorized += 1
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                conn = http.client.HTTPConnection("127.0.0.1", upstream_port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "authorization")}
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                conn.close()

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_behind_basic_auth(tmp_path):
    """A real `mlflow server` (its store and artifacts under tmp_path/server) reachable only through the proxy."""
    server_dir = tmp_path / "server"
    server_dir.mkdir()
    port = free_port()
    log = open(server_dir / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                             "--backend-store-uri", f"sqlite:///{server_dir / 'mlflow.db'}",
                             "--artifacts-destination", str(server_dir / "artifacts"), "--workers", "1"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    proxy = None
    try:
        wait_until_healthy(proc, port, server_dir / "server.log")
        proxy = BasicAuthProxy(port)
        yield proxy, server_dir
    finally:
        if proxy is not None:
            proxy.close()
        import os
        import signal

        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
        log.close()


def wait_until_healthy(proc, port: int, log: Path, timeout_s: float = 120) -> None:
    """Blocks until the server answers /health (each probe waits on the socket; the total is bounded)."""
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, "mlflow server did not start: " + log.read_text()[-3000:]
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).close()
            return
        except (urllib.error.URLError, ConnectionError, OSError):
            time.sleep(0.5)


def files_under(*folders: Path) -> list[Path]:
    return [p for folder in folders for p in folder.rglob("*") if p.is_file()]


def test_fit_with_credentials_in_the_tracking_uri_and_storage_url_writes_none_of_them(
        tmp_path, ray_local, mlflow_behind_basic_auth, capfd, monkeypatch):
    from tests.conftest import TINY

    proxy, server_dir = mlflow_behind_basic_auth
    monkeypatch.setenv("SOME_SERVICE_TOKEN", ENV_TOKEN)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"http://alice:{PASSWORD}@127.0.0.1:{proxy.port}"
    with pytest.raises(urllib.error.HTTPError, match="401"):  # the server takes no request without the password
        urllib.request.urlopen(f"http://127.0.0.1:{proxy.port}/api/2.0/mlflow/experiments/search?max_results=1")
    refused_before = len(proxy.refused)

    runs = tmp_path / "runs"
    storage = f"file://{runs}?token={STORAGE_TOKEN}"  # a storage URL with a token parameter (pyarrow ignores it)
    code = main(["fit", *[o for o in TINY if not o.startswith("train.epochs")], "train.epochs=1",
                 f"tracking.tracking_uri={uri}", f"run.storage_path={storage}", "run.name=secret",
                 "--no-progress"])
    out, err = capfd.readouterr()
    assert code == 0, err[-3000:]

    # the run used the credential: every request of the run carried it (the one without is the store check's
    # probe of /health, which needs no login: any answer says the server is there)
    assert proxy.authorized > 10 and proxy.refused[refused_before:] == ["/health"]
    c = tracking.client(uri)
    exp = c.get_experiment_by_name("raysegtrain")
    (run,) = c.search_runs([exp.experiment_id], filter_string="attributes.run_name = 'secret'")
    assert run.info.status == "FINISHED"
    assert run.data.params["tracking.tracking_uri"] == f"http://alice:***@127.0.0.1:{proxy.port}"
    assert run.data.params["run.storage_path"] == f"file://{runs}?token=***"
    assert list(runs.glob("secret/checkpoint_*/checkpoint.pt"))  # the storage URL was used

    # no console line
    console = out + err
    assert f"MLflow run: {run.info.run_id} (http://alice:***@127.0.0.1:{proxy.port})" in console
    secrets = (PASSWORD, STORAGE_TOKEN)
    for secret in secrets:
        assert secret not in console
    # no MLflow param or tag, as the server returns them
    shown = repr(run.data.params) + repr(run.data.tags)
    assert not [s for s in secrets if s in shown]
    # no artifact, downloaded through the server, and no file of the server's store, database included
    downloaded = Path(c.download_artifacts(run.info.run_id, "", str(tmp_path / "artifacts")))
    written = files_under(downloaded, server_dir, runs)
    assert any(p.name == "checkpoint.pt" for p in written) and any(p.name == "config.yaml" for p in written)
    leaks = [(str(p), s) for p in written if p.name != "server.log" for s in secrets if s.encode() in p.read_bytes()]
    assert not leaks
    # and inside every checkpoint once loaded
    for p in written:
        if p.name == "checkpoint.pt":
            state = load_checkpoint(p)
            assert not [s for s in secrets if s in repr(state["config"])], p
            assert state["config"]["tracking"]["tracking_uri"] == f"http://alice:***@127.0.0.1:{proxy.port}"

    # the checkpoint saved redacted still predicts: nothing in predict needs the credential
    # a checkpoint folder, not Ray's checkpoint_manager_snapshot.json beside them (glob order is the file system's)
    best = next(p.parent for p in runs.glob("secret/checkpoint_*/checkpoint.pt"))
    assert main(["predict", str(best), str(_some_images(tmp_path)), "--out", str(tmp_path / "preds"), "--no-progress"]) == 0
    assert list((tmp_path / "preds").rglob("*.png"))


def _some_images(tmp_path: Path) -> Path:
    """Two images of the synthetic set, written as an ordinary folder."""
    out = tmp_path / "synth"
    assert main(["data", "synth", str(out), "--size", "64", "--num-train", "2", "--num-val", "1",
                 "--num-test", "1"]) == 0
    return next(p for p in out.rglob("images") if p.is_dir())


# --------------------------------------------------------------------------------------- a study's saved state
def test_a_study_saves_no_credential_in_its_state_and_files(tmp_path):
    """Tune pickles the study's callbacks into the study folder; the leaderboard and best config are written there
    too. None holds the tracking URI's password; a logger Tune restores takes it from this driver again."""
    import cloudpickle

    from raysegtrain.search_space import load_space
    from raysegtrain.study_report import write_best_config, write_leaderboard_csv
    from raysegtrain.study_status import StudyStatusTable
    from raysegtrain.study_tracking import MLflowTrialLogger, StudyRun

    uri = f"http://alice:{PASSWORD}@127.0.0.1:5091"
    space = load_space(ROOT / "search_spaces" / "smoke.yaml", [f"tracking.tracking_uri={uri}"])
    assert space.base_config.tracking.tracking_uri == uri
    logger = MLflowTrialLogger(space, "s", StudyRun(uri, "run-1", "1", "raysegtrain/s"))
    for callback in (logger, StudyStatusTable(space, "s")):
        saved = cloudpickle.dumps(callback)
        assert PASSWORD.encode() not in saved
    MLflowTrialLogger.driver_uris.clear()
    assert cloudpickle.loads(cloudpickle.dumps(logger)).uri == "http://alice:***@127.0.0.1:5091"
    MLflowTrialLogger(space, "s", StudyRun(uri, "run-1", "1", "raysegtrain/s"))  # the resumed driver, given the URI again
    restored = cloudpickle.loads(cloudpickle.dumps(logger))
    assert restored.uri == uri and restored.space.base_config.tracking.tracking_uri.endswith(":***@127.0.0.1:5091")
    assert PASSWORD not in repr(space.to_dict())

    config_of_a_trial = {"overrides": {"model.arch": "unet"}}
    write_best_config({"_config": config_of_a_trial}, space, tmp_path / "best_config.yaml")
    write_leaderboard_csv([{"trial_id": "t1", "param.note": f"http://u:{PASSWORD}@h"}], tmp_path / "leaderboard.csv")
    for f in ("best_config.yaml", "leaderboard.csv"):
        assert PASSWORD not in (tmp_path / f).read_text()
