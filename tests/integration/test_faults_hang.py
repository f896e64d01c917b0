"""A frozen rank under `python -m launchers.local`: the watchdog ends the job fast, names the rank, dumps stacks.

Rank 1 of 2 gets SIGSTOP mid-run (what a hung GPU driver or a swapped-out node looks like to its peers: the
process exists, its sockets stay open, it answers nothing). With train.hang_timeout_s = 30 the job must exit
with the hang status within timeout + 60 s, rank 0's one error line must name rank 1, its host and the last
completed step, stack dumps must lie in run_dir/hang/, and the very same command must then resume from the
last checkpoint and finish.
"""
import json
import re
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest

from hgscale.core.status import HANG as EXIT_HANG
from tests.integration.train_helpers import ROOT, TRAIN, Watched, demo_data, env, metrics, tiny_config  # noqa: F401

pytestmark = pytest.mark.integration
STEPS = 60
TIMEOUT_S = 30


def _rank_pid(launcher: subprocess.Popen, rank: int, timeout: float = 60) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline:
        for p in psutil.Process(launcher.pid).children():
            try:
                if p.environ().get("RANK") == str(rank):
                    return p.pid
            except psutil.Error:
                continue
        time.sleep(0.2)
    raise AssertionError(f"rank {rank} not found")


def test_frozen_rank_is_named_and_the_job_ends_then_resumes(tmp_path, demo_data):  # noqa: F811
    cfg = tiny_config(tmp_path, demo_data, "hang.json", train={"steps": STEPS, "log_interval": 1,
                                                               "hang_timeout_s": TIMEOUT_S},
                      checkpoint={"interval": 5}, tracking={"enabled": True, "system_metrics": False})
    cmd = [sys.executable, "-m", "launchers.local", "--nproc", "2", sys.executable, str(TRAIN), "--config", str(cfg)]
    run = Watched(cmd)
    try:
        rank1 = _rank_pid(run.proc, 1)
        run.wait_for_step(12, of=STEPS)
        psutil.Process(rank1).send_signal(signal.SIGSTOP)
        frozen_at = time.monotonic()
        rc = run.wait(TIMEOUT_S + 60)
        took = time.monotonic() - frozen_at
    finally:
        if run.proc.poll() is None:
            run.proc.kill()
    out = run.text
    assert rc == EXIT_HANG, out[-3000:]
    assert TIMEOUT_S <= took <= TIMEOUT_S + 60, took
    hang = [ln for ln in out.splitlines() if "error: hang:" in ln]
    assert len(hang) == 1, out[-3000:]  # one line, from rank 0
    m = re.search(r"rank 1 \(([^;]+); last heartbeat \d+ s ago in phase '[^']*'\): heartbeat stopped; last step "
                  r"completed by every rank: (\d+);", hang[0])
    assert m and m.group(1) == socket.gethostname(), hang[0]
    last = int(m.group(2))
    logged = [int(s) for s in re.findall(rf"^step\s+(\d+)/{STEPS}", out, re.M)]
    assert last >= 12 and max(logged) in (last, last + 1), (hang[0], logged)
    dumps = tmp_path / "hang_run" / "hang"
    report = json.loads((dumps / "report.json").read_text())
    assert report["ranks"] == [1] and report["step"] == last
    stack = (dumps / "rank00000.txt").read_text()  # rank 0 was waiting for rank 1 inside a collective
    assert "hgscale-watchdog" in stack or "Thread 0x" in stack
    # the main thread waits inside a torch.distributed collective (an all_reduce of the step, or the gather of
    # the progress line's per-rank timings), called from the step of Trainer.train
    [main] = [block for block in stack.split("\n\n") if "trainer.py\", line" in block and " in train\n" in block]
    assert "distributed_c10d.py" in main and ("all_reduce" in main or "gather" in main), stack[-2000:]

    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'hang_run' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("hgscale").experiment_id])
    assert (run.info.status, run.data.tags.get("hgscale.exit")) == ("FAILED", "HANG")

    saved = int((tmp_path / "hang_ckpt" / "latest").read_text()[4:])
    assert saved >= 10 and saved % 5 == 0
    again = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-2000:]
    assert f"at step {saved}" in again.stdout and f"finished {STEPS} steps" in again.stdout
    steps = [m["step"] for m in metrics(tmp_path / "hang_run") if "train/loss" in m]
    assert steps == list(range(1, STEPS + 1))  # every step once: the steps after the checkpoint ran again
    (run,) = client.search_runs([client.get_experiment_by_name("hgscale").experiment_id])  # the same run, continued
    assert (run.info.status, run.data.tags.get("hgscale.exit")) == ("FINISHED", "OK")


def test_a_rendezvous_that_cannot_form_is_infrastructure(tmp_path, demo_data):  # noqa: F811
    """Rank 1 of 2 whose rendezvous store (rank 0's MASTER_PORT) never answers: after parallel.timeout_s the rank
    exits with the infrastructure status (requeued with back-off, no node excluded), one line naming the address."""
    from hgscale.core.net import free_port
    from hgscale.core.status import INFRA

    cfg = tiny_config(tmp_path, demo_data, "rdzv.json", parallel={"timeout_s": 3})
    port = free_port()  # nothing listens on it
    e = {**env(), "RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
         "MASTER_PORT": str(port)}
    r = subprocess.run([sys.executable, str(TRAIN), "--config", str(cfg)], cwd=ROOT, env=e, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == INFRA, r.stdout[-2000:] + r.stderr[-2000:]
    assert f"rendezvous of 2 processes at 127.0.0.1:{port} failed" in r.stderr and "Traceback" not in r.stderr
