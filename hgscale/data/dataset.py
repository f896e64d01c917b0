"""A prepared dataset (manifest + shards) and the ways to read it.

    ds = open_dataset(cfg.data)                   # reads and checks <data.url>/manifest.json
    ds.vocab_size, ds.metric_name, ds.bits_per_nat_token   # metric = mean NLL (nats/token) x factor
    ds.stream("train", micro_batch_size, seq_len, dp_rank, dp_size, seed)   # infinite, resumable, one order
    ds.eval_batches("valid", batch_size, seq_len, dp_rank, dp_size)         # finite, in file order
    ds.split_tokens("test")                       # the whole split, for sliding-window evaluation
"""
from __future__ import annotations

import logging
from typing import Any, Iterator

import numpy as np

from . import shards as fmt
from .errors import DataError
from .io import join, storage_options
from .records import StreamSpec
from .stream import Stream, check_start_method

log = logging.getLogger("hgscale.data")

METRICS = {"text_bytes": "bpc", "text_sentencepiece": "bpc", "image": "bpd"}


def _warn(msg: str) -> None:
    """Transient storage errors on the trainer's own reads (retried) reach the log."""
    log.warning("%s", msg)


class Dataset:
    def __init__(self, root: str, manifest: dict, data_cfg: Any = None, opts: dict | None = None):
        self.root = root.rstrip("/")
        self.manifest = manifest
        self.cfg = data_cfg
        self.opts = opts or storage_options(data_cfg)

    # ---------------------------------------------------------------------------------- facts
    @property
    def vocab_size(self) -> int:
        return int(self.manifest["vocab_size"])

    @property
    def modality(self) -> str:
        return self.manifest["modality"]

    @property
    def metric_name(self) -> str:
        """'bpc' (bits per byte of text, SentencePiece included) or 'bpd' (bits per sub-pixel)."""
        return METRICS[self.modality]

    @property
    def bits_per_nat_token(self) -> float:
        """metric = mean NLL in nats per token x this (1/ln 2 / bytes-per-token over the whole dataset)."""
        return fmt.bits_per_nat_token(self.manifest)

    def bits_per_nat_token_for(self, split: str) -> float:
        """The same factor from one split's own bytes per token (SentencePiece: exact bpc of that split)."""
        s = self._split(split)
        if self.modality == "text_sentencepiece" and s.get("num_bytes"):
            return fmt.bits_per_nat_token({"bytes_per_token": s["num_bytes"] / s["num_tokens"]})
        return self.bits_per_nat_token

    @property
    def tokenizer_url(self) -> str | None:
        tok = self.manifest.get("tokenizer")
        return join(self.root, tok) if tok else None

    @property
    def splits(self) -> list[str]:
        return list(self.manifest["splits"])

    def num_tokens(self, split: str) -> int:
        return int(self._split(split)["num_tokens"])

    def _split(self, split: str) -> dict:
        try:
            return self.manifest["splits"][split]
        except KeyError:
            raise DataError(f"dataset {self.root} has no split {split!r}; it has {', '.join(self.splits)} "
                            f"(set data.train_split / valid_split / test_split)") from None

    def _cfg(self, name: str, default):
        return getattr(self.cfg, name, default) if self.cfg is not None else default

    # --------------------------------------------------------------------------------- reading
    def stream(self, split: str, micro_batch_size: int, seq_len: int, dp_rank: int = 0, dp_size: int = 1,
               seed: int | None = None, num_workers: int | None = None, shuffle: bool | None = None,
               global_batch_size: int | None = None) -> Stream:
        """Infinite, deterministic, resumable (inputs, labels) LongTensor (B, T) batches of one DP rank: its
        share of each global batch (default micro_batch_size x dp_size windows), whose windows do not depend
        on dp_size, the workers or pipeline stages (see order.py)."""
        if not 0 <= dp_rank < dp_size:
            raise DataError(f"data-parallel rank {dp_rank} is not in [0, {dp_size})")
        if micro_batch_size < 1 or seq_len < 1:
            raise DataError(f"micro_batch_size = {micro_batch_size} and seq_len = {seq_len} must be >= 1")
        shuffle = bool(self._cfg("shuffle", True) if shuffle is None else shuffle)
        spec = StreamSpec(
            root=self.root, split=split, shards=self._split(split)["shards"], dtype=self.manifest["dtype"],
            modality=self.modality, seq_len=int(seq_len), micro_batch_size=int(micro_batch_size),
            seed=int(self._cfg("seed", 1234) if seed is None else seed), shuffle=shuffle,
            shuffle_shards=max(1, int(self._cfg("shuffle_shards", 4))) if shuffle else 1,  # shards per group
            dp_rank=int(dp_rank), dp_size=int(dp_size), on_corrupt=self._cfg("on_corrupt", "error"),
            image_tokens=int(self.manifest.get("sample_tokens") or 0) if self.modality == "image" else 0,
            global_batch_size=int(global_batch_size or micro_batch_size * dp_size), opts=self.opts)
        workers = self._cfg("num_workers", 0) if num_workers is None else num_workers
        return Stream(spec, workers, self._cfg("prefetch_batches", 4), self._cfg("worker_start_method", "forkserver"))

    def iter_split(self, split: str) -> Iterator[np.ndarray]:
        """Token arrays of every shard of ``split`` in file order (one shard in memory at a time)."""
        for shard in self._split(split)["shards"]:
            samples = fmt.load_shard(self.root, shard, self.manifest["dtype"], self.opts, _warn)
            yield np.concatenate(samples) if samples else np.zeros(0, self.manifest["dtype"])

    def split_tokens(self, split: str):
        """The whole split as one 1-D LongTensor, in file order."""
        import torch
        parts = list(self.iter_split(split))
        arr = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        return torch.from_numpy(arr.astype(np.int64))

    def eval_windows(self, split: str, seq_len: int) -> int:
        """Windows of seq_len + 1 tokens (stride seq_len) in ``split``; images wrap by one token."""
        n = self.num_tokens(split)
        return n // seq_len if self.modality == "image" else max(0, (n - 1) // seq_len)

    #: (name, weight, dataset) per source of a mixture; None for one dataset
    sources = None

    def eval_sets(self, split: str, batch_size: int, seq_len: int, dp_rank: int = 0, dp_size: int = 1,
                  max_batches: int | None = None) -> list[tuple[None, list, float]]:
        """[(None, this rank's validation batches, bits per nat-token)]: the mixture interface for one dataset."""
        return [(None, list(self.eval_batches(split, batch_size, seq_len, dp_rank, dp_size, max_batches)),
                 self.bits_per_nat_token_for(split))]

    def eval_batches(self, split: str, batch_size: int, seq_len: int, dp_rank: int = 0, dp_size: int = 1,
                     max_batches: int | None = None) -> Iterator:
        """Finite, deterministic (inputs, labels) batches of ``split`` in file order.

        Window i goes to rank i mod dp_size; every rank yields the same number of full batches (so
        collectives over them never hang) and the same shapes (so pipelines can run them)."""
        import torch
        per_rank = self.eval_windows(split, seq_len) // dp_size
        n_batches = per_rank // batch_size
        if max_batches is not None:
            n_batches = min(n_batches, int(max_batches))
        if n_batches == 0 and (max_batches is None or max_batches > 0):
            raise DataError(f"split {split!r} of {self.root} ({self.num_tokens(split)} tokens) has no full batch of "
                            f"{batch_size} x {dp_size} rank(s) windows of {seq_len} + 1 tokens; lower the eval batch "
                            f"size or data.seq_len")
        wanted = n_batches * batch_size * dp_size  # windows consumed, all ranks together
        rows: list[np.ndarray] = []
        for window_idx, window in enumerate(self._iter_eval_windows(split, seq_len)):
            if window_idx >= wanted:
                break
            if window_idx % dp_size == dp_rank:
                rows.append(window)
                if len(rows) == batch_size:
                    t = torch.from_numpy(np.stack(rows).astype(np.int64))  # (B, T + 1)
                    rows.clear()
                    yield t[:, :-1].contiguous(), t[:, 1:].contiguous()

    def _iter_eval_windows(self, split: str, seq_len: int) -> Iterator[np.ndarray]:
        first: np.ndarray | None = None
        buf = np.zeros(0, self.manifest["dtype"])
        for part in self.iter_split(split):
            if first is None and len(part):
                first = part[:1].copy()
            buf = np.concatenate([buf, part])
            while len(buf) >= seq_len + 1:
                yield buf[:seq_len + 1]
                buf = buf[seq_len:]
        if self.modality == "image" and first is not None and len(buf) == seq_len:
            yield np.concatenate([buf, first])  # every pixel of the split is a label exactly once


