"""Direct links into the MLflow UI: an experiment's training runs and one run's metrics.

    experiment_link("http://mlflow:5000", "3")       # http://mlflow:5000/#/experiments/3/runs?workflowType=...
    run_link("http://mlflow:5000", "3", run_id)      # .../#/experiments/3/runs/<run_id>/model-metrics?...

MLflow 3 keeps its sidebar's mode (GenAI or machine learning) in the browser's storage and starts in GenAI mode,
whose sidebar leads to traces and "Evaluation runs", not training runs (mlflow/mlflow issue 24498). Its pages read
the mode from the ``workflowType`` query parameter before the stored one, so these links open in machine-learning
mode whatever the browser holds. Only a tracking server has a UI: for a local store (sqlite, a path) the links
are those of ``mlflow ui`` started on it (:func:`local_ui_command`). A user:password@ in the URI stays out.
"""
from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

ML_MODE = "workflowType=machine_learning"
LOCAL_UI = "http://127.0.0.1:5000"  # where `mlflow ui` listens by default


def ui_base(uri: str) -> str | None:
    """The UI's root for a tracking URI (http or https), without credentials, query or trailing slash."""
    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return None
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit((parts.scheme, host, parts.path.rstrip("/"), "", ""))


def local_ui_command(uri: str) -> str | None:
    """The command that serves a local store's UI at LOCAL_UI; None for a tracking server."""
    if ui_base(uri) is not None or not uri:
        return None
    return f"mlflow ui --backend-store-uri {uri}"


def _base(uri: str) -> str | None:
    return ui_base(uri) or (LOCAL_UI if local_ui_command(uri) else None)


def experiment_link(uri: str, experiment_id: str) -> str | None:
    base = _base(uri)
    return f"{base}/#/experiments/{experiment_id}/runs?{ML_MODE}" if base else None


def run_link(uri: str, experiment_id: str, run_id: str) -> str | None:
    base = _base(uri)
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}/model-metrics?{ML_MODE}" if base else None


def link_lines(uri: str, experiment_id: str | None, run_id: str | None = None) -> list[str]:
    """The lines a command prints at its end: the training runs, the run's metrics, how to serve a local store."""
    if not experiment_id or not _base(uri):
        return []
    out = [f"MLflow training runs: {experiment_link(uri, experiment_id)}"]
    if run_id:
        out.append(f"MLflow run metrics:   {run_link(uri, experiment_id, run_id)}")
    if local_ui_command(uri):
        out.append(f"  (a local store: serve it with `{local_ui_command(uri)}`)")
    return out
