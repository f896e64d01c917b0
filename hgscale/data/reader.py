"""The producer side of a stream: which shards a worker reads, and the windows it cuts from them.

Everything here is a pure function of (seed, epoch, shard, data-parallel rank/size, worker/count),
so a cursor ``[epoch, group_pos, window_pos]`` pins the position exactly and resume is replay-free:

    epoch e:  perm = permutation(n_shards | seed, e)          # same on every rank
              rank r takes perm[r::dp_size]                    # data-parallel rank, never global RANK
              worker w of rank r takes those[w::num_workers]   # its shard list for epoch e
    shard s:  tokens = concat(samples in file order)           # text: the original contiguous stream
              windows of seq_len + 1 tokens at stride seq_len  # labels are inputs shifted by one
              text:   a random start offset in [0, seq_len) per (seed, e, s), windows in random order
              images: images in random order, the stream wraps by one token so every pixel is a label
    group:    the worker reads its shards shuffle_shards at a time and shuffles their windows together
    batch:    the next micro_batch_size windows of the worker, across group and epoch boundaries

The stream's main process takes batches from its workers round-robin (see stream.py).
This module imports no torch: spawned workers start fast.
"""
from __future__ import annotations

import os
import queue as queue_mod
import threading
from typing import Callable, Iterator

import numpy as np

from .shards import CorruptShard, load_shard
from .storage import DataError, join


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([int(k) & 0xFFFFFFFF for k in key])


def worker_shards(n_shards: int, seed: int, epoch: int, shuffle: bool, dp_rank: int, dp_size: int,
                  worker: int, num_workers: int) -> list[int]:
    """Indices of the shards worker ``worker`` of data-parallel rank ``dp_rank`` reads in ``epoch``."""
    order = _rng(seed, epoch, 0x5EED).permutation(n_shards) if shuffle else np.arange(n_shards)
    return [int(i) for i in order[dp_rank::dp_size][worker::num_workers]]


