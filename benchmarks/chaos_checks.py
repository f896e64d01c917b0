"""The checks of benchmarks/chaos.py after a trial, and the poller that watches ``latest`` while it runs.

    poller = Poller(server, bucket).start()    # every POLL_S: does run/latest name a tag with run/<tag>/COMPLETE?
    poller.attempt = attempt                   # and remember every process of the running attempt
    ...
    poller.stop()                              # one last look; poller.violations lists what it caught
    problems, lost = check_run(run_dir, reference, mlflow_db, experiment, server, bucket)   # [] if it survived
"""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import torch
from chaos_faults import PREFIX
from torch.testing import assert_close

# a save that clears the tag latest names leaves it without COMPLETE for ~0.15 s on this machine: polls every
# 0.2 s see most such windows, at a few requests a second to the server
POLL_S = 0.2
RTOL = 1e-5


class Poller:
    """A thread that reads ``latest`` from the server itself (not through the trial's proxy, whose faults are for
    the trainer) every POLL_S seconds, and records each moment it named a tag without COMPLETE."""

    def __init__(self, server, bucket: str):
        self.client, self.bucket = server.client(), bucket
        self.attempt = None  # chaos_faults.Attempt now running: its processes are remembered on each poll
        self.violations: list[str] = []
        self.polls = self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> "Poller":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)
        self.look()  # after the last attempt too

    def _run(self) -> None:
        while not self._stop.wait(POLL_S):
            if self.attempt is not None:
                self.attempt.track()
            self.look()

    def look(self) -> None:
        c = self.client
        try:
            tag = c.get_object(Bucket=self.bucket, Key=f"{PREFIX}/latest")["Body"].read().decode()
        except c.exceptions.NoSuchKey:
            self.polls += 1
            return
        except Exception:  # noqa: BLE001 - a failed poll proves nothing either way: counted, not fatal
            self.errors += 1
            return
        try:
            c.head_object(Bucket=self.bucket, Key=f"{PREFIX}/{tag}/COMPLETE")
        except c.exceptions.ClientError as e:
            if e.response.get("Error", {}).get("Code") not in ("404", "NoSuchKey", "NotFound"):
                self.errors += 1
                return
            self.violations.append(f"{time.strftime('%H:%M:%S')}: latest names {tag!r}, which has no COMPLETE")
        except Exception:  # noqa: BLE001
            self.errors += 1
            return
        self.polls += 1


def losses(run_dir: Path) -> tuple[dict[int, float], list[int]]:
    """({step: train/loss} of metrics.jsonl, the steps logged more than once)."""
    out, twice = {}, []
    path = Path(run_dir) / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    for rec in (json.loads(ln) for ln in lines if ln.strip()):
        if "train/loss" in rec:
            if rec["step"] in out:
                twice.append(rec["step"])
            out[rec["step"]] = rec["train/loss"]
    return out, twice


def mlflow_problems(db: Path, experiment: str, steps: int) -> list[str]:
    """One run in the experiment, FINISHED, with train/loss at steps 1..steps once each."""
    from mlflow.tracking import MlflowClient

    if not db.exists():
        return [f"no MLflow store at {db}"]
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id]) if exp else []
    if len(runs) != 1:
        return [f"MLflow holds {len(runs)} runs, not 1"]
    run = runs[0]
    logged = sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/loss"))
    out = []
    if logged != list(range(1, steps + 1)):
        twice = sorted({s for s in logged if logged.count(s) > 1})
        out.append(f"MLflow train/loss steps: {len(logged)} points, twice: {twice}, missing: "
                   f"{sorted(set(range(1, steps + 1)) - set(logged))}")
    if run.info.status != "FINISHED":
        out.append(f"MLflow run status {run.info.status}")
    return out


def secret_objects(server, bucket: str) -> list[str]:
    """Keys of the objects whose bytes hold the server's secret key."""
    c = server.client()
    keys = [o["Key"] for page in c.get_paginator("list_objects_v2").paginate(Bucket=bucket)
            for o in page.get("Contents", [])]
    secret = server.secret_key.encode()
    return [k for k in keys if secret in c.get_object(Bucket=bucket, Key=k)["Body"].read()]


def check_run(run_dir: Path, reference: dict[int, float], db: Path, experiment: str, server, bucket: str
              ) -> tuple[list[str], int]:
    """(problems, steps lost) of a finished trial: losses against the reference (rtol RTOL), each step once in
    metrics.jsonl and MLflow, no secret in any object. Steps lost: reference steps missing from metrics.jsonl."""
    got, twice = losses(run_dir)
    lost = len(set(reference) - set(got))
    problems = []
    if twice:
        problems.append(f"metrics.jsonl logs steps {sorted(set(twice))} more than once")
    if lost:
        problems.append(f"metrics.jsonl lacks {lost} step(s): {sorted(set(reference) - set(got))[:10]}")
    common = sorted(set(reference) & set(got))
    if common:
        try:
            assert_close(torch.tensor([got[s] for s in common], dtype=torch.float64),
                         torch.tensor([reference[s] for s in common], dtype=torch.float64), rtol=RTOL, atol=0)
        except AssertionError as e:
            problems.append("losses differ from the fault-free run: " + " ".join(str(e).split())[:300])
    problems += mlflow_problems(db, experiment, max(reference))
    leaked = secret_objects(server, bucket)
    if leaked:
        problems.append(f"the secret key is in {leaked[:5]}")
    return problems, lost
