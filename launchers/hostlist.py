"""Slurm node lists and task counts, and the hostfile the ``deepspeed`` launcher reads.

Slurm hands a job its nodes in compressed form (``SLURM_JOB_NODELIST=gpu[01-04,07],login-a``) and
its tasks per node as ``SLURM_TASKS_PER_NODE=8(x4),4``. Both are expanded here in plain Python, so
nothing needs ``scontrol`` on the compute node:

    expand_hostlist("node[01-03,07]")      -> ["node01", "node02", "node03", "node07"]
    expand_tasks_per_node("2(x3),1")       -> [2, 2, 2, 1]
    hostfile_text(["n1", "n2"], [8, 8])    -> "n1 slots=8\\nn2 slots=8\\n"

``python -m launchers.hostlist [--nodelist LIST] [--slots N] [-o FILE]`` writes a hostfile for the
current allocation (``deepspeed --hostfile FILE``), for users who start the deepspeed launcher
inside ``salloc``; ``slurm/train_multinode.sh`` itself starts ranks with ``srun`` (see its header).
"""
from __future__ import annotations

import argparse
import os
import re
import sys

from hgscale.core.status import USER_ERROR


class HostlistError(ValueError):
    """A node list or task count string that does not follow Slurm's grammar."""


def _split_top(text: str) -> list[str]:
    """Split on commas that are not inside brackets: ``a[1,2],b`` -> ``["a[1,2]", "b"]``."""
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise HostlistError(f"node list {text!r} has a ']' without a matching '['")
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth:
        raise HostlistError(f"node list {text!r} has a '[' that is never closed")
    parts.append("".join(cur))
    return [p.strip() for p in parts if p.strip()]


def _expand_range(body: str, whole: str) -> list[str]:
    """``01-03,07`` -> ``["01", "02", "03", "07"]``; the width of the lower bound keeps zero padding."""
    out = []
    for item in body.split(","):
        item = item.strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", item)
        if not m:
            raise HostlistError(f"node list {whole!r}: range item {item!r} is not N or N-M")
        lo, hi = m.group(1), m.group(2) or m.group(1)
        if int(hi) < int(lo):
            raise HostlistError(f"node list {whole!r}: range {item!r} runs backwards")
        width = len(lo)
        out += [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    return out


def _expand_one(pattern: str, whole: str) -> list[str]:
    """One host pattern, possibly with several bracket groups (``r[1-2]n[1-2]`` is a cartesian product)."""
    m = re.search(r"\[([^\[\]]*)\]", pattern)
    if not m:
        if "[" in pattern or "]" in pattern:
            raise HostlistError(f"node list {whole!r}: unbalanced brackets in {pattern!r}")
        return [pattern]
    head, tail = pattern[:m.start()], pattern[m.end():]
    return [head + mid + rest for mid in _expand_range(m.group(1), whole) for rest in _expand_one(tail, whole)]


def expand_hostlist(text: str) -> list[str]:
    """Expand a Slurm host list expression into host names, in Slurm's order (duplicates kept)."""
    if not text or not text.strip():
        raise HostlistError("node list is empty")
    hosts = []
    for part in _split_top(text.strip()):
        hosts += _expand_one(part, text)
    return hosts


def expand_tasks_per_node(text: str) -> list[int]:
    """``SLURM_TASKS_PER_NODE`` (``"8(x2),4"``) -> one task count per node (``[8, 8, 4]``)."""
    out = []
    for item in (text or "").split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", item)
        if not m:
            raise HostlistError(f"tasks per node {text!r}: item {item!r} is not N or N(xM)")
        out += [int(m.group(1))] * int(m.group(2) or 1)
    return out


def hostfile_text(hosts: list[str], slots: list[int] | int) -> str:
    """The ``deepspeed --hostfile`` format: one ``host slots=N`` line per node."""
    if isinstance(slots, int):
        slots = [slots] * len(hosts)
    if len(slots) != len(hosts):
        raise HostlistError(f"{len(hosts)} hosts but {len(slots)} slot counts")
    return "".join(f"{h} slots={s}\n" for h, s in zip(hosts, slots, strict=True))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m launchers.hostlist",
                                 description="Write a deepspeed hostfile for a Slurm allocation.")
    ap.add_argument("--nodelist", default=os.environ.get("SLURM_JOB_NODELIST", ""),
                    help="Slurm node list (default: $SLURM_JOB_NODELIST)")
    ap.add_argument("--slots", type=int, default=0,
                    help="slots (processes) per node; default: $SLURM_TASKS_PER_NODE, else GPUs per node")
    ap.add_argument("-o", "--output", default="-", help="hostfile path ('-' prints it)")
    args = ap.parse_args(argv)
    try:
        hosts = expand_hostlist(args.nodelist)
        if args.slots:
            slots: list[int] | int = args.slots
        elif os.environ.get("SLURM_TASKS_PER_NODE"):
            slots = expand_tasks_per_node(os.environ["SLURM_TASKS_PER_NODE"])
        else:
            slots = int(os.environ.get("SLURM_GPUS_ON_NODE") or 1)
        text = hostfile_text(hosts, slots)
    except HostlistError as e:
        print(f"error: {e}; pass --nodelist like 'node[01-04]' (or run inside a Slurm allocation)", file=sys.stderr)
        return USER_ERROR
    if args.output == "-":
        sys.stdout.write(text)
    else:
        with open(args.output, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
