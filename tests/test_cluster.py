"""Cluster launch: the `cluster/` configs pass Ray's own validation, and a real multi-node Ray cluster on this machine
runs `fit` across nodes, a study submitted through the Ray Jobs API, and survives losing a worker node.

The local cluster is what cluster/README.md tells on-premise users to do: `ray start --head` plus `ray start
--address=...` per machine, token authentication on. Here every node is a `ray start --block` process of its own
(own process group, temp dir, custom resource and RST_NODE environment variable), so a node can be killed alone and
the whole cluster is stopped by the ids this file started. Nothing here touches the session's `ray_local` Ray: drivers
run in subprocesses that connect to this cluster by address.
"""

from __future__ import annotations

import copy
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from raysegtrain.hooks import Hook

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_DIR = ROOT / "cluster"
LAUNCHER_YAMLS = ["aws.yaml", "gcp.yaml", "onprem.yaml"]
KUBERAY_YAMLS = ["kuberay-raycluster.yaml", "kuberay-rayjob.yaml"]
SMOKE = ROOT / "search_spaces" / "smoke.yaml"


# ============================================================================================ (1) the configs
def load_yaml(name: str):
    docs = [d for d in yaml.safe_load_all((CLUSTER_DIR / name).read_text()) if d is not None]
    return docs[0] if len(docs) == 1 else docs


def ray_validate(config: dict) -> dict:
    """What `ray up` checks before it touches a cloud, offline: the raw YAML against Ray's JSON schema, then Ray's
    defaults merged in (`prepare_config`) and `validate_config` on the result (the schema again plus node-type checks).
    Private Ray API: tests only."""
    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


@pytest.mark.parametrize("name", LAUNCHER_YAMLS)
def test_launcher_yaml_passes_ray_validation(name):
    raw = load_yaml(name)
    prepared = ray_validate(raw)
    assert prepared["head_node_type"] in prepared["available_node_types"]
    if raw["provider"]["type"] != "local":
        workers = [t for n, t in raw["available_node_types"].items() if n != raw["head_node_type"]]
        assert any(t["resources"].get("GPU", 0) > 0 for t in workers), "a GPU worker type"
        assert all(t["max_workers"] >= t.get("min_workers", 0) for t in workers) and raw["max_workers"] > 0


