"""Checks a Slurm job runs before it starts any rank, and the header of its log.

    python -m launchers.preflight CONFIG [key=value ...]      # in the batch script, before srun

1. prints the rendezvous (job, nodes, tasks per node, MASTER_ADDR:MASTER_PORT) and the resolved config;
2. validates the config for this allocation with the trainer's checks: every config problem, pipeline
   stages x data-parallel size against the number of tasks, the generated DeepSpeed JSON;
3. checks every node reaches MASTER_ADDR:MASTER_PORT: this process listens on the port, and one probe
   per node (``srun --ntasks-per-node=1``) connects to it. A wrong address otherwise shows up as ranks
   hanging in the rendezvous until a timeout, long after the allocation started burning.

Exit status 0 when the job may start; 2 for a config problem, 3 for a rendezvous problem, each with one
clear ``error:`` line in the job log.
"""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading

from hgscale.core.status import INFRA, USER_ERROR
from launchers.env import LaunchError, Rendezvous, slurm_rendezvous

PROBE_TIMEOUT_S = float(os.environ.get("HGSCALE_PROBE_TIMEOUT", "20"))


def header(rdv: Rendezvous, env=os.environ) -> str:
    tasks = ",".join(map(str, rdv.tasks_per_node))
    return "\n".join([
        f"hgscale: job {env.get('SLURM_JOB_ID', '?')} ({env.get('SLURM_JOB_NAME', '')}) "
        f"restart {env.get('SLURM_RESTART_COUNT', '0')} on {rdv.num_nodes} node(s): {','.join(rdv.hosts)}",
        f"hgscale: rendezvous MASTER_ADDR={rdv.master_addr} MASTER_PORT={rdv.master_port} "
        f"WORLD_SIZE={rdv.world_size} tasks per node={tasks}",
    ])


def gpu_mismatch(rdv: Rendezvous, env=os.environ) -> str | None:
    """A warning when the tasks per node differ from the GPUs per node (one rank per GPU is the layout)."""
    raw = env.get("SLURM_GPUS_PER_NODE", "")
    m = re.search(r"(\d+)$", raw)
    gpus = int(m.group(1)) if m else 0
    if gpus and any(t != gpus for t in rdv.tasks_per_node):
        return (f"hgscale: warning: {gpus} GPUs per node but {','.join(map(str, rdv.tasks_per_node))} tasks per "
                f"node; one rank per GPU needs --ntasks-per-node={gpus}")
    return None


def check_config(path: str, overrides: list[str], world_size: int):
    """Load and validate the config for ``world_size`` ranks (raises ConfigError); print layout and config."""
    # The trainer's own checks, before any rank starts; neither module imports torch (this takes a second).
    from hgscale.config import load_config
    from hgscale.core.secrets import mask_args, mask_secrets
    from hgscale.training.ds_config import deepspeed_config
    from hgscale.training.layout import ParallelLayout
    cfg = load_config(path, overrides)
    lay = ParallelLayout.of(cfg, world_size, source=path)
    lay.resolve(cfg)  # train.grad_accum_steps = 0: the accumulation this allocation needs, shown below
    deepspeed_config(cfg, world_size)  # conflicts between `deepspeed` pass-through keys and generated ones
    sp = f" x {lay.sp} sharing each sequence" if lay.sp > 1 else ""
    print(f"hgscale: layout {world_size} tasks = {lay.stages} pipeline stage(s) x {lay.dp} data-parallel{sp}, "
          f"accumulation {lay.accum}; config {os.path.abspath(path)} overrides "
          f"{' '.join(mask_args(overrides)) or '(none)'}")
    # The job log is read by others: credentials go the way they go in MLflow params (masked).
    print("hgscale: resolved config\n" + json.dumps(mask_secrets(cfg.to_dict()), indent=2), flush=True)
    return cfg


def _fail(code: int, message: str) -> int:
    print(f"hgscale: error: {message}", file=sys.stderr, flush=True)
    return code


