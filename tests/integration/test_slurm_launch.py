"""The launch path on a real one-node Slurm cluster, before any training: srun ranks, env mapping, preflight.

Each job asks for 2 tasks x 1 CPU (the whole test node), so jobs run one after another.
"""
from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest

from launchers.env import master_port_for_job

pytestmark = [pytest.mark.integration, pytest.mark.slurm]

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "slurm" / "train_multinode.sh"
CPU_JOB = ["--gpus-per-node=0", "--ntasks-per-node=2", "--cpus-per-task=1", "--time=5"]

ALLREDUCE = textwrap.dedent("""
    import json, os, sys, torch, torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo")  # env://: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT from launchers.env
    t = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(t)
    names = ["RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT"]
    out = dict({k: os.environ[k] for k in names}, sum=t.item(), gloo_rank=dist.get_rank(),
               gloo_world=dist.get_world_size())
    open(os.path.join(sys.argv[1], f"rank{dist.get_rank()}.json"), "w").write(json.dumps(out))
    dist.destroy_process_group()
""")


def _config(tmp_path: Path, **parallel) -> Path:
    cfg = {"model": {"size": "debug"}, "data": {"url": str(tmp_path / "data"), "seq_len": 64},
           "train": {"micro_batch_size": 2, "steps": 4}, "parallel": parallel,
           "run_dir": str(tmp_path / "run"), "checkpoint": {"dir": str(tmp_path / "ckpt")}}
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(cfg))
    return path


def test_srun_ranks_allreduce_through_env_mapping(slurm_cluster, tmp_path):
    """sbatch --wait: two srun tasks map SLURM_* to the rendezvous variables and all-reduce over gloo."""
    script = tmp_path / "job.sh"
    script.write_text(f"#!/bin/bash\nsrun {sys.executable} -m launchers.env {sys.executable} -c '{ALLREDUCE}' "
                      f"{tmp_path}\n")
    p = slurm_cluster.cmd("sbatch", "--wait", "--parsable", *CPU_JOB, f"--output={tmp_path}/job-%j.log",
                          str(script), cwd=tmp_path, timeout=120)
    job_id = int(p.stdout.strip().split(";")[0])
    log = (tmp_path / f"job-{job_id}.log").read_text()
    assert slurm_cluster.job(job_id)["JobState"] == "COMPLETED", log
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r, got in enumerate(ranks):
        assert got["RANK"] == str(r) and got["LOCAL_RANK"] == str(r) and got["gloo_rank"] == r
        assert got["WORLD_SIZE"] == "2" and got["LOCAL_WORLD_SIZE"] == "2" and got["NODE_RANK"] == "0"
        assert got["gloo_world"] == 2
        assert got["sum"] == 3.0  # 1 + 2
        assert got["MASTER_ADDR"] == slurm_cluster.host
        assert got["MASTER_PORT"] == str(master_port_for_job(job_id))


def _run_script(cluster, tmp_path, *args, env=None):
    job_id = cluster.sbatch(*CPU_JOB, f"--output={tmp_path}/job-%j.log", str(SCRIPT), *args, cwd=tmp_path,
                            env={"HGSCALE_PYTHON": sys.executable, **(env or {})})
    return job_id, cluster.wait_job(job_id, timeout=180)


def _log(tmp_path, job_id) -> str:
    return (tmp_path / f"job-{job_id}.log").read_text()


def test_preflight_prints_rendezvous_and_config_then_bad_layout_fails(slurm_cluster, tmp_path):
    """3 pipeline stages cannot split 2 tasks: the job fails in preflight, naming the numbers and the fix."""
    cfg = _config(tmp_path, pipeline_stages=3)
    job_id, job = _run_script(slurm_cluster, tmp_path, str(cfg), "train.lr=0.001")
    log = _log(tmp_path, job_id)
    assert job["JobState"] == "FAILED" and job["ExitCode"] == "2:0", log
    port = master_port_for_job(job_id)
    assert f"rendezvous MASTER_ADDR={slurm_cluster.host} MASTER_PORT={port} WORLD_SIZE=2 tasks per node=2" in log
    assert "hgscale: error:" in log and "world size 2 is not divisible by parallel.pipeline_stages = 3" in log
    assert "no rank was started" in log and "hgscale.train" not in log


