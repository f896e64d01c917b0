"""`sbatch slurm/train_multinode.sh` end to end on a real one-node Slurm cluster, CPU ranks over gloo.

- an uninterrupted job (`sbatch --wait`) trains with 2 tasks, writes a checkpoint and records one MLflow run;
- a job signalled like a preemption (SIGUSR1 to the batch script, as `--signal=B:USR1@...` does) checkpoints,
  requeues itself and finishes from that checkpoint in the same MLflow run, logging every step exactly once
  with the losses of the uninterrupted job;
- a rank killed mid-run (kill -9) requeues the job (a restart after a failure), which resumes from the last
  checkpoint and logs every step once; a job that always crashes stops at HGSCALE_MAX_RESTARTS.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from launchers.env import master_port_for_job

pytestmark = [pytest.mark.integration, pytest.mark.slurm]

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "slurm" / "train_multinode.sh"
CPU_JOB = ["--gpus-per-node=0", "--ntasks-per-node=2", "--cpus-per-task=1", "--time=10"]
STEPS = 40
OVERRIDE = f"train.steps={STEPS}"
EXPERIMENT = "slurm-e2e"


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo_data")
    subprocess.run([sys.executable, "-m", "data_pipelines.demo_corpus", "--out", str(out)], check=True,
                   capture_output=True, cwd=REPO)
    return out


def _config(run: Path, data: Path) -> Path:
    """A debug-size model, 2 data-parallel ranks, every step logged; checkpoints only at the end or on a signal.
    The step count comes from a command-line override (OVERRIDE), which the script passes through."""
    cfg = {
        "model": {"size": "debug", "max_seq_len": 256},
        "data": {"url": str(data), "seq_len": 128, "num_workers": 0},
        "train": {"micro_batch_size": 2, "grad_accum_steps": 1, "steps": 1000, "lr": 1e-3, "warmup_steps": 0,
                  "lr_schedule": "constant", "log_interval": 1, "eval_interval": 0},
        "parallel": {"pipeline_stages": 1, "zero_stage": 1},
        "tracking": {"uri": f"sqlite:///{run}/mlflow.db", "experiment": EXPERIMENT, "system_metrics": False},
        "checkpoint": {"dir": str(run / "ckpt"), "interval": 0},
        "run_dir": str(run / "run"),
    }
    path = run / "tiny.json"
    path.write_text(json.dumps(cfg))
    return path


def _env() -> dict:
    return {"HGSCALE_PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}


def _mlflow(run: Path):
    """(the experiment's runs, {step: train/loss} of the single run, and the list of logged steps)."""
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=f"sqlite:///{run}/mlflow.db")
    exp = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([exp.experiment_id])
    history = client.get_metric_history(runs[0].info.run_id, "train/loss") if runs else []
    return runs, [m.step for m in sorted(history, key=lambda m: (m.step, m.timestamp))], \
        {m.step: m.value for m in history}


@pytest.fixture(scope="module")
def reference_run(slurm_cluster, demo_data, tmp_path_factory):
    """One uninterrupted job, submitted with `sbatch --wait` (its exit status is the job's)."""
    run = tmp_path_factory.mktemp("slurm_ref")
    cfg = _config(run, demo_data)
    p = slurm_cluster.cmd("sbatch", "--wait", "--parsable", *CPU_JOB, f"--output={run}/job-%j.log", str(SCRIPT),
                          str(cfg), OVERRIDE, check=False, cwd=run, env={**slurm_cluster.env, **_env()}, timeout=300)
    job_id = int(p.stdout.strip().split(";")[0])
    return run, job_id, p.returncode, (run / f"job-{job_id}.log").read_text()


def test_sbatch_trains_with_two_ranks_checkpoints_and_tracks_one_run(reference_run, slurm_cluster):
    run, job_id, rc, log = reference_run
    assert rc == 0, log
    # header: rendezvous and resolved config at the top, before the trainer's first line
    head = log.split("training ", 1)[0]
    assert f"rendezvous MASTER_ADDR={slurm_cluster.host} MASTER_PORT={master_port_for_job(job_id)} WORLD_SIZE=2" in head
    assert "layout 2 tasks = 1 pipeline stage(s) x 2 data-parallel" in head and f"overrides {OVERRIDE}" in head
    assert '"steps": 40' in head  # the override reached the resolved config, and the trainer (below)
    assert "2 process(es), 1 stage(s) x 2 data-parallel" in log
    assert f"finished {STEPS} steps" in log
    latest = (run / "ckpt" / "latest").read_text().strip()
    assert latest.endswith(f"{STEPS:08d}") and (run / "ckpt" / latest / "COMPLETE").exists()
    runs, steps, losses = _mlflow(run)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert steps == list(range(1, STEPS + 1))
    assert losses[STEPS] < losses[1]  # it learned something