def _resolve(addr: str) -> str:
    try:
        return socket.getaddrinfo(addr, None, socket.AF_INET, socket.SOCK_STREAM)[0][4][0]
    except socket.gaierror as e:
        raise LaunchError(f"MASTER_ADDR {addr!r} does not resolve on {socket.gethostname()} ({e.strerror}); "
                          f"set HGSCALE_MASTER_ADDR to an address of the first node that every node can reach") from e


def _serve(srv: socket.socket, seen: list[str], stop: threading.Event):
    """Answer probes: read the prober's host name, reply, let the prober close first."""
    srv.settimeout(0.2)
    while not stop.is_set():
        try:
            conn, _ = srv.accept()
        except socket.timeout:
            continue
        with conn:
            conn.settimeout(5)
            try:
                seen.append(conn.recv(256).decode(errors="replace").strip())
                conn.sendall(b"ok\n")
                conn.recv(1)  # wait for the prober's close: TIME_WAIT stays on its side, not on our port
            except OSError:
                pass


def check_rendezvous(rdv: Rendezvous, python: str = sys.executable, timeout_s: float = PROBE_TIMEOUT_S):
    """Listen on MASTER_PORT here, probe it from every node of the job; raise LaunchError on failure."""
    ip = _resolve(rdv.master_addr)
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        srv.bind(("", rdv.master_port))
    except OSError as e:
        srv.close()
        raise LaunchError(f"MASTER_PORT {rdv.master_port} is not free on {socket.gethostname()} ({e.strerror}); "
                          f"set HGSCALE_MASTER_PORT to a free port") from e
    srv.listen(64)
    seen: list[str] = []
    stop = threading.Event()
    thread = threading.Thread(target=_serve, args=(srv, seen, stop), daemon=True)
    thread.start()
    n = rdv.num_nodes
    cmd = ["srun", f"--nodes={n}", f"--ntasks={n}", "--ntasks-per-node=1", "--cpus-per-task=1",
           "--kill-on-bad-exit=1", "--job-name=rendezvous-probe", python, "-m", "launchers.preflight",
           "--probe", rdv.master_addr, str(rdv.master_port), str(timeout_s)]
    try:
        rc = subprocess.run(cmd, timeout=timeout_s + 120).returncode
    except subprocess.TimeoutExpired:
        rc = -1
    finally:
        stop.set()
        thread.join()
        srv.close()
    if rc != 0:
        raise LaunchError(f"not every node reaches MASTER_ADDR {rdv.master_addr} ({ip}) port {rdv.master_port} "
                          f"(probe step exit status {rc}); set HGSCALE_MASTER_ADDR to an address of "
                          f"{rdv.hosts[0]} that every node can reach")
    print(f"hgscale: rendezvous reachable from {len(seen)} node(s): {','.join(sorted(seen))} -> {ip}", flush=True)


def probe(addr: str, port: int, timeout_s: float) -> int:
    """One node's side of the check: connect to the master, exchange a line, close."""
    me = socket.gethostname()
    try:
        with socket.create_connection((addr, port), timeout=timeout_s) as s:
            s.sendall(me.encode() + b"\n")
            if not s.recv(16).startswith(b"ok"):
                raise OSError("no answer from the listener")
    except OSError as e:
        reason = "timed out" if isinstance(e, socket.timeout) else (e.strerror or str(e))
        return _fail(INFRA, f"node {me} cannot reach MASTER_ADDR {addr} port {port} ({reason})")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--probe"]:
        return probe(argv[1], int(argv[2]), float(argv[3]))
    if not argv or argv[0].startswith("-"):
        return _fail(USER_ERROR, "usage: python -m launchers.preflight CONFIG.json [key=value ...]")
    from hgscale.config import ConfigError
    try:
        rdv = slurm_rendezvous(os.environ)
        print(header(rdv), flush=True)
        if warning := gpu_mismatch(rdv):
            print(warning, flush=True)
        check_config(argv[0], argv[1:], rdv.world_size)
        if os.environ.get("HGSCALE_SKIP_RENDEZVOUS_CHECK") != "1":
            check_rendezvous(rdv)
    except ConfigError as e:
        return _fail(USER_ERROR, str(e))
    except LaunchError as e:
        return _fail(INFRA, str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
