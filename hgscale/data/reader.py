"""The producer side of a stream: the windows one worker of one data-parallel rank cuts for each global batch.

The order itself is order.py's (the same for every layout). A worker handles the lanes ``lane % num_workers
== worker`` of its rank's share of each batch and sends one message per global batch: the windows and
their slots in the rank's share, so the main process assembles the share in a fixed order whatever the
timing. Within a lane the windows a rank needs come in increasing order: the worker holds one group of
each lane it reads and never reads a group twice.

    shard s:  tokens = concat(samples in file order)           # text: the original contiguous stream
              windows of seq_len + 1 tokens at stride seq_len  # labels are inputs shifted by one
              text:   a random start offset in [0, seq_len) per (seed, e, s), windows in random order
              images: images in random order, the stream wraps by one token so every pixel is a label
    group:    shuffle_shards shards of one lane, their windows shuffled together

A corrupt shard skipped under data.on_corrupt='skip' keeps its slots in the order (every rank plans with
the manifest's counts): they are filled, cycling, with windows of its group's good shards, or of the next
good shard of the split. This module imports no torch: spawned workers start fast.
"""
from __future__ import annotations

import os
import queue as queue_mod
import threading
from typing import Callable, Iterator

import numpy as np

from .order import EpochPlan, _rng
from .shards import CorruptShard, load_shard
from .storage import DataError, join


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

    def __init__(self, spec: dict, stats: dict, events: list[str]):
        self.spec, self.stats, self.events = spec, stats, events

    def _note_retry(self, msg: str) -> None:
        self.stats["retries"] += 1
        self.events.append(msg)

    def shard(self, epoch: int, idx: int) -> tuple[np.ndarray, np.ndarray] | None:
        """(tokens, window starts) of shard ``idx`` in ``epoch``; None for a skipped corrupt shard."""
        spec = self.spec
        shard = spec["shards"][idx]
        try:
            samples = load_shard(spec["root"], shard, spec["dtype"], spec["opts"], self._note_retry)
        except CorruptShard as e:
            if spec["on_corrupt"] != "skip":
                raise
            self.stats["skipped_shards"] += 1
            self.events.append(f"skipped shard {join(spec['root'], shard['path'])} (data.on_corrupt='skip'; "
                               f"{self.stats['skipped_shards']} skipped so far): {e}")
            return None
        rng = _rng(spec["seed"], epoch, idx, 0xD17A) if spec["shuffle"] else None
        return window_starts(samples, spec["seq_len"], int(spec.get("image_tokens") or 0), rng)

    def group(self, plan: EpochPlan, shards: list[int]) -> tuple[list[np.ndarray], np.ndarray]:
        """Token streams and the (piece, start) of every window of a group, in the plan's order."""
        pieces, refs, missing = [], [], []
        for idx in shards:
            got = self.shard(plan.epoch, idx)
            if got is None:
                missing.append(idx)
                continue
            tokens, starts = got
            refs.append(np.stack([np.full(len(starts), len(pieces), np.int64), starts], 1))  # (n, 2)
            pieces.append(tokens)
        good = np.concatenate(refs) if refs else np.zeros((0, 2), np.int64)
        need = sum(plan.counts[i] for i in missing)
        if need:
            if not len(good):
                pieces, good = self._substitute(plan, shards[-1])
            refs.append(good[np.arange(need) % len(good)])  # the skipped shards' slots, cycling
        out = np.concatenate(refs) if refs else np.zeros((0, 2), np.int64)
        if self.spec["shuffle"] and len(out):
            out = out[_rng(self.spec["seed"], plan.epoch, shards[0], 0x6A0F).permutation(len(out))]
        return pieces, out

    def _substitute(self, plan: EpochPlan, after: int) -> tuple[list[np.ndarray], np.ndarray]:
        n = len(self.spec["shards"])
        for k in range(1, n):
            got = self.shard(plan.epoch, (after + k) % n)
            if got is not None and len(got[1]):
                return [got[0]], np.stack([np.zeros(len(got[1]), np.int64), got[1]], 1)
        spec = self.spec
        raise DataError(f"worker {spec['worker']} of data-parallel rank {spec['dp_rank']} read a whole epoch of split "
                        f"{spec['split']!r} of {spec['root']} without one window of data.seq_len + 1 = "
                        f"{spec['seq_len'] + 1} tokens (shards too small or all skipped); lower data.seq_len or "
                        f"re-shard")


