"""Fault soak: short 2-rank trainings checkpointing to S3, each hit by one fault and rerun until it completes.

    .venv/bin/python benchmarks/chaos.py --trials 50 --seed 0 [--steps 14] [--kinds sigkill,outage,...]
                                         [--work DIR] [--keep] [--out FILE]

A moto S3 server (authentication on) runs for the whole soak; each trial has its own bucket and its own fault
proxy (tests/fixtures/s3.py) that every S3 request of the trainer goes through. A trial runs the tiny test config
(configs/test/tiny.json) for --steps steps on 2 ranks (``python -m launchers.local --nproc 2``), checkpoint.dir =
s3://<bucket>/run every INTERVAL steps, MLflow in a SQLite store of the trial, train.hang_timeout_s = HANG_S. Its
first attempt gets one fault (chaos_faults.KINDS: SIGKILL, SIGSTOP, SIGUSR1 to a rank, SIGTERM to the launcher,
S3 errors, S3 latency, an S3 outage, a kill during an upload, a corrupt newest checkpoint) after a step drawn
between the second checkpoint and the end. The same command then runs again, as a requeue would, while an attempt
exits with a status other than 0 (HANG, INFRA, a crash) or exits 0 before the last step (preempted), at most
MAX_ATTEMPTS times; USER_ERROR or NAN ends the trial (those stop a job for good).

A trial survived when the run completed and: its losses equal a fault-free 2-rank run's (rtol 1e-5); every step
is in metrics.jsonl and in the one MLflow run once; ``latest`` named a checkpoint holding COMPLETE at every poll
(each 0.2 s, during and after each attempt); no object holds the secret key; no process outlived its attempt;
and the fault really hit the run. Steps lost: steps of the fault-free run missing from the final metrics.jsonl.
Faults are drawn with random.Random(--seed), each kind once per round of len(KINDS) trials.

Prints a table (trial, fault, attempts, survived, steps lost, seconds) and a summary (trials, faults by kind,
survived, steps lost); writes benchmarks/results/chaos.json (--out). Exit status 1 unless every trial survived.
Goal: 50/50 trials survived, 0 steps lost.
"""
from __future__ import annotations

import collections
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import chaos_checks  # noqa: E402
import chaos_faults  # noqa: E402
import common  # noqa: E402
import psutil  # noqa: E402

from hgscale.core.status import STOPS, name_of  # noqa: E402
from tests.fixtures.s3 import start_fault_proxy, start_s3_server, stop_s3_server  # noqa: E402
from tests.integration.train_helpers import TRAIN, env, metrics, tiny_config  # noqa: E402

INTERVAL = 3          # checkpoint.interval: a fault step after the second checkpoint leaves one to fall back on
HANG_S = 10           # train.hang_timeout_s: a frozen rank ends its attempt within seconds
MAX_ATTEMPTS = 6
ATTEMPT_TIMEOUT_S = 180  # the driver's own limit: an attempt still running then is a hang nothing caught
BACKOFF_S = 1.0       # between attempts, as a requeue waits
EXPERIMENT = "chaos"


def sections(steps: int) -> dict:
    """The config sections every run of the soak shares (the reference too: the losses depend on these)."""
    return {"train": {"steps": steps, "log_interval": 1, "hang_timeout_s": HANG_S},
            "checkpoint": {"interval": INTERVAL, "keep_last": 2}}


def launch_cmd(cfg: Path) -> list[str]:
    return [sys.executable, "-m", "launchers.local", "--nproc", "2", sys.executable, str(TRAIN), "--config", str(cfg)]


def run_env(server, endpoint_url: str) -> dict:
    e = {**env(), **server.env(endpoint_url)}
    e.pop("MLFLOW_TRACKING_URI", None)  # tracking.uri of the config decides
    return e


def reference_losses(work: Path, data: Path, steps: int, server) -> dict[int, float]:
    """Losses of the fault-free run: 2 ranks, the same config with a local checkpoint.dir and without MLflow
    (neither changes a loss)."""
    cfg = tiny_config(work, data, "reference.json", **sections(steps), tracking={"enabled": False})
    r = subprocess.run(launch_cmd(cfg), cwd=REPO, env=run_env(server, server.endpoint_url), capture_output=True,
                       text=True, timeout=ATTEMPT_TIMEOUT_S)
    if r.returncode != 0:
        raise SystemExit(f"error: the fault-free reference run failed ({r.returncode}):\n{r.stdout[-3000:]}\n"
                         f"{r.stderr[-3000:]}")
    out = {m["step"]: m["train/loss"] for m in metrics(work / "reference_run") if "train/loss" in m}
    if sorted(out) != list(range(1, steps + 1)):
        raise SystemExit(f"error: the reference run logged steps {sorted(out)}")
    return out


