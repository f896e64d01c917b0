"""Per-process and per-node resource samples (CPU, memory, GPU), each tagged with the node it came from."""
from __future__ import annotations

import os
import socket

import psutil

_GB = 1024 ** 3


def node_id() -> str:
    """A stable name for this machine: HGSCALE_NODE_ID, else Slurm's node name, else the short host name."""
    return os.environ.get("HGSCALE_NODE_ID") or os.environ.get("SLURMD_NODENAME") or socket.gethostname().split(".")[0]


def node_rank() -> int:
    """Index of this node among the job's nodes, from the launcher's environment (0 when unknown)."""
    for var in ("GROUP_RANK", "NODE_RANK", "SLURM_NODEID"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


def start_cpu_sampling() -> None:
    """psutil reports CPU use since the previous call; the first call only sets the reference point."""
    psutil.cpu_percent(interval=None)


def sample(device=None) -> dict:
    """One snapshot: node-level CPU and memory, this process's RSS, and this rank's GPU memory if it has a GPU."""
    import torch

    vm = psutil.virtual_memory()
    out = {
        "node": node_id(),
        "node_rank": node_rank(),
        "cpu_percent": psutil.cpu_percent(interval=None),
        "mem_used_gb": (vm.total - vm.available) / _GB,
        "mem_percent": vm.percent,
        "rss_gb": psutil.Process().memory_info().rss / _GB,
    }
    dev = torch.device(device) if device is not None else None
    if dev is not None and dev.type == "cuda" and torch.cuda.is_available():
        out["gpu_mem_gb"] = torch.cuda.memory_allocated(dev) / _GB
        out["gpu_peak_gb"] = torch.cuda.max_memory_allocated(dev) / _GB
        out["gpu_reserved_gb"] = torch.cuda.memory_reserved(dev) / _GB
        try:  # needs pynvml; optional
            out["gpu_util_percent"] = float(torch.cuda.utilization(dev))
        except Exception:  # noqa: BLE001
            pass
    return out
