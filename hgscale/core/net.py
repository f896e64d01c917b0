"""A free TCP port on this host (rendezvous of a single process, local launches, test services)."""
from __future__ import annotations

import socket


def free_port(addr: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((addr, 0))
        return s.getsockname()[1]
