#!/usr/bin/env python3
"""Submit a raysegtrain study (or fit) to a Ray cluster through the Ray Jobs API; print the job id and where to look.

    scripts/submit_study.py --python /home/ubuntu/rst/bin/python --working-dir ./study \\
        smoke.yaml budget.num_samples=12 run.storage_path=s3://my-bucket/raysegtrain
    scripts/submit_study.py --fit --python /home/ubuntu/rst/bin/python my_fit.yaml scaling.num_workers=8

stdout carries the job id alone (`JOB=$(scripts/submit_study.py ...)`); everything for humans goes to stderr.

- ADDRESS is the head's dashboard as seen from here: `http://127.0.0.1:8265` after `ray dashboard cluster/aws.yaml`
  (or `kubectl port-forward svc/<cluster>-head-svc 8265`). The dashboard is never opened to the world.
- Token authentication (Ray 2.60): the token is taken from $RAY_AUTH_TOKEN, else $RAY_AUTH_TOKEN_PATH, else
  ~/.ray/auth_token, and sent as `Authorization: Bearer ...`. It must be the cluster's token (see cluster/README.md).
- --python names the interpreter of the environment raysegtrain is installed in on the cluster: `ray job submit`
  runs the entrypoint with whatever `python` is first on the head's PATH otherwise.
- --working-dir (optional) is uploaded and becomes the job's working directory: put the space/config YAML there.
  Relative paths in it (run.storage_path, tracking URIs) would land inside Ray's temp folder on the head, which
  `ray down` deletes: use absolute, NFS or s3:// / gs:// paths (this script refuses a relative --storage).
- Credentials (a tracking URI's `user:password@`, a storage URL's keys, `token=`/`sig=` parameters) are not sent:
  Ray keeps a job's entrypoint in its metadata, readable by everyone who can read the cluster. The entrypoint carries
  them redacted (`***`), and raysegtrain on the cluster takes them from its environment (`$MLFLOW_TRACKING_URI`,
  `$RAYSEGTRAIN_RUN_STORAGE_PATH`, `$RAYSEGTRAIN_<SECTION>_<KEY>`, or the storage's own credentials such as
  `$AWS_ACCESS_KEY_ID`); this script says which keys need it. Nothing it prints shows a credential either.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shlex
import sys
import time
from pathlib import Path

if (Path(__file__).resolve().parents[1] / "raysegtrain").is_dir():  # the checkout's own package, installed or not
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from raysegtrain.redaction import environment_names, redact_text, redact_value  # noqa: E402

TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def find_token() -> str | None:
    """The cluster token as Ray looks it up: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, then ~/.ray/auth_token."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token").expanduser()
    return path.read_text().strip() if path.is_file() else None


def overrides_sent(args) -> tuple[list[str], list[str]]:
    """The job's `key=value` overrides with the storage/MLflow ones, credentials redacted; and the keys whose value
    was redacted (the cluster's environment must supply them)."""
    overrides = list(args.overrides)
    if args.storage:
        overrides.append(f"run.storage_path={args.storage}")
    if args.mlflow_uri:
        overrides.append(f"tracking.tracking_uri={args.mlflow_uri}")
    sent, redacted = [], []
    for word in overrides:
        key, eq, value = word.partition("=")
        clean = f"{key}={redact_value(key, value)}" if eq else redact_text(word)
        if clean != word:
            redacted.append(key)
        sent.append(clean)
    return sent, redacted


def entrypoint(args) -> str:
    """`<python> -m raysegtrain tune SPACE ... --no-progress` (or `fit CONFIG ...`), with the storage/MLflow overrides
    (credentials redacted: `overrides_sent`)."""
    overrides, _ = overrides_sent(args)
    words = [args.python, "-m", "raysegtrain", "fit" if args.fit else "tune", args.target, *overrides, "--no-progress"]
    if args.name and not args.fit:
        words += ["--name", args.name]
    return shlex.join(words)


def submission_id(args) -> str:
    kind = "fit" if args.fit else "tune"
    stem = args.name or (Path(args.target).stem if "=" not in args.target else "run")
    stem = re.sub(r"[^A-Za-z0-9_-]+", "-", stem).strip("-") or kind
    return f"raysegtrain-{kind}-{stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def guidance(address: str, job_id: str, args) -> str:
    """What to do next, for a human; credentials redacted."""
    return redact_text(_guidance(address, job_id, args))


def credentials_note(args) -> str | None:
    """The keys whose credentials were not sent, and where the cluster takes them from; None when none were."""
    _, keys = overrides_sent(args)
    if not keys:
        return None
    where = "; ".join(f"{k}: {' or '.join('$' + n for n in environment_names(k))}" for k in keys)
    return (f"credentials not sent with the job (Ray keeps its entrypoint): the cluster's environment must supply "
            f"them ({where}), or the storage's own credentials")


