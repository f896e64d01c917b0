"""Who the watchdog blames, its derived timeout, and the config keys that drive it."""
import pytest

from hgscale.config import ConfigError, config_from_dict
from hgscale.training.watchdog import culprits, derived_timeout, hang_line


def beat(step, t, host="h"):
    return {"step": step, "phase": f"step {step + 1}", "host": host, "pid": 1, "time": t}


def test_a_stopped_heartbeat_is_the_culprit():
    beats = {0: beat(12, 100.0), 1: beat(12, 60.0, "n2"), 2: beat(12, 99.0), 3: None}
    assert culprits(beats, now=100.0, stale_s=10.0) == ([1, 3], "heartbeat stopped")


def test_with_every_rank_beating_the_ones_behind_are_named():
    beats = {0: beat(12, 100.0), 1: beat(11, 100.0), 2: beat(12, 100.0)}
    assert culprits(beats, now=101.0, stale_s=10.0) == ([1], "behind the other ranks")
    level = {0: beat(12, 100.0), 1: beat(12, 100.0)}
    assert culprits(level, now=101.0, stale_s=10.0) == ([0, 1], "every rank waiting (no rank behind)")


def test_derived_timeout_is_twenty_median_steps_at_least_300_s():
    assert derived_timeout([]) == 300.0
    assert derived_timeout([1.0, 2.0, 100.0]) == 300.0
    assert derived_timeout([30.0, 20.0, 25.0]) == 500.0


def test_hang_line_names_rank_host_step_and_dumps():
    report = {"ranks": [1], "why": "heartbeat stopped", "timeout_s": 30.0, "dumps": "runs/x/hang", "step": 12,
              "hosts": {"0": "a", "1": "node7"}, "phases": {"0": "step 13", "1": "step 13"}, "ages": {"1": 41}}
    line = hang_line(report)
    assert line.count("\n") == 0
    assert ("rank 1 (node7; last heartbeat 41 s ago in phase 'step 13'): heartbeat stopped; last step completed "
            "by every rank: 12; stack dumps in runs/x/hang; exiting with status 4") in line


@pytest.mark.parametrize("override, message", [
    ("train.hang_timeout_s=-5", "train.hang_timeout_s = -5.0: use seconds > 0, -1 (derived) or 0 (off)"),
    ("parallel.timeout_s=0", "parallel.timeout_s = 0.0 must be > 0 seconds"),
    ("checkpoint.dir=gs://b/x", "checkpoint.dir = 'gs://b/x' has an unknown scheme 'gs'"),
])
def test_bad_fault_settings_are_config_errors(override, message):
    base = {"data": {"url": "/data"}}
    with pytest.raises(ConfigError) as e:
        config_from_dict(base, [override])
    assert message in str(e.value)
    ok = config_from_dict(base, ["train.hang_timeout_s=0", "checkpoint.dir=s3://b/run"])
    assert ok.parallel.timeout_s == 600.0 and ok.train.hang_timeout_s == 0