def test_preflight_passes_and_reports_layout(slurm_cluster, tmp_path):
    """A good config: resolved config (with the override) and a reachable rendezvous appear in the log."""
    cfg = _config(tmp_path, pipeline_stages=2)
    job_id = slurm_cluster.sbatch(*CPU_JOB, f"--output={tmp_path}/job-%j.log", "--wrap",
                                  f"{sys.executable} -m launchers.preflight {cfg} train.lr=0.001", cwd=tmp_path)
    job = slurm_cluster.wait_job(job_id, timeout=180)
    log = _log(tmp_path, job_id)
    assert job["JobState"] == "COMPLETED", log
    assert "layout 2 tasks = 2 pipeline stage(s) x 1 data-parallel" in log
    resolved = json.loads(log.split("hgscale: resolved config\n", 1)[1].split("\nhgscale:", 1)[0])
    assert resolved["train"]["lr"] == 0.001 and resolved["parallel"]["pipeline_stages"] == 2
    assert f"rendezvous reachable from 1 node(s): {slurm_cluster.host}" in log


def test_missing_config_fails_before_training(slurm_cluster, tmp_path):
    job_id, job = _run_script(slurm_cluster, tmp_path, str(tmp_path / "nope.json"))
    log = _log(tmp_path, job_id)
    assert job["JobState"] == "FAILED", log
    assert f"config file '{tmp_path / 'nope.json'}' does not exist" in log


@pytest.mark.parametrize("addr, reason", [("no-such-host.invalid", "does not resolve"),
                                          ("198.51.100.1", "cannot reach MASTER_ADDR 198.51.100.1")])
def test_unreachable_master_addr_fails_before_training(slurm_cluster, tmp_path, addr, reason):
    """A master address that does not resolve, or that nothing answers on (TEST-NET-2), stops the job."""
    cfg = _config(tmp_path)
    job_id, job = _run_script(slurm_cluster, tmp_path, str(cfg),
                              env={"HGSCALE_MASTER_ADDR": addr, "HGSCALE_PROBE_TIMEOUT": "3"})
    log = _log(tmp_path, job_id)
    assert job["JobState"] == "FAILED" and job["ExitCode"] == "5:0", log
    assert reason in log and "HGSCALE_MASTER_ADDR" in log
    assert "no rank was started" in log


def test_hostlist_expansion_matches_scontrol(slurm_cluster):
    """Our node-list expansion agrees with Slurm's own (`scontrol show hostnames`) on the compressed forms."""
    from launchers.hostlist import expand_hostlist
    for text in ("node[01-04,07]", "r[1-2]n[08-10]", "a[8-11],login,b[009-011]", "gpu[1,3,5-6]", "vm"):
        got = slurm_cluster.cmd("scontrol", "show", "hostnames", text).stdout.split()
        assert expand_hostlist(text) == got, text


def test_missing_dataset_fails_with_the_trainers_message(slurm_cluster, tmp_path):
    """Bad data.url: every rank stops before any process group starts; the job log names the URL and the fix."""
    cfg = _config(tmp_path)  # data.url points at a directory that does not exist
    job_id, job = _run_script(slurm_cluster, tmp_path, str(cfg))
    log = _log(tmp_path, job_id)
    assert job["JobState"] == "FAILED", log
    assert f"no dataset at {tmp_path / 'data'}" in log and "python -m data_pipelines" in log
    assert "hgscale: error: the ranks failed" in log and "step 1/" not in log and "Traceback" not in log