@pytest.mark.parametrize("name", LAUNCHER_YAMLS)
def test_launcher_yaml_follows_the_project_rules(name):
    import raysegtrain

    raw = load_yaml(name)
    text = (CLUSTER_DIR / name).read_text()
    setup = " ".join(raw.get("setup_commands", []) + raw.get("head_setup_commands", []))
    assert f"raysegtrain=={raysegtrain.__version__}" in setup, "raysegtrain installed at the pinned version"
    head_start = " ".join(raw["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start and "0.0.0.0" not in yaml.safe_dump(raw)
    for cmds in (raw["head_start_ray_commands"], raw["worker_start_ray_commands"]):
        assert "RAY_AUTH_MODE=token" in " ".join(cmds), "token authentication on every node"
    assert any("auth_token" in remote for remote in raw["file_mounts"]), "the cluster token is copied to every node"
    assert "MLFLOW_TRACKING_URI" in setup and "run.storage_path" in text
    assert "# EDIT:" in text


@pytest.mark.parametrize("breakage, error", [
    (lambda c: c.pop("provider"), "'provider' is a required property"),
    (lambda c: c.update(max_workers="four"), "is not of type 'integer'"),
    (lambda c: c.update(setup_command=c.pop("setup_commands")), "Additional properties are not allowed"),
    (lambda c: c.update(head_node_type="ray.head.missing"), "head_node_type"),
    (lambda c: c["available_node_types"]["gpu_worker"].update(min_workers=99), "max_workers"),
    (lambda c: c["available_node_types"]["gpu_worker"]["resources"].update(GPU=0.5), "is not of type 'integer'"),
])
def test_broken_launcher_yaml_is_rejected(breakage, error):
    config = load_yaml("aws.yaml")
    breakage(config)
    with pytest.raises(Exception, match=re.escape(error)):
        ray_validate(config)


def test_broken_onprem_yaml_is_rejected():
    config = load_yaml("onprem.yaml")
    del config["provider"]["worker_ips"]
    with pytest.raises(Exception, match="worker_ips"):  # Ray's cli_logger.abort (a click exception)
        ray_validate(config)


def kuberay_problems(doc: dict) -> list[str]:
    """What a RayCluster / RayJob of ours must carry; [] when it does."""
    import raysegtrain

    problems = []
    if doc.get("apiVersion") != "ray.io/v1":
        problems.append(f"apiVersion {doc.get('apiVersion')!r} is not ray.io/v1")
    kind = doc.get("kind")
    spec = doc.get("spec") or {}
    if kind == "RayJob":
        entry = spec.get("entrypoint") or ""
        if "-m raysegtrain tune" not in entry:
            problems.append("RayJob entrypoint does not run `python -m raysegtrain tune`")
        if "run.storage_path=" not in entry:
            problems.append("RayJob entrypoint does not set run.storage_path")
        if spec.get("shutdownAfterJobFinishes") is not True:
            problems.append("RayJob keeps its GPUs after the job (shutdownAfterJobFinishes)")
        spec = spec.get("rayClusterSpec") or {}
    elif kind != "RayCluster":
        return [f"kind {kind!r} is neither RayCluster nor RayJob"]
    import ray

    if spec.get("rayVersion") != ray.__version__:
        problems.append(f"rayVersion {spec.get('rayVersion')!r} is not the Ray raysegtrain pins ({ray.__version__})")
    if spec.get("enableInTreeAutoscaling") is not True:
        problems.append("autoscaling is off (enableInTreeAutoscaling)")
    if (spec.get("authOptions") or {}).get("mode") != "token":
        problems.append("token authentication is off (authOptions.mode)")
    head = spec.get("headGroupSpec")
    if not isinstance(head, dict):
        return problems + ["no headGroupSpec"]
    params = head.get("rayStartParams")
    if not isinstance(params, dict) or any(not isinstance(v, str) for v in params.values()):
        problems.append("headGroupSpec.rayStartParams must be a mapping of strings")
    if head.get("serviceType", "ClusterIP") != "ClusterIP":
        problems.append(f"head service {head.get('serviceType')} opens the cluster beyond Kubernetes")
    groups = spec.get("workerGroupSpecs")
    if not isinstance(groups, list) or not groups:
        return problems + ["no workerGroupSpecs"]
    for g in groups:
        name = g.get("groupName")
        if not isinstance(g.get("rayStartParams"), dict):
            problems.append(f"worker group {name}: no rayStartParams")
        lo, n, hi = g.get("minReplicas", 0), g.get("replicas", 0), g.get("maxReplicas")
        if not (isinstance(hi, int) and 0 <= lo <= n <= hi and hi > 0):
            problems.append(f"worker group {name}: needs 0 <= minReplicas <= replicas <= maxReplicas > 0")
        containers = (((g.get("template") or {}).get("spec") or {}).get("containers")) or []
        gpus = [int((c.get("resources") or {}).get("limits", {}).get("nvidia.com/gpu", 0)) for c in containers]
        if not any(gpus):
            problems.append(f"worker group {name}: no nvidia.com/gpu limit")
    pods = [head.get("template") or {}] + [g.get("template") or {} for g in groups]
    text = yaml.safe_dump(doc)
    if f"raysegtrain=={raysegtrain.__version__}" not in text:
        problems.append("raysegtrain is not installed at the pinned version")
    for pod in pods:
        for c in (pod.get("spec") or {}).get("containers") or []:
            if not str(c.get("image", "")).startswith(f"rayproject/ray:{ray.__version__}"):
                problems.append(f"container {c.get('name')}: image {c.get('image')} is not Ray {ray.__version__}")
    return problems


def kuberay_docs(name: str) -> list[dict]:
    docs = load_yaml(name)
    return docs if isinstance(docs, list) else [docs]


@pytest.mark.parametrize("name", KUBERAY_YAMLS)
def test_kuberay_manifests_parse_and_carry_the_required_fields(name):
    docs = kuberay_docs(name)
    ray_docs = [d for d in docs if d.get("kind") in ("RayCluster", "RayJob")]
    assert len(ray_docs) == 1, [d.get("kind") for d in docs]
    assert kuberay_problems(ray_docs[0]) == []
    head = (ray_docs[0]["spec"].get("rayClusterSpec") or ray_docs[0]["spec"])["headGroupSpec"]
    if ray_docs[0]["kind"] == "RayCluster":  # interactive cluster: reach the dashboard by kubectl port-forward only
        assert head["rayStartParams"].get("dashboard-host") == "127.0.0.1"
    assert "0.0.0.0" not in yaml.safe_dump(ray_docs[0]).replace("dashboard-host: 0.0.0.0", "")


def test_kuberay_rayjob_study_is_a_valid_search_space(tmp_path):
    """The study the RayJob runs (a ConfigMap mounted into the head) loads with raysegtrain's own validation."""
    from raysegtrain.search_space import load_space

    docs = kuberay_docs("kuberay-rayjob.yaml")
    configmap = next(d for d in docs if d.get("kind") == "ConfigMap")
    job = next(d for d in docs if d.get("kind") == "RayJob")
    (name, text), = configmap["data"].items()
    assert name in job["spec"]["entrypoint"]
    (tmp_path / name).write_text(text)
    space = load_space(tmp_path / name, [])
    assert space.num_samples >= 1 and space.base_config.scaling.use_gpu == "true"


@pytest.mark.parametrize("breakage, problem", [
    (lambda d: d.update(apiVersion="ray.io/v1alpha1"), "apiVersion"),
    (lambda d: d["spec"].pop("headGroupSpec"), "no headGroupSpec"),
    (lambda d: d["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["limits"]
     .pop("nvidia.com/gpu"), "no nvidia.com/gpu limit"),
    (lambda d: d["spec"]["workerGroupSpecs"][0].update(minReplicas=9), "minReplicas"),
    (lambda d: d["spec"]["headGroupSpec"]["rayStartParams"].update({"num-cpus": 0}), "mapping of strings"),
    (lambda d: d["spec"].update(enableInTreeAutoscaling=False), "autoscaling"),
    (lambda d: d["spec"]["headGroupSpec"].update(serviceType="LoadBalancer"), "LoadBalancer"),
])
def test_broken_kuberay_manifest_is_rejected(breakage, problem):
    doc = kuberay_docs("kuberay-raycluster.yaml")[0]
    breakage(doc)
    assert any(problem in p for p in kuberay_problems(doc)), kuberay_problems(doc)


# ================================================================================ a local multi-node cluster
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def group_processes(pgid: int) -> list[tuple[int, str]]:
    """(pid, command name) of the live processes in process group PGID, from /proc."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        comm = text[text.index("(") + 1:text.rindex(")")]
        fields = text[text.rindex(")") + 2:].split()
        if fields[0] != "Z" and int(fields[2]) == pgid:
            found.append((int(stat.parent.name), comm))
    return found


class LocalCluster:
    """A Ray head and worker nodes on this machine, each a `ray start --block` in its own process group."""

    def __init__(self, env: dict[str, str] | None = None):
        # a short root: Ray's socket paths must stay under 107 bytes
        self.root = Path(tempfile.mkdtemp(prefix="rc", dir="/tmp"))
        self.token = secrets.token_hex(16)
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self.address = f"127.0.0.1:{self.gcs_port}"
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        base = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
        self.env = {**base, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token, "RAY_ADDRESS": self.address,
                    "RAY_TMPDIR": str(self.root), "RAY_DEDUP_LOGS": "0", "RAY_USAGE_STATS_ENABLED": "0",
                    "PYTHONUNBUFFERED": "1", **(env or {})}
        self.nodes: dict[str, subprocess.Popen] = {}
        self.specs: dict[str, tuple[list[str], dict[str, str] | None]] = {}

    def start(self, workers: int = 2, head_env: dict[str, str] | None = None) -> "LocalCluster":
        self.wait_started(self.add_node("head", ["--head", f"--port={self.gcs_port}",
                                                 f"--dashboard-port={self.dashboard_port}",
                                                 "--dashboard-host=127.0.0.1", f"--ray-client-server-port={free_port()}"],
                                        env=head_env))
        names = [self.add_node(f"node{i + 1}", [f"--address={self.address}"]) for i in range(workers)]
        for name in names:
            self.wait_started(name)
        return self

    def add_node(self, name: str, args: list[str], env: dict[str, str] | None = None) -> str:
        """Start node NAME (its own temp dir, so nodes can start together without sharing socket names)."""
        self.specs[name] = (args, env)
        temp = self.root / name
        temp.mkdir(exist_ok=True)
        log = self.root / f"{name}.log"
        cmd = [str(Path(sys.executable).parent / "ray"), "start", "--block", f"--temp-dir={temp}", "--num-cpus=1",
               "--num-gpus=0", f'--resources={{"{name}": 1}}', f"--dashboard-agent-listen-port={free_port()}",
               "--min-worker-port=0", "--max-worker-port=0", "--object-store-memory=100000000",
               "--disable-usage-stats", *args]
        with open(log, "w") as out:
            proc = subprocess.Popen(cmd, env={**self.env, "RST_NODE": name, **(env or {})}, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True, cwd=self.root)
        self.nodes[name] = proc
        return name

    def wait_started(self, name: str, timeout_s: float = 600, attempts: int = 3) -> None:
        """Until node NAME says it started, bounded by TIMEOUT_S. `ray start` gives its raylet a fixed 30 s to
        register with the GCS, which a loaded machine can miss: a node that gave up so is started again, up to
        ATTEMPTS times."""
        log = self.root / f"{name}.log"
        deadline = time.monotonic() + timeout_s
        while "Ray runtime started." not in log.read_text():
            proc = self.nodes[name]
            if proc.poll() is not None and "timed out during startup" in log.read_text() and attempts > 1:
                attempts -= 1
                try:  # whatever the failed start left of its process group (the GCS of a head, say)
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                self.add_node(name, *self.specs[name])
                continue
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"node {name} did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)

    def kill_raylet(self, name: str) -> int:
        """SIGKILL node NAME's raylet, as a machine that vanishes; its `ray start --block` then ends the rest."""
        raylets = [pid for pid, comm in group_processes(self.nodes[name].pid) if comm == "raylet"]
        assert len(raylets) == 1, raylets
        os.kill(raylets[0], signal.SIGKILL)
        return raylets[0]

    def stop(self) -> None:
        for proc in reversed(list(self.nodes.values())):  # workers first, the head last
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 5  # graceful first; a head that ran drivers can take 30 s to exit
        for proc in self.nodes.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            try:  # whatever of this node's own process group is left
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        shutil.rmtree(self.root, ignore_errors=True)

    def run_driver(self, func: str, spec: dict) -> tuple[subprocess.Popen, Path]:
        """Start `tests.test_cluster.FUNC(spec)` as a driver process on the "head" (this machine, connected by
        address, with the head's environment); returns the process and its log file."""
        spec_file = self.root / f"{func}-{time.monotonic_ns()}.json"
        spec_file.write_text(json.dumps(spec))
        log = spec_file.with_suffix(".log")
        code = f"import sys; from tests.test_cluster import {func}; {func}(sys.argv[1])"
        with open(log, "w") as out:
            proc = subprocess.Popen([sys.executable, "-c", code, str(spec_file)], cwd=ROOT, env=self.env, stdout=out,
                                    stderr=subprocess.STDOUT)
        return proc, log


def wait_for(proc: subprocess.Popen, log: Path, timeout_s: float) -> str:
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    text = log.read_text()
    assert proc.returncode == 0, f"driver exited {proc.returncode}:\n{text[-6000:]}"
    return text


# ---------------------------------------------------------------------------------- hooks (run in the workers)
class RecordPlacement(Hook):
    """Each attempt of each rank writes where it runs and which epoch it starts from (the checkpoint's after a
    restart) to OUT/rank<r>-pid<p>.json."""

    def __init__(self, out: str):
        self.out = out

    def before_train(self) -> None:
        import ray

        t = self.trainer
        record = {"rank": t.rank, "node": os.environ.get("RST_NODE"), "node_id": ray.get_runtime_context().get_node_id(),
                  "pid": os.getpid(), "start_epoch": t.epoch, "time": time.time()}
        Path(self.out, f"rank{t.rank}-pid{os.getpid()}.json").write_text(json.dumps(record))


class AwaitNodeLoss(Hook):
    """In epoch EPOCH (0-based; after the previous epoch's checkpoint), the first rank that is not on the head writes
    MARKER with its node's name, then waits for the test to kill that node. Later attempts find MARKER and train on."""

    def __init__(self, marker: str, epoch: int = 1, wait_s: float = 120):
        self.marker, self.epoch, self.wait_s = marker, epoch, wait_s

    def after_step(self, info) -> None:
        node = os.environ.get("RST_NODE")
        if info.epoch != self.epoch or node == "head" or os.path.exists(self.marker + ".claim"):
            return
        try:  # one rank only, across nodes: the first to create the claim
            os.close(os.open(self.marker + ".claim", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
        tmp = f"{self.marker}.{os.getpid()}.tmp"
        Path(tmp).write_text(json.dumps({"node": node, "rank": self.trainer.rank, "pid": os.getpid()}))
        os.replace(tmp, self.marker)  # the test sees the marker complete or not at all
        deadline = time.monotonic() + self.wait_s
        while time.monotonic() < deadline:  # the node is killed under this loop
            time.sleep(0.2)
        raise RuntimeError(f"node {node} was not killed within {self.wait_s} s")


# ------------------------------------------------------------------------------ driver (a separate process)
def fit_driver(spec_path: str) -> None:
    """`fit` from a process on the head, like `raysegtrain fit --address ...`: the cluster's address, the TINY config
    plus SPEC's overrides, SPEC's hooks; writes the FitResult to SPEC["result"]."""
    import dataclasses

    from raysegtrain import config
    from raysegtrain.train import fit
    from tests.conftest import TINY

    spec = json.loads(Path(spec_path).read_text())
    hooks = [RecordPlacement(spec["placements"])]
    if spec.get("kill_marker"):
        hooks.append(AwaitNodeLoss(spec["kill_marker"], epoch=spec.get("kill_epoch", 1)))
    cfg = config.load(None, [*TINY, *spec["overrides"]])
    result = fit(cfg, address=spec["address"], hooks=hooks, progress="lines")
    Path(spec["result"]).write_text(json.dumps(dataclasses.asdict(result), default=str))


def registered_epoch(run_dir: Path) -> int | None:
    """The epoch of the latest checkpoint Ray Train's controller has recorded for the run in RUN_DIR, if any."""
    try:
        state = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
        return int(state["latest_checkpoint_result"]["metrics"]["epoch"])
    except (OSError, ValueError, KeyError, TypeError):  # not written yet, or caught mid-write
        return None


def placements(folder: Path) -> list[dict]:
    return sorted((json.loads(p.read_text()) for p in folder.glob("rank*.json")), key=lambda r: r["time"])


# ========================================================================================== (2)-(4) the runs
FIT_ON_CLUSTER = ["scaling.num_workers=2", "scaling.use_gpu=false", "scaling.placement_strategy=STRICT_SPREAD",
                  "data.synthetic.num_val=7"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Head + 2 worker nodes, 1 CPU each; MLflow's store on the head (MLFLOW_TRACKING_URI in the head's environment
    only, as cluster/*.yaml set it), checkpoints in a folder every node sees (the NFS of cluster/onprem.yaml)."""
    work = tmp_path_factory.mktemp("cluster")
    (work / "head").mkdir()
    mlflow_uri = f"sqlite:///{work / 'head' / 'mlflow.db'}"
    c = LocalCluster(env={"RAYSEGTRAIN_CACHE": os.environ["RAYSEGTRAIN_CACHE"]})
    try:
        c.start(workers=2, head_env={"MLFLOW_TRACKING_URI": mlflow_uri})
        c.work, c.mlflow_uri, c.shared = work, mlflow_uri, work / "shared"
        yield c
    finally:
        c.stop()


def test_fit_spreads_two_workers_over_two_nodes(cluster, tmp_path):
    from raysegtrain import tracking

    (tmp_path / "placements").mkdir()
    spec = {"address": cluster.address, "placements": str(tmp_path / "placements"), "result": str(tmp_path / "r.json"),
            "overrides": [*FIT_ON_CLUSTER, "run.name=spread", f"run.storage_path={cluster.shared}",
                          f"tracking.tracking_uri={cluster.mlflow_uri}"]}
    proc, log = cluster.run_driver("fit_driver", spec)
    wait_for(proc, log, timeout_s=300)
    result = json.loads((tmp_path / "r.json").read_text())

    where = placements(tmp_path / "placements")
    assert sorted(r["rank"] for r in where) == [0, 1], where
    assert len({r["node_id"] for r in where}) == 2 and len({r["node"] for r in where}) == 2, where
    assert [h["epoch"] for h in result["history"]] == [1, 2]
    assert Path(result["best_checkpoint"]).is_relative_to(cluster.shared / "spread")
    assert list((cluster.shared / "spread").glob("checkpoint_*/checkpoint.pt"))

    db = cluster.work / "head" / "mlflow.db"
    assert db.is_file() and result["tracking_uri"] == cluster.mlflow_uri
    c = tracking.client(cluster.mlflow_uri)
    run = c.get_run(result["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.params["scaling.placement_strategy"] == "STRICT_SPREAD"
    assert sorted(m.step for m in c.get_metric_history(run.info.run_id, "val_iou")) == [1, 2]


def test_study_submitted_through_the_jobs_api(cluster, tmp_path):
    from ray.job_submission import JobSubmissionClient

    from raysegtrain import tracking

    study = tmp_path / "study"
    study.mkdir()
    shutil.copy(SMOKE, study / "smoke.yaml")
    # submitted as from a laptop: no cluster address or token in the environment, the token in a file
    token_file = tmp_path / "auth_token"
    token_file.write_text(cluster.token)
    laptop = {k: v for k, v in cluster.env.items() if not k.startswith("RAY_")}
    laptop["RAY_AUTH_TOKEN_PATH"] = str(token_file)
    cmd = [sys.executable, str(ROOT / "scripts" / "submit_study.py"), "--address", cluster.dashboard,
           "--python", sys.executable, "--working-dir", str(study), "--storage", str(cluster.shared),
           "--name", "jobstudy", "smoke.yaml", "budget.num_samples=2", "asha.max_epochs=2"]
    wrong = tmp_path / "wrong_token"
    wrong.write_text("not-the-cluster-token")
    refused = subprocess.run(cmd, env={**laptop, "RAY_AUTH_TOKEN_PATH": str(wrong)}, capture_output=True, text=True,
                             timeout=120)
    assert refused.returncode == 2 and "Invalid authentication token" in refused.stderr and not refused.stdout, \
        refused.stderr
    sub = subprocess.run(cmd, env=laptop, capture_output=True, text=True, timeout=120)
    assert sub.returncode == 0, sub.stderr
    job_id = sub.stdout.strip()
    assert re.fullmatch(r"raysegtrain-tune-jobstudy-\d{8}-\d{6}", job_id), sub.stdout
    assert f"ray job logs --address {cluster.dashboard} --follow {job_id}" in sub.stderr

    client = JobSubmissionClient(cluster.dashboard, headers={"Authorization": f"Bearer {cluster.token}"})
    status = poll_job(client, job_id, timeout_s=360)
    logs = client.get_job_logs(job_id)
    assert status == "SUCCEEDED", logs[-6000:]
    info = client.get_job_info(job_id)
    assert info.driver_info is not None and info.entrypoint.startswith(f"{sys.executable} -m raysegtrain tune")

    # the study's MLflow runs are in the head's store (MLFLOW_TRACKING_URI of the head's environment)
    c = tracking.client(cluster.mlflow_uri)
    exp = c.get_experiment_by_name("raysegtrain/jobstudy")  # a study's own experiment
    parents = c.search_runs([exp.experiment_id], filter_string="tags.`raysegtrain.study` = 'jobstudy' and "
                                                               "tags.`raysegtrain.kind` = 'study'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED", parents
    children = c.search_runs([exp.experiment_id],
                             filter_string=f"tags.`mlflow.parentRunId` = '{parents[0].info.run_id}'")
    states = [(ch.info.status, ch.data.tags.get("state")) for ch in children]
    assert len(children) == 2 and all(status == "FINISHED" for status, _ in states), (states, logs[-6000:])
    assert (cluster.shared / "jobstudy" / "leaderboard.csv").is_file()
    assert list((cluster.shared / "jobstudy").rglob("checkpoint_*/checkpoint.pt"))  # the kept trials' best


def poll_job(client, job_id: str, timeout_s: float) -> str:
    """The job's status once it is terminal, polled (bounded by TIMEOUT_S)."""
    deadline = time.monotonic() + timeout_s
    status = None
    while time.monotonic() < deadline:
        status = str(client.get_job_status(job_id).value)
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            return status
        time.sleep(1)
    client.stop_job(job_id)
    return f"still {status} after {timeout_s} s"


def test_losing_a_worker_node_resumes_from_the_last_checkpoint(cluster, tmp_path):
    """In epoch 2 of 3 the node of a rank that is not on the head is lost (its raylet SIGKILLed); with
    run.max_failures=1 Ray Train restarts the worker group on the two nodes left, from the epoch-1 checkpoint."""
    from raysegtrain import tracking
    from raysegtrain.checkpoint import load_checkpoint

    (tmp_path / "placements").mkdir()
    marker = tmp_path / "kill-this-node.json"
    spec = {"address": cluster.address, "placements": str(tmp_path / "placements"), "result": str(tmp_path / "r.json"),
            "kill_marker": str(marker), "kill_epoch": 1,
            "overrides": [*FIT_ON_CLUSTER, "run.name=nodeloss", "run.max_failures=1", "train.epochs=3",
                          f"run.storage_path={cluster.shared}", f"tracking.tracking_uri={cluster.mlflow_uri}"]}
    proc, log = cluster.run_driver("fit_driver", spec)
    victim = None
    try:
        deadline = time.monotonic() + 240
        # kill once a non-head rank waits in epoch 2 (the hook's marker) and Ray Train has recorded the epoch-1
        # checkpoint (its controller's snapshot in the run folder): a node lost between a report and its recording
        # restarts from the checkpoint before
        while not (marker.exists() and registered_epoch(cluster.shared / "nodeloss") == 1):
            assert proc.poll() is None, log.read_text()[-6000:]
            assert time.monotonic() < deadline, "no rank reached epoch 2 on a worker node"
            time.sleep(0.2)
        victim = json.loads(marker.read_text())["node"]
        cluster.kill_raylet(victim)
        wait_for(proc, log, timeout_s=360)
    finally:
        if proc.poll() is None:
            proc.kill()
        if victim is not None:  # the module's cluster keeps a head and two live worker nodes
            cluster.wait_started(cluster.add_node(f"{victim}-replacement", [f"--address={cluster.address}"]))

    result = json.loads((tmp_path / "r.json").read_text())
    assert [h["epoch"] for h in result["history"]] == [1, 2, 3]
    where = placements(tmp_path / "placements")
    first, second = where[:2], where[2:]
    assert victim in {r["node"] for r in first} and len(second) == 2, where
    assert victim not in {r["node"] for r in second}, "the restarted workers avoid the lost node"
    assert len({r["node_id"] for r in second}) == 2, where
    assert [r["start_epoch"] for r in first] == [0, 0] and [r["start_epoch"] for r in second] == [1, 1], where
    assert load_checkpoint(result["last_checkpoint"])["epoch"] == 3
    assert Path(result["last_checkpoint"]).is_relative_to(cluster.shared / "nodeloss")
    run = tracking.client(cluster.mlflow_uri).get_run(result["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert sorted(m.step for m in tracking.client(cluster.mlflow_uri).get_metric_history(run.info.run_id,
                                                                                          "val_iou")) == [1, 2, 3]