def open_dataset(data_cfg: Any, verify_checksums: bool | None = None) -> Dataset:
    """Open the dataset at ``data_cfg.url``: read and check the manifest; check that every shard exists
    with its recorded size (``data.verify_manifest``) and, optionally, every checksum and count
    (``data.verify_checksums``). Problems raise DataError naming the URL, before training starts.
    ``data.mixture`` (and no url) opens every source and returns a :class:`~hgscale.data.mixture.Mixture`."""
    if getattr(data_cfg, "mixture", None) and not data_cfg.url:
        from .mixture import open_mixture
        return open_mixture(data_cfg, lambda sub: open_dataset(sub, verify_checksums))
    root = (data_cfg.url or "").rstrip("/")
    check_start_method(getattr(data_cfg, "worker_start_method", "forkserver"))  # before any download
    opts = storage_options(data_cfg)
    manifest = fmt.load_manifest(root, opts, _warn)
    if getattr(data_cfg, "verify_manifest", True):
        fmt.verify_sizes(root, manifest, opts, _warn)
    full = getattr(data_cfg, "verify_checksums", False) if verify_checksums is None else verify_checksums
    if full:
        n = fmt.verify_checksums(root, manifest, opts, on_retry=_warn)
        log.info("verified sha256 and counts of %d shard(s) of %s", n, root)
    return Dataset(root, manifest, data_cfg, opts)
