"""Failure records of one job attempt, for the Slurm script's requeue decision.

Each rank's wrapper (``python -m launchers.env``) writes ``crash-rank00003.json`` into ``$HGSCALE_EVENTS_DIR``
when its rank dies without having been asked to stop; the trainer's watchdog writes ``hang.json`` naming the
culprit hosts. ``python -m launchers.faults culprit DIR`` prints the node to exclude from the requeued job:
the hang report's first culprit host, else the host of the rank that died first (the ranks that fail after
it lost a peer), else nothing.

A rank that stops on purpose (2: config or data error, 3: NaN loss) writes ``stop-rank00003.json``:
srun then kills the other ranks, and its own exit status may be theirs (143) rather than the first one's, so
``python -m launchers.faults stop-status DIR`` tells the script that the attempt stopped, not crashed.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path


def _record(kind: str, rank: int, status: int, events_dir: str | None) -> Path | None:
    events_dir = events_dir or os.environ.get("HGSCALE_EVENTS_DIR")
    if not events_dir:
        return None
    path = Path(events_dir) / f"{kind}-rank{rank:05d}.json"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"kind": kind, "rank": rank, "host": socket.gethostname().split(".")[0],
                                    "status": status, "time": time.time()}))
    except OSError:
        return None
    return path


def record_crash(rank: int, status: int, events_dir: str | None = None) -> Path | None:
    """Write this rank's crash record (no-op without an events directory)."""
    return _record("crash", rank, status, events_dir)


def record_stop(rank: int, status: int, events_dir: str | None = None) -> Path | None:
    """Write the record of a rank that stopped on purpose (status 2 or 3)."""
    return _record("stop", rank, status, events_dir)


def _records(events_dir: str | Path, kind: str) -> list[dict]:
    out = []
    for f in Path(events_dir).glob(f"{kind}-rank*.json"):
        try:
            out.append(json.loads(f.read_text()))
        except (OSError, ValueError):
            continue
    return out


def stop_status(events_dir: str | Path) -> int | None:
    """The status of the first rank that stopped on purpose in this attempt, else None."""
    stops = _records(events_dir, "stop")
    return int(min(stops, key=lambda c: c["time"])["status"]) if stops else None


def culprit(events_dir: str | Path) -> str | None:
    d = Path(events_dir)
    hang = d / "hang.json"
    if hang.is_file():
        hosts = json.loads(hang.read_text()).get("culprit_hosts") or []
        return hosts[0].split(".")[0] if hosts else None
    crashes = _records(d, "crash")
    return min(crashes, key=lambda c: c["time"])["host"] if crashes else None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] not in ("culprit", "stop-status"):
        print("usage: python -m launchers.faults culprit|stop-status EVENTS_DIR", file=sys.stderr)
        return 2
    found = culprit(argv[1]) if argv[0] == "culprit" else stop_status(argv[1])
    if found is not None:
        print(found)
    return 0


if __name__ == "__main__":
    sys.exit(main())