def trial_config(tdir: Path, data: Path, steps: int, bucket: str, proxy_url: str) -> Path:
    sec = sections(steps)
    sec["checkpoint"].update(dir=f"s3://{bucket}/{chaos_faults.PREFIX}", staging_dir=str(tdir / "staging"))
    return tiny_config(tdir, data, "run.json", **sec, data={"s3_endpoint_url": proxy_url},
                       tracking={"enabled": True, "uri": f"sqlite:///{tdir / 'mlflow.db'}", "experiment": EXPERIMENT,
                                 "run_name": tdir.name, "system_metrics": False})


def _inject(t, a) -> None:
    try:
        chaos_faults.inject(t, a)
    except Exception as e:  # noqa: BLE001 - a harness error is the trial's problem, not the soak's end
        t.notes.append(f"injection failed: {type(e).__name__}: {e}")


def run_attempt(t, number: int, cmd: list[str], e: dict, poller) -> tuple[int | None, str, list[str]]:
    """One launch: (exit status or None after the driver's time limit, its output, problems)."""
    a = chaos_faults.Attempt(cmd, e)
    poller.attempt = a
    injector = threading.Thread(target=_inject, args=(t, a), daemon=True) if number == 1 else None
    if injector:
        injector.start()
    problems = []
    try:
        rc = a.run.wait(ATTEMPT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        rc = None
        problems.append(f"attempt {number} still ran after {ATTEMPT_TIMEOUT_S} s (killed)")
    finally:  # also when the driver itself is interrupted: no attempt outlives it
        if a.run.proc.poll() is None:
            a.kill()
            a.run.wait(30)
    if injector:
        injector.join(150)
    poller.attempt = None
    # the ranks die with the launcher (PR_SET_PDEATHSIG); give the kernel a moment, then look for survivors
    alive = [p for p in a.procs.values() if p.pid != a.run.proc.pid]
    _, still = psutil.wait_procs(alive, timeout=5)
    if still and not a.killed:
        problems.append(f"attempt {number} left processes running: {sorted(p.pid for p in still)}")
    if still:
        a.kill()
    return rc, a.run.text, problems


def finished(rc: int | None, text: str, steps: int) -> bool:
    return rc == 0 and f"finished {steps} steps" in text


def run_trial(ctx: dict, index: int, kind: str) -> dict:
    steps, server = ctx["steps"], ctx["server"]
    rng = random.Random(ctx["seed"] * 100_003 + index)
    tdir = ctx["work"] / f"trial{index:03d}"
    tdir.mkdir(parents=True)
    proxy = start_fault_proxy(server)
    bucket = server.make_bucket("chaos")
    t = chaos_faults.Trial(index, kind, rng.randint(2 * INTERVAL + 1, steps - 3), steps, INTERVAL, server, proxy,
                           bucket, rng)
    cmd, e = launch_cmd(trial_config(tdir, ctx["data"], steps, bucket, proxy.endpoint_url)), run_env(
        server, proxy.endpoint_url)
    poller = chaos_checks.Poller(server, bucket).start()
    start, texts, statuses, problems = time.monotonic(), [], [], []
    try:
        for number in range(1, MAX_ATTEMPTS + 1):
            rc, text, trouble = run_attempt(t, number, cmd, e, poller)
            texts.append(text)
            statuses.append(rc)
            problems += trouble
            (tdir / f"attempt{number}.log").write_text(text)
            if finished(rc, text, steps) or rc in STOPS:
                break
            chaos_faults.after_attempt(t, number)
            time.sleep(BACKOFF_S)
    finally:
        poller.stop()
        proxy.close()
    return _verdict(t, tdir, ctx, texts, statuses, problems + poller.violations, time.monotonic() - start)


def _verdict(t, tdir: Path, ctx: dict, texts: list[str], statuses: list, problems: list[str], seconds: float
             ) -> dict:
    if not finished(statuses[-1], texts[-1], t.steps):
        problems.append(f"the run did not complete: last status {_status(statuses[-1])}:\n" + texts[-1][-2000:])
    more, lost = chaos_checks.check_run(tdir / "run_run", ctx["reference"], tdir / "mlflow.db", EXPERIMENT,
                                        t.server, t.bucket)
    problems += more
    if not chaos_faults.landed(t, texts):
        problems.append("the fault missed the run")
    return {"trial": t.index, "fault": t.kind, "fault_step": t.fault_step, "attempts": len(statuses),
            "statuses": [_status(s) for s in statuses], "survived": not problems, "steps_lost": lost,
            "seconds": round(seconds, 1), "notes": t.notes, "problems": problems, "dir": str(tdir)}


def _status(rc: int | None) -> str:
    return "timeout" if rc is None else f"{rc} {name_of(rc)}"


def summarize(rows: list[dict], wall_s: float) -> dict:
    return {"trials": len(rows), "faults_by_kind": dict(collections.Counter(r["fault"] for r in rows)),
            "survived": sum(r["survived"] for r in rows), "steps_lost": sum(r["steps_lost"] for r in rows),
            "attempts": sum(r["attempts"] for r in rows), "wall_s": round(wall_s, 1)}


def print_row(r: dict) -> None:
    print(f"{r['trial']:>5}  {r['fault']:<19} {r['attempts']:>8}  {'yes' if r['survived'] else 'NO':<8} "
          f"{r['steps_lost']:>10}  {r['seconds']:>7.1f}   {' / '.join(r['statuses'])}", flush=True)
    for p in r["problems"]:
        print("       problem: " + p.replace("\n", "\n       "), flush=True)


def print_summary(s: dict) -> None:
    kinds = ", ".join(f"{k} {n}" for k, n in sorted(s["faults_by_kind"].items()))
    print(f"\ntrials: {s['trials']}\nfaults by kind: {kinds}\nsurvived: {s['survived']}/{s['trials']}\n"
          f"steps lost: {s['steps_lost']}\nattempts: {s['attempts']}\nwall time: {s['wall_s']:.0f} s", flush=True)


def soak(args, work: Path) -> list[dict]:
    data = work / "data"
    subprocess.run([sys.executable, "-m", "data_pipelines.demo_corpus", "--out", str(data)], cwd=REPO, check=True,
                   capture_output=True, timeout=300)
    server, moto = start_s3_server(work)
    try:
        t0 = time.monotonic()
        reference = reference_losses(work, data, args.steps, server)
        print(f"fault-free reference: {args.steps} steps in {time.monotonic() - t0:.0f} s", flush=True)
        ctx = {"steps": args.steps, "server": server, "seed": args.seed, "work": work, "data": data,
               "reference": reference}
        kinds = chaos_faults.draw(args.trials, random.Random(args.seed), args.kinds)
        print(f"\n{'trial':>5}  {'fault':<19} {'attempts':>8}  {'survived':<8} {'steps lost':>10}  {'seconds':>7}   "
              f"exit statuses", flush=True)
        rows = []
        for i, kind in enumerate(kinds):
            rows.append(run_trial(ctx, i, kind))
            print_row(rows[-1])
        return rows
    finally:
        stop_s3_server(moto)


def main(argv: list[str] | None = None) -> int:
    ap = common.parser(__doc__)
    ap.add_argument("--trials", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=14, help=f"training steps per run (>= {2 * INTERVAL + 4})")
    ap.add_argument("--work", default="", help="directory for the trials (default: a temporary one)")
    ap.add_argument("--keep", action="store_true", help="keep the trials' directories even if every one survived")
    ap.add_argument("--kinds", default=",".join(chaos_faults.KINDS),
                    help="the fault kinds to draw from, comma-separated (default: all)")
    common.add_out(ap, "chaos")
    args = ap.parse_args(argv)
    args.kinds = tuple(k for k in args.kinds.split(",") if k)
    if not args.kinds or set(args.kinds) - set(chaos_faults.KINDS):
        ap.error(f"--kinds: choose among {', '.join(chaos_faults.KINDS)}")
    if args.steps < 2 * INTERVAL + 4 or args.trials < 1:
        ap.error(f"--steps must be >= {2 * INTERVAL + 4} and --trials >= 1")
    work = Path(args.work or tempfile.mkdtemp(prefix="hgscale-chaos-"))
    if work.exists() and any(work.iterdir()):  # a run directory left there would be resumed from
        ap.error(f"--work {work} is not empty")
    work.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    rows = soak(args, work)
    summary = summarize(rows, time.monotonic() - start)
    print_summary(summary)
    common.write_result(args.out, {"command": common.command(__file__, argv), "cpus": os.cpu_count(),
                                   "steps": args.steps, "checkpoint_interval": INTERVAL, "summary": summary,
                                   "trials": rows})
    ok = summary["survived"] == summary["trials"]
    if ok and not args.keep and not args.work:
        shutil.rmtree(work, ignore_errors=True)
    elif not ok:
        print(f"trial directories (attempt logs, runs, MLflow stores) kept in {work}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
