"""Typed records of the data stream: what a stream reads (``StreamSpec``) and what its workers send back
(``Batch``, ``WorkerError``). All are plain dataclasses, so they pickle to worker processes and back."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class StreamSpec:
    """One stream of one split for one data-parallel rank: everything the window order and a worker's share of
    it depend on. ``worker``/``num_workers`` are set per worker by :meth:`for_worker`."""

    root: str                 # dataset root URL
    split: str
    shards: list              # the split's manifest entries ({"path", "num_tokens", ...})
    dtype: str
    modality: str
    seq_len: int
    micro_batch_size: int
    seed: int
    shuffle: bool
    shuffle_shards: int       # shards' worth of windows per shuffle block (1 without shuffling)
    dp_rank: int
    dp_size: int
    on_corrupt: str           # 'error' or 'skip'
    image_tokens: int         # tokens per image (0 for text)
    global_batch_size: int    # windows per global batch: fixes the order for every layout
    opts: dict = field(default_factory=dict)   # fsspec storage options (no secrets: those come from the env)
    worker: int = 0
    num_workers: int = 1

    def for_worker(self, worker: int, num_workers: int) -> StreamSpec:
        return dataclasses.replace(self, worker=worker, num_workers=num_workers)


@dataclass
class Batch:
    """One worker's part of one global batch."""

    epoch: int
    offset: int               # windows of the epoch consumed before this batch
    slots: np.ndarray         # (k,) positions in this rank's share of the batch that ``windows`` fill
    windows: np.ndarray       # (k, seq_len + 1) token windows
    stats: dict               # the worker's running counters: retries, skipped_shards
    events: list              # log lines since the last batch (retries, skipped shards)


@dataclass
class WorkerError:
    message: str              # one sentence naming the shard or URL
    traceback: str | None = None   # for an unexpected failure (a bug), logged before the DataError is raised
    outage: bool = False      # storage kept failing after every retry: raised as DataUnavailable (exit INFRA)
