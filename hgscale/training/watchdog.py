"""Hang detection: a watchdog thread on every rank, heartbeats through the rendezvous store.

    wd = Watchdog(progress, rank, world, timeout_s, run_dir)   # a callback; its thread starts at once and arms
                                                               # after the first completed step

Every rank's thread publishes a heartbeat ``{step, phase, host, pid, time}`` to the TCPStore rank 0 serves for the
process group (MASTER_ADDR:MASTER_PORT; our own client connection, every call bounded in time, so a frozen store cannot
block the thread for long). Progress is what the main thread marks: a step started or done, a part at work
(``progress.phase``). When a rank sees no progress for ``train.hang_timeout_s`` seconds (or another rank declared a
hang in the store) it

    1. reads every heartbeat and names the culprits: ranks whose heartbeat stopped (frozen, dead) or, if every
       rank still beats, the ranks behind the others (the rest wait for them in a collective);
    2. dumps the Python stacks of all its threads (faulthandler) to ``run_dir/hang/rank00003.txt``;
    3. rank 0 (or the lowest rank still alive when rank 0 is the culprit) logs ONE line naming the culprit
       rank(s), host(s) and the last step every rank completed, and writes ``run_dir/hang/report.json`` (and a
       copy into ``$HGSCALE_EVENTS_DIR`` for the Slurm script, which excludes that node);
    4. ends the process with exit status HANG (4, hgscale.core.status): the main thread is stuck in C++, so
       ``os._exit``.

The launchers stop the other ranks once one exits non-zero. train.hang_timeout_s = -1 derives the timeout:
max(300 s, 20 x the median step time); 0 switches the watchdog off.
"""
from __future__ import annotations

import faulthandler
import json
import os
import socket
import statistics
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

from hgscale.core.status import HANG
from hgscale.training.callbacks import Callback, StepInfo

__all__ = ["Watchdog", "culprits", "derived_timeout"]

HANG_KEY = "hgscale/hang"
WAITING = "every rank waiting (no rank behind)"
ACK_KEY = "hgscale/hang_ack"
DERIVED_MIN_S, DERIVED_FACTOR = 300.0, 20.0


def beat_key(rank: int) -> str:
    return f"hgscale/beat/{rank}"


def derived_timeout(step_times: list[float]) -> float:
    """max(300 s, 20 x the median step time)."""
    return max(DERIVED_MIN_S, DERIVED_FACTOR * statistics.median(step_times)) if step_times else DERIVED_MIN_S


def culprits(beats: dict[int, dict | None], now: float, stale_s: float) -> tuple[list[int], str]:
    """(culprit ranks, why) from every rank's last heartbeat (None: never seen or store unreachable).
    A heartbeat older than ``stale_s`` means a frozen or dead rank; if all still beat, the ranks with the
    fewest completed steps hold the others up."""
    stale = sorted(r for r, b in beats.items() if b is None or now - b["time"] > stale_s)
    if stale:
        return stale, "heartbeat stopped"
    steps = {r: b["step"] for r, b in beats.items()}
    low = min(steps.values())
    behind = sorted(r for r, s in steps.items() if s == low)
    if len(behind) < len(steps):
        return behind, "behind the other ranks"
    return sorted(steps), WAITING


def hang_line(report: dict) -> str:
    def one(r: int) -> str:
        age = report["ages"].get(str(r))
        if age is None:
            return f"rank {r} ({report['hosts'][str(r)]}; no heartbeat)"
        phase = report["phases"][str(r)]
        return f"rank {r} ({report['hosts'][str(r)]}; last heartbeat {age} s ago in phase {phase!r})"

    who = ", ".join(one(r) for r in report["ranks"])
    return (f"error: hang: no progress for {report['timeout_s']:.0f} s "
            f"({report.get('setting', 'train.hang_timeout_s')}); {who}: "
            f"{report['why']}; last step completed by every rank: {report['step']}; stack dumps in "
            f"{report['dumps']}; exiting with status {HANG}")


class BoundedStore:
    """A rendezvous-store client whose every call returns within ``timeout_s`` or raises TimeoutError.

    torch's TCPStore client waits far longer than its own timeout for a store host that is stopped (SIGSTOP, a
    frozen node) rather than gone: check/get/add block in recv. The watchdog must judge by its own progress whatever
    the store does, so each call runs in a short-lived thread. After a call that did not return, the client (its
    socket in an unknown state) is dropped: calls fail at once for ``timeout_s``, then a new client is made."""

    def __init__(self, connect, timeout_s: float):
        self._connect, self.timeout_s = connect, timeout_s
        self._client, self._dead_until = None, 0.0

    def _run(self, fn, *args):
        box: dict = {}

        def call():
            try:
                box["value"] = fn(*args)
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
                box["error"] = e
        t = threading.Thread(target=call, name="hgscale-watchdog-store", daemon=True)
        t.start()
        t.join(self.timeout_s)
        if t.is_alive():  # left to finish, or to die with the process
            self._client, self._dead_until = None, time.monotonic() + self.timeout_s
            raise TimeoutError(f"the rendezvous store did not answer within {self.timeout_s:g} s")
        if "error" in box:
            raise box["error"]
        return box.get("value")

    def __getattr__(self, name: str):
        def call(*args):
            if time.monotonic() < self._dead_until:
                raise TimeoutError("the rendezvous store did not answer a moment ago")
            if self._client is None:
                self._client = self._run(self._connect)
            return self._run(getattr(self._client, name), *args)
        return call


