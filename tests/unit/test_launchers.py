"""launchers: Slurm node lists, the SLURM_* -> rendezvous mapping, the local launcher, preflight pieces."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from hgscale.config import ConfigError
from hgscale.core.status import INFRA
from launchers import env as lenv
from launchers import hostlist, local, preflight
from launchers.env import LaunchError, master_port_for_job, slurm_rank_env, slurm_rendezvous
from launchers.hostlist import HostlistError, expand_hostlist, expand_tasks_per_node, hostfile_text

# ------------------------------------------------------------------------------------------ host lists

@pytest.mark.parametrize("text, hosts", [
    ("vm", ["vm"]),
    ("node[01-04,07]", ["node01", "node02", "node03", "node04", "node07"]),
    ("node[01-04,07],login,gpu[9-11]", ["node01", "node02", "node03", "node04", "node07", "login",
                                        "gpu9", "gpu10", "gpu11"]),
    ("n[009-011]", ["n009", "n010", "n011"]),
    ("r[1-2]n[08-09]", ["r1n08", "r1n09", "r2n08", "r2n09"]),
    ("gpu-a[1-2]-ib", ["gpu-a1-ib", "gpu-a2-ib"]),
    (" a[1,3] , b ", ["a1", "a3", "b"]),
])
def test_expand_hostlist(text, hosts):
    assert expand_hostlist(text) == hosts


@pytest.mark.parametrize("text, why", [
    ("", "empty"), ("node[01-04", "never closed"), ("node01]", "without a matching"),
    ("node[04-01]", "runs backwards"), ("node[a-b]", "is not N or N-M"),
])
def test_expand_hostlist_rejects_malformed(text, why):
    with pytest.raises(HostlistError, match=why):
        expand_hostlist(text)


def test_tasks_per_node_and_hostfile():
    assert expand_tasks_per_node("8(x3),4") == [8, 8, 8, 4]
    assert expand_tasks_per_node("2") == [2]
    with pytest.raises(HostlistError, match="not N or N"):
        expand_tasks_per_node("2(x)")
    assert hostfile_text(["a1", "a2"], [8, 4]) == "a1 slots=8\na2 slots=4\n"
    assert hostfile_text(["a1", "a2"], 2) == "a1 slots=2\na2 slots=2\n"
    with pytest.raises(HostlistError, match="2 hosts but 1 slot counts"):
        hostfile_text(["a1", "a2"], [8])


def test_hostlist_cli_writes_hostfile_from_slurm_env(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu[07-08]")
    monkeypatch.setenv("SLURM_TASKS_PER_NODE", "4(x2)")
    out = tmp_path / "hostfile"
    assert hostlist.main(["-o", str(out)]) == 0
    assert out.read_text() == "gpu07 slots=4\ngpu08 slots=4\n"
    assert hostlist.main(["--nodelist", "x[1-2", "--slots", "1"]) == 2
    assert "never closed" in capsys.readouterr().err


# -------------------------------------------------------------------------------------- env mapping

def _step_env(procid: int, localid: int, nodeid: int, **extra) -> dict:
    """What srun gives task `procid` of a 2-node x 4-task step (values as Slurm 22.05 sets them)."""
    return {"SLURM_JOB_ID": "123457", "SLURM_STEP_ID": "0", "SLURM_JOB_NODELIST": "gpu[07-08]",
            "SLURM_STEP_NODELIST": "gpu[07-08]", "SLURM_STEP_TASKS_PER_NODE": "4(x2)",
            "SLURM_TASKS_PER_NODE": "4(x2)", "SLURM_STEP_NUM_TASKS": "8", "SLURM_NTASKS": "8",
            "SLURM_PROCID": str(procid), "SLURM_LOCALID": str(localid), "SLURM_NODEID": str(nodeid), **extra}


def test_master_port_from_job_id():
    assert master_port_for_job(123457) == lenv.PORT_BASE + 123457 % lenv.PORT_SPAN == 23457
    assert master_port_for_job("123458") == 23458  # consecutive jobs on a shared node differ
    ports = {master_port_for_job(j) for j in range(1, 50_000, 7)}
    assert min(ports) >= lenv.PORT_BASE and max(ports) < lenv.PORT_BASE + lenv.PORT_SPAN < 32768
    with pytest.raises(LaunchError, match="not a number"):
        master_port_for_job("abc")


def test_slurm_rank_env_maps_every_task():
    seen = []
    for node in (0, 1):
        for local_id in range(4):
            e = slurm_rank_env(_step_env(node * 4 + local_id, local_id, node, MASTER_ADDR="stale", MASTER_PORT="1"))
            seen.append(e)
            assert e["LOCAL_RANK"] == str(local_id) and e["NODE_RANK"] == str(node) == e["CROSS_RANK"]
            assert e["WORLD_SIZE"] == "8" and e["LOCAL_WORLD_SIZE"] == "4" and e["CROSS_SIZE"] == "2"
            # stale MASTER_* from the submitting shell are ignored: the first node and the job's port win
            assert e["MASTER_ADDR"] == "gpu07" and e["MASTER_PORT"] == "23457"
    assert [e["RANK"] for e in seen] == [str(r) for r in range(8)]


def test_slurm_rank_env_overrides_and_uneven_nodes():
    e = slurm_rank_env(_step_env(8, 0, 1, SLURM_STEP_TASKS_PER_NODE="8,1", SLURM_STEP_NUM_TASKS="9",
                                 HGSCALE_MASTER_ADDR="10.1.0.7", HGSCALE_MASTER_PORT="29555"))
    assert (e["RANK"], e["LOCAL_WORLD_SIZE"], e["WORLD_SIZE"]) == ("8", "1", "9")
    assert (e["MASTER_ADDR"], e["MASTER_PORT"]) == ("10.1.0.7", "29555")


@pytest.mark.parametrize("change, message", [
    ({"SLURM_STEP_ID": None}, "not a job step"),
    ({"SLURM_PROCID": None}, r"\$SLURM_PROCID is not set"),
    ({"SLURM_STEP_NUM_TASKS": "6"}, "SLURM_STEP_NUM_TASKS=6 but the tasks per node add up to 8"),
    ({"SLURM_STEP_TASKS_PER_NODE": "4"}, "2 nodes .* but tasks per node lists 1 counts"),
    ({"SLURM_PROCID": "8"}, "inconsistent launch: rank 8/8"),
    ({"HGSCALE_MASTER_PORT": "70000"}, "not a port number"),
])
def test_slurm_rank_env_errors_name_the_variable(change, message):
    env = _step_env(1, 1, 0)
    for k, v in change.items():
        env.pop(k) if v is None else env.__setitem__(k, v)
    with pytest.raises(LaunchError, match=message):
        slurm_rank_env(env)


def test_batch_script_rendezvous_uses_job_variables():
    """In the batch script (no step yet) the job's node list and task counts describe the launch."""
    rdv = slurm_rendezvous({"SLURM_JOB_ID": "77", "SLURM_JOB_NODELIST": "c[1-3]", "SLURM_TASKS_PER_NODE": "2(x3)"})
    assert (rdv.master_addr, rdv.master_port, rdv.world_size, rdv.num_nodes) == ("c1", 20077, 6, 3)
    assert "rendezvous MASTER_ADDR=c1 MASTER_PORT=20077 WORLD_SIZE=6 tasks per node=2,2,2" in preflight.header(rdv, {})


