"""Stop signals for ranks that may still be starting up: hold SIGUSR1 until the rank can catch it.

A preemption SIGUSR1 tells the trainer to checkpoint and exit. Delivered while the trainer is still
importing torch and DeepSpeed (tens of seconds), before its handler exists, the default action would kill
it without a checkpoint. So every rank starts with SIGUSR1 ignored (an ignored disposition survives exec),
and the process that started it holds a SIGUSR1 that arrived too early and delivers it once the rank's
status shows a handler (``SigCgt`` in /proc/PID/status). A rank that already catches the signal gets
it at once; a duplicate of a stop signal is harmless to the trainer (it only sets a flag).

Used by both launch paths: the per-task wrapper ``python -m launchers.env`` under srun, and
``python -m launchers.local``.
"""
from __future__ import annotations

import ctypes
import signal
import subprocess

FORWARDED = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)
PR_SET_PDEATHSIG = 1
try:  # loaded here, not in the forked child: a dlopen there could deadlock on a lock another thread held
    _libc = ctypes.CDLL("libc.so.6", use_errno=True)
except OSError:
    _libc = None


def catches(pid: int, signum: int) -> bool:
    """Whether process ``pid`` has a handler installed for ``signum`` (False if it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("SigCgt:"):
                    return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return False


def die_with_parent(signum: int = signal.SIGKILL) -> None:
    """Between fork and exec: have the kernel send ``signum`` to this process when its parent dies, so a
    parent killed outright leaves no orphans (the setting survives exec)."""
    if _libc is not None:
        _libc.prctl(PR_SET_PDEATHSIG, signum)


def child_setup():
    """Runs in each rank between fork and exec: ignore SIGUSR1 until the rank handles it; default SIGINT;
    and let the kernel kill the rank if its parent dies (no orphaned ranks)."""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    die_with_parent(signal.SIGKILL)


class SignalRelay:
    """Relays FORWARDED signals to child processes, holding SIGUSR1 for children not catching it yet.

    Install with ``relay.install()`` before starting children, register each with ``relay.add(child)``
    (a signal that came before is delivered like one that came later), and call ``relay.poll()`` while
    waiting on them.
    """

    def __init__(self):
        self.children: list[subprocess.Popen] = []
        self.pending: set[int] = set()  # pids owed a SIGUSR1
        self.seen: list[int] = []  # every signal so far: a child registered later still gets them
        self._previous: dict = {}

    def add(self, child: subprocess.Popen) -> subprocess.Popen:
        self.children.append(child)
        for signum in self.seen:
            self._deliver(child, signum)
        return child

    def install(self):
        for s in FORWARDED:
            self._previous[s] = signal.signal(s, self._on_signal)
        return self

    def restore(self):
        for s, h in self._previous.items():
            signal.signal(s, h)

    def _on_signal(self, signum, _frame):
        self.seen.append(signum)
        for p in self.children:
            self._deliver(p, signum)

    def _deliver(self, p: subprocess.Popen, signum: int):
        if p.poll() is not None:
            return
        if signum == signal.SIGUSR1 and not catches(p.pid, signum):
            self.pending.add(p.pid)  # still starting: deliver when it can catch it
        else:
            p.send_signal(signum)

    def poll(self):
        """Deliver held SIGUSR1s to children that now catch it."""
        for p in self.children:
            if p.pid in self.pending and (p.poll() is not None or catches(p.pid, signal.SIGUSR1)):
                self.pending.discard(p.pid)
                if p.poll() is None:
                    p.send_signal(signal.SIGUSR1)


def exit_status(returncode: int) -> int:
    """Popen's negative 'killed by signal N' as a shell exit status (128 + N)."""
    return 128 - returncode if returncode < 0 else returncode
