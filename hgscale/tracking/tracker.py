"""The trainer's view of experiment tracking: one MLflow run per training job, written by global rank 0.

    tracker = Tracker(cfg, rank, world_size, resume_run_id=state.get("run_id"))
    tracker.log_run_info(cfg, ds_json, topology, manifest, stage_plan)      # once
    for step ...:
        tracker.log_metrics({names.TRAIN_LOSS: loss, ...}, step)             # rank 0; queued, never blocks
        tracker.gather_and_log(step, timings={"step_s": ..., "compute_s": ...})   # ALL ranks (collective)
    tracker.log_artifact(export_path)
    tracker.close()                                                          # bounded flush + loss-vs-FLOPs plot

Where the run lives: ``tracking.uri`` in the config, else ``MLFLOW_TRACKING_URI``, else a SQLite store in the
run directory (``sqlite:///<run_dir>/mlflow.db``, artifacts beside it), viewable with
``mlflow ui --backend-store-uri sqlite:///<run_dir>/mlflow.db``. Ranks other than 0 hold no MLflow state:
their calls return at once (``gather_and_log`` still takes part in the collective).
"""
from __future__ import annotations

import atexit
import json
import logging
import os
import shutil
import time
from collections import defaultdict
from pathlib import Path

from . import names, runinfo, system
from .gather import aggregate, gather_to_rank0
from .mlflow_sink import MlflowSink
from .records import Artifact, Call, Metrics, Params, Status, Tags, clean_key

log = logging.getLogger(__name__)

_STAGE_COPY_MAX_BYTES = 64 * 2 ** 20   # smaller artifacts are copied at once, so later edits do not leak in


def resolve_uri(cfg) -> str:
    """tracking.uri, else MLFLOW_TRACKING_URI, else sqlite in run_dir. Raises ValueError naming a bad URI."""
    env_uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    problems = [p for p in cfg.tracking.problems(env_uri) if "uri" in p.split(" = ")[0].lower()]
    if problems:
        raise ValueError(problems[0])
    return cfg.tracking.uri or env_uri or f"sqlite:///{(Path(cfg.run_dir) / 'mlflow.db').resolve()}"


def run_name_for(cfg) -> str:
    return cfg.tracking.run_name or Path(cfg.run_dir).name or "hgscale"