class _Lane:
    """The group of one lane a worker currently holds."""

    def __init__(self, reader: _Reader, plan: EpochPlan, lane: int):
        self.reader, self.plan, self.lane, self.group = reader, plan, lane, -1

    def window(self, index: int, width: int) -> np.ndarray:
        g, pos = self.plan.locate(self.lane, index)
        if g != self.group:
            self.pieces, self.refs = self.reader.group(self.plan, self.plan.groups[self.lane][g])
            self.group = g
        k, s = int(self.refs[pos, 0]), int(self.refs[pos, 1])
        return self.pieces[k][s:s + width]


def iter_batches(spec: dict, start: list[int]) -> Iterator[dict]:
    """Messages ``{"kind": "batch", "epoch", "offset", "slots", "windows": (k, seq_len + 1), "stats", "events"}``,
    one per global batch from position ``start`` = [epoch, windows of it consumed]."""
    stats = {"retries": 0, "skipped_shards": 0}
    events: list[str] = []
    reader = _Reader(spec, stats, events)
    G, width = spec["global_batch_size"], spec["seq_len"] + 1
    epoch, off = int(start[0]), int(start[1])
    while True:
        plan = EpochPlan(spec, epoch)
        end = plan.usable(G, off)
        if off == 0 and end == 0:
            raise DataError(f"split {spec['split']!r} of {spec['root']} holds {plan.windows} windows of data.seq_len "
                            f"+ 1 = {width} tokens per epoch, fewer than one global batch of {G}: lower the batch "
                            f"size or data.seq_len")
        lanes: dict[int, _Lane] = {}
        while off < end:
            slots = plan.rank_slots(off, G, spec["dp_rank"], spec["dp_size"])  # (G/D, 2)
            mine = np.flatnonzero(slots[:, 0] % spec["num_workers"] == spec["worker"])
            rows = [lanes.setdefault(int(lane), _Lane(reader, plan, int(lane))).window(int(i), width)
                    for lane, i in slots[mine]]
            windows = np.stack(rows) if rows else np.zeros((0, width), np.int64)
            yield {"kind": "batch", "epoch": epoch, "offset": off, "slots": mine, "windows": windows,
                   "stats": dict(stats), "events": events[:]}
            events.clear()
            off += G
        epoch, off = epoch + 1, 0


def produce(spec: dict, start: list[int], put: Callable[[dict], bool]) -> None:
    """Run a worker: put batch messages until ``put`` says stop; errors become one message."""
    try:
        for msg in iter_batches(spec, start):
            if not put(msg):
                return
    except DataError as e:
        put({"kind": "error", "message": str(e)})
    except BaseException as e:  # noqa: BLE001 - reported to the main process, which raises it
        import traceback
        put({"kind": "error", "message": f"data worker {spec['worker']} failed: {type(e).__name__}: {e}",
             "traceback": traceback.format_exc()})


def _putter(q, stop) -> Callable[[dict], bool]:
    def put(msg: dict) -> bool:
        while not stop.is_set():
            try:
                q.put(msg, timeout=0.1)
                return True
            except queue_mod.Full:
                continue
        return False
    return put


def worker_main(spec: dict, start: list[int], q, stop, env: dict) -> None:
    """Entry point of a worker process. ``env``: the AWS_* variables of the stream's process now (a
    forkserver child would otherwise see those of the moment the server started)."""
    for k in [k for k in os.environ if k.startswith("AWS_")]:
        del os.environ[k]
    os.environ.update(env)
    produce(spec, start, _putter(q, stop))
    if stop.is_set():
        q.cancel_join_thread()  # the main process stopped reading: exit without flushing


def start_thread(spec: dict, start: list[int], maxsize: int):
    """In-process producer (num_workers = 0): a prefetching thread. Returns (queue, stop, thread)."""
    q: queue_mod.Queue = queue_mod.Queue(maxsize=maxsize)
    stop = threading.Event()
    t = threading.Thread(target=produce, args=(spec, start, _putter(q, stop)), daemon=True,
                         name=f"hgscale-data-{spec['split']}")
    t.start()
    return q, stop, t
