"""Background delivery of tracking records to MLflow.

The training thread only appends to an in-memory queue (``put`` never blocks, never raises). One daemon
thread owns the ``MlflowClient``: it creates or resumes the run, then sends records in order, batching
consecutive metrics/params/tags into ``log_batch`` calls. A server that is down, slow or refusing
(connection errors, timeouts, HTTP 429/5xx) is retried with capped back-off until it returns; nothing is
dropped. HTTP requests use short timeouts and no urllib3 retries of their own
(``MLFLOW_HTTP_REQUEST_TIMEOUT`` / ``MLFLOW_HTTP_REQUEST_MAX_RETRIES``), so a dead server costs one
connection attempt per back-off period, not minutes. Retried batches are idempotent: every metric carries
the timestamp it was logged with, and MLflow stores identical (key, step, timestamp, value) once.

A request the server rejects as invalid (HTTP 4xx) is retried item by item; what still fails is dropped
with a warning naming it. If ``close`` runs out of time, the records not yet delivered are written to a
spool file (JSON lines) that the next tracker for the same run replays (a resumed run), so a run that ends
during an outage loses nothing. The records, their batching and the spool file are in ``records``.
"""
from __future__ import annotations

import collections
import logging
import os
import queue
import re
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from .records import (
    BATCHED,
    MAX_METRICS_PER_BATCH,
    MAX_PARAMS_TAGS_PER_BATCH,
    MAX_TAG_LEN,
    Artifact,
    Call,
    Record,
    Status,
    append_spool,
    batch_entities,
    clean_key,
    spoolable,
    take_spooled,
    with_values,
)
from .runinfo import mask_value

log = logging.getLogger(__name__)

# MLflow 3's UI opens an experiment with this tag as model training, not as GenAI evaluations
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


@dataclass(frozen=True)
class _End:
    """Put last by ``close``: the delivery thread stops once everything before it is sent."""


def _said(exc: BaseException) -> str:
    """An error's text for a log line; MLflow quotes the request URL, credentials in it included."""
    return mask_value(str(exc))


def is_transient_tracking_error(exc: BaseException) -> bool:
    """True for tracking-server errors worth retrying later: connection trouble, timeouts, HTTP 429 and 5xx."""
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException):
        status = exc.get_http_status_code()
        msg = str(exc)
        if "failed with exception" in msg or "Max retries exceeded" in msg or "timed out" in msg.lower():
            return True
        m = re.search(r"error code (\d{3})", msg)
        if m:
            status = int(m.group(1))
        return status == 429 or status >= 500   # 503 includes a locked SQLite store
    return isinstance(exc, OSError)  # socket / requests errors; anything else is a bug, not an outage


