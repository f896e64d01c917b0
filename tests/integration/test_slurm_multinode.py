"""Two Slurm nodes on one machine: each slurmd in its own network and UTS namespace (tests/fixtures/slurm.py).

The job spans hosts hgn1 and hgn2 that reach each other only over the test bridge, so the rendezvous,
the reachability probe and gloo's traffic cross a real (virtual) network, as on a cluster.
"""
from __future__ import annotations

import pytest

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
