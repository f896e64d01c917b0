"""benchmarks/chaos.py, three trials: three faults of different kinds, each survived with no step lost.

The fixed seed draws sigterm (the launcher relays it, the ranks checkpoint and exit 0 before the end),
kill_during_upload (every process SIGKILLed while the proxy holds an upload of the next checkpoint) and sigkill
(one rank killed mid-run); each trial reruns its command until the run completes and checks it against a
fault-free run (see the benchmark's docstring). The soak itself: ``benchmarks/chaos.py --trials 50``.
"""
import json
import signal
import subprocess
import sys

import psutil
import pytest

from tests.integration.train_helpers import ROOT, env

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]
SEED = 29
TIMEOUT_S = 240


def _kill_tree(proc: subprocess.Popen) -> None:
    """The driver and everything it started: the ranks live in sessions of their own, and a stopped one needs
    SIGCONT before it can die."""
    try:
        procs = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.Error:
        procs = []
    for p in procs:
        for sig in (signal.SIGCONT, signal.SIGKILL):
            try:
                p.send_signal(sig)
            except psutil.Error:
                break


def test_three_faults_of_different_kinds_are_survived(tmp_path):
    out = tmp_path / "chaos.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "chaos.py"), "--trials", "3", "--seed", str(SEED),
           "--work", str(tmp_path / "work"), "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        text, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        _kill_tree(proc)
        text, _ = proc.communicate()
        pytest.fail(f"benchmarks/chaos.py ran over {TIMEOUT_S} s:\n{text[-4000:]}")
    assert proc.returncode == 0, text[-6000:]
    result = json.loads(out.read_text())
    summary, trials = result["summary"], result["trials"]
    assert (summary["trials"], summary["survived"], summary["steps_lost"]) == (3, 3, 0), text[-6000:]
    assert len({t["fault"] for t in trials}) == 3, [t["fault"] for t in trials]
    assert all(t["attempts"] >= 2 for t in trials), trials  # each fault ended its first attempt before the end
    assert "survived: 3/3" in text and "steps lost: 0" in text
