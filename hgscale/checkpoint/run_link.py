"""Which MLflow run trained a checkpoint: a training checkpoint's ``hgscale.json`` names its run id and step; an
exported directory keeps them in ``run.json``. Results made later (test scores, samples) go to that run through
:func:`hgscale.tracking.checkpoint_run.log_to_run`.

    run = checkpoint_run("runs/enwik8_xl/checkpoints")        # None: no run recorded, or tracking was off

The tracking URI is the training config's (``tracking.uri``, else ``MLFLOW_TRACKING_URI``, else the SQLite store in
its run_dir). Checkpoints hold URIs with credentials masked: for such a URI the credentials must come from
``MLFLOW_TRACKING_URI`` (or MLflow's own variables), never from the checkpoint.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from hgscale.checkpoint.layout import META, CheckpointError, resolve
from hgscale.config import config_from_dict

RUN_FILE = "run.json"  # in an exported directory: {"run_id", "step", "tracking_uri"}


@dataclass(frozen=True)
class CheckpointRun:
    run_id: str
    step: int
    tracking_uri: str


def _unmasked(uri: str) -> str:
    from hgscale.core.secrets import MASK

    # the training URI carried credentials, masked when saved: take them from the environment
    return os.environ.get("MLFLOW_TRACKING_URI", "") if MASK in uri else uri


def save_run_file(run: CheckpointRun | None, out: Path) -> None:
    """Keep ``run`` beside an exported model (credentials in its URI masked)."""
    from hgscale.core.secrets import mask_value

    if run is not None:
        (Path(out) / RUN_FILE).write_text(json.dumps({"run_id": run.run_id, "step": run.step,
                                                      "tracking_uri": mask_value(run.tracking_uri)}))


def checkpoint_run(path: str | Path) -> CheckpointRun | None:
    """The run that trained the checkpoint at ``path`` (training or exported directory), or None."""
    path = Path(path)
    if (path / RUN_FILE).is_file():
        rec = json.loads((path / RUN_FILE).read_text())
        uri = _unmasked(rec.get("tracking_uri", ""))
        return CheckpointRun(rec["run_id"], int(rec["step"]), uri) if rec.get("run_id") and uri else None
    try:
        root, tag = resolve(path)
    except CheckpointError:
        return None
    meta = json.loads((root / tag / META).read_text())
    cfg = config_from_dict(meta["config"], validate=False)
    if not meta.get("run_id") or not cfg.tracking.enabled:
        return None
    from hgscale.tracking.tracker import resolve_uri

    uri = _unmasked(resolve_uri(cfg))
    return CheckpointRun(meta["run_id"], int(meta["step"]), uri) if uri else None


def log_to_training_run(checkpoint: str | Path, metrics: dict | None = None,
                        artifacts: list | None = None) -> CheckpointRun | None:
    """Metrics (at the checkpoint's step) and files into the run that trained ``checkpoint``; that run when all was
    logged, else None (no run recorded, or tracking trouble: one warning, the result is already printed)."""
    from hgscale.tracking.checkpoint_run import log_to_run

    run = checkpoint_run(checkpoint)
    return run if log_to_run(run, metrics=metrics, artifacts=artifacts) else None