def _wait_for(path: Path, pattern: str, timeout: float) -> re.Match:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = re.search(pattern, path.read_text() if path.exists() else "")
        if m:
            return m
        time.sleep(0.1)
    raise AssertionError(f"{pattern!r} did not appear in {path} within {timeout} s:\n"
                         f"{path.read_text() if path.exists() else '(no log)'}")


def test_preempted_job_checkpoints_requeues_and_resumes_same_run(slurm_cluster, demo_data, reference_run,
                                                                 tmp_path):
    """The signal lands while the ranks are still starting (the hardest moment): each task's launchers.env
    wrapper holds it until the trainer's handler exists, then the trainer checkpoints after its next step."""
    cfg = _config(tmp_path, demo_data)
    job_id = slurm_cluster.sbatch(*CPU_JOB, f"--output={tmp_path}/job-%j.log", str(SCRIPT), str(cfg), OVERRIDE,
                                  cwd=tmp_path, env=_env())
    log_path = tmp_path / f"job-{job_id}.log"
    _wait_for(log_path, r"rendezvous reachable", timeout=120)  # preflight done: srun starts the ranks now
    time.sleep(1)
    slurm_cluster.cmd("scancel", "--signal=USR1", "--batch", str(job_id))  # what --signal=B:USR1@300 does
    job = slurm_cluster.wait_job(job_id, timeout=360)
    log = log_path.read_text()
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", log
    assert job["Restarts"] == "1", log
    stopped = int(re.search(r"preempted at step (\d+); checkpoint saved", log).group(1))
    assert 1 <= stopped < STEPS, log
    first, second = log.split("requeueing job", 1)
    assert "SIGUSR1 received" in first and f"finished {STEPS} steps" not in first
    assert "step  1/40" not in first.split("SIGUSR1 received", 1)[0]  # it came before training started
    assert f"job {job_id} (hgscale) restart 1" in second
    assert re.search(rf"resumed from \S+{stopped:08d} at step {stopped}\b", second), second
    assert f"finished {STEPS} steps" in second
    runs, steps, losses = _mlflow(tmp_path)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"  # the requeued job continued the same run
    assert steps == list(range(1, STEPS + 1))  # no step lost, none logged twice
    _, _, ref = _mlflow(reference_run[0])
    torch.testing.assert_close(torch.tensor([losses[s] for s in steps]), torch.tensor([ref[s] for s in steps]),
                               rtol=1e-5, atol=1e-6)  # resumed exactly: same data position, same weights


@pytest.mark.parametrize("how", ["scancel --signal=TERM", "time limit"])
def test_sigterm_checkpoints_with_data_workers_and_the_ranks_exit_0(how, slurm_cluster, demo_data, tmp_path):
    """SIGTERM reaches every process of the ranks, their data workers included (scancel --signal=TERM signals the
    steps; at the time limit Slurm signals the batch script too, which forwards it): the workers ignore it, the
    trainer finishes its step, saves a checkpoint and the ranks exit 0, so nothing since the last interval is lost.
    The job is not requeued (a cancelled job stays cancelled); its MLflow run ends KILLED, exit status OK."""
    cfg = _config(tmp_path, demo_data)
    job_args = [a for a in CPU_JOB if not a.startswith("--time")] + ["--time=10"]
    if how == "time limit":  # the script's own --signal=B:USR1@300 would preempt a 1-minute job at once; SIGURG
        job_args = job_args[:-1] + ["--time=1", "--signal=B:URG@1"]  # is ignored: the limit's SIGTERM comes alone
    job_id = slurm_cluster.sbatch(*job_args, f"--output={tmp_path}/job-%j.log", str(SCRIPT), str(cfg),
                                  "train.steps=100000", "data.num_workers=2", cwd=tmp_path, env=_env())
    log_path = tmp_path / f"job-{job_id}.log"
    _wait_for(log_path, r"step\s+5/100000", timeout=180)
    if how != "time limit":
        slurm_cluster.cmd("scancel", "--signal=TERM", str(job_id))
    job = slurm_cluster.wait_job(job_id, timeout=300)
    log = log_path.read_text()
    assert job["JobState"] == ("TIMEOUT" if how == "time limit" else "COMPLETED") and job["Restarts"] == "0", log
    stopped = int(re.search(r"preempted at step (\d+); checkpoint saved", log).group(1))
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == f"step{stopped:08d}", log
    assert (tmp_path / "ckpt" / f"step{stopped:08d}" / "COMPLETE").exists()
    assert "Traceback" not in log and "exited with exit code" not in log and "requeueing" not in log, log
    runs, steps, _ = _mlflow(tmp_path)
    assert len(runs) == 1 and runs[0].info.status == "KILLED" and runs[0].data.tags["hgscale.exit"] == "OK"
    assert steps == list(range(1, stopped + 1))