@pytest.fixture
def store_env(monkeypatch):
    """A real TCPStore, as the process group's rendezvous serves it."""
    from datetime import timedelta

    import torch.distributed as dist

    from hgscale.core.net import free_port

    port = free_port()
    master = dist.TCPStore("127.0.0.1", port, is_master=True, timeout=timedelta(seconds=5), wait_for_workers=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    yield master


def test_a_slow_save_is_not_a_hang_but_a_frozen_peer_inside_it_is(store_env, tmp_path):
    import json
    import time

    from hgscale.training.watchdog import Progress, Watchdog, beat_key

    progress = Progress(step=3)
    wd = Watchdog(progress, rank=0, world=2, hang_timeout_s=1.0, run_dir=str(tmp_path), period_s=0.1, start=False)
    store_env.set(beat_key(0), json.dumps(beat(3, time.time())))  # what this rank's own thread would write
    progress.mark("step 4")
    time.sleep(1.2)
    assert wd._stalled() and wd.limit() == (1.0, "train.hang_timeout_s")  # a step without progress: a hang
    progress.mark("Checkpointing after step 4", 60.0, "checkpoint.save_timeout_s")
    time.sleep(1.2)
    store_env.set(beat_key(1), json.dumps(beat(4, time.time())))  # the peer beats on, uploading
    assert not wd._stalled() and not wd._peer_frozen()  # longer than the hang timeout, within the save's budget
    store_env.set(beat_key(1), json.dumps(beat(4, time.time() - 5)))  # the peer stopped beating (SIGSTOP)
    assert wd._peer_frozen()
    report = wd._report(frozen_peer=True)  # the line names the frozen peer and the limit it passed, not the budget
    assert (report["ranks"], report["why"]) == ([1], "heartbeat stopped")
    assert (report["timeout_s"], report["setting"]) == (1.0, "train.hang_timeout_s")
    progress.mark("step 5")
    assert not wd._peer_frozen()  # outside a long phase the collective itself stalls: judged by progress


def test_no_node_is_excluded_when_no_rank_is_behind(store_env, tmp_path, monkeypatch):
    import json

    from hgscale.training.watchdog import WAITING, Progress, Watchdog

    monkeypatch.setenv("HGSCALE_EVENTS_DIR", str(tmp_path / "events"))
    wd = Watchdog(Progress(), rank=0, world=2, hang_timeout_s=1.0, run_dir=str(tmp_path), start=False)
    wd.dump_dir.mkdir(parents=True)
    report = {"ranks": [0, 1], "why": WAITING, "timeout_s": 1.0, "dumps": "d", "step": 3, "ages": {"0": 1, "1": 1},
              "hosts": {"0": "a", "1": "b"}, "phases": {"0": "step 4", "1": "step 4"}}
    wd._publish(report)
    assert json.loads((tmp_path / "events" / "hang.json").read_text())["culprit_hosts"] == []
    wd._publish({**report, "ranks": [1], "why": "behind the other ranks"})
    assert json.loads((tmp_path / "events" / "hang.json").read_text())["culprit_hosts"] == ["b"]


def test_every_long_phase_names_a_budget_the_config_has():
    """Validation, a save and a preemption save each have a time budget of their own, read from the config."""
    from hgscale.config import Config
    from hgscale.training.callbacks import Checkpointing, Preemption, Validation

    cfg = Config()
    budgets = {cls.__name__: cls.budget_key for cls in (Validation, Checkpointing, Preemption)}
    assert budgets == {"Validation": "train.eval_timeout_s", "Checkpointing": "checkpoint.save_timeout_s",
                       "Preemption": "checkpoint.save_timeout_s"}
    for key in budgets.values():
        section, name = key.split(".")
        assert getattr(getattr(cfg, section), name) == 3600.0


def test_a_stopped_store_host_bounds_every_call_and_the_report_names_rank_0():
    """Rank 0 serves the rendezvous store; stopped (SIGSTOP), its store answers nothing and torch's client would
    wait in recv far past its own timeout. Every call returns within the bound, later calls fail at once, and the
    hang report of rank 1 names rank 0 as the rank whose heartbeat stopped; once the host answers, a new client
    works again."""
    import signal
    import subprocess
    import sys
    import time
    from datetime import timedelta

    import torch.distributed as dist

    from hgscale.core.net import free_port
    from hgscale.training.watchdog import BoundedStore, Progress, Watchdog

    port = free_port()
    host = subprocess.Popen([sys.executable, "-c", (
        "import time, torch.distributed as d\n"
        f"s = d.TCPStore('127.0.0.1', {port}, is_master=True, wait_for_workers=False)\n"
        "print('up', flush=True)\ntime.sleep(120)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert host.stdout.readline().strip() == "up"
        connect = lambda: dist.TCPStore("127.0.0.1", port, is_master=False,  # noqa: E731
                                        timeout=timedelta(seconds=5), wait_for_workers=False)
        store = BoundedStore(connect, 1.0)
        store.set("k", "v")
        assert store.check(["k"])
        host.send_signal(signal.SIGSTOP)
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            store.check(["k"])
        with pytest.raises(TimeoutError):
            store.get("k")  # at once: the client that did not answer was dropped
        assert time.monotonic() - t0 < 3
        wd = Watchdog(Progress(step=5), rank=1, world=2, hang_timeout_s=1.0, run_dir="/tmp", start=False)
        wd.store = store
        report = wd._report()
        assert (report["ranks"], report["why"]) == ([0], "heartbeat stopped") and time.monotonic() - t0 < 6
        host.send_signal(signal.SIGCONT)
        time.sleep(1.2)
        assert store.get("k") == b"v"  # a new client once the host answers again
    finally:
        host.kill()
        host.wait()
