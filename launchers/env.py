"""The rendezvous environment every rank starts with: one mapping for Slurm and for local launches.

torch.distributed and DeepSpeed read ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and
``MASTER_PORT`` and none of Slurm's variables, so each ``srun`` task maps its ``SLURM_*`` values
through :func:`rendezvous_env` (as gpt-neox does), and :mod:`launchers.local` builds the very same
variables for processes on one machine.

    srun python -m launchers.env python -m hgscale.train --config X   # map, then run the command
    srun python -m launchers.env                                        # print what each rank gets

With a command, this process stays as the rank's parent: it prints the rank's rendezvous line to the
job log, relays stop signals and holds a preemption SIGUSR1 that lands while the rank is still
starting up (launchers.signals), and exits with the rank's status.

Rendezvous point, identical for the batch script (launchers.preflight) and every rank:
- MASTER_ADDR: the first host of the step's node list (rank 0 runs there: Slurm places tasks in block
  order), or ``HGSCALE_MASTER_ADDR`` to pick another interface (for example an InfiniBand address).
- MASTER_PORT: derived from the job id, so jobs sharing a node do not collide and a requeued job (same
  id) gets the same port; or ``HGSCALE_MASTER_PORT``. Stale ``MASTER_*`` values inherited from the
  submitting shell are ignored on purpose.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from typing import Mapping

from hgscale.core.status import HANG, STOPS, USER_ERROR
from launchers.faults import record_crash, record_stop
from launchers.hostlist import HostlistError, expand_hostlist, expand_tasks_per_node
from launchers.signals import SignalRelay, child_setup, exit_status

# Ports below Linux's ephemeral range (32768-60999), above the common service ports and Slurm's own.
PORT_BASE = 20000
PORT_SPAN = 10000


class LaunchError(RuntimeError):
    """The environment does not describe a launch we can map; the message names the variable and the fix."""


def master_port_for_job(job_id: int | str) -> int:
    """A port in [PORT_BASE, PORT_BASE + PORT_SPAN) derived from the job id."""
    try:
        jid = int(str(job_id).split("_")[0])  # array jobs: SLURM_JOB_ID is already unique per task
    except ValueError:
        raise LaunchError(f"SLURM_JOB_ID={job_id!r} is not a number") from None
    return PORT_BASE + jid % PORT_SPAN


@dataclass(frozen=True)
class Rendezvous:
    """Where rank 0 listens, and the shape of the launch."""

    master_addr: str
    master_port: int
    hosts: tuple[str, ...]
    tasks_per_node: tuple[int, ...]

    @property
    def world_size(self) -> int:
        return sum(self.tasks_per_node)

    @property
    def num_nodes(self) -> int:
        return len(self.hosts)


def rendezvous_env(rank: int, local_rank: int, world_size: int, local_world_size: int, node_rank: int,
                   num_nodes: int, master_addr: str, master_port: int) -> dict[str, str]:
    """The variables one rank needs (torchrun's names, plus the aliases DeepSpeed's launcher sets)."""
    if not 0 <= rank < world_size or not 0 <= local_rank < local_world_size or not 0 <= node_rank < num_nodes:
        raise LaunchError(f"inconsistent launch: rank {rank}/{world_size}, local rank {local_rank}/"
                          f"{local_world_size}, node {node_rank}/{num_nodes}")
    return {
        "RANK": str(rank), "LOCAL_RANK": str(local_rank), "WORLD_SIZE": str(world_size),
        "LOCAL_WORLD_SIZE": str(local_world_size), "LOCAL_SIZE": str(local_world_size),
        "NODE_RANK": str(node_rank), "GROUP_RANK": str(node_rank),
        "CROSS_RANK": str(node_rank), "CROSS_SIZE": str(num_nodes),
        "MASTER_ADDR": master_addr, "MASTER_PORT": str(master_port),
    }


def _need(env: Mapping[str, str], *names: str) -> str:
    for name in names:
        if env.get(name):
            return env[name]
    which = f"${names[0]} is not set" if len(names) == 1 else f"none of {', '.join('$' + n for n in names)} is set"
    raise LaunchError(f"{which}: run this inside a Slurm job (srun for ranks) or use "
                      f"python -m launchers.local on one machine")


def slurm_rendezvous(env: Mapping[str, str] = os.environ) -> Rendezvous:
    """The rendezvous of the current Slurm job (batch script) or job step (srun task)."""
    try:
        hosts = tuple(expand_hostlist(_need(env, "SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")))
        tasks = tuple(expand_tasks_per_node(_need(env, "SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE")))
    except HostlistError as e:
        raise LaunchError(str(e)) from None
    if len(tasks) != len(hosts):
        raise LaunchError(f"{len(hosts)} nodes ({','.join(hosts)}) but tasks per node lists {len(tasks)} counts")
    addr = env.get("HGSCALE_MASTER_ADDR") or hosts[0]
    port_raw = env.get("HGSCALE_MASTER_PORT")
    if port_raw:
        if not port_raw.isdigit() or not 0 < int(port_raw) < 65536:
            raise LaunchError(f"HGSCALE_MASTER_PORT={port_raw!r} is not a port number (1-65535)")
        port = int(port_raw)
    else:
        port = master_port_for_job(_need(env, "SLURM_JOB_ID", "SLURM_JOBID"))
    return Rendezvous(addr, port, hosts, tasks)


def slurm_rank_env(env: Mapping[str, str] = os.environ) -> dict[str, str]:
    """Map one ``srun`` task's SLURM_PROCID / SLURM_LOCALID / SLURM_NODEID to the rendezvous variables."""
    if "SLURM_STEP_ID" not in env:
        raise LaunchError("$SLURM_STEP_ID is not set: this is not a job step; start ranks with srun "
                          "(the batch script itself is not a rank)")
    rdv = slurm_rendezvous(env)
    rank, local, node = (int(_need(env, n)) for n in ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_NODEID"))
    world = int(_need(env, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS"))
    if world != rdv.world_size:
        raise LaunchError(f"SLURM_STEP_NUM_TASKS={world} but the tasks per node add up to {rdv.world_size}")
    return rendezvous_env(rank, local, world, rdv.tasks_per_node[node], node, rdv.num_nodes,
                          rdv.master_addr, rdv.master_port)


def main(argv: list[str] | None = None) -> int:
    """``python -m launchers.env [COMMAND ...]``: run COMMAND with the mapped variables, or print them."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--":
        argv = argv[1:]
    try:
        mapped = slurm_rank_env(os.environ)
    except LaunchError as e:
        print(f"error: {e}", file=sys.stderr)
        return USER_ERROR
    if not argv:
        print(" ".join(f"{k}={v}" for k, v in mapped.items()))
        return 0
    m = mapped  # one line per rank in the job log: who runs where, and where it meets the others
    print(f"hgscale: rank {m['RANK']}/{m['WORLD_SIZE']} on {socket.gethostname()} (node {m['NODE_RANK']}, local rank "
          f"{m['LOCAL_RANK']}/{m['LOCAL_WORLD_SIZE']}) -> {m['MASTER_ADDR']}:{m['MASTER_PORT']}", file=sys.stderr,
          flush=True)
    return run_rank(argv, dict(os.environ, **mapped))


def run_rank(cmd: list[str], env: dict[str, str]) -> int:
    """Run one rank's command and wait for it, relaying stop signals (launchers.signals); its exit status.

    Under srun, Slurm signals every process of the step, the rank included; this process relays on top
    (duplicates are harmless) and holds a SIGUSR1 that lands while the rank is still starting up.
    """
    relay = SignalRelay().install()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the rank gets SIGINT itself; we wait for its exit status
    try:
        child = subprocess.Popen(cmd, env=env, preexec_fn=child_setup)
    except OSError as e:
        print(f"error: cannot run {cmd[0]!r}: {e.strerror}", file=sys.stderr)
        return 127
    relay.add(child)
    while True:
        try:
            status = exit_status(child.wait(timeout=0.1))
        except subprocess.TimeoutExpired:
            relay.poll()
            continue
        # a rank that died while nobody asked it to stop: the Slurm script excludes its node on requeue
        # (0 done, 2 config/data error, 3 NaN loss, 4 hang: the watchdog reports that one itself)
        if status in STOPS:
            record_stop(int(env.get("RANK", "0")), status)
        elif status not in (0, HANG) and not relay.seen:
            record_crash(int(env.get("RANK", "0")), status)
        return status


if __name__ == "__main__":
    sys.exit(main())