def window_starts(samples: list[np.ndarray], seq_len: int, image_tokens: int, rng: np.random.Generator | None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(token stream, window start offsets) of one shard; each window is ``seq_len + 1`` tokens.

    ``image_tokens`` > 0: samples hold whole images of that many tokens, shuffled one by one.
    ``rng`` None keeps file order (evaluation, shuffle off)."""
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


def iter_windows(spec: dict, cursor: list[int], stats: dict, events: list[str]
                 ) -> Iterator[tuple[np.ndarray, list[int]]]:
    """Infinite (window, cursor after it) of one worker, starting at ``cursor`` = [epoch, group, window].

    The worker's shards are read ``shuffle_shards`` at a time (a group, held in memory); the windows of
    a group are shuffled together, so a batch mixes several shards."""
    shards = spec["shards"]
    epoch, gpos, wpos = cursor
    group_size = spec["shuffle_shards"]  # 1 without shuffling (Dataset.stream)

    def note_retry(msg: str) -> None:
        stats["retries"] += 1
        events.append(msg)

    while True:
        mine = worker_shards(len(shards), spec["seed"], epoch, spec["shuffle"], spec["dp_rank"], spec["dp_size"],
                             spec["worker"], spec["num_workers"])
        if not mine:
            raise DataError(f"split {spec['split']!r} of {spec['root']} has {len(shards)} shard(s): too few for "
                            f"{spec['dp_size']} data-parallel rank(s) x {spec['num_workers']} worker(s); "
                            f"use fewer data.num_workers or re-shard the dataset into more shards")
        groups = [mine[i:i + group_size] for i in range(0, len(mine), group_size)]
        produced = 0
        while gpos < len(groups):
            pieces, refs = _load_group(spec, epoch, groups[gpos], stats, events, note_retry)
            if spec["shuffle"]:
                refs = refs[_rng(spec["seed"], epoch, groups[gpos][0], 0x6A0F).permutation(len(refs))]
            for w in range(wpos, len(refs)):
                k, s = int(refs[w, 0]), int(refs[w, 1])
                produced += 1
                # after a group's last window the cursor names the next group: a resume there
                # need not download this group again only to find nothing left in it
                after = [epoch, gpos, w + 1] if w + 1 < len(refs) else [epoch, gpos + 1, 0]
                yield pieces[k][s:s + spec["seq_len"] + 1], after
            gpos, wpos = gpos + 1, 0
        if produced == 0 and cursor == [epoch, 0, 0]:
            raise DataError(f"worker {spec['worker']} of data-parallel rank {spec['dp_rank']} read a whole epoch of "
                            f"split {spec['split']!r} of {spec['root']} without one window of data.seq_len + 1 = "
                            f"{spec['seq_len'] + 1} tokens (shards too small or all skipped); lower data.seq_len "
                            f"or re-shard")
        epoch, gpos, wpos = epoch + 1, 0, 0
        cursor = [epoch, 0, 0]


def _load_group(spec: dict, epoch: int, group: list[int], stats: dict, events: list[str], note_retry
                ) -> tuple[list[np.ndarray], np.ndarray]:
    """Token streams of the group's shards and the (shard k, start) of every window, in shard order.
    Corrupt shards raise, or with data.on_corrupt='skip' are counted, reported and left out."""
    pieces, refs = [], []
    image_tokens = int(spec.get("image_tokens") or 0)
    for idx in group:
        shard = spec["shards"][idx]
        try:
            samples = load_shard(spec["root"], shard, spec["dtype"], spec["opts"], note_retry)
        except CorruptShard as e:
            if spec["on_corrupt"] != "skip":
                raise
            stats["skipped_shards"] += 1
            events.append(f"skipped shard {join(spec['root'], shard['path'])} "
                          f"(data.on_corrupt='skip'; {stats['skipped_shards']} skipped so far): {e}")
            continue
        rng = _rng(spec["seed"], epoch, idx, 0xD17A) if spec["shuffle"] else None
        tokens, starts = window_starts(samples, spec["seq_len"], image_tokens, rng)
        refs.append(np.stack([np.full(len(starts), len(pieces), np.int64), starts], 1))  # (n, 2)
        pieces.append(tokens)
    return pieces, (np.concatenate(refs) if refs else np.zeros((0, 2), np.int64))


def iter_batches(spec: dict, cursor: list[int]) -> Iterator[dict]:
    """Messages ``{"kind": "batch", "windows": (B, seq_len + 1), "cursor", "stats", "events"}``."""
    stats = {"retries": 0, "skipped_shards": 0}
    events: list[str] = []
    B, width = spec["micro_batch_size"], spec["seq_len"] + 1
    rows: list[np.ndarray] = []
    for window, after in iter_windows(spec, list(cursor), stats, events):
        rows.append(window)
        if len(rows) == B:
            yield {"kind": "batch", "windows": np.stack(rows).reshape(B, width), "cursor": after,
                   "stats": dict(stats), "events": events[:]}
            rows.clear()
            events.clear()


def produce(spec: dict, cursor: list[int], put: Callable[[dict], bool]) -> None:
    """Run a worker: put batch messages until ``put`` says stop; errors become one message."""
    try:
        for msg in iter_batches(spec, cursor):
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


def worker_main(spec: dict, cursor: list[int], q, stop, env: dict) -> None:
    """Entry point of a worker process. ``env``: the AWS_* variables of the stream's process now (a
    forkserver child would otherwise see those of the moment the server started)."""
    for k in [k for k in os.environ if k.startswith("AWS_")]:
        del os.environ[k]
    os.environ.update(env)
    produce(spec, cursor, _putter(q, stop))
    if stop.is_set():
        q.cancel_join_thread()  # the main process stopped reading: exit without flushing


def start_thread(spec: dict, cursor: list[int], maxsize: int):
    """In-process producer (num_workers = 0): a prefetching thread. Returns (queue, stop, thread)."""
    q: queue_mod.Queue = queue_mod.Queue(maxsize=maxsize)
    stop = threading.Event()
    t = threading.Thread(target=produce, args=(spec, cursor, _putter(q, stop)), daemon=True,
                         name=f"hgscale-data-{spec['split']}")
    t.start()
    return q, stop, t
