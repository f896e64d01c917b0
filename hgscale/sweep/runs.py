"""The state of a sweep's runs on disk, the tuning choice, and running them one after another on this machine.

A run is *finished* when its newest complete checkpoint is at its final step and its ``metrics.jsonl`` holds the
validation metric of that step; then it is skipped. Any other run is started with the same command, which resumes
from its own ``checkpoint.dir`` when a checkpoint exists (hgscale resumes automatically) and starts afresh
otherwise (a ``metrics.jsonl`` left by an attempt that saved nothing is dropped first: its steps run again).

Each run is ``python -m hgscale train --config <sweep>/config.json <overrides>``, the code path of
``hgscale train``, in its own process; its output goes to ``<run_dir>/train.log``.
"""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from hgscale.checkpoint.layout import latest_tag, tag_step
from hgscale.core.secrets import mask_args
from hgscale.core.status import NAN
from hgscale.sweep.plan import budget_label, kv_label, with_overrides
from hgscale.tracking import names

LOG = "train.log"


def records(run_dir: str | Path) -> list[dict]:
    """The lines of a run's metrics.jsonl (a line cut short by a killed attempt is left out)."""
    path = Path(run_dir) / "metrics.jsonl"
    out = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


def final_metric(run: dict) -> tuple[str, float] | None:
    """(validation key, value) at the run's final step, from its metrics.jsonl; None before it exists."""
    for rec in reversed(records(run["run_dir"])):
        if rec.get("step") == run["steps"]:
            key = names.find_val_key(set(rec))
            if key and key.startswith("val"):
                return key, float(rec[key])
    return None


def saved_step(run: dict) -> int | None:
    tag = latest_tag(run["checkpoint_dir"])
    return tag_step(tag) if tag else None


def finished(run: dict) -> bool:
    return run.get("name") is not None and saved_step(run) == run["steps"] and final_metric(run) is not None


def diverged(run: dict) -> bool:
    """The run stopped on a NaN/Inf loss (exit status NAN; the trainer recorded train/diverged), here or in a Slurm
    array task: rerunning would repeat it, and as a tuning value it counts as the worst. Delete its run directory
    to try again."""
    return run.get("name") is not None and any(names.DIVERGED in rec for rec in records(run["run_dir"]))


def resolve_finals(plan: dict) -> list[str]:
    """Give each pending final run the tuning value of its group with the lowest mean final validation metric, once
    every tuning run of that group is finished. Returns one line per choice made."""
    said, still = [], []
    groups: dict[tuple, list[dict]] = {}
    for r in plan["runs"]:
        if "tune" in r["phases"]:
            groups.setdefault((r["model"], r["budget"], kv_label(r["cell"])), []).append(r)
    chosen: dict[tuple, tuple[dict, float, list]] = {}
    for key, tuning in groups.items():
        if all(finished(r) or diverged(r) for r in tuning):
            by_value: dict[str, list] = {}
            for r in tuning:
                by_value.setdefault(json.dumps(r["tune"]), []).append(math.inf if diverged(r) else final_metric(r)[1])
            means = sorted((sum(v) / len(v), k) for k, v in by_value.items())
            if math.isfinite(means[0][0]):
                chosen[key] = (json.loads(means[0][1]), means[0][0], means)
            else:
                said.append(f"every tuning value of {key[0]!r} at {budget_label(key[1])} FLOPs diverged: its final "
                            f"runs wait; add smaller values to --tune (another sweep)")
    for p in plan["pending"]:
        key = (p["model"], p["budget"], kv_label(p["cell"]))
        if key not in chosen:
            still.append(p)
            continue
        run = with_overrides(plan, {**p, "tune": chosen[key][0]})
        same = next((r for r in plan["runs"] if r["name"] == run["name"]), None)
        if same is not None:  # the tuning run at this value and seed: the same config, trained once
            same["phases"] = sorted(set(same["phases"]) | {"final"})
        else:
            plan["runs"].append(run)
        if p["seed"] == 0:
            tried = ", ".join(f"{kv_label(json.loads(k))}: {m:.4f}" for m, k in chosen[key][2])
            cell = f" ({kv_label(p['cell'])})" if p["cell"] else ""
            said.append(f"tuned {p['model']!r} at {budget_label(p['budget'])} FLOPs{cell}: {kv_label(chosen[key][0])} "
                        f"(mean final validation {tried})")
    plan["pending"] = still
    return said