def test_env_cli_runs_command_with_mapping_and_exit_status(tmp_path):
    """`python -m launchers.env CMD` runs CMD with the mapping, SIGUSR1 ignored until CMD handles it."""
    code = ("import os, json, signal, sys; print(json.dumps([os.environ['RANK'], os.environ['MASTER_PORT'], "
            "signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN])); sys.exit(7)")
    env = {**os.environ, **_step_env(5, 1, 1)}
    p = subprocess.run([sys.executable, "-m", "launchers.env", sys.executable, "-c", code], env=env,
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 7 and json.loads(p.stdout) == ["5", "23457", True]
    killed = subprocess.run([sys.executable, "-m", "launchers.env", sys.executable, "-c",
                             "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"], env=env, timeout=30)
    assert killed.returncode == 128 + signal.SIGKILL
    bad = subprocess.run([sys.executable, "-m", "launchers.env", "true"], capture_output=True, text=True,
                         env={k: v for k, v in os.environ.items() if not k.startswith("SLURM_")})
    assert bad.returncode == 2 and "error: $SLURM_STEP_ID is not set" in bad.stderr
    missing = subprocess.run([sys.executable, "-m", "launchers.env", "no-such-program-xyz"], env=env,
                             capture_output=True, text=True)
    assert missing.returncode == 127 and "cannot run 'no-such-program-xyz'" in missing.stderr


# A rank that needs a while before it can catch SIGUSR1 (like the trainer importing torch), then counts
# the SIGUSR1s it gets; it reports 'started' at once and exits 0 after exactly one.
SLOW_RANK = textwrap.dedent("""
    import os, signal, sys, time
    out = sys.argv[1]
    open(os.path.join(out, "started" + os.environ.get("RANK", "")), "w").close()
    time.sleep(1.5)                       # still "importing": SIGUSR1 is ignored here
    got = []
    signal.signal(signal.SIGUSR1, lambda *a: got.append(1))
    deadline = time.time() + 20
    while not got and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    sys.exit(0 if len(got) == 1 else 10 + len(got))
""")


def _wait_files(paths, timeout=30):
    deadline = time.time() + timeout
    while not all(p.exists() for p in paths):
        assert time.time() < deadline, f"{paths} did not appear"
        time.sleep(0.02)


def test_env_wrapper_holds_an_early_sigusr1_until_the_rank_catches_it(tmp_path):
    """A preemption signal during start-up neither kills the rank nor gets lost: it arrives once, later."""
    env = {**os.environ, **_step_env(0, 0, 0)}
    p = subprocess.Popen([sys.executable, "-m", "launchers.env", sys.executable, "-c", SLOW_RANK, str(tmp_path)],
                         env=env)
    _wait_files([tmp_path / "started0"])
    p.send_signal(signal.SIGUSR1)   # what srun relays to the task
    assert p.wait(timeout=30) == 0


# ------------------------------------------------------------------------------------- local launcher

RANK_REPORT = textwrap.dedent("""
    import json, os, sys
    keys = ["RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS"]
    open(os.path.join(sys.argv[1], "r" + os.environ["RANK"]), "w").write(json.dumps({k: os.environ[k] for k in keys}))
""")


def test_local_launch_gives_each_rank_the_slurm_mapping(tmp_path):
    rc = local.launch_local([sys.executable, "-c", RANK_REPORT, str(tmp_path)], nproc=3, master_port=29123,
                            env={k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"})
    assert rc == 0
    got = [json.loads((tmp_path / f"r{r}").read_text()) for r in range(3)]
    expected = local.local_rank_envs(3, "127.0.0.1", 29123)
    for r in range(3):
        shared = set(got[r]) & set(expected[r])
        assert {k: got[r][k] for k in shared} == {k: expected[r][k] for k in shared}
        assert got[r]["RANK"] == got[r]["LOCAL_RANK"] == str(r) and got[r]["WORLD_SIZE"] == "3"
        assert got[r]["MASTER_PORT"] == "29123" and int(got[r]["OMP_NUM_THREADS"]) >= 1
    # the same function maps Slurm tasks: one node, three tasks gives identical variables
    slurm = slurm_rank_env({"SLURM_JOB_ID": "9123", "SLURM_STEP_ID": "0", "SLURM_STEP_NODELIST": "127.0.0.1",
                            "SLURM_STEP_TASKS_PER_NODE": "3", "SLURM_STEP_NUM_TASKS": "3", "SLURM_PROCID": "2",
                            "SLURM_LOCALID": "2", "SLURM_NODEID": "0"})
    assert slurm == expected[2]


def test_local_launch_stops_the_others_when_a_rank_fails():
    code = "import os, sys, time\nif os.environ['RANK'] == '1': sys.exit(7)\ntime.sleep(60)"
    t0 = time.monotonic()
    assert local.launch_local([sys.executable, "-c", code], nproc=3, grace_s=5) == 7
    assert time.monotonic() - t0 < 20  # the sleeping ranks were terminated, not waited for


def test_local_launch_forwards_sigusr1_to_every_rank(tmp_path):
    """The launcher relays SIGUSR1 once to each rank (the trainer's preemption signal)."""
    code = textwrap.dedent(f"""
        import os, signal, sys, time
        got = []
        signal.signal(signal.SIGUSR1, lambda *a: got.append(1))
        open(os.path.join({str(tmp_path)!r}, "ready" + os.environ["RANK"]), "w").close()
        deadline = time.time() + 30
        while not got and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        sys.exit(0 if len(got) == 1 else 5)
    """)
    p = subprocess.Popen([sys.executable, "-m", "launchers.local", "--nproc", "2", "--", sys.executable, "-c", code])
    deadline = time.time() + 30
    while not all((tmp_path / f"ready{r}").exists() for r in (0, 1)) and time.time() < deadline:
        time.sleep(0.05)
    p.send_signal(signal.SIGUSR1)
    assert p.wait(timeout=30) == 0


def test_relay_replays_a_signal_that_came_before_the_rank_existed(tmp_path):
    from launchers.signals import SignalRelay, child_setup
    relay = SignalRelay().install()
    try:
        os.kill(os.getpid(), signal.SIGUSR1)  # arrives at the relay before any rank is started
        child = relay.add(subprocess.Popen([sys.executable, "-c", SLOW_RANK, str(tmp_path)], preexec_fn=child_setup))
        deadline = time.time() + 30
        while child.poll() is None and time.time() < deadline:
            relay.poll()
            time.sleep(0.05)
    finally:
        relay.restore()
    assert child.wait(timeout=5) == 0  # got exactly one SIGUSR1, after its handler existed


def test_local_launch_holds_early_sigusr1_for_starting_ranks(tmp_path):
    p = subprocess.Popen([sys.executable, "-m", "launchers.local", "--nproc", "2", "--", sys.executable, "-c",
                          SLOW_RANK, str(tmp_path)])
    _wait_files([tmp_path / "started0", tmp_path / "started1"])
    p.send_signal(signal.SIGUSR1)
    assert p.wait(timeout=30) == 0


def test_signal_handler_detection():
    from launchers.signals import catches
    code = ("import signal, time; signal.signal(signal.SIGUSR2, lambda *a: None); print('ok', flush=True); "
            "time.sleep(30)")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "ok"
        assert catches(p.pid, signal.SIGUSR2) and not catches(p.pid, signal.SIGUSR1)
    finally:
        p.kill()
        p.wait()
    assert not catches(p.pid, signal.SIGUSR2)  # gone


def test_local_launch_cli_usage_errors():
    p = subprocess.run([sys.executable, "-m", "launchers.local", "--nproc", "2"], capture_output=True, text=True)
    assert p.returncode == 2 and "give the command to run" in p.stderr
    p = subprocess.run([sys.executable, "-m", "launchers.local", "--nproc", "1", "no-such-program-xyz"],
                       capture_output=True, text=True)
    assert p.returncode == 127 and "cannot run 'no-such-program-xyz'" in p.stderr


def test_local_launch_gloo_allreduce(tmp_path):
    """Two real torch.distributed ranks rendezvous through the variables the launcher sets."""
    code = textwrap.dedent(f"""
        import os, torch, torch.distributed as dist
        torch.set_num_threads(1)
        dist.init_process_group("gloo")
        t = torch.tensor([float(dist.get_rank() + 1)])
        dist.all_reduce(t)
        open(os.path.join({str(tmp_path)!r}, "sum" + os.environ["RANK"]), "w").write(str(t.item()))
        dist.destroy_process_group()
    """)
    assert local.launch_local([sys.executable, "-c", code], nproc=2) == 0
    assert [(tmp_path / f"sum{r}").read_text() for r in (0, 1)] == ["3.0", "3.0"]


# ------------------------------------------------------------------------------------------ preflight

def test_gpu_mismatch_warning():
    rdv = slurm_rendezvous({"SLURM_JOB_ID": "5", "SLURM_JOB_NODELIST": "g[1-2]", "SLURM_TASKS_PER_NODE": "4(x2)"})
    assert preflight.gpu_mismatch(rdv, {"SLURM_GPUS_PER_NODE": "a100:4"}) is None
    assert preflight.gpu_mismatch(rdv, {"SLURM_GPUS_PER_NODE": "0"}) is None  # CPU nodes
    assert "8 GPUs per node but 4,4 tasks per node; one rank per GPU needs --ntasks-per-node=8" in \
        preflight.gpu_mismatch(rdv, {"SLURM_GPUS_PER_NODE": "8"})


def test_check_config_masks_credentials_in_the_job_log(tmp_path, capsys):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"model": {"size": "debug"}, "data": {"url": "s3://bucket/path", "seq_len": 64},
                               "deepspeed": {"aws_secret_access_key": "wJalrXUtnFEMI"}}))
    preflight.check_config(str(cfg), ["tracking.uri=http://alice:s3cr3t@mlflow:5000", "train.steps=3"], world_size=1)
    out = capsys.readouterr().out
    assert "s3cr3t" not in out and "wJalrXUtnFEMI" not in out
    assert "overrides tracking.uri=http://alice:***@mlflow:5000 train.steps=3" in out
    shown = json.loads(out.split("resolved config\n", 1)[1])
    assert shown["tracking"]["uri"] == "http://alice:***@mlflow:5000"
    assert shown["deepspeed"]["aws_secret_access_key"] == "***" and shown["data"]["url"] == "s3://bucket/path"


