"""Exit statuses of hgscale's processes, one meaning each; the trainer, ``launchers/`` and ``slurm/`` share them.

    status  name        meaning                                             what slurm/train_multinode.sh does
    0       OK          finished, or preempted with a checkpoint saved      requeues a preempted job, else done
    2       USER_ERROR  config, data or credentials wrong: one error line   stops: a rerun would fail the same way
    3       NAN         the loss became NaN/Inf; nothing saved after it     stops: lower train.lr, then resume
    4       HANG        the watchdog found no progress (it names the rank)  requeues, excluding the culprit node
    5       INFRA       storage unreachable after retries, upload failed,   requeues with back-off, no node
                        rendezvous failed                                   excluded
    other   (crash)     a rank died (signal, OOM, bug)                      requeues, excluding the first node
                                                                            that failed

``python -m hgscale.core.status`` prints ``NAME=STATUS`` lines for the shell scripts.
"""
from __future__ import annotations

import sys

OK = 0
USER_ERROR = 2
NAN = 3
HANG = 4
INFRA = 5

STOPS = (USER_ERROR, NAN)  # deliberate stops: never requeued
NAMES = {"OK": OK, "USER_ERROR": USER_ERROR, "NAN": NAN, "HANG": HANG, "INFRA": INFRA}


class UserError(ValueError):
    """A problem the user fixes (config, data, credentials, a checkpoint): one sentence naming the thing and the
    fix. Exit status USER_ERROR."""


class InfraError(Exception):
    """Infrastructure that kept failing after every retry (storage, upload, rendezvous). Exit status INFRA."""


def status_of(exc: BaseException) -> int:
    """The exit status an error ends a process with: INFRA, USER_ERROR, or 1 for anything else (a crash)."""
    if isinstance(exc, InfraError):
        return INFRA
    return USER_ERROR if isinstance(exc, UserError) else 1


def deciding(statuses: list[int]) -> int:
    """The status of an attempt whose ranks ended with ``statuses`` (in the order they ended): a deliberate stop
    (USER_ERROR, NAN) first, then an outage (INFRA), then a hang, else the first failure. The ranks that lose a
    peer fail too, often before the one that found the cause: their status says nothing of it."""
    failed = [s for s in statuses if s != OK]
    for kind in (STOPS, (INFRA,), (HANG,)):
        found = next((s for s in failed if s in kind), None)
        if found is not None:
            return found
    return failed[0] if failed else OK


def name_of(status: int) -> str:
    """'OK', 'USER_ERROR', ... for a status, 'CRASH' for one that is none of them."""
    return next((n for n, v in NAMES.items() if v == status), "CRASH")


def main() -> int:
    for name, value in NAMES.items():
        print(f"{name}={value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