class Tracker:
    """One MLflow run per training job; see the module docstring for the calls and who makes them."""

    def __init__(self, cfg, rank: int, world_size: int, resume_run_id: str | None = None):
        self.cfg = cfg
        self.rank, self.world_size = int(rank), int(world_size)
        self.collect = bool(cfg.tracking.enabled)               # same on every rank: decides collectives
        self.enabled = self.collect and self.rank == 0          # only rank 0 talks to MLflow
        self._sink: MlflowSink | None = None
        self._history: dict[str, list[tuple[int, float]]] = defaultdict(list)
        self._info_logged = False
        self._closed = False
        self._bad_values_warned = False
        # Every rank checks the URI, so a bad one stops all ranks alike instead of rank 0 alone
        # (which would leave the others waiting in the next collective).
        self.uri = resolve_uri(cfg) if self.collect else ""
        if not self.enabled:
            return
        try:
            self._start(cfg, resume_run_id)
        except Exception as e:  # noqa: BLE001 - e.g. an unwritable run_dir: train on without tracking
            log.error("tracking is off for this run: %s: %s", type(e).__name__, e)
            self.enabled = False

    def _start(self, cfg, resume_run_id):
        self.run_dir = Path(cfg.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.stage_dir = self.run_dir / "tracking"
        artifact_location = None
        if self.uri.startswith("sqlite:") or "://" not in self.uri:
            artifact_location = (self.run_dir / "mlartifacts").resolve().as_uri()
        self._git = git = runinfo.git_info()
        tags = {"hgscale.world_size": self.world_size, "mlflow.source.name": runinfo.command_line()}
        if git:
            tags.update({"mlflow.source.git.commit": git["commit"], "hgscale.git_dirty": git["dirty"]})
        self._sink = MlflowSink(self.uri, cfg.tracking.experiment, run_name_for(cfg), resume_run_id,
                                artifact_location=artifact_location,
                                spool_path=self.run_dir / "tracking_spool.jsonl", tags=tags,
                                http_timeout_s=cfg.tracking.http_timeout_s)
        if not self._sink.wait_ready(cfg.tracking.start_timeout_s):
            log.warning("tracking at %s did not answer within %.0f s; training goes on and the run is created "
                        "when it answers", self._sink.shown_uri, cfg.tracking.start_timeout_s)
        system.start_cpu_sampling()
        # Without close() (a crash, a forgotten call) still deliver what was queued, briefly.
        atexit.register(self.close, status="KILLED", timeout=10.0)

    # --------------------------------------------------------------------------------------- identity

    @property
    def run_id(self) -> str | None:
        """The MLflow run id (rank 0), None on other ranks or while the server has not yet answered."""
        return self._sink.run_id if self._sink else None

    @property
    def resumed(self) -> bool:
        return bool(self._sink and self._sink.resumed)

    # ----------------------------------------------------------------------------------------- logging

    def log_run_info(self, cfg, ds_json: dict, topology: dict, manifest: dict | None = None,
                     stage_plan: dict | None = None) -> None:
        """Once per run: resolved config, DeepSpeed JSON, topology, versions, git, dataset summary (params, secrets
        masked) and the same documents as artifacts under ``run_info/``."""
        if not self.enabled or self._info_logged:
            return
        self._info_logged = True
        params, docs = {}, {}
        sections = [  # (artifact name or None, params prefix, document): each section fails alone
            ("config.json", "", lambda: cfg.to_dict()),
            ("deepspeed.json", "ds", lambda: ds_json or {}),
            ("topology.json", "topology", lambda: {**(topology or {}), "world_size": self.world_size}),
            (None, "version", runinfo.versions),
            (None, "git", lambda: self._git),
            ("manifest.json", "dataset", lambda: manifest),
            ("stage_plan.json", "stage_plan", lambda: stage_plan),
        ]
        for artifact, prefix, get in sections:
            try:
                doc = get()
                if doc is None:
                    continue
                doc = runinfo.mask_secrets(doc)
                summary = {"dataset": runinfo.manifest_summary, "stage_plan": _plan_summary}.get(prefix, dict)(doc)
                params.update(runinfo.flatten(summary, prefix))
                if artifact:
                    docs[artifact] = doc
            except Exception as e:  # noqa: BLE001 - tracking trouble must not stop training
                log.warning("could not record %s (%s: %s)", artifact or prefix, type(e).__name__, e)
        self._sink.put(Params(params))
        try:
            info_dir = self.stage_dir / "run_info"
            info_dir.mkdir(parents=True, exist_ok=True)
            for name, doc in docs.items():
                (info_dir / name).write_text(json.dumps(doc, indent=2, default=str))
            self._sink.put(Artifact(str(info_dir), "run_info"))
        except OSError as e:
            log.warning("could not write the run information to %s (%s)", self.stage_dir, e)

    def log_metrics(self, metrics: dict, step: int) -> None:
        """Queue metrics for ``step`` (never blocks, never raises). Values: numbers or 0-d tensors; None is skipped.

        Pass Python floats where you can: converting a CUDA tensor here waits for the GPU.
        """
        if not self.enabled or self._closed:
            return
        try:
            values = {}
            for k, v in metrics.items():
                if v is None:
                    continue
                try:
                    values[clean_key(k)] = float(v)
                except (TypeError, ValueError):
                    if not self._bad_values_warned:
                        log.warning("metric %r = %r is not a number; not logged", k, v)
                        self._bad_values_warned = True
            if not values:
                return
            step = int(step)
            for k, v in values.items():
                if _plotted(k):
                    self._history[k].append((step, v))
            self._sink.put(Metrics(step, int(time.time() * 1000), values))
        except Exception as e:  # noqa: BLE001
            log.warning("metrics for step %s not logged (%s)", step, e)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Queue a file or directory for upload; small files are copied first so the upload sees them as they were."""
        if not self.enabled or self._closed:
            return
        try:
            path, staged = Path(path), False
            if path.is_file() and path.stat().st_size <= _STAGE_COPY_MAX_BYTES:
                copy = self.stage_dir / "artifacts" / f"{time.time_ns()}" / path.name
                copy.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, copy)
                path, staged = copy, True
            elif not path.exists():
                log.warning("artifact %s does not exist; not logged", path)
                return
            self._sink.put(Artifact(str(path), artifact_path, staged))
        except Exception as e:  # noqa: BLE001
            log.warning("artifact %s not logged (%s)", path, e)

    def gather_and_log(self, step: int, timings: dict | None = None, stage: int = 0, device=None, group=None,
                       counters: dict | None = None) -> None:
        """COLLECTIVE: every rank calls this at the same step. Sends this rank's timings (seconds, e.g. data_s,
        compute_s, optimizer_s, step_s), counters (running totals, e.g. its data stream's retries) and resource
        sample to rank 0, which logs per-stage, per-node and job-wide metrics."""
        if not self.collect:
            return
        rec = {"rank": self.rank, "stage": int(stage), "timings": dict(timings or {}),
               "counters": dict(counters or {})}
        if self.cfg.tracking.system_metrics:
            try:
                rec["system"] = system.sample(device)
            except Exception as e:  # noqa: BLE001 - a failed sample must not desert the collective
                rec["system"] = {"node": system.node_id(), "error": str(e)[:100]}
        records = gather_to_rank0(rec, group)
        if self.enabled and records:
            self.log_metrics(aggregate(records), step)

    # ------------------------------------------------------------------------------------------- end

    def link_lines(self) -> list[str]:
        """Where to look at this run in the MLflow UI (rank 0, once the run exists; else nothing)."""
        from hgscale.tracking.links import link_lines

        if not self.enabled or self._sink is None:
            return []
        return link_lines(self.uri, self._sink.experiment_id, self._sink.run_id)

    def close(self, status: str = "FINISHED", timeout: float | None = None, exit_status: str | None = None) -> bool:
        """Plot loss vs FLOPs, mark the run ``status`` (FINISHED / KILLED / FAILED) and tag ``hgscale.exit`` with the
        process's exit status by name (hgscale.core.status), deliver what is queued within ``timeout`` (default
        tracking.close_timeout_s). Never raises; True when everything reached MLflow. A requeued job that
        continues the run sets it RUNNING again."""
        if not self.enabled or self._closed:
            return True
        self._closed = True
        try:
            history = {k: list(v) for k, v in self._history.items()}
            out_png = self.stage_dir / "plots" / "loss_vs_flops.png"
            self._sink.put(Call(lambda client, run_id: _final_plot(client, run_id, history, out_png)))
            if exit_status is not None:
                self._sink.put(Tags({"hgscale.exit": exit_status}))
            self._sink.put(Status(status, int(time.time() * 1000)))
            ok = self._sink.close(self.cfg.tracking.close_timeout_s if timeout is None else timeout)
            if not ok:
                log.warning("tracking: %d records not delivered to %s before the close timeout; they are kept in %s",
                            self._sink.pending(), self._sink.shown_uri, self._sink.spool_path)
            return ok
        except Exception as e:  # noqa: BLE001
            log.warning("tracking close failed (%s)", e)
            return False


def _plotted(key: str) -> bool:
    return (key in names.LOSS_KEYS or key in names.FLOPS_KEYS or key in names.ELAPSED_KEYS
            or key.split("/", 1)[0] in ("train", "val", "valid", "validation", "eval"))


def _plan_summary(plan: dict, depth: int = 0) -> dict:
    """Scalars and short lists of a stage plan, two levels deep (e.g. flops.imbalance, flops.parts);
    the per-layer detail stays in the stage_plan.json artifact."""
    out = {}
    for k, v in plan.items():
        if isinstance(v, dict) and depth < 1:
            out[k] = _plan_summary(v, depth + 1)
        elif isinstance(v, (int, float, str, bool)) or (isinstance(v, list) and len(json.dumps(v, default=str)) < 500):
            out[k] = v
    return out


def _final_plot(client, run_id: str, local: dict, out_png: Path) -> None:
    """Training and validation curves, in one unit (bpc/bpd when logged), against cumulative training FLOPs, from
    the run's full history in MLflow (earlier attempts of a resumed run included), as ``plots/loss_vs_flops.png``."""
    from .plots import at_steps, plot_panels, series

    run = client.get_run(run_id)
    keys = set(run.data.metrics) | set(local)

    def hist(key):
        if key is None:
            return series([])
        try:
            h = client.get_metric_history(run_id, key)
        except Exception:  # noqa: BLE001 - the server went away: plot what this process saw
            h = []
        seen = {m.step for m in h}
        return series(list(h) + [(s, v) for s, v in local.get(key, []) if s not in seen])

    train_key, val_key, unit = names.loss_curve_keys(keys)
    if train_key is None and val_key is None:
        return
    flops_key = names.first_present(names.FLOPS_KEYS, keys)
    fs, fv = hist(flops_key)
    curves = []
    for label, key in (("train", train_key), ("validation", val_key)):
        if key is not None:
            s, v = hist(key)
            curves.append((f"{label} ({key})", at_steps(fs, fv, s) if flops_key else s, v))
    panel = {"curves": curves, "xlabel": "training FLOPs" if flops_key else "step (no FLOPs metric logged)",
             "ylabel": unit, "logx": bool(flops_key)}
    plot_panels([panel], out_png, title=f"{run.info.run_name}: loss vs training compute")
    client.log_artifact(run_id, str(out_png), "plots")
