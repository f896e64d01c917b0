"""The sweep in MLflow: a parent run holding the plan, and the sweep's tags on each of its training runs.

    parent = ensure_parent(plan)     # created once (its id kept in plan.json), RUNNING again on a rerun
    tag_run(plan, run)               # after a run: hgscale.sweep, .model, .budget, .seed, .cell ... and its parent
    sync_tags(plan)                  # every run that has a checkpoint (runs trained by Slurm array tasks)

A training run learns its MLflow run id only once it starts, and the trainer takes no tags from outside, so the
tags are added afterwards, to the run its checkpoint names (``hgscale.json``), by whoever comes next: the local
sweep after each run, the next round of a Slurm sweep, and ``hgscale report --sweep``. Everything is idempotent.
Tag and parameter values are masked (hgscale.core.secrets).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from hgscale.checkpoint.layout import CheckpointError, latest_tag, read_meta
from hgscale.core.secrets import mask_secrets, mask_value
from hgscale.sweep.plan import budget_label, kv_label

log = logging.getLogger("hgscale.sweep")
SWEEP_TAG, KIND_TAG, PARENT_TAG = "hgscale.sweep", "hgscale.kind", "mlflow.parentRunId"


def store_uri(plan: dict) -> str:
    """The tracking URI every run of the sweep logs to (credentials from the environment, never from plan.json)."""
    from hgscale.config import load_config
    from hgscale.tracking import resolve_uri

    return resolve_uri(load_config(plan["config"], plan["overrides"], validate=False))


def client(plan: dict):
    for name in ("alembic", "mlflow.store.db.utils"):
        logging.getLogger(name).setLevel(logging.WARNING)
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=store_uri(plan))


def _experiment_id(c, plan: dict) -> str:
    from hgscale.tracking.mlflow_sink import EXPERIMENT_KIND

    name = plan["tracking"]["experiment"]
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    local = store_uri(plan).startswith("sqlite:")  # artifacts beside the store, as the trainer puts them
    return c.create_experiment(name, artifact_location=(Path(plan["out"]) / "mlartifacts").as_uri() if local else None,
                               tags={EXPERIMENT_KIND[0]: EXPERIMENT_KIND[1]})


def _params(plan: dict) -> dict[str, str]:
    opts = mask_secrets(plan["options"])
    out = {k: json.dumps(v) if isinstance(v, (list, dict)) else str(v) for k, v in opts.items()}
    out.update({"runs": str(len(plan["runs"]) + len(plan["pending"])), "sweep_dir": mask_value(plan["out"])})
    return {f"sweep.{k}": v[:6000] for k, v in out.items()}


def ensure_parent(plan: dict) -> str | None:
    """The sweep's parent run (tag hgscale.kind=sweep): created once, its id kept in ``plan["parent_run_id"]``, set
    RUNNING again by a rerun. None when tracking is off."""
    if not plan["tracking"]["enabled"]:
        return None
    from mlflow.entities import Param, RunStatus

    c = client(plan)
    rid = plan.get("parent_run_id")
    if rid:
        try:
            c.update_run(rid, status=RunStatus.to_string(RunStatus.RUNNING))
            return rid
        except Exception as e:  # noqa: BLE001 - deleted, or another store: a new parent run
            log.warning("the sweep's parent run %s is gone (%s); starting another", rid, type(e).__name__)
    run = c.create_run(_experiment_id(c, plan), run_name=f"sweep {plan['sweep']}",
                       tags={KIND_TAG: "sweep", SWEEP_TAG: plan["sweep"], "hgscale.sweep.dir": mask_value(plan["out"])})
    c.log_batch(run.info.run_id, params=[Param(k, v) for k, v in _params(plan).items()])
    plan["parent_run_id"] = run.info.run_id
    return run.info.run_id


def log_plan(plan: dict) -> None:
    """plan.json (masked) as the parent run's artifact ``sweep/plan.json``."""
    if plan.get("parent_run_id"):
        shown = Path(plan["out"]) / "tracking" / "plan.json"
        shown.parent.mkdir(parents=True, exist_ok=True)
        shown.write_text(json.dumps(mask_secrets({k: v for k, v in plan.items() if not k.startswith("_")}), indent=1))
        client(plan).log_artifact(plan["parent_run_id"], str(shown), "sweep")


def run_tags(plan: dict, run: dict) -> dict[str, str]:
    tags = {SWEEP_TAG: plan["sweep"], "hgscale.sweep.run": run["name"], "hgscale.sweep.model": run["model"],
            "hgscale.sweep.role": run["role"], "hgscale.sweep.budget": budget_label(run["budget"]),
            "hgscale.sweep.flops": f"{run['flops']:.6g}", "hgscale.sweep.seed": str(run["seed"]),
            "hgscale.sweep.cell": kv_label(run["cell"]) or "-", "hgscale.sweep.tune": kv_label(run["tune"]) or "-",
            "hgscale.sweep.phase": ",".join(run["phases"]),
            "hgscale.sweep.matches": "; ".join(f"{m['hourglass']} by {m['by']}" for m in run["matches"]) or "-"}
    if plan.get("parent_run_id"):
        tags[PARENT_TAG] = plan["parent_run_id"]
    return {k: mask_value(v) for k, v in tags.items()}


def checkpoint_run_id(run: dict) -> str | None:
    """The MLflow run id the run's newest checkpoint names."""
    tag = latest_tag(run["checkpoint_dir"])
    try:
        return read_meta(Path(run["checkpoint_dir"]) / tag).get("run_id") if tag else None
    except CheckpointError:
        return None


def tag_run(plan: dict, run: dict, c=None) -> bool:
    """The sweep's tags on the run's MLflow run; False (one warning) when tracking trouble prevents it."""
    rid = checkpoint_run_id(run) if plan["tracking"]["enabled"] else None
    if not rid:
        return False
    from mlflow.entities import RunTag

    try:
        (c or client(plan)).log_batch(rid, tags=[RunTag(k, v) for k, v in run_tags(plan, run).items()])
        return True
    except Exception as e:  # noqa: BLE001 - a store that does not answer: the next round or the report tags it
        log.warning("could not tag MLflow run %s of %s (%s: %s)", rid, run["name"], type(e).__name__,
                    mask_value(str(e))[:200])
        return False


def sync_tags(plan: dict) -> int:
    """Tag every run of the plan that has a checkpoint; returns how many were tagged."""
    if not plan["tracking"]["enabled"]:
        return 0
    c = client(plan)
    seen, n = set(), 0
    for run in plan["runs"]:
        if run["name"] not in seen:
            seen.add(run["name"])
            n += tag_run(plan, run, c)
    return n


def close_parent(plan: dict, status: str) -> None:
    """Mark the parent run FINISHED / FAILED / KILLED."""
    if plan.get("parent_run_id"):
        try:
            client(plan).set_terminated(plan["parent_run_id"], status)
        except Exception as e:  # noqa: BLE001
            log.warning("could not close the sweep's parent run (%s)", type(e).__name__)