def test_check_config_reports_layout_and_rejects_mismatch(tmp_path, capsys):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"model": {"size": "debug"}, "data": {"url": "/data", "seq_len": 64},
                               "parallel": {"pipeline_stages": 2}}))
    preflight.check_config(str(cfg), ["train.steps=7"], world_size=4)
    out = capsys.readouterr().out
    assert "layout 4 tasks = 2 pipeline stage(s) x 2 data-parallel" in out
    assert json.loads(out.split("resolved config\n", 1)[1])["train"]["steps"] == 7
    with pytest.raises(ConfigError, match="train.global_batch_size = 5 != micro_batch_size 8 x grad_accum_steps 1 "
                                          "x data-parallel size 2"):
        preflight.check_config(str(cfg), ["train.global_batch_size=5"], world_size=4)
    with pytest.raises(ConfigError, match="deepspeed.train_micro_batch_size_per_gpu = 4 conflicts"):
        preflight.check_config(str(cfg), ['deepspeed={"train_micro_batch_size_per_gpu": 4}'], world_size=4)


def test_probe_reaches_a_listener_and_names_a_dead_port(capsys):
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]
    seen, stop = [], threading.Event()
    t = threading.Thread(target=preflight._serve, args=(srv, seen, stop), daemon=True)
    t.start()
    try:
        assert preflight.probe("127.0.0.1", port, 5) == 0
    finally:
        stop.set()
        t.join()
        srv.close()
    assert seen == [socket.gethostname()]
    assert preflight.probe("127.0.0.1", port, 2) == INFRA
    assert f"cannot reach MASTER_ADDR 127.0.0.1 port {port}" in capsys.readouterr().err


def test_preflight_main_without_probe(tmp_path, monkeypatch, capsys):
    """The batch-script entry point: header, layout and config; the probe step can be switched off."""
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"model": {"size": "debug"}, "data": {"url": "/data", "seq_len": 64}}))
    for k, v in {"SLURM_JOB_ID": "42", "SLURM_JOB_NODELIST": "n[1-2]", "SLURM_TASKS_PER_NODE": "2(x2)",
                 "HGSCALE_SKIP_RENDEZVOUS_CHECK": "1"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("SLURM_STEP_NODELIST", raising=False)
    monkeypatch.delenv("SLURM_STEP_TASKS_PER_NODE", raising=False)
    assert preflight.main([str(cfg), "train.steps=3"]) == 0
    out = capsys.readouterr().out
    assert "rendezvous MASTER_ADDR=n1 MASTER_PORT=20042 WORLD_SIZE=4" in out and "reachable" not in out
    assert preflight.main([str(tmp_path / "missing.json")]) == 2
    assert "missing.json' does not exist" in capsys.readouterr().err
