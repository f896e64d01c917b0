"""A resumable, prefetching stream of ``(inputs, labels)`` micro-batches for one data-parallel rank.

    stream = ds.stream("train", micro_batch_size=8, seq_len=2048, dp_rank=r, dp_size=n, seed=1234,
                       global_batch_size=64)   # default micro_batch_size x dp_size
    for inputs, labels in stream: ...          # LongTensor (B, T) each; labels = inputs shifted by one
    state = stream.state_dict()                # position after the last batch yielded (JSON-able)
    stream.load_state_dict(state)              # the next batches are exactly those that would have come

The windows of global batch j are fixed by the dataset, seed, shuffle settings, seq_len and the global
batch size (order.py); this rank yields its G / dp_size of them as G / (dp_size x micro_batch_size)
micro-batches. The state is a position in that one order, (epoch, windows of it consumed, micro-batches
of the current batch yielded): the same on every rank, and valid for any other layout, which resumes
exactly there; a state saved at a batch boundary also resumes with another global batch size.

Workers: ``num_workers`` processes, started from a fork server (or spawned; never forked from the
trainer: s3fs is not fork-safe), each cut the windows of their lanes (reader.py); each sends one message
per global batch and the main process assembles them in slot order, so the batches never depend on
timing or on the number of workers. Batches prefetched but not yet yielded are produced again after a
resume. ``num_workers = 0`` runs one producer in a prefetching thread of this process.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import multiprocessing as mp
import os
import queue as queue_mod
import sys
from typing import Iterator

from hgscale.core.signals import stop_signals_held

from .errors import DataError, DataUnavailable
from .reader import start_thread, worker_main
from .records import Batch, StreamSpec, WorkerError

log = logging.getLogger("hgscale.data")

STATE_VERSION = 2
# everything the order depends on: a state saved with other values cannot resume exactly
_ORDER = ("split", "seed", "shuffle", "shuffle_shards", "seq_len")
# what splits a global batch into micro-batches: a state saved mid-batch needs the same values
_SPLIT = ("global_batch_size", "dp_size", "micro_batch_size")
START_METHODS = ("forkserver", "spawn")


def check_start_method(method: str) -> None:
    if method not in START_METHODS:
        raise DataError(f"data.worker_start_method = {method!r} is not one of {', '.join(START_METHODS)} "
                        f"(fork is unsafe with s3fs)")


@contextlib.contextmanager
def _main_not_reimported():
    """Spawned workers need only hgscale.data.reader; without this they would first re-run the
    launching script (a trainer importing deepspeed: seconds per worker, and a hard error in
    scripts without an ``if __name__ == "__main__"`` guard)."""
    main = sys.modules.get("__main__")
    saved = {k: getattr(main, k) for k in ("__spec__", "__file__") if main is not None and hasattr(main, k)}
    try:
        for k in saved:
            delattr(main, k) if k == "__file__" else setattr(main, k, None)
        yield
    finally:
        for k, v in saved.items():
            setattr(main, k, v)


class Stream:
    def __init__(self, spec: StreamSpec, num_workers: int, prefetch_batches: int = 4,
                 start_method: str = "forkserver"):
        self._spec = spec  # everything but worker id/count (see reader.iter_batches)
        self._workers = max(0, int(num_workers))
        self._n = max(1, self._workers)
        self._prefetch = max(1, int(prefetch_batches))
        if self._workers:
            check_start_method(start_method)
        self._start_method = start_method
        G, D, B = spec.global_batch_size, spec.dp_size, spec.micro_batch_size
        if G % (D * B):
            raise DataError(f"global batch {G} is not micro_batch_size {B} x data-parallel size {D} x an integer "
                            f"number of accumulation steps")
        self._micro_per_batch = G // (D * B)
        self._state = {"version": STATE_VERSION, **{k: getattr(spec, k) for k in _ORDER + _SPLIT}, "epoch": 0,
                       "offset": 0, "micro": 0}
        self._stats = [{"retries": 0, "skipped_shards": 0} for _ in range(self._n)]  # of the active iterator
        self._stats_before = {"retries": 0, "skipped_shards": 0}  # of earlier iterators
        self._active: Iterator | None = None

    # ------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        """Position after the last batch yielded: small, JSON-able, the same on every rank."""
        return copy.deepcopy(self._state)

    def load_state_dict(self, state: dict) -> None:
        """Continue where ``state`` was saved, by any layout; see the module doc for what must match."""
        self.close()
        if not isinstance(state, dict) or state.get("version") not in (1, STATE_VERSION):
            raise DataError(f"data stream state {str(state)[:80]!r} is not a version-{STATE_VERSION} stream state")
        here = self._state
        if state["version"] == 1:  # per-rank cursors of the order before layouts could change
            epoch = min((c[0] for c in state.get("cursors") or []), default=0)
            log.warning("data stream state of an older version: resuming at the start of epoch %d", epoch)
            here.update(epoch=epoch, offset=0, micro=0)
            return
        differ = [f"{k} {state.get(k)!r} -> {here[k]!r}" for k in _ORDER if state.get(k) != here[k]]
        if differ:
            # another order: an exact resume is impossible; restart the epoch rather than refuse to train
            log.warning("data stream state was saved with a different order (%s): resuming at the start of epoch %d "
                        "instead of the exact position", ", ".join(differ), state["epoch"])
            here.update(epoch=state["epoch"], offset=0, micro=0)
            return
        micro = int(state["micro"])
        if micro and any(state.get(k) != here[k] for k in _SPLIT):
            log.warning("data stream state was saved in the middle of a global batch by another layout: "
                        "resuming at the start of that batch")
            micro = 0
        here.update(epoch=int(state["epoch"]), offset=int(state["offset"]), micro=micro)

    @property
    def stats(self) -> dict:
        """Transient storage retries and skipped corrupt shards seen so far (all workers)."""
        return {k: self._stats_before[k] + sum(s[k] for s in self._stats) for k in ("retries", "skipped_shards")}

    # ----------------------------------------------------------------------------------- iterate
    def __iter__(self) -> Iterator:
        self.close()
        self._active = self._run()
        return self._active

    def close(self) -> None:
        """Stop the producers of the active iterator (also done when it is garbage-collected)."""
        if self._active is not None:
            self._active.close()
            self._active = None

    def _run(self):
        import numpy as np
        import torch

        self._stats_before = self.stats
        self._stats = [{"retries": 0, "skipped_shards": 0} for _ in range(self._n)]
        queues, stops, handles = self._start()
        B, width = self._spec.micro_batch_size, self._spec.seq_len + 1
        share = np.zeros((self._micro_per_batch * B, width), np.int64)  # this rank's windows of one batch
        try:
            while True:
                for i in range(self._n):  # every worker sends one message per global batch
                    msg = self._get(queues[i], handles[i], i)
                    if isinstance(msg, WorkerError):
                        if msg.traceback:
                            log.error("data worker %d: %s", i, msg.traceback)
                        raise (DataUnavailable if msg.outage else DataError)(msg.message)
                    for event in msg.events:
                        log.warning("%s", event)
                    self._stats[i] = msg.stats
                    share[msg.slots] = msg.windows
                st = self._state
                st["epoch"], st["offset"] = msg.epoch, msg.offset  # the batch being yielded
                windows = torch.from_numpy(share.copy())  # (G / D, T + 1)
                for j in range(st["micro"], self._micro_per_batch):
                    rows = windows[j * B:(j + 1) * B]
                    if j + 1 == self._micro_per_batch:  # batch done: the position is the next one
                        st.update(offset=msg.offset + self._spec.global_batch_size, micro=0)
                    else:
                        st["micro"] = j + 1
                    yield rows[:, :-1].contiguous(), rows[:, 1:].contiguous()
        finally:
            self._stop(queues, stops, handles)

    def _spec_for(self, w: int) -> StreamSpec:
        return self._spec.for_worker(w, self._n)

    def _start(self):
        start = [self._state["epoch"], self._state["offset"]]
        if self._workers == 0:
            q, stop, t = start_thread(self._spec_for(0), start, self._prefetch)
            return [q], [stop], [t]
        ctx = mp.get_context(self._start_method)
        if self._start_method == "forkserver":
            # the server imports the reader (numpy, fsspec, s3fs) once; workers fork from it in
            # milliseconds. It creates no s3fs client or event loop, so the forks are clean.
            ctx.set_forkserver_preload(["hgscale.data.reader", "s3fs"])
        queues, stops, procs = [], [], []
        with _main_not_reimported(), stop_signals_held():  # workers must outlive a stop signal
            for w in range(self._n):
                q, stop = ctx.Queue(maxsize=self._prefetch), ctx.Event()
                env = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
                p = ctx.Process(target=worker_main, args=(self._spec_for(w), start, q, stop, env), daemon=True,
                                name=f"hgscale-data-{self._spec.split}-{w}")
                p.start()
                queues.append(q), stops.append(stop), procs.append(p)
        return queues, stops, procs

    @staticmethod
    def _get(q, handle, i: int) -> Batch | WorkerError:
        while True:
            try:
                return q.get(timeout=1.0)
            except queue_mod.Empty:
                if not handle.is_alive():
                    try:  # it may have put its last message just before exiting
                        return q.get(timeout=0.5)
                    except queue_mod.Empty:
                        code = getattr(handle, "exitcode", None)
                        raise DataError(f"data worker {i} exited (exit code {code}) without sending data; "
                                        f"see its output above, or run with data.num_workers=0") from None

    @staticmethod
    def _stop(queues, stops, handles) -> None:
        for s in stops:
            s.set()
        for q, h in zip(queues, handles, strict=True):
            if isinstance(h, mp.process.BaseProcess):
                h.join(timeout=3)
                if h.is_alive():  # stuck in a read: SIGKILL (it blocks SIGTERM: hgscale.core.signals)
                    h.kill()
                    h.join(timeout=3)
                q.cancel_join_thread()
                q.close()
            else:
                h.join(timeout=3)