def _guidance(address: str, job_id: str, args) -> str:
    storage = args.storage or ("the run.storage_path of the config (absolute, NFS or s3:// / gs:// on a cluster)")
    mlflow = args.mlflow_uri or "the head's $MLFLOW_TRACKING_URI (cluster/*.yaml set it on the head)"
    return "\n".join([
        f"job {job_id} submitted to {address}",
        f"  follow the logs:  ray job logs --address {address} --follow {job_id}",
        f"  status / stop:    ray job status --address {address} {job_id}  |  ray job stop --address {address} {job_id}",
        f"  dashboard:        {address}/#/jobs/{job_id}",
        f"  checkpoints:      {storage}",
        f"  MLflow:           {mlflow}",
        "                    the UI runs on the head bound to 127.0.0.1; forward its port (cluster/README.md):",
        "                    ray exec cluster/aws.yaml 'raysegtrain ui --port 5000' --port-forward 5000",
    ])


def client_for(address: str):
    from ray.job_submission import JobSubmissionClient

    # Ray lets $RAY_API_SERVER_ADDRESS, then $RAY_ADDRESS, override the address a client is given (a GCS address
    # there would be looked up without our token): the address asked for wins.
    os.environ["RAY_API_SERVER_ADDRESS"] = address
    token = find_token()
    headers = {"Authorization": f"Bearer {token}"} if token else None
    return JobSubmissionClient(address, headers=headers)


async def _tail(client, job_id: str) -> None:
    async for chunk in client.tail_job_logs(job_id):
        sys.stderr.write(redact_text(chunk))
        sys.stderr.flush()


def wait(client, job_id: str, follow: bool, timeout_s: float | None) -> str:
    """Stream the logs (FOLLOW) until the job ends, then return its status; TIMEOUT_S bounds the whole wait (the
    job itself keeps running)."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    if follow:
        try:
            asyncio.run(asyncio.wait_for(_tail(client, job_id), timeout_s))
        except asyncio.TimeoutError:
            pass
    while True:
        status = str(client.get_job_status(job_id).value)
        if status in TERMINAL:
            return status
        if deadline is not None and time.monotonic() > deadline:
            return status
        time.sleep(2)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", help="search-space YAML for tune (default) or fit config YAML with --fit, as the job "
                                  "sees it (relative to --working-dir)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides passed to raysegtrain")
    p.add_argument("--address", default=os.environ.get("RAY_API_SERVER_ADDRESS", "http://127.0.0.1:8265"),
                   help="the head's dashboard URL (default $RAY_API_SERVER_ADDRESS or http://127.0.0.1:8265)")
    p.add_argument("--python", default=os.environ.get("RAYSEGTRAIN_CLUSTER_PYTHON", "python"),
                   help="interpreter on the cluster with raysegtrain installed (default $RAYSEGTRAIN_CLUSTER_PYTHON "
                        "or python), e.g. /home/ubuntu/rst/bin/python")
    p.add_argument("--working-dir", help="local folder uploaded as the job's working directory (YAMLs live here)")
    p.add_argument("--storage", help="run.storage_path for checkpoints/results: s3://..., gs://..., or a shared path")
    p.add_argument("--mlflow-uri", help="tracking.tracking_uri (default: the head's MLFLOW_TRACKING_URI)")
    p.add_argument("--name", help="study name (tune --name); also names the job")
    p.add_argument("--fit", action="store_true", help="submit `raysegtrain fit TARGET` instead of a study")
    p.add_argument("--wait", action="store_true", help="stream the logs and exit 0 only if the job SUCCEEDED")
    p.add_argument("--timeout", type=float, default=None,
                   help="with --wait: stop waiting after this many seconds (exit 1; the job keeps running)")
    args = p.parse_args(argv)
    if args.storage and "://" not in args.storage and not args.storage.startswith("/"):
        p.error(f"--storage {args.storage!r} is relative: it would land in the job's temporary working dir")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from ray.exceptions import AuthenticationError

    runtime_env = {"working_dir": str(Path(args.working_dir).resolve())} if args.working_dir else None
    try:
        client = client_for(args.address)
        job_id = client.submit_job(entrypoint=entrypoint(args), runtime_env=runtime_env,
                                   submission_id=submission_id(args),
                                   metadata={"tool": "raysegtrain", "kind": "fit" if args.fit else "tune"})
    except AuthenticationError as e:
        print(f"error: {redact_text(str(e).splitlines()[0])} (the token sent: $RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH or "
              f"~/.ray/auth_token must be the cluster's)", file=sys.stderr)
        return 2
    except ConnectionError as e:
        print(f"error: {redact_text(str(e))} (is the dashboard forwarded? `ray dashboard cluster/<cloud>.yaml`)", file=sys.stderr)
        return 2
    print(job_id, flush=True)
    print(guidance(args.address, job_id, args), file=sys.stderr, flush=True)
    note = credentials_note(args)
    if note:
        print(note, file=sys.stderr, flush=True)
    if not args.wait:
        return 0
    status = wait(client, job_id, follow=True, timeout_s=args.timeout)
    print(f"job {job_id}: {status}", file=sys.stderr)
    return 0 if status == "SUCCEEDED" else 1


if __name__ == "__main__":
    sys.exit(main())
