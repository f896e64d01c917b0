"""Stop signals held while a process starts children that must not act on them.

Slurm signals every process of a job step: SIGUSR1/SIGUSR2 on preemption, SIGTERM on ``scancel`` and at the time
limit. Only the trainer acts on them (it finishes its step, checkpoints, then stops its children). A child started
while the signals are blocked inherits the blocked mask across fork and exec (data workers, the fork server, the
compiler DeepSpeed runs to build an op just in time), so the signal leaves it alive; in this process the signals are
only held, and delivered to its handlers when the block ends.

    with stop_signals_held():
        start_workers()
"""
from __future__ import annotations

import contextlib
import signal

STOP_SIGNALS = frozenset({signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM})


@contextlib.contextmanager
def stop_signals_held():
    """Block STOP_SIGNALS in this thread (and in every child started meanwhile) until the block ends."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
