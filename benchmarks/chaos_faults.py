"""The faults of benchmarks/chaos.py and the running attempt they are injected into.

A trial's first attempt gets one fault, by kind (KINDS):

    sigkill             SIGKILL of one rank after the fault step (a node lost, an OOM kill)
    sigstop             SIGSTOP of one rank (a frozen GPU driver, a swapped-out node): the watchdog of the other
                        rank ends the attempt with the hang status after train.hang_timeout_s
    sigusr1             SIGUSR1 to one rank (Slurm's preemption warning): checkpoint, exit 0 before the end
    sigterm             SIGTERM to the launcher (scancel, the time limit), which relays it to every rank
    s3_errors           HTTP 500s and connection resets on checkpoint uploads, fewer than data.retries
    s3_latency          the first 6 uploads of one checkpoint held 3 s each by the proxy
    outage              every S3 request refused for OUTAGE_S, longer than the retries last: the attempt
                        exits INFRA, a later one finds the storage back
    kill_during_upload  the proxy holds an upload of the next checkpoint; every process is SIGKILLed meanwhile
    corrupt_checkpoint  SIGKILL of one rank, then the newest complete checkpoint's hgscale.json is overwritten
                        with garbage: the rerun must skip it (a warning) and resume from the one before

``inject`` runs beside the first attempt, ``after_attempt`` between attempts, ``landed`` says at the end whether
the fault really hit the run (a fault that missed would make a survival meaningless).
"""
from __future__ import annotations

import os
import re
import signal
import time
from dataclasses import dataclass, field

import psutil

from tests.integration.train_helpers import Watched

KINDS = ("sigkill", "sigstop", "sigusr1", "sigterm", "s3_errors", "s3_latency", "outage", "kill_during_upload",
         "corrupt_checkpoint")
OUTAGE_S = 12.0  # data.retries = 5 with retry_backoff_s = 0.5 give up after 7.5 s
PREFIX = "run"   # checkpoint.dir = s3://<bucket>/run


def draw(trials: int, rng, kinds: tuple[str, ...] = KINDS) -> list[str]:
    """The fault kind of each trial: ``kinds`` shuffled, once per round of len(kinds) trials, so every kind appears
    when trials >= len(kinds) and the trials of one round hold each kind once."""
    out: list[str] = []
    while len(out) < trials:
        round_ = list(kinds)
        rng.shuffle(round_)
        out += round_
    return out[:trials]


