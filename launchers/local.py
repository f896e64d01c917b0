"""Local multi-process launch for development: N ranks on this machine, the same variables as on Slurm.

    python -m launchers.local --nproc 2 python -m hgscale.train --config configs/demo.json train.steps=20

Every rank gets its environment from :func:`launchers.env.rendezvous_env` (the function each Slurm task
maps through), so a program that runs here runs unchanged under ``slurm/train_multinode.sh``.
SIGINT, SIGTERM, SIGUSR1 and SIGUSR2 sent to the launcher reach every rank once (the ranks live in
their own session, so a terminal's Ctrl-C is not delivered twice); a SIGUSR1 that arrives while a rank
is still starting is held until it can catch it (launchers.signals, as under srun). When a rank fails
the others are stopped (at once after a hang, exit status 4), and the launcher exits with the status of the cause
(a rank's deliberate stop or outage, not the status of a peer that lost it first).
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time

from hgscale.core.net import free_port
from hgscale.core.status import HANG, deciding
from launchers.env import rendezvous_env
from launchers.signals import SignalRelay, child_setup, exit_status


def local_rank_envs(nproc: int, master_addr: str, master_port: int) -> list[dict[str, str]]:
    """The rendezvous variables of ``nproc`` ranks on one node."""
    return [rendezvous_env(r, r, nproc, nproc, 0, 1, master_addr, master_port) for r in range(nproc)]


def launch_local(cmd: list[str], nproc: int, master_addr: str = "127.0.0.1", master_port: int | None = None,
                 env: dict[str, str] | None = None, grace_s: float = 10.0) -> int:
    """Run ``cmd`` as ``nproc`` ranks; 0 when all succeed, else the status that names the cause
    (:func:`hgscale.core.status.deciding`: a peer that lost a rank often fails first)."""
    if nproc < 1:
        raise ValueError(f"--nproc {nproc} must be >= 1")
    base = dict(os.environ if env is None else env)
    # N ranks on a few cores: one BLAS thread pool per rank each as wide as the machine would thrash.
    base.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    port = master_port or free_port(master_addr)
    relay = SignalRelay().install()
    procs = relay.children

    def interrupt(signum, _frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    previous_int = signal.signal(signal.SIGINT, interrupt)
    try:
        for rank_env in local_rank_envs(nproc, master_addr, port):
            relay.add(subprocess.Popen(cmd, env={**base, **rank_env}, start_new_session=True,
                                       preexec_fn=child_setup))
        failed: int | None = None
        deadline = 0.0
        while True:
            relay.poll()
            codes = [p.poll() for p in procs]
            bad = [c for c in codes if c not in (None, 0)]
            if bad and failed is None:
                rank = next(r for r, c in enumerate(codes) if c not in (None, 0))
                failed = exit_status(bad[0])
                why = "hung (see its error line)" if failed == HANG else f"exited with status {failed}"
                print(f"launchers.local: rank {rank} {why}; stopping the other ranks", file=sys.stderr, flush=True)
                # after a hang the others are stuck in a collective and have dumped their stacks: no grace
                deadline = time.monotonic() + (min(grace_s, 2.0) if failed == HANG else grace_s)
                interrupt(signal.SIGTERM, None)
            if all(c is not None for c in codes):  # the cause, not a peer that lost its rank first
                return deciding([failed, *(exit_status(c) for c in codes)]) if failed is not None else 0
            if failed is not None and time.monotonic() > deadline:
                for p in procs:
                    if p.poll() is None:
                        p.kill()
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        relay.restore()
        signal.signal(signal.SIGINT, previous_int)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m launchers.local",
                                 description="Start N ranks of a command on this machine with the rendezvous "
                                             "variables torch.distributed and DeepSpeed read.")
    ap.add_argument("--nproc", type=int, default=2, help="processes (ranks) to start (default 2)")
    ap.add_argument("--master-addr", default="127.0.0.1", help="address rank 0 listens on")
    ap.add_argument("--master-port", type=int, default=0, help="port rank 0 listens on (default: a free one)")
    ap.add_argument("cmd", nargs=argparse.REMAINDER, help="the command each rank runs")
    args = ap.parse_args(argv)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        ap.error("give the command to run, e.g. python -m launchers.local --nproc 2 python -m hgscale.train "
                 "--config configs/demo.json")
    if args.nproc < 1:
        ap.error(f"--nproc {args.nproc} must be >= 1")
    try:
        return launch_local(cmd, args.nproc, args.master_addr, args.master_port or None)
    except FileNotFoundError as e:
        print(f"error: cannot run {cmd[0]!r}: {e.strerror}", file=sys.stderr)
        return 127


if __name__ == "__main__":
    sys.exit(main())
