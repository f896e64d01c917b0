"""The producer side of a stream: the windows one worker of one data-parallel rank cuts for each global batch.

The order itself is order.py's (the same for every layout). A worker handles the lanes ``lane % num_workers
== worker`` of its rank's share of each batch and sends one message per global batch: the windows and
their slots in the rank's share, so the main process assembles the share in a fixed order whatever the
timing. Within a lane the windows a rank needs come in increasing order: the worker holds the shards of
one block of each lane it reads and never reads a shard of a lane twice.

    shard s:  tokens = concat(samples in file order)           # text: the original contiguous stream
              windows of seq_len + 1 tokens at stride seq_len  # labels are inputs shifted by one
              text:   a random start offset in [0, seq_len) per (seed, e, s), windows in random order
              images: images in random order, the stream wraps by one token so every pixel is a label
    block:    shuffle_shards shards' worth of a lane's windows, shuffled together

A corrupt shard skipped under data.on_corrupt='skip' keeps its slots in the order (every rank plans with
the manifest's counts): they are filled, cycling, with the windows of the next good shard of the epoch.
This module imports no torch: spawned workers start fast.
"""
from __future__ import annotations

import os
import queue as queue_mod
import signal
import threading
from typing import Callable, Iterator

import numpy as np

from .errors import DataError
from .io import StorageError, StorageUnavailable, join
from .order import EpochPlan, _rng
from .records import Batch, StreamSpec, WorkerError
from .shards import CorruptShard, load_shard


