"""How a training process leaves its process group: the exit status the launcher and Slurm act on is the one the
trainer chose, never an abort from gloo's threads at interpreter finalization."""
import subprocess
import sys
import textwrap

from hgscale.core.net import free_port

_SCRIPT = textwrap.dedent("""
    import atexit, os, sys
    import torch, torch.distributed as dist
    from hgscale.training.engine import leave_process_group
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:{port}", rank=0, world_size=1)
    dist.all_reduce(torch.ones(4))
    atexit.register(lambda: print("finalized", flush=True))
    print("before", flush=True, end=" ")
    status = leave_process_group({status}, clean={clean})
    print("group", "alive" if dist.is_initialized() else "destroyed", flush=True)
    sys.exit(status)
""")


def _run(status: int, clean: bool) -> subprocess.CompletedProcess:
    code = _SCRIPT.format(port=free_port(), status=status, clean=clean)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)


def test_a_clean_end_destroys_the_group_and_finalizes():
    r = _run(0, clean=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["before", "group", "destroyed", "finalized"]


def test_an_error_exits_with_its_status_at_once():
    """Printed output is flushed; nothing after the call runs, not even atexit handlers (finalization is skipped)."""
    r = _run(4, clean=False)
    assert r.returncode == 4, r.stderr[-2000:]
    assert r.stdout.split() == ["before"]