class Progress:
    """What the main thread is doing, since when, and how long that phase may take (written by the trainer, read
    by the watchdog's thread). ``budget_s`` None: the hang timeout; a long phase (a save, the final upload wait)
    gets its own, and meanwhile a rank whose heartbeat stops is still caught at the hang timeout."""

    def __init__(self, step: int = 0):
        self.step, self.phase, self.t, self.budget_s, self.budget_name = step, "starting", time.monotonic(), None, ""

    def mark(self, phase: str, budget_s: float | None = None, budget_name: str = "") -> None:
        self.phase, self.t, self.budget_s, self.budget_name = phase, time.monotonic(), budget_s, budget_name


class Watchdog(Callback):
    def __init__(self, progress: Progress, rank: int, world: int, hang_timeout_s: float, run_dir: str,
                 other_progress_t=lambda: 0.0, period_s: float | None = None, start: bool = True, on_hang=None):
        """``other_progress_t``: the time of the newest progress made off the main thread (an upload); ``on_hang``:
        called (bounded, errors ignored) before the process exits with HANG, e.g. to mark the tracking run."""
        self.on_hang = on_hang
        self.progress, self.rank, self.world = progress, rank, world
        self.other_progress_t = other_progress_t
        self.fixed = hang_timeout_s if hang_timeout_s > 0 else None
        # one heartbeat (a single store write) and one look for a declared hang per period
        self.period = period_s or min(2.0, (self.fixed or DERIVED_MIN_S) / 10)
        self.stale_s = max(3 * self.period, 10.0)  # a heartbeat older than this: a frozen or dead rank
        self.dump_dir = Path(run_dir) / "hang"
        self.host = socket.gethostname()
        self.step_times: list[float] = []
        self.first_step = progress.step
        self.started = time.time()
        self._stop = threading.Event()
        self.store = BoundedStore(self._connect, max(2 * self.period, 5.0))
        self.thread = threading.Thread(target=self._loop, name="hgscale-watchdog", daemon=True)
        if start:
            self.thread.start()

    def _connect(self):
        import torch.distributed as dist

        # a client of the store the process group rendezvoused through (BoundedStore bounds every call)
        return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                             timeout=timedelta(seconds=max(2 * self.period, 5.0)), wait_for_workers=False)

    # ------------------------------------------------------------------------------ main-thread side
    def after_step(self, info: StepInfo) -> None:
        self.step_times = (self.step_times + [info.timings.get("step_s", 0.0)])[-101:]

    def close(self) -> None:
        self._stop.set()

    def timeout(self) -> float:
        return self.fixed if self.fixed else derived_timeout(self.step_times)

    # ------------------------------------------------------------------------------ the thread
    def _progress_t(self) -> float:
        """The main thread's last mark, or a background checkpoint upload's last file, whichever is newer."""
        return max(self.progress.t, self.other_progress_t())

    def _beat(self) -> dict:
        return {"step": self.progress.step, "phase": self.progress.phase, "host": self.host, "pid": os.getpid(),
                "time": time.time()}

    def _loop(self) -> None:
        while True:
            try:
                self.store.set(beat_key(self.rank), json.dumps(self._beat()))
                declared = self.store.check([HANG_KEY])
            except Exception:  # noqa: BLE001 - the store's host is frozen or gone: judged below by progress
                declared = False
            armed = self.progress.step > self.first_step  # the first step (compile, warm-up) is never a hang
            frozen = armed and not declared and self._peer_frozen()
            if declared or frozen or (armed and self._stalled()):
                self._on_hang(declared, frozen)
                return
            if self._stop.wait(self.period):
                return

    def limit(self) -> tuple[float, str]:
        """(seconds the current phase may go without progress, the setting that says so)."""
        if self.progress.budget_s:
            return self.progress.budget_s, self.progress.budget_name
        return self.timeout(), "train.hang_timeout_s"

    def _stalled(self) -> bool:
        return time.monotonic() - self._progress_t() > self.limit()[0]

    def _peer_frozen(self) -> bool:
        """In a long phase only (then this rank may wait for the others a long time): a peer whose heartbeat is
        older than the hang timeout is frozen or dead, whatever the phase allows."""
        if not self.progress.budget_s:
            return False
        now = time.time()
        for r, b in self._read_beats().items():
            seen = b["time"] if b is not None else self.started  # never seen: count from this watchdog's start
            if r != self.rank and now - seen > self.timeout():
                return True
        return False

    def _read_beats(self) -> dict[int, dict | None]:
        keys = [beat_key(r) for r in range(self.world)]
        try:
            return {r: json.loads(v) for r, v in enumerate(self.store.multi_get(keys))}
        except Exception:  # noqa: BLE001 - some rank never beat, or the store is unreachable: one at a time
            out: dict[int, dict | None] = {}
            for r, k in enumerate(keys):
                try:
                    out[r] = json.loads(self.store.get(k)) if self.store.check([k]) else None
                except Exception:  # noqa: BLE001
                    out[r] = {**self._beat(), "time": time.time()} if r == self.rank else None
            return out

    def _report(self, frozen_peer: bool = False) -> dict:
        """What the hang line says. ``frozen_peer``: found by a peer's heartbeat inside a long phase, so the limit
        that was passed is the hang timeout, not the phase's budget."""
        beats = self._read_beats()
        beats[self.rank] = self._beat()  # this thread is alive, whatever the store says
        # found by a peer's heartbeat older than the hang timeout: stale by that measure, however short it is
        stale_s = min(self.stale_s, self.timeout()) if frozen_peer else self.stale_s
        ranks, why = culprits(beats, time.time(), stale_s)
        limit, setting = (self.timeout(), "train.hang_timeout_s") if frozen_peer else self.limit()
        return {"ranks": ranks, "why": why, "timeout_s": limit, "setting": setting, "dumps": str(self.dump_dir),
                # live ranks finished it; a step finishes only with every rank's part in its collectives
                "step": min(b["step"] for r, b in beats.items() if b is not None and (r not in ranks or
                                                                                       why != "heartbeat stopped")),
                "ages": {str(r): round(time.time() - b["time"]) for r, b in beats.items() if b is not None},
                "hosts": {str(r): (beats[r] or {}).get("host", "unknown host") for r in range(self.world)},
                "phases": {str(r): (beats[r] or {}).get("phase", "unknown") for r in range(self.world)},
                "time": time.time()}

    def _on_hang(self, declared: bool, frozen_peer: bool = False) -> None:
        report = None
        try:
            if declared:
                report = json.loads(self.store.get(HANG_KEY))
            else:  # first to notice: tell the others, so that every live rank dumps its stacks
                report = self._report(frozen_peer)
                self.store.compare_set(HANG_KEY, "", json.dumps(report))
                report = json.loads(self.store.get(HANG_KEY))
        except Exception:  # noqa: BLE001 - no store (rank 0 frozen or gone): judge alone
            report = report or self._report(frozen_peer)
        self._dump(report)
        alive = [r for r in range(self.world) if r not in report["ranks"] or report["why"] != "heartbeat stopped"]
        if self.rank == min(alive, default=0):
            self._publish(report)
        self._linger(report, alive)
        if self.on_hang is not None:
            try:
                self.on_hang()
            except Exception:  # noqa: BLE001 - the exit must not wait on tracking trouble
                pass
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(HANG)

    def _dump(self, report: dict) -> None:
        self.dump_dir.mkdir(parents=True, exist_ok=True)
        with open(self.dump_dir / f"rank{self.rank:05d}.txt", "w") as f:
            f.write(f"rank {self.rank} on {self.host} (pid {os.getpid()}) at step {self.progress.step}, phase "
                    f"{self.progress.phase!r}; hang report: {json.dumps(report)}\n\n")
            f.flush()
            faulthandler.dump_traceback(file=f, all_threads=True)

    def _publish(self, report: dict) -> None:
        print(hang_line(report), file=sys.stderr, flush=True)
        # a node is excluded only when a rank on it holds the others up; if every rank waits, none is to blame
        hosts = [] if report["why"] == WAITING else sorted({report["hosts"][str(r)] for r in report["ranks"]})
        record = json.dumps({"kind": "hang", **report, "culprit_hosts": hosts})
        (self.dump_dir / "report.json").write_text(record)
        events = os.environ.get("HGSCALE_EVENTS_DIR")
        if events:
            Path(events).mkdir(parents=True, exist_ok=True)
            (Path(events) / "hang.json").write_text(record)

    def _linger(self, report: dict, alive: list[int]) -> None:
        """Rank 0 serves the store: it waits (a few periods at most) until every live rank has dumped."""
        try:
            n = self.store.add(ACK_KEY, 1)
            deadline = time.monotonic() + 3 * self.period
            while self.rank == 0 and n < len(alive) and time.monotonic() < deadline:
                time.sleep(0.2)
                n = self.store.add(ACK_KEY, 0)
        except Exception:  # noqa: BLE001
            pass
