"""Links into MLflow's UI (3.17), as we print them and write them into run descriptions. No MLflow import: these are
URLs only.

MLflow 3.17's UI is a hash-routed page that opens experiments in its GenAI mode (traces, evaluations) unless the
route's query says `workflowType=machine_learning` (read by the UI's workflow-type context from the route's search
parameters; the choice is otherwise remembered per browser). Every link here carries it, so each opens the training
runs view. A runs-table link may also name a saved view (`viewStateShareKey=KEY`): the UI then loads the experiment
tag `mlflow.sharedViewState.KEY` (JSON: search facets such as `searchFilter`/`orderByKey`/`orderByAsc`, and table
state such as `selectedColumns`) as the page's filter, order and columns.
"""

from __future__ import annotations

import json
from urllib.parse import quote, urlencode

TRAINING_VIEW = {"workflowType": "machine_learning"}
SHARED_VIEW_TAG_PREFIX = "mlflow.sharedViewState."
DEFAULT_UI = "http://127.0.0.1:5000"  # what `raysegtrain ui` serves when port 5000 is free


def ui_base(tracking_uri: str | None = None, host: str | None = None, port: int | None = None) -> str:
    """Where the UI is: HOST:PORT when given (a UI we serve); else the tracking server itself when the store is an
    http(s) server (it serves the UI); else `raysegtrain ui`'s default address."""
    if host and port:
        return f"http://{host}:{port}"
    if tracking_uri and tracking_uri.startswith(("http://", "https://")):
        return tracking_uri.rstrip("/")
    return DEFAULT_UI


def _query(**extra: str) -> str:
    return urlencode({**extra, **TRAINING_VIEW})


def home_route() -> str:
    """The experiments list, in the training view."""
    return f"#/?{_query()}"


def runs_route(experiment_id: str, share_key: str | None = None) -> str:
    """`#/experiments/ID/runs?...` (a hash route: also a link within a run description, whatever the host)."""
    extra = {"viewStateShareKey": share_key} if share_key else {}
    return f"#/experiments/{experiment_id}/runs?{_query(**extra)}"


def run_route(experiment_id: str, run_id: str) -> str:
    return f"#/experiments/{experiment_id}/runs/{run_id}?{_query()}"


def compare_route(experiment_id: str, run_ids: list[str]) -> str:
    """MLflow's compare page of RUN_IDS (`#/compare-runs?runs=[...]&experiments=[...]`, JSON lists)."""
    runs = quote(json.dumps(list(run_ids)), safe="")
    experiments = quote(json.dumps([experiment_id]), safe="")
    return f"#/compare-runs?runs={runs}&experiments={experiments}&{_query()}"


def url(base: str, route: str) -> str:
    return f"{base.rstrip('/')}/{route}"


def shared_view_tag(share_key: str) -> str:
    return SHARED_VIEW_TAG_PREFIX + share_key


def column(kind: str, key: str) -> str:
    """A runs-table column as the UI names it: kind `attributes` | `params` | `metrics` | `tags`, then the key in
    backticks (`params.\\`model.arch\\``)."""
    return f"{kind}.`{key}`"