def prepare(run: dict) -> None:
    """Before (re)starting a run: with no checkpoint to resume from, records of an earlier attempt are dropped."""
    Path(run["run_dir"]).mkdir(parents=True, exist_ok=True)
    metrics = Path(run["run_dir"]) / "metrics.jsonl"
    if saved_step(run) is None and metrics.exists():
        metrics.unlink()


def train_command(plan: dict, run: dict, python: str = sys.executable) -> list[str]:
    """One process (``hgscale train``), or ``--world-size`` ranks on this machine through launchers.local."""
    world = plan["world_size"]
    ranks = [python, "-m", "launchers.local", "--nproc", str(world)] if world > 1 else []
    return [*ranks, python, "-m", "hgscale", "train", "--config", plan["config"], *run["overrides"]]


class Runner:
    """Runs a plan's unfinished runs one after another; SIGINT/SIGTERM stop the current run at its next step with a
    checkpoint (the trainer's SIGTERM handling) and end the sweep, which the same command resumes."""

    def __init__(self, plan: dict, say=print, after_run=None, on_plan=None):
        self.plan, self.say = plan, say
        self.after_run = after_run or (lambda run: None)   # tag the run in MLflow
        self.on_plan = on_plan or (lambda plan: None)       # save the plan once final runs are chosen
        self.proc: subprocess.Popen | None = None
        self.stopped: int | None = None
        self.failed: list[tuple[str, int]] = []
        self.tried: set[str] = set()  # each run starts at most once per invocation

    def _on_signal(self, signum, frame):
        self.stopped = signum
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # checkpoint at the end of the step, exit 0

    def run_one(self, run: dict, index: str) -> int:
        prepare(run)
        resume = saved_step(run)
        self.say(f"[{index}] {run['name']}: {run['steps']} steps, {run['flops']:.3g} FLOPs"
                 + (f", resuming at step {resume}" if resume else ""))
        t0, cmd = time.monotonic(), train_command(self.plan, run)
        with open(Path(run["run_dir"]) / LOG, "a") as log:
            log.write(f"$ {' '.join(mask_args(cmd))}\n")
            log.flush()
            # its own session: a Ctrl-C reaches the sweep alone, which relays it as SIGTERM (checkpoint, exit 0)
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                         env=child_env())
            rc = self.proc.wait()
        self.proc = None
        self.after_run(run)
        if rc == 0 and finished(run):
            key, value = final_metric(run)
            self.say(f"    finished in {time.monotonic() - t0:.0f} s: final {key} {value:.4f}")
        elif rc == 0:
            self.say(f"    stopped at step {saved_step(run)} with a checkpoint; the same command resumes it")
        elif rc == NAN and diverged(run):
            self.say("    diverged (NaN/Inf loss); not rerun, and as a tuning value it counts as the worst")
            self.failed.append((run["name"], rc))
        else:
            tail = (Path(run["run_dir"]) / LOG).read_text(errors="replace").splitlines()[-8:]
            self.say("    failed (exit status {}); the end of {}:\n      {}".format(
                rc, Path(run["run_dir"]) / LOG, "\n      ".join(tail)))
            self.failed.append((run["name"], rc))
        return rc

    def run(self) -> int:
        """Every unfinished run, the final runs of a tuned group once its tuning runs are done. Returns 0 when every
        run finished, else the first failed run's exit status (128 + the signal when stopped)."""
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            while self.stopped is None:
                todo = [r for r in unique(self.plan["runs"])
                        if r["name"] not in self.tried and not finished(r) and not diverged(r)]
                if not todo:
                    break
                for i, r in enumerate(todo, 1):
                    if self.stopped is not None:
                        break
                    self.tried.add(r["name"])
                    self.run_one(r, f"{i}/{len(todo)}")
                chosen = resolve_finals(self.plan)
                for line in chosen:
                    self.say(line)
                if chosen:
                    self.on_plan(self.plan)
        finally:
            for s, h in old.items():
                signal.signal(s, h)
        if self.stopped is not None:
            return 128 + self.stopped
        return self.failed[0][1] if self.failed else 0


def unique(runs: list[dict]) -> list[dict]:
    seen, out = set(), []
    for r in runs:
        if r["name"] not in seen:
            seen.add(r["name"])
            out.append(r)
    return out


def child_env() -> dict:
    """The environment of a run: one process of its own (no rank variables of a launcher around the sweep)."""
    return {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE",
                                                             "MASTER_ADDR", "MASTER_PORT")}