def window_starts(samples: list[np.ndarray], seq_len: int, image_tokens: int, rng: np.random.Generator | None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(token stream, window start offsets) of one shard; each window is ``seq_len + 1`` tokens.

    ``image_tokens`` > 0: samples hold whole images of that many tokens, shuffled one by one.
    ``rng`` None keeps file order (shuffle off). order.shard_windows counts them without reading."""
    if image_tokens:
        if not samples:
            return np.zeros(0, np.uint8), np.zeros(0, np.int64)
        images = np.concatenate(samples).reshape(-1, image_tokens)  # (N_images, H*W*3)
        if rng is not None:
            images = images[rng.permutation(len(images))]
        flat = images.reshape(-1)
        tokens = np.concatenate([flat, flat[:1]])  # wrap: the last pixel is a label too
        n = (len(tokens) - 1) // seq_len
        starts = np.arange(n, dtype=np.int64) * seq_len
        return tokens, starts
    tokens = np.concatenate(samples) if samples else np.zeros(0, np.uint8)
    offset = int(rng.integers(0, seq_len)) if rng is not None else 0
    n = max(0, (len(tokens) - offset - 1) // seq_len)
    starts = offset + np.arange(n, dtype=np.int64) * seq_len
    if rng is not None:
        starts = rng.permutation(starts)
    return tokens, starts


class _Reader:
    """Loads shards for one worker, counting retries and skipped corrupt shards."""

    def __init__(self, spec: StreamSpec, stats: dict, events: list[str]):
        self.spec, self.stats, self.events = spec, stats, events

    def _note_retry(self, msg: str) -> None:
        self.stats["retries"] += 1
        self.events.append(msg)

    def shard(self, epoch: int, idx: int) -> tuple[np.ndarray, np.ndarray] | None:
        """(tokens, window starts) of shard ``idx`` in ``epoch``; None for a skipped corrupt shard."""
        spec = self.spec
        shard = spec.shards[idx]
        try:
            samples = load_shard(spec.root, shard, spec.dtype, spec.opts, self._note_retry)
        except CorruptShard as e:
            if spec.on_corrupt != "skip":
                raise
            self.stats["skipped_shards"] += 1
            self.events.append(f"skipped shard {join(spec.root, shard['path'])} (data.on_corrupt='skip'; "
                               f"{self.stats['skipped_shards']} skipped so far): {e}")
            return None
        rng = _rng(spec.seed, epoch, idx, 0xD17A) if spec.shuffle else None
        return window_starts(samples, spec.seq_len, spec.image_tokens, rng)

    def windows_of(self, plan: EpochPlan, idx: int) -> tuple[np.ndarray, np.ndarray]:
        """(tokens, window starts) of shard ``idx``, or of the next good shard in the epoch's order when it is
        skipped as corrupt (its windows then fill the skipped one's slots, cycling)."""
        got = self.shard(plan.epoch, idx)
        if got is not None:
            if len(got[1]) != plan.counts[idx]:
                raise DataError(f"shard {join(self.spec.root, self.spec.shards[idx]['path'])} yields "
                                f"{len(got[1])} windows, the manifest's token count {plan.counts[idx]}: re-create "
                                f"the dataset")
            return got
        where = int(np.flatnonzero(plan.order == idx)[0])
        n = len(plan.order)
        for k in range(1, n):
            got = self.shard(plan.epoch, int(plan.order[(where + k) % n]))
            if got is not None and len(got[1]):
                return got
        spec = self.spec
        raise DataError(f"worker {spec.worker} of data-parallel rank {spec.dp_rank} read a whole epoch of split "
                        f"{spec.split!r} of {spec.root} without one window of data.seq_len + 1 = "
                        f"{spec.seq_len + 1} tokens (shards too small or all skipped); lower data.seq_len or "
                        f"re-shard")


class _Lane:
    """The shards of the current block of one lane that a worker holds (a shard that the next block also
    needs is kept, not read again)."""

    def __init__(self, reader: _Reader, plan: EpochPlan, lane: int):
        self.reader, self.plan, self.lane, self.j = reader, plan, lane, -1
        self.loaded: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def window(self, index: int, width: int) -> np.ndarray:
        plan = self.plan
        j, i = divmod(index, plan.block)
        if j != self.j:
            need = plan.block_shards(self.lane, j)
            self.loaded = {s: self.loaded[s] if s in self.loaded else self.reader.windows_of(plan, s) for s in need}
            self.perm, self.j = plan.block_perm(self.lane, j), j
        shard, w = plan.source(self.lane, j, int(self.perm[i]))
        tokens, starts = self.loaded[shard]
        start = int(starts[w % len(starts)])  # the modulo only matters for a skipped shard's substitute
        return tokens[start:start + width]


def iter_batches(spec: StreamSpec, start: list[int]) -> Iterator[Batch]:
    """This worker's :class:`Batch` of each global batch from position ``start`` = [epoch, windows of it consumed]."""
    stats = {"retries": 0, "skipped_shards": 0}
    events: list[str] = []
    reader = _Reader(spec, stats, events)
    G, width = spec.global_batch_size, spec.seq_len + 1
    epoch, off = int(start[0]), int(start[1])
    while True:
        plan = EpochPlan(spec, epoch)
        end = plan.usable(G, off)
        if off == 0 and end == 0:
            raise DataError(f"split {spec.split!r} of {spec.root} holds {plan.windows} windows of data.seq_len "
                            f"+ 1 = {width} tokens per epoch, fewer than one global batch of {G}: lower the batch "
                            f"size or data.seq_len")
        lanes: dict[int, _Lane] = {}
        while off < end:
            slots = plan.rank_slots(off, G, spec.dp_rank, spec.dp_size)  # (G/D, 2)
            mine = np.flatnonzero(slots[:, 0] % spec.num_workers == spec.worker)
            rows = [lanes.setdefault(int(lane), _Lane(reader, plan, int(lane))).window(int(i), width)
                    for lane, i in slots[mine]]
            windows = np.stack(rows) if rows else np.zeros((0, width), np.int64)
            yield Batch(epoch, off, mine, windows, dict(stats), events[:])
            events.clear()
            off += G
        epoch, off = epoch + 1, 0


def produce(spec: StreamSpec, start: list[int], put: Callable[[Batch | WorkerError], bool]) -> None:
    """Run a worker: put batch messages until ``put`` says stop; errors become one message."""
    try:
        for msg in iter_batches(spec, start):
            if not put(msg):
                return
    except StorageError as e:
        put(WorkerError(str(e), outage=isinstance(e, StorageUnavailable)))
    except BaseException as e:  # noqa: BLE001 - reported to the main process, which raises it
        import traceback
        put(WorkerError(f"data worker {spec.worker} failed: {type(e).__name__}: {e}", traceback.format_exc()))


def _putter(q, stop) -> Callable[[Batch | WorkerError], bool]:
    def put(msg: Batch | WorkerError) -> bool:
        while not stop.is_set():
            try:
                q.put(msg, timeout=0.1)
                return True
            except queue_mod.Full:
                continue
        return False
    return put


def worker_main(spec: StreamSpec, start: list[int], q, stop, env: dict) -> None:
    """Entry point of a worker process. ``env``: the AWS_* variables of the stream's process now (a
    forkserver child would otherwise see those of the moment the server started)."""
    # Slurm's SIGTERM (scancel, the time limit) reaches every process of a job step: the trainer checkpoints on it
    # and then stops this worker; a spawned interpreter unblocks SIGTERM at start-up, so ignore it here as well
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    for k in [k for k in os.environ if k.startswith("AWS_")]:
        del os.environ[k]
    os.environ.update(env)
    produce(spec, start, _putter(q, stop))
    if stop.is_set():
        q.cancel_join_thread()  # the main process stopped reading: exit without flushing


def start_thread(spec: StreamSpec, start: list[int], maxsize: int):
    """In-process producer (num_workers = 0): a prefetching thread. Returns (queue, stop, thread)."""
    q: queue_mod.Queue = queue_mod.Queue(maxsize=maxsize)
    stop = threading.Event()
    t = threading.Thread(target=produce, args=(spec, start, _putter(q, stop)), daemon=True,
                         name=f"hgscale-data-{spec.split}")
    t.start()
    return q, stop, t
