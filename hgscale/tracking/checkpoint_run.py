"""Results made after training (test scores, samples) go into the MLflow run that trained the checkpoint.

    run = checkpoint_run("runs/enwik8_xl/checkpoints")        # hgscale.checkpoint.run_link
    log_to_run(run, metrics={"test/bpc": 0.98}, artifacts=["samples.txt"])
"""
from __future__ import annotations

import logging
import time

log = logging.getLogger(__name__)


def log_to_run(run, metrics: dict | None = None, artifacts: list | None = None) -> bool:
    """Log ``metrics`` (at the checkpoint's step) and files into ``run`` (a
    :class:`hgscale.checkpoint.run_link.CheckpointRun`, or None: nothing to do). Never raises: results are already
    printed; tracking trouble is one warning. True when everything was logged."""
    if run is None:
        return False
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    from hgscale.core.secrets import mask_value

    try:
        client = MlflowClient(tracking_uri=run.tracking_uri)
        now = int(time.time() * 1000)
        if metrics:
            client.log_batch(run.run_id, metrics=[Metric(k, float(v), now, run.step) for k, v in metrics.items()])
        for a in artifacts or []:
            client.log_artifact(run.run_id, str(a))
        return True
    except Exception as e:  # noqa: BLE001 - a missing run or a server that is down must not lose the result
        log.warning("could not log to MLflow run %s at %s (%s: %s)", run.run_id, mask_value(run.tracking_uri),
                    type(e).__name__, mask_value(str(e))[:300])
        return False
