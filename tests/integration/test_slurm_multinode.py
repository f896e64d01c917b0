"""Two Slurm nodes on one machine: each slurmd in its own network and UTS namespace (tests/fixtures/slurm.py).

The job spans hosts hgn1 and hgn2 that reach each other only over the test bridge, so the rendezvous,
the reachability probe and gloo's traffic cross a real (virtual) network, as on a cluster.
"""
from __future__ import annotations

import json
import os
import re
import signal

import pytest
import torch

from launchers.env import master_port_for_job
from tests.integration.test_slurm_train import SCRIPT, _config, _env, _mlflow, demo_data  # noqa: F401

pytestmark = [pytest.mark.integration, pytest.mark.slurm]

TWO_NODES = ["--gpus-per-node=0", "--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1", "--time=10"]


def test_two_node_job_trains_across_hosts(slurm_netns_cluster, demo_data, tmp_path):  # noqa: F811
    cluster = slurm_netns_cluster
    cfg = _config(tmp_path, demo_data)
    p = cluster.cmd("sbatch", "--wait", "--parsable", *TWO_NODES, f"--output={tmp_path}/job-%j.log", str(SCRIPT),
                    str(cfg), "train.steps=8", check=False, cwd=tmp_path, env={**cluster.env, **_env()}, timeout=300)
    job_id = int(p.stdout.strip().split(";")[0])
    log = (tmp_path / f"job-{job_id}.log").read_text()
    assert p.returncode == 0, log
    port = master_port_for_job(job_id)
    assert "on 2 node(s): hgn1,hgn2" in log
    assert f"rendezvous MASTER_ADDR=hgn1 MASTER_PORT={port} WORLD_SIZE=2 tasks per node=1,1" in log
    assert f"rendezvous reachable from 2 node(s): hgn1,hgn2 -> {cluster.netns.addr(0)}" in log
    # one rank on each host, both pointed at the first node
    assert f"rank 0/2 on hgn1 (node 0, local rank 0/1) -> hgn1:{port}" in log
    assert f"rank 1/2 on hgn2 (node 1, local rank 0/1) -> hgn1:{port}" in log
    assert "2 process(es), 1 stage(s) x 2 data-parallel" in log and "finished 8 steps" in log
    runs, steps, _ = _mlflow(tmp_path)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED" and steps == list(range(1, 9))


def test_loopback_master_addr_fails_on_the_other_node(slurm_netns_cluster, demo_data, tmp_path):  # noqa: F811
    """127.0.0.1 works on the first node only: the probe from hgn2 names itself and the address."""
    cluster = slurm_netns_cluster
    cfg = _config(tmp_path, demo_data)
    job_id = cluster.sbatch(*TWO_NODES, f"--output={tmp_path}/job-%j.log", str(SCRIPT), str(cfg), cwd=tmp_path,
                            env={**_env(), "HGSCALE_MASTER_ADDR": "127.0.0.1", "HGSCALE_PROBE_TIMEOUT": "3"})
    job = cluster.wait_job(job_id, timeout=90)
    log = (tmp_path / f"job-{job_id}.log").read_text()
    assert job["JobState"] == "FAILED" and job["ExitCode"] == "5:0", log
    assert f"node hgn2 cannot reach MASTER_ADDR 127.0.0.1 port {master_port_for_job(job_id)}" in log
    assert "node hgn1 cannot reach" not in log
    assert "no rank was started" in log and "hgscale: rank" not in log


def test_a_job_that_loses_a_node_shrinks_and_resumes_on_the_new_layout(slurm_netns_cluster, demo_data, tmp_path):  # noqa: F811
    """2 nodes x 1 rank, HGSCALE_MIN_NODES=1, accumulation derived from the global batch (train.grad_accum_steps=0).
    The rank on hgn2 is killed after step 12 (the step-10 checkpoint complete): the job is requeued without hgn2 on
    1 node, whose 1 rank accumulates 2 micro-batches, converts the checkpoint to its layout and resumes at step 10.
    Every step is logged once, and the steps both attempts ran have the same losses (the resume is exact)."""
    from tests.integration.test_slurm_train import _trainer_pid, _wait_for

    cluster = slurm_netns_cluster
    cfg = _config(tmp_path, demo_data)
    doc = json.loads(cfg.read_text())
    doc["train"].update(grad_accum_steps=0, global_batch_size=4)
    doc["checkpoint"]["interval"] = 5
    cfg.write_text(json.dumps(doc))
    env = {**_env(), "HGSCALE_MIN_NODES": "1", "HGSCALE_RESTART_BACKOFF_S": "1",
           "HGSCALE_STATE_DIR": str(tmp_path / "state")}
    job_id = cluster.sbatch(*TWO_NODES, f"--output={tmp_path}/job-%j.log", str(SCRIPT), str(cfg), "train.steps=24",
                            cwd=tmp_path, env=env)
    log_path = tmp_path / f"job-{job_id}.log"
    pid = _trainer_pid(cfg, 1, timeout=120)
    _wait_for(log_path, r"step\s+12/24", timeout=180)
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == "step00000010"
    os.kill(pid, signal.SIGKILL)
    job = cluster.wait_job(job_id, timeout=360)
    log = log_path.read_text()
    assert job["JobState"] == "COMPLETED" and job["Restarts"] == "1", log
    first, second = log.split("requeueing job", 1)
    assert "excluding node hgn2 from the requeued job (ExcNodeList=hgn2); it runs on 1 node(s) instead of 2" in first
    assert "on 1 node(s): hgn1" in second and "layout 1 tasks = 1 pipeline stage(s) x 1 data-parallel, " \
        "accumulation 2" in second, second[:3000]
    assert re.search(r"resumed from \S+step00000010 at step 10\b", second) and "layout changed since step 10" in second
    assert "finished 24 steps" in second
    runs, steps, first_losses = _mlflow(tmp_path)  # MLflow keeps the first attempt's values of the steps run twice
    assert len(runs) == 1 and runs[0].info.status == "FINISHED" and steps == list(range(1, 25))
    again = {m["step"]: m["train/loss"] for m in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text()
                                                                    .splitlines()) if "train/loss" in m}
    assert sorted(again) == list(range(1, 25))  # metrics.jsonl keeps the second attempt's
    both = list(range(11, 13))  # run by 2 ranks, then again by 1 rank accumulating 2
    torch.testing.assert_close(torch.tensor([again[s] for s in both]), torch.tensor([first_losses[s] for s in both]),
                               rtol=1e-5, atol=0)
