"""Stop signals held while children start: the children outlive them, this process handles them afterwards."""
import signal
import subprocess
import sys
import threading
import time

from hgscale.core.signals import STOP_SIGNALS, stop_signals_held


def test_children_started_while_stop_signals_are_held_outlive_them_and_the_signal_waits():
    got: list[int] = []
    old = signal.signal(signal.SIGUSR1, lambda s, f: got.append(s))
    child = None
    try:
        with stop_signals_held():
            # what DeepSpeed does when it builds an op, and what a data worker is: a child process
            child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
            signal.pthread_kill(threading.main_thread().ident, signal.SIGUSR1)  # a preemption during start-up
            time.sleep(0.2)
            assert got == []  # held, not lost
        assert got == [signal.SIGUSR1]  # delivered when the block ends
        for signum in sorted(STOP_SIGNALS):
            child.send_signal(signum)
        time.sleep(0.5)
        assert child.poll() is None  # the mask it was started with blocks them all
        assert signal.pthread_sigmask(signal.SIG_BLOCK, []) & STOP_SIGNALS == set()  # this thread's mask restored
    finally:
        signal.signal(signal.SIGUSR1, old)
        if child is not None:
            child.kill()
            child.wait()