# ------------------------------------------------------------------------------------------ crashes

def _trainer_pid(cfg: Path, rank: int, timeout: float) -> int:
    """The trainer process (not its launchers.env wrapper) of ``rank`` running ``cfg``."""
    import psutil
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in psutil.process_iter(["cmdline"]):
            cmd = p.info["cmdline"] or []
            try:
                if cmd[1:3] == ["-m", "hgscale.train"] and str(cfg) in cmd and p.environ().get("RANK") == str(rank):
                    return p.pid
            except psutil.Error:
                continue
        time.sleep(0.2)
    raise AssertionError(f"no trainer process of rank {rank} for {cfg}")


def _fault_env(tmp_path: Path, **extra) -> dict:
    return {**_env(), "HGSCALE_STATE_DIR": str(tmp_path / "state"), "HGSCALE_RESTART_BACKOFF_S": "1", **extra}


def test_killed_rank_requeues_resumes_and_logs_every_step_once(slurm_cluster, demo_data, reference_run, tmp_path):
    """kill -9 of rank 1 right after the step-10 checkpoint: the job requeues itself (restart 1 after a failure),
    names the node it would exclude, resumes at step 10 and logs steps 10, 20, 30, 40 once each, with the
    window-mean losses of the uninterrupted job."""
    import os
    import signal as sig
    cfg = _config(tmp_path, demo_data)
    every = ["train.log_interval=10", "checkpoint.interval=10"]
    job_id = slurm_cluster.sbatch(*CPU_JOB, f"--output={tmp_path}/job-%j.log", str(SCRIPT), str(cfg), OVERRIDE,
                                  *every, cwd=tmp_path, env=_fault_env(tmp_path))
    log_path = tmp_path / f"job-{job_id}.log"
    pid = _trainer_pid(cfg, 1, timeout=120)
    latest = tmp_path / "ckpt" / "latest"
    _wait_for(latest, r"step00000010", timeout=120)
    os.kill(pid, sig.SIGKILL)
    job = slurm_cluster.wait_job(job_id, timeout=360)
    log = log_path.read_text()
    assert job["JobState"] == "COMPLETED" and job["Restarts"] == "1", log
    first, second = log.split("requeueing job", 1)
    assert "the ranks failed (srun exit status" in first
    host = slurm_cluster.host
    assert f"not excluding node {host}: the partition has 1 node(s) and the job needs 1" in first
    assert re.search(r"after the failure \(restart 1/3 after failures\) in 1 s", second), second[:500]
    crash = json.loads((tmp_path / "state" / f"job-{job_id}" / "attempt-0" / "crash-rank00001.json").read_text())
    assert crash["rank"] == 1 and crash["status"] == 137 and crash["host"] == host
    assert re.search(r"resumed from \S+step00000010 at step 10\b", second), second
    assert f"finished {STEPS} steps" in second
    runs, steps, losses = _mlflow(tmp_path)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert steps == [10, 20, 30, 40], steps
    _, _, ref = _mlflow(reference_run[0])
    want = [sum(ref[s] for s in range(k - 9, k + 1)) / 10 for k in steps]  # the progress line's window mean
    torch.testing.assert_close(torch.tensor([losses[s] for s in steps]), torch.tensor(want), rtol=1e-5, atol=1e-6)