class MlflowSink:
    """Owns the MLflow client on its own thread. Construct on global rank 0 only."""

    def __init__(self, uri: str, experiment: str, run_name: str, resume_run_id: str | None = None,
                 artifact_location: str | None = None, spool_path: str | Path | None = None,
                 tags: dict | None = None, http_timeout_s: int = 5, max_backoff_s: float = 5.0):
        self.uri = uri
        self.shown_uri = mask_value(uri)   # for log lines: a user:password@ in the URI stays out of them
        self.experiment = experiment
        self.run_name = run_name
        self.resume_run_id = resume_run_id
        self.artifact_location = artifact_location
        self.spool_path = Path(spool_path) if spool_path else None
        self.tags = dict(tags or {})
        self.max_backoff_s = max_backoff_s
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.resumed = False
        self._through: dict[str, int] = {}  # per metric key, the last step the run holds (see _new_only)
        self.dropped = 0                   # records the server rejected as invalid
        self.delivered = 0                 # records delivered (metrics count per value)
        self.last_error: str | None = None
        self.dead = False                  # the store refused the run for good: records are not kept
        self._existing_params: dict[str, str] = {}
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._pending: collections.deque = collections.deque()
        self._ready = threading.Event()    # run resolved (or given up at close)
        self._closing = threading.Event()
        self._deadline = float("inf")
        self._warned = False
        # Short HTTP timeouts, no hidden urllib3 retries: this thread does its own back-off.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(int(http_timeout_s)))
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")   # no "View run" lines in the log
        self._replay_spool()
        self._thread = threading.Thread(target=self._main, name="hgscale-mlflow", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ training-thread side (never blocks)

    def put(self, record: Record) -> None:
        if not self._closing.is_set() and not self.dead:
            self._q.put(record)

    def wait_ready(self, timeout: float) -> bool:
        return self._ready.wait(timeout)

    def pending(self) -> int:
        return self._q.qsize() + len(self._pending)

    def close(self, timeout: float) -> bool:
        """Stop accepting records, deliver what is queued within ``timeout`` s; spool the rest. True if all sent."""
        self._q.put(_End())
        self._deadline = time.monotonic() + max(timeout, 0.0)
        self._closing.set()
        self._thread.join(max(timeout, 0.0) + 2.0)
        return not self._thread.is_alive() and not self._pending

    # ------------------------------------------------------------------------------ delivery thread

    def _main(self) -> None:
        try:
            self._run()
        except Exception as e:  # noqa: BLE001 - the thread must never take the trainer down
            log.error("MLflow delivery stopped unexpectedly (%s: %s); unsent records are spooled", type(e).__name__,
                      _said(e))
            self._drain()
            self._spool()
        finally:
            self._ready.set()

    def _run(self) -> None:
        for name in ("alembic", "mlflow.store.db.utils", "mlflow.tracking._tracking_service.utils"):
            logging.getLogger(name).setLevel(logging.WARNING)
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=self.uri)
        backoff = 0.2
        ended = False
        while True:
            ended = self._drain() or ended
            timed_out = time.monotonic() > self._deadline
            if self.run_id is None:
                if timed_out:
                    break
                try:
                    self._resolve_run()
                    self._ready.set()
                    backoff = 0.2
                except Exception as e:  # noqa: BLE001
                    if not is_transient_tracking_error(e):
                        log.error("MLflow at %s refused to create the run (%s); tracking is off for this run",
                                  self.shown_uri, _said(e)[:500])
                        self.dead = True
                        self._pending.clear()
                        self._ready.set()
                        return
                    backoff = self._failed(e, backoff)
                continue
            if not self._pending:
                if ended:
                    return
                try:
                    item = self._q.get(timeout=0.5)
                except queue.Empty:
                    continue
                if isinstance(item, _End):
                    ended = True
                else:
                    self._pending.append(item)
                continue
            if timed_out:
                break
            n, send = self._make_batch(self._pending)
            try:
                send()
                for _ in range(n):
                    self._pending.popleft()
                backoff = 0.2
                if self._warned:
                    log.warning("MLflow at %s is reachable again; delivering queued records", self.shown_uri)
                    self._warned = False
            except Exception as e:  # noqa: BLE001
                if is_transient_tracking_error(e):
                    backoff = self._failed(e, backoff)
                else:
                    self._one_by_one(n, e)
        self._spool()

    def _drain(self) -> bool:
        """Move everything queued into the pending list; True once the end marker has been seen."""
        ended = False
        while True:
            try:
                item = self._q.get_nowait()
            except queue.Empty:
                return ended
            if isinstance(item, _End):
                ended = True
            else:
                self._pending.append(item)

    def _failed(self, e: BaseException, backoff: float) -> float:
        self.last_error = f"{type(e).__name__}: {_said(e)[:300]}"
        if not self._warned:
            log.warning("MLflow at %s is not answering (%s); records are queued and will be delivered when it "
                        "returns", self.shown_uri, (_said(e).splitlines() or [''])[0][:200])
            self._warned = True
        remaining = self._deadline - time.monotonic()
        time.sleep(max(0.0, min(backoff, remaining)))
        return min(backoff * 2, self.max_backoff_s)

    def _resolve_run(self) -> None:
        from mlflow.entities import RunStatus

        c = self.client
        if self.resume_run_id:
            try:
                run = c.get_run(self.resume_run_id)
                if run.info.lifecycle_stage == "deleted":
                    from mlflow.exceptions import MlflowException
                    raise MlflowException("deleted", error_code="RESOURCE_DOES_NOT_EXIST")
            except Exception as e:  # noqa: BLE001
                if is_transient_tracking_error(e):
                    raise
                log.warning("MLflow run %s (from the checkpoint) is not in the store at %s or was deleted; "
                            "starting a new run",
                            self.resume_run_id, self.shown_uri)
                self.tags["hgscale.resumed_from_missing_run"] = self.resume_run_id
                self.resume_run_id = None
            else:
                self._existing_params = dict(run.data.params)
                c.update_run(run.info.run_id, status=RunStatus.to_string(RunStatus.RUNNING))
                self.run_id, self.resumed = run.info.run_id, True
                self.experiment_id = run.info.experiment_id
                return
        exp = c.get_experiment_by_name(self.experiment)
        if exp is not None and exp.lifecycle_stage == "deleted":
            from mlflow.exceptions import MlflowException
            raise MlflowException(f"experiment {self.experiment!r} is deleted: restore it with `mlflow experiments "
                                  f"restore --experiment-id {exp.experiment_id}` or set tracking.experiment to "
                                  f"another name", error_code="INVALID_PARAMETER_VALUE")
        if exp is None:
            try:
                exp_id = c.create_experiment(self.experiment, artifact_location=self.artifact_location)
            except Exception:  # noqa: BLE001 - another job created it meanwhile
                exp = c.get_experiment_by_name(self.experiment)
                if exp is None:
                    raise
                exp_id = exp.experiment_id
        else:
            exp_id = exp.experiment_id
        if exp is None or EXPERIMENT_KIND[0] not in exp.tags:
            c.set_experiment_tag(exp_id, *EXPERIMENT_KIND)
        tags = {clean_key(k): str(v)[:MAX_TAG_LEN] for k, v in self.tags.items()}
        run = c.create_run(exp_id, run_name=self.run_name or None, tags=tags)
        self.run_id, self.experiment_id = run.info.run_id, exp_id

    def _make_batch(self, pending):
        """(number of leading items of ``pending`` covered, a callable that sends them)."""
        if isinstance(pending[0], BATCHED):
            n, metrics, params, tags = batch_entities(pending, self._existing_params)

            def send():
                kept, through = self._new_only(metrics)
                # one item may itself exceed a limit (a config of 300 keys): chunk within the call
                for i in range(0, max(len(params), len(tags)), MAX_PARAMS_TAGS_PER_BATCH):
                    self.client.log_batch(self.run_id, params=params[i:i + MAX_PARAMS_TAGS_PER_BATCH],
                                          tags=tags[i:i + MAX_PARAMS_TAGS_PER_BATCH])
                for i in range(0, len(kept), MAX_METRICS_PER_BATCH):
                    self.client.log_batch(self.run_id, metrics=kept[i:i + MAX_METRICS_PER_BATCH])
                for p in params:
                    self._existing_params[p.key] = p.value
                self._through.update(through)
                self.delivered += len(kept) + len(params) + len(tags)
            return n, send
        item = pending[0]
        if isinstance(item, Artifact):
            def send():
                if Path(item.path).is_dir():
                    self.client.log_artifacts(self.run_id, item.path, item.artifact_path)
                elif Path(item.path).exists():
                    self.client.log_artifact(self.run_id, item.path, item.artifact_path)
                else:
                    log.warning("artifact %s no longer exists; not logged", item.path)
                if item.staged:
                    shutil.rmtree(Path(item.path).parent, ignore_errors=True)
                self.delivered += 1
            return 1, send
        if isinstance(item, Status):
            return 1, lambda: self.client.set_terminated(self.run_id, status=item.status, end_time=item.end_time_ms)
        if isinstance(item, Call):
            return 1, lambda: item.fn(self.client, self.run_id)
        log.warning("unknown tracking record %r dropped", item)
        return 1, lambda: None

    def _new_only(self, metrics: list) -> tuple[list, dict]:
        """(the metrics at steps after the last one the run holds of their key, the new last steps). An attempt
        resumed from a checkpoint runs the steps after it again, which the attempt before may have logged (with the
        same values: the resume is exact): each step is kept once, the first time. The last steps become this
        sink's only once sent (a failed send is retried with the same metrics)."""
        kept, through = [], {}
        for m in metrics:
            last = through.get(m.key, self._through.get(m.key))
            if last is None:  # the store's own state: safe to keep whether or not this send succeeds
                last = self._through[m.key] = self._last_step(m.key)
            if m.step > last:
                kept.append(m)
                through[m.key] = m.step
        return kept, through

    def _last_step(self, key: str) -> int:
        """The last step of ``key`` in the run: -1 for a new run, else read once per key after a resume."""
        if not self.resumed:
            return -1
        return max((m.step for m in self.client.get_metric_history(self.run_id, key)), default=-1)

    def _one_by_one(self, n: int, first_error: BaseException) -> None:
        """The server rejected a batch as invalid: send its items singly, drop only the ones it still rejects."""
        singles = []
        for _ in range(n):
            item = self._pending.popleft()
            if isinstance(item, BATCHED) and len(item.values) > 1:
                singles += [with_values(item, {k: v}) for k, v in item.values.items()]
            else:
                singles.append(item)
        for i, single in enumerate(singles):
            try:
                self._make_batch(collections.deque([single]))[1]()
            except Exception as e:  # noqa: BLE001
                if is_transient_tracking_error(e):  # the server went away meanwhile: the main loop retries the rest
                    self._pending.extendleft(reversed(singles[i:]))
                    return
                self.dropped += 1
                if self.dropped <= 5 or self.dropped % 1000 == 0:   # a deleted run rejects everything: no flood
                    log.warning("MLflow rejected %s (%d rejected so far): %s", str(single)[:200], self.dropped,
                                _said(e)[:300])

    # ---------------------------------------------------------------------------------------- spool

    def _spool(self) -> None:
        """Write undelivered metrics/params/tags/artifacts to the spool file for a resumed run to replay."""
        items = spoolable(self._pending)
        if not items:
            return
        if self.spool_path is None:
            log.warning("%d tracking records could not be delivered to %s and are lost", len(items), self.shown_uri)
            return
        try:
            append_spool(self.spool_path, self.run_id, items)
            log.warning("%d tracking records could not be delivered to %s; kept in %s and sent when the run "
                        "resumes", len(items), self.shown_uri, self.spool_path)
        except OSError as e:
            log.warning("%d tracking records lost: cannot write %s (%s)", len(items), self.spool_path, e)

    def _replay_spool(self) -> None:
        """Queue records spooled by an earlier tracker of this run (or of a run that never got an id)."""
        if self.spool_path is None:
            return
        replay = take_spooled(self.spool_path, self.resume_run_id)
        for item in replay:
            self._q.put(item)
        if replay:
            log.info("replaying %d tracking records spooled by the previous attempt", len(replay))