@dataclass
class Trial:
    """One trial: its fault, the S3 server and the trial's own proxy and bucket, what happened."""

    index: int
    kind: str
    fault_step: int
    steps: int
    interval: int
    server: object       # tests.fixtures.s3.S3Server
    proxy: object        # tests.fixtures.s3.FaultProxy, in front of the server for this trial only
    bucket: str
    rng: object          # random.Random of this trial
    notes: list[str] = field(default_factory=list)
    corrupted: str = ""  # the tag whose hgscale.json corrupt_checkpoint overwrote

    def next_save(self, step: int) -> int:
        """The step of the first checkpoint after ``step`` (the final one at train.steps)."""
        return min((step // self.interval + 1) * self.interval, self.steps)


class Attempt:
    """One launch of the trial's command, its output read as it comes, every process it started remembered (the
    ranks run in sessions of their own: a kill of the launcher's process group would miss them)."""

    def __init__(self, cmd: list[str], env: dict):
        self.run = Watched(cmd, start_new_session=True, env=env)
        self.procs: dict[int, psutil.Process] = {}
        self.killed = False  # the driver killed it (a fault, or the attempt's time limit)
        self.track()

    def track(self) -> None:
        """Remember the launcher's descendants now (called every poll, so short-lived ones are seen too)."""
        try:
            root = psutil.Process(self.run.proc.pid)
            for p in [root, *root.children(recursive=True)]:
                self.procs.setdefault(p.pid, p)
        except psutil.Error:
            pass

    def ranks(self, timeout: float = 60.0) -> dict[int, psutil.Process]:
        """{rank: trainer process} once both ranks are up (fewer if the attempt ended or ``timeout`` passed)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = {}
            try:
                for p in psutil.Process(self.run.proc.pid).children():
                    rank = p.environ().get("RANK")
                    if rank is not None:
                        found[int(rank)] = p
            except psutil.Error:
                pass
            if len(found) == 2 or self.run.proc.poll() is not None:
                return found
            time.sleep(0.1)
        return found

    def wait_step(self, step: int, timeout: float = 240.0) -> bool:
        """Until the progress line of ``step`` is printed (True), the attempt exits or ``timeout`` passes (False);
        never the full timeout for an attempt that already ended."""
        pattern = re.compile(rf"step\s+{step}/\d+\b")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(pattern.search(ln) for ln in list(self.run.lines)):
                return True
            if self.run.proc.poll() is not None:
                return False
            time.sleep(0.02)
        return False

    def kill(self) -> None:
        """SIGKILL every process of the attempt, SIGCONT first so a stopped one cannot linger."""
        self.killed = True
        self.track()
        for p in self.procs.values():
            for sig in (signal.SIGCONT, signal.SIGKILL):
                try:
                    p.send_signal(sig)
                except psutil.Error:
                    break


# --------------------------------------------------------------------------------------------- injection

def inject(t: Trial, a: Attempt) -> None:
    """Inject ``t.kind`` into the running first attempt ``a``; notes say what was done."""
    if t.kind in ("s3_errors", "s3_latency", "kill_during_upload"):
        _arm_proxy(t)  # armed before the fault step: held or failed from the checkpoint after it on
    if not a.wait_step(t.fault_step):
        t.notes.append(f"the attempt ended before step {t.fault_step}")
        return
    if t.kind == "corrupt_checkpoint":
        _wait_complete(t, a, 2)  # one to corrupt, one before it to resume from
    if t.kind in ("sigkill", "sigstop", "sigusr1", "corrupt_checkpoint"):
        ranks = sorted(a.ranks().items())
        if not ranks:
            t.notes.append(f"no rank to signal after step {t.fault_step}")
            return
        rank, proc = t.rng.choice(ranks)
        sig = {"sigstop": signal.SIGSTOP, "sigusr1": signal.SIGUSR1}.get(t.kind, signal.SIGKILL)
        _signal(proc, sig)
        t.notes.append(f"{signal.Signals(sig).name} to rank {rank} after step {t.fault_step}")
    elif t.kind == "sigterm":
        os.kill(a.run.proc.pid, signal.SIGTERM)
        t.notes.append(f"SIGTERM to the launcher after step {t.fault_step}")
    elif t.kind == "outage":
        t.proxy.outage(OUTAGE_S)
        t.notes.append(f"S3 outage of {OUTAGE_S:.0f} s after step {t.fault_step}")
    elif t.kind == "kill_during_upload":
        _kill_mid_upload(t, a)


def _wait_complete(t: Trial, a: Attempt, n: int, timeout: float = 120.0) -> None:
    """Until the bucket holds ``n`` complete checkpoints (uploads finish in the background, a few steps after
    their save), the attempt ends, or ``timeout`` passes."""
    c = t.server.client()
    deadline = time.monotonic() + timeout
    while a.run.proc.poll() is None and time.monotonic() < deadline:
        keys = [o["Key"] for o in c.list_objects_v2(Bucket=t.bucket, Prefix=f"{PREFIX}/").get("Contents", [])]
        if sum(k.endswith("/COMPLETE") for k in keys) >= n:
            return
        time.sleep(0.05)


def _signal(proc: psutil.Process, sig: int) -> None:
    try:
        proc.send_signal(sig)
    except psutil.Error:
        pass  # the rank already exited: landed() tells


def _arm_proxy(t: Trial) -> None:
    tag = f"{PREFIX}/step{t.next_save(t.fault_step):08d}/"
    if t.kind == "s3_errors":
        # four failures in a row at most for one request: data.retries = 5 absorbs them within the attempt
        for action in ("500", "reset", "500", "reset"):
            t.proxy.inject(action, 1, match=tag, method="PUT")
        t.notes.append(f"2 HTTP 500s and 2 resets on the uploads of {tag}")
    elif t.kind == "s3_latency":
        t.proxy.slow_s = 3.0
        t.proxy.inject("slow", 6, match=tag, method="PUT")
        t.notes.append(f"6 uploads of {tag} held 3 s each")
    else:
        # held past the end of the trial: the proxy forwards a held request once its delay is over, and a write
        # of a killed attempt arriving later is not what a dead client's connection does on S3
        t.proxy.slow_s = 600.0
        t.proxy.inject("slow", 1, match=tag, method="PUT")


def _kill_mid_upload(t: Trial, a: Attempt) -> None:
    deadline = time.monotonic() + 120
    while not t.proxy.injected["slow"] and a.run.proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    if t.proxy.injected["slow"]:
        a.kill()
        t.notes.append(f"SIGKILL of every process while an upload of step {t.next_save(t.fault_step)} was held")


def after_attempt(t: Trial, number: int) -> None:
    """Between attempts: corrupt_checkpoint overwrites the newest complete checkpoint's hgscale.json once."""
    if t.kind != "corrupt_checkpoint" or number != 1:
        return
    c = t.server.client()
    try:
        tag = c.get_object(Bucket=t.bucket, Key=f"{PREFIX}/latest")["Body"].read().decode()
    except c.exceptions.NoSuchKey:
        t.notes.append("no complete checkpoint to corrupt")
        return
    c.put_object(Bucket=t.bucket, Key=f"{PREFIX}/{tag}/hgscale.json", Body=b"\x00garbage{not json")
    t.corrupted = tag
    t.notes.append(f"overwrote {tag}/hgscale.json with garbage")


def landed(t: Trial, texts: list[str]) -> bool:
    """Whether the fault hit the run: the first attempt did not finish, or (S3 faults survived within the attempt)
    the proxy injected them; a corrupt checkpoint was skipped by the rerun."""
    first = texts[0] if texts else ""
    unfinished = f"finished {t.steps} steps" not in first
    if t.kind in ("s3_errors", "s3_latency"):
        return sum(t.proxy.injected.values()) > 0
    if t.kind == "outage":
        return t.proxy.injected["outage"] > 0
    if t.kind in ("sigusr1", "sigterm"):
        return unfinished and "preempted at step" in first
    if t.kind == "corrupt_checkpoint":
        return unfinished and bool(t.corrupted) and len(texts) > 1 and \
            f"skipping checkpoint {t.corrupted}" in texts[1]
    return unfinished
