"""Failure records of one job attempt, for the Slurm script's requeue decision.

Each rank's wrapper (``python -m launchers.env``) writes ``crash-rank00003.json`` into ``$HGSCALE_EVENTS_DIR``
when its rank dies without having been asked to stop; the trainer's watchdog writes ``hang.json`` naming the
culprit hosts. ``python -m launchers.faults culprit DIR`` prints the node to exclude from the requeued job:
the hang report's first culprit host, else the host of the rank that died first (the ranks that fail after
it lost a peer), else nothing.

A rank that stops on purpose (``hgscale.core.status.STOPS``: 2 config or data error, 3 NaN loss) writes
``stop-rank00003.json``: srun then kills the other ranks, and its own exit status may be theirs (143) rather than
the first one's, so ``python -m launchers.faults stop-status DIR`` tells the script that the attempt stopped, not
crashed. ``python -m launchers.faults status DIR`` also names an outage: INFRA (5) when the first rank to fail
exited with it (storage unreachable after retries, an upload that failed), so the job is requeued without
excluding a node. A record that cannot be read (cut short, hand-edited) is left out.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

from hgscale.core.status import INFRA, STOPS, USER_ERROR, deciding


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
    """Write the record of a rank that stopped on purpose (a status in STOPS)."""
    return _record("stop", rank, status, events_dir)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _records(events_dir: str | Path, kind: str) -> list[dict]:
    """The readable records of one kind: a JSON object with an integer status, a numeric time and a host."""
    out = []
    for f in Path(events_dir).glob(f"{kind}-rank*.json"):
        try:
            rec = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        if (isinstance(rec, dict) and _is_int(rec.get("status")) and isinstance(rec.get("host"), str)
                and isinstance(rec.get("time"), (int, float)) and not isinstance(rec.get("time"), bool)):
            out.append(rec)
    return out


def _first(records: list[dict]) -> dict | None:
    return min(records, key=lambda c: c["time"]) if records else None


def stop_status(events_dir: str | Path) -> int | None:
    """The status of the first rank that stopped on purpose in this attempt, else None."""
    first = _first([r for r in _records(events_dir, "stop") if r["status"] in STOPS])
    return first["status"] if first else None


def attempt_status(events_dir: str | Path) -> int | None:
    """The status the ranks' records give this attempt (:func:`hgscale.core.status.deciding`): a deliberate stop's,
    else INFRA when a rank exited INFRA, even after a peer that lost it (srun may report the status of the ranks it
    killed instead); else None (srun's status stands)."""
    records = sorted(_records(events_dir, "stop") + _records(events_dir, "crash"), key=lambda r: r["time"])
    status = deciding([r["status"] for r in records])
    return status if status in STOPS or status == INFRA else None


def culprit(events_dir: str | Path) -> str | None:
    """The node to exclude: the hang report's first culprit host, else the host of the first rank that died,
    unless that rank exited INFRA (an outage is no node's fault)."""
    d = Path(events_dir)
    try:
        hang = json.loads((d / "hang.json").read_text()) if (d / "hang.json").is_file() else None
    except (OSError, ValueError):
        hang = None  # cut short: the crash records decide
    if isinstance(hang, dict):
        listed = hang.get("culprit_hosts")
        hosts = [h for h in listed if isinstance(h, str) and h] if isinstance(listed, list) else []
        return hosts[0].split(".")[0] if hosts else None
    crashes = _records(d, "crash")
    if attempt_status(d) == INFRA:  # an outage is no node's fault, whichever rank failed first
        return None
    first = _first(crashes)
    return first["host"] if first else None


COMMANDS = {"culprit": culprit, "stop-status": stop_status, "status": attempt_status}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] not in COMMANDS:
        print(f"usage: python -m launchers.faults {'|'.join(COMMANDS)} EVENTS_DIR", file=sys.stderr)
        return USER_ERROR
    found = COMMANDS[argv[0]](argv[1])
    if found is not None:
        print(found)
    return 0


if __name__ == "__main__":
    sys.exit(main())