def test_restart_cap_stops_a_job_that_always_crashes(slurm_cluster, demo_data, tmp_path):
    """A trainer that dies at once on every attempt: one restart (HGSCALE_MAX_RESTARTS=1), then the job fails."""
    cfg = _config(tmp_path, demo_data)
    fake = tmp_path / "python"
    fake.write_text(f'#!/bin/bash\nif [ "$1 $2" = "-m hgscale.train" ]; then echo "simulated crash" >&2; exit 1; fi\n'
                    f'exec {sys.executable} "$@"\n')
    fake.chmod(0o755)
    job_id = slurm_cluster.sbatch(*CPU_JOB, f"--output={tmp_path}/job-%j.log", str(SCRIPT), str(cfg), OVERRIDE,
                                  cwd=tmp_path, env=_fault_env(tmp_path, HGSCALE_PYTHON=str(fake),
                                                               HGSCALE_MAX_RESTARTS="1"))
    job = slurm_cluster.wait_job(job_id, timeout=180)
    log = (tmp_path / f"job-{job_id}.log").read_text()
    assert job["JobState"] == "FAILED" and job["Restarts"] == "1", log
    assert log.count("simulated crash") == 4  # two ranks, two attempts
    assert "restart 1/1 after failures" in log
    assert "restarted 1 time(s) after failures already (HGSCALE_MAX_RESTARTS=1); not requeueing" in log


# ------------------------------------------------------------------------------------------ outages

def test_a_storage_outage_requeues_without_exclusion_and_resumes_exactly(slurm_cluster, demo_data, reference_run,
                                                                         tmp_path, s3_server, fault_proxy):
    """Checkpoints go to S3 through the fault proxy. Once step 10's checkpoint is complete the proxy refuses every
    request for 60 s: the ranks exit with the infrastructure status (the upload failed after its retries; then,
    while the outage lasts, the start-up checks of each requeued attempt), the job is requeued with back-off and no
    node excluded, resumes from step 10 once storage answers, and logs every step once, in metrics.jsonl and in
    MLflow, with the losses of the uninterrupted job."""
    bucket = s3_server.make_bucket()
    client = s3_server.client()
    cfg = _config(tmp_path, demo_data)
    sections = json.loads(cfg.read_text())
    sections["checkpoint"] = {"dir": f"s3://{bucket}/run", "interval": 5, "keep_last": 3,
                              "staging_dir": str(tmp_path / "staging")}
    sections["data"].update(s3_endpoint_url=fault_proxy.endpoint_url, retries=3, retry_backoff_s=0.2)
    cfg.write_text(json.dumps(sections))
    env = {**_fault_env(tmp_path, HGSCALE_RESTART_BACKOFF_S="4", HGSCALE_MAX_RESTARTS="8"),
           **s3_server.env(fault_proxy.endpoint_url)}
    job_id = slurm_cluster.sbatch(*CPU_JOB, f"--output={tmp_path}/job-%j.log", str(SCRIPT), str(cfg), OVERRIDE,
                                  cwd=tmp_path, env=env)

    def latest() -> str:
        try:
            return client.get_object(Bucket=bucket, Key="run/latest")["Body"].read().decode()
        except client.exceptions.NoSuchKey:
            return ""
    deadline = time.monotonic() + 180
    while latest() != "step00000010":
        assert time.monotonic() < deadline, (tmp_path / f"job-{job_id}.log").read_text()
        time.sleep(0.05)
    fault_proxy.outage(60)
    job = slurm_cluster.wait_job(job_id, timeout=600)
    log = (tmp_path / f"job-{job_id}.log").read_text()
    assert job["JobState"] == "COMPLETED" and int(job["Restarts"]) >= 1, log
    assert "an outage (exit status 5" in log and "no node is excluded" in log
    assert "excluded node" not in log and "not excluding node" not in log
    assert re.search(rf"resumed from s3://{bucket}/run/step00000010 at step 10\b", log), log[-3000:]
    assert f"finished {STEPS} steps" in log and fault_proxy.injected["outage"] > 0
    jsonl = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
             if "train/loss" in line]
    assert jsonl == list(range(1, STEPS + 1))
    runs, steps, losses = _mlflow(tmp_path)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED" and runs[0].data.tags["hgscale.exit"] == "OK"
    assert steps == list(range(1, STEPS + 1))  # the steps run again after the resume are not logged twice
    _, _, ref = _mlflow(reference_run[0])
    torch.testing.assert_close(torch.tensor([losses[s] for s in steps]), torch.tensor([ref[s] for s in steps]),
                               rtol=1e-5, atol=0)
