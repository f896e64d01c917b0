"""Failure records of one job attempt, for the Slurm script's requeue decision.

Each rank's wrapper (``python -m launchers.env``) writes ``crash-rank00003.json`` into ``$HGSCALE_EVENTS_DIR``
when its rank dies without having been asked to stop; the trainer's watchdog writes ``hang.json`` naming the
culprit hosts. ``python -m launchers.faults culprit DIR`` prints the node to exclude from the requeued job:
the hang report's first culprit host, else the host of the rank that died first (the ranks that fail after
it lost a peer), else nothing.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path


def record_crash(rank: int, status: int, events_dir: str | None = None) -> Path | None:
    """Write this rank's crash record (no-op without an events directory)."""
    events_dir = events_dir or os.environ.get("HGSCALE_EVENTS_DIR")
    if not events_dir:
        return None
    path = Path(events_dir) / f"crash-rank{rank:05d}.json"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"kind": "crash", "rank": rank, "host": socket.gethostname().split(".")[0],
                                    "status": status, "time": time.time()}))
    except OSError:
        return None
    return path


def culprit(events_dir: str | Path) -> str | None:
    d = Path(events_dir)
    hang = d / "hang.json"
    if hang.is_file():
        hosts = json.loads(hang.read_text()).get("culprit_hosts") or []
        return hosts[0].split(".")[0] if hosts else None
    crashes = []
    for f in d.glob("crash-rank*.json"):
        try:
            crashes.append(json.loads(f.read_text()))
        except (OSError, ValueError):
            continue
    return min(crashes, key=lambda c: c["time"])["host"] if crashes else None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] != "culprit":
        print("usage: python -m launchers.faults culprit EVENTS_DIR", file=sys.stderr)
        return 2
    node = culprit(argv[1])
    if node:
        print(node)
    return 0


if __name__ == "__main__":
    sys.exit(main())
