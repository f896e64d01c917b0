"""A resumable, prefetching stream of ``(inputs, labels)`` micro-batches for one data-parallel rank.

    stream = ds.stream("train", micro_batch_size=8, seq_len=2048, dp_rank=r, dp_size=n, seed=1234)
    for inputs, labels in stream: ...          # LongTensor (B, T) each; labels = inputs shifted by one
    state = stream.state_dict()                # position after the last batch yielded (JSON-able)
    stream.load_state_dict(state)              # the next batches are exactly those that would have come

Workers: ``num_workers`` processes, started from a fork server (or spawned; never forked from the
trainer: s3fs is not fork-safe), each produce the batches of their own shards (reader.py); the main
process takes batch i from worker i mod num_workers, so the order never depends on timing. Each
batch carries its worker's cursor, and the state is ``{next_worker, cursors[w]}`` as of the last
batch handed out: batches prefetched but not yet yielded are simply produced again after a resume.
``num_workers = 0`` runs one producer in a prefetching thread of this process and gives the same
batches as one worker process.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import multiprocessing as mp
import os
import queue as queue_mod
import signal
import sys
from typing import Iterator

from .reader import start_thread, worker_main
from .storage import DataError

log = logging.getLogger("hgscale.data")

STATE_VERSION = 1
# everything a cursor's meaning depends on: a state saved with other values cannot resume exactly
_FIXED = ("split", "seed", "shuffle", "shuffle_shards", "dp_rank", "dp_size", "num_workers", "micro_batch_size",
          "seq_len")
START_METHODS = ("forkserver", "spawn")


def check_start_method(method: str) -> None:
    if method not in START_METHODS:
        raise DataError(f"data.worker_start_method = {method!r} is not one of {', '.join(START_METHODS)} "
                        f"(fork is unsafe with s3fs)")


@contextlib.contextmanager
def _preemption_signals_blocked():
    """Workers (and the fork server and resource tracker started with the first of them) inherit a
    signal mask blocking SIGUSR1/SIGUSR2: Slurm signals every process of a job step on preemption,
    and only the trainer should act on it (checkpoint, then stop its workers). In this process the
    signals are only held while workers start, and delivered on unblocking."""
    sigs = {signal.SIGUSR1, signal.SIGUSR2}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


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
    def __init__(self, spec: dict, num_workers: int, prefetch_batches: int = 4, start_method: str = "forkserver"):
        self._spec = spec  # everything but worker id/count (see reader.iter_windows)
        self._workers = max(0, int(num_workers))
        self._n = max(1, self._workers)
        self._prefetch = max(1, int(prefetch_batches))
        if self._workers:
            check_start_method(start_method)
        self._start_method = start_method
        n_shards = len(spec["shards"])
        if n_shards < spec["dp_size"] * self._n:
            raise DataError(f"split {spec['split']!r} of {spec['root']} has {n_shards} shard(s), fewer than "
                            f"{spec['dp_size']} data-parallel rank(s) x {self._n} worker(s) = "
                            f"{spec['dp_size'] * self._n}; use fewer data.num_workers or re-shard the dataset "
                            f"into more shards")
        self._state = {"version": STATE_VERSION, **{k: spec[k] for k in _FIXED if k != "num_workers"},
                       "num_workers": self._n, "next_worker": 0, "cursors": [[0, 0, 0] for _ in range(self._n)]}
        self._stats = [{"retries": 0, "skipped_shards": 0} for _ in range(self._n)]  # of the active iterator
        self._stats_before = {"retries": 0, "skipped_shards": 0}  # of earlier iterators
        self._active: Iterator | None = None

    # ------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        """Position after the last batch yielded: small, JSON-able."""
        return copy.deepcopy(self._state)

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise DataError(f"data stream state {str(state)[:80]!r} is not a version-{STATE_VERSION} stream state")
        differ = [f"{k} {state.get(k)!r} -> {self._state[k]!r}" for k in _FIXED if state.get(k) != self._state[k]]
        self.close()
        if not differ:
            self._state = copy.deepcopy(state)
            return
        # A changed layout changes the data order: an exact resume is impossible. Restart at the
        # beginning of the earliest epoch any worker was in, rather than refusing to train.
        epoch = min((c[0] for c in state.get("cursors") or []), default=0)
        log.warning("data stream state was saved with a different layout (%s): resuming at the start of epoch %d "
                    "instead of the exact position", ", ".join(differ), epoch)
        self._state["next_worker"] = 0
        self._state["cursors"] = [[epoch, 0, 0] for _ in range(self._n)]

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
        try:
            while True:
                i = self._state["next_worker"]
                msg = self._get(queues[i], handles[i], i)
                if msg["kind"] == "error":
                    if msg.get("traceback"):
                        log.error("data worker %d: %s", i, msg["traceback"])
                    raise DataError(msg["message"])
                for event in msg["events"]:
                    log.warning("%s", event)
                self._stats[i] = msg["stats"]
                windows = torch.from_numpy(msg["windows"].astype(np.int64, copy=False))  # (B, T + 1)
                self._state["cursors"][i] = msg["cursor"]
                self._state["next_worker"] = (i + 1) % self._n
                yield windows[:, :-1].contiguous(), windows[:, 1:].contiguous()
        finally:
            self._stop(queues, stops, handles)

    def _spec_for(self, w: int) -> dict:
        return {**self._spec, "worker": w, "num_workers": self._n}

    def _start(self):
        cursors = self._state["cursors"]
        if self._workers == 0:
            q, stop, t = start_thread(self._spec_for(0), cursors[0], self._prefetch)
            return [q], [stop], [t]
        ctx = mp.get_context(self._start_method)
        if self._start_method == "forkserver":
            # the server imports the reader (numpy, fsspec, s3fs) once; workers fork from it in
            # milliseconds. It creates no s3fs client or event loop, so the forks are clean.
            ctx.set_forkserver_preload(["hgscale.data.reader", "s3fs"])
        queues, stops, procs = [], [], []
        with _main_not_reimported(), _preemption_signals_blocked():
            for w in range(self._n):
                q, stop = ctx.Queue(maxsize=self._prefetch), ctx.Event()
                env = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
                p = ctx.Process(target=worker_main, args=(self._spec_for(w), cursors[w], q, stop, env), daemon=True,
                                name=f"hgscale-data-{self._spec['split']}-{w}")
                p.start()
                queues.append(q), stops.append(stop), procs.append(p)
        return queues, stops, procs

    @staticmethod
    def _get(q, handle, i: int) -> dict:
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
        for q, h in zip(queues, handles):
            if isinstance(h, mp.process.BaseProcess):
                h.join(timeout=3)
                if h.is_alive():
                    h.terminate()
                    h.join(timeout=3)
                q.cancel_join_thread()
                q.close()
            else:
                h.join(timeout=3)
