"""Spawned worker processes: exact resume across shards and epochs, error propagation (local paths)."""
from __future__ import annotations

import json

import pytest

from data_pipelines.demo_corpus import write_demo_corpus
from hgscale.config import DataConfig
from hgscale.data import DataError, open_dataset
from tests.batches import assert_same

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    path = tmp_path_factory.mktemp("workers") / "demo"
    write_demo_corpus(str(path), shard_bytes=16 << 10, sample_tokens=2048)  # 26 train shards
    return path


def run(stream, n, skip=0):
    it = iter(stream)
    for _ in range(skip):
        next(it)
    out = [next(it) for _ in range(n)]
    state = json.loads(json.dumps(stream.state_dict()))
    stream.close()
    return out, state


def test_resume_with_three_workers_mid_shard_and_across_epochs(root):
    ds = open_dataset(DataConfig(url=str(root), num_workers=3, prefetch_batches=2))
    B, T = 4, 256  # rank 0 of 2 gets half of ~1,630 windows an epoch: ~ 200 batches per epoch
    full, _ = run(ds.stream("train", B, T, dp_rank=0, dp_size=2, seed=4), 260)
    for cut in (5, 229):  # mid-shard of the first epoch; past the epoch boundary of every worker
        _, state = run(ds.stream("train", B, T, dp_rank=0, dp_size=2, seed=4), cut)
        if cut == 229:
            assert state["epoch"] == 1, state
        else:
            assert (state["epoch"], state["offset"], state["micro"]) == (0, cut * 2 * B, 0), state
        resumed = ds.stream("train", B, T, dp_rank=0, dp_size=2, seed=4)
        resumed.load_state_dict(state)
        got, _ = run(resumed, 260 - cut)
        assert_same(got, full[cut:])


def test_one_spawned_worker_equals_in_process_producer(root):
    ds = open_dataset(DataConfig(url=str(root), worker_start_method="spawn"))
    a, sa = run(ds.stream("train", 4, 128, 1, 2, seed=8, num_workers=1), 40)
    b, sb = run(ds.stream("train", 4, 128, 1, 2, seed=8, num_workers=0), 40)
    assert_same(a, b)
    assert sa == sb


def test_worker_error_reaches_the_trainer_naming_the_shard(root, tmp_path):
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(root, bad)
    for shard in sorted((bad / "train").glob("*.tar")):
        data = bytearray(shard.read_bytes())
        data[600] ^= 0xFF
        shard.write_bytes(bytes(data))
    ds = open_dataset(DataConfig(url=str(bad), num_workers=2))
    with pytest.raises(DataError, match=r"train/shard-\d+\.tar does not match its sha256"):
        run(ds.stream("train", 2, 64, seed=1), 3)
    ds = open_dataset(DataConfig(url=str(bad), num_workers=2, on_corrupt="skip"))
    with pytest.raises(DataError, match="without one window .* all skipped"):
        run(ds.stream("train", 2, 64, seed=1), 3)


def test_closing_stops_workers_and_a_killed_worker_is_reported(root):
    import multiprocessing as mp
    import os
    import signal

    ds = open_dataset(DataConfig(url=str(root), num_workers=2))
    stream = ds.stream("train", 2, 64, seed=1)
    it = iter(stream)
    next(it)
    workers = [p for p in mp.active_children() if p.name.startswith("hgscale-data-train")]
    assert len(workers) == 2
    stream.close()
    assert not any(p.is_alive() for p in workers)

    stream = ds.stream("train", 2, 64, seed=1)
    it = iter(stream)
    next(it)
    victim = next(p for p in mp.active_children() if p.name == "hgscale-data-train-1")
    os.kill(victim.pid, signal.SIGKILL)
    with pytest.raises(DataError, match=r"data worker 1 exited \(exit code -9\)"):
        for _ in range(10_000):  # the batches it had already queued come first
            next(it)
    assert not any(p.is_alive() for p in mp.active_children() if p.name.startswith("hgscale-data-train"))


def test_sigterm_to_every_process_checkpoints_and_exits_0(tmp_path):
    """scancel and the Slurm time limit send SIGTERM to every process of the job step, data workers included: the
    workers ignore it, the trainer saves a checkpoint and exits 0, so the requeued job resumes from it."""
    import os
    import re
    import signal
    import sys

    from tests.integration.train_helpers import TRAIN, Watched, tiny_config

    data = tmp_path / "demo"
    write_demo_corpus(str(data))
    # many micro-batches per step and little prefetch: the signal lands while the step still needs the workers
    cfg = tiny_config(tmp_path, data, "term.json", train={"steps": 400, "log_interval": 1, "grad_accum_steps": 16},
                      data={"num_workers": 2, "prefetch_batches": 1, "worker_start_method": "spawn"})
    run = Watched([sys.executable, str(TRAIN), "--config", str(cfg)], start_new_session=True)
    try:
        run.wait_for_step(3, of=400)
        os.killpg(run.proc.pid, signal.SIGTERM)  # the trainer and its workers, as Slurm signals a step
        assert run.wait(120) == 0, run.tail()
    finally:
        if run.proc.poll() is None:
            os.killpg(run.proc.pid, signal.SIGKILL)
    out = run.text
    m = re.search(r"preempted at step (\d+); checkpoint saved", out)
    assert m, out[-3000:]
    assert (tmp_path / "term_ckpt" / "latest").read_text() == f"step{int(m.group(1)):08d}"


def test_workers_outlive_the_sigterm_a_job_step_gets(root):
    """Slurm's SIGTERM reaches the workers too: they keep serving batches until the trainer (which checkpoints on
    it) stops them; closing still stops them (SIGKILL if a read hangs)."""
    import os
    import signal
    import time

    import psutil

    ds = open_dataset(DataConfig(url=str(root), num_workers=2, prefetch_batches=1, worker_start_method="spawn"))
    stream = ds.stream("train", 2, 32, 0, 1, seed=1)
    it = iter(stream)
    next(it)
    workers = [c for c in psutil.Process().children() if "spawn_main" in " ".join(c.cmdline())]
    assert len(workers) == 2
    for w in workers:
        os.kill(w.pid, signal.SIGTERM)
    time.sleep(1.0)
    assert all(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers)
    for _ in range(200):  # far more than the workers had prefetched
        next(it)
    stream.close()
    time.sleep(0.5)
    assert not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers)
