"""A weighted mixture of prepared datasets, seen by the trainer as one dataset.

    "data": {"mixture": [{"name": "web", "url": "s3://b/web", "weight": 0.8},
                         {"name": "code", "url": "s3://b/code", "weight": 0.2}]}
    ds = open_dataset(cfg.data)                  # a Mixture: the Dataset interface, plus .sources
    stream = ds.stream("train", B, T, dp_rank, dp_size, seed)
    stream.source_tokens                         # {name: training tokens drawn so far, all ranks together}
    ds.eval_sets("valid", B, T, dp_rank, dp_size, max_batches)   # [(name, batches, bits factor)] per source

Every training window comes from source k with probability weight_k / sum(weights): the choice for window g
of global batch j is a pure function of (data.seed, j, g), and each source is an ordinary
:class:`~hgscale.data.stream.Stream` (its own shards, workers, shuffling and layout-independent order) read in
lockstep with the others (see MixtureStream). So, like a single dataset, the mixture's windows do not depend
on the layout, and the state (global batch, micro-batch, every source's state) resumes exactly, by any layout.
Sources must agree on modality, vocabulary and tokenizer (checked when opened, before any process group).
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
from typing import Any, Iterator

import numpy as np

from hgscale.core.notation import mixture_problems

from .errors import DataError
from .io import read_bytes

log = logging.getLogger("hgscale.data")

STATE_VERSION = 2
_BLOCK = 4096  # source choices drawn per RNG block: window i's choice needs only block i // _BLOCK


def choices(seed: int, start: int, n: int, probs: np.ndarray) -> np.ndarray:
    """Sources of global windows start .. start + n - 1 (a pure function of the seed and the index)."""
    out, i = [], start
    while i < start + n:
        block = i // _BLOCK
        rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, block, 0x313])
        picks = rng.choice(len(probs), size=_BLOCK, p=probs)
        lo, hi = i - block * _BLOCK, min(_BLOCK, start + n - block * _BLOCK)
        out.append(picks[lo:hi])
        i += hi - lo
    return np.concatenate(out) if out else np.zeros(0, np.int64)


class MixtureStream:
    """(inputs, labels) LongTensor (B, T) micro-batches of one data-parallel rank, rows from the sources.

    Global batch j has G windows; window g of it comes from source k = choices(seed, j G + g) and is window g
    of source k's own global batch j. Every source streams its global batches in lockstep (one per step,
    each rank reading its G / D of them, see order.py), and this rank keeps, at each of its positions, the
    window of the chosen source. So the mixture's windows do not depend on the data-parallel size, workers or
    pipeline stages, and the position is (global batch, micro-batch in it) plus the sources' states. The cost:
    each source reads a full global batch per step, of which it contributes its share."""

    def __init__(self, streams: list, names: list[str], weights: list[float], seed: int, dp_rank: int,
                 dp_size: int, micro_batch_size: int, seq_len: int, global_batch_size: int):
        self._streams, self._names = streams, names
        self._probs = np.asarray(weights, np.float64) / float(sum(weights))
        self._weights = [float(w) for w in weights]
        self._seed, self._B, self._T, self._G = int(seed), int(micro_batch_size), int(seq_len), int(global_batch_size)
        self._rank, self._D = int(dp_rank), int(dp_size)
        if self._G % (self._B * self._D):
            raise DataError(f"global batch {self._G} is not a multiple of micro_batch_size {self._B} x data-parallel "
                            f"size {self._D}")
        self._A = self._G // (self._B * self._D)  # micro-batches per global batch on this rank
        self._batch, self._micro = 0, 0  # the next micro-batch to yield
        self._tokens = [0] * len(streams)  # global: every window of every global batch begun so far
        self._active: Iterator | None = None

    # ------------------------------------------------------------------------------------- state
    def _layout(self) -> dict:
        return {"dp_size": self._D, "micro_batch_size": self._B}

    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "kind": "mixture", "names": list(self._names), "weights": self._weights,
                "seed": self._seed, "seq_len": self._T, "global_batch_size": self._G, **self._layout(),
                "batch": self._batch, "micro": self._micro, "tokens": list(self._tokens),
                "sources": [s.state_dict() for s in self._streams]}

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or state.get("kind") != "mixture" or state.get("version") != STATE_VERSION:
            raise DataError(f"data stream state {str(state)[:80]!r} is not a version-{STATE_VERSION} mixture state; "
                            f"the checkpoint was written by a run without this data.mixture")
        self.close()
        saved = dict(zip(state["names"], state["sources"], strict=True))
        for name, s in zip(self._names, self._streams, strict=True):
            if name in saved:
                s.load_state_dict(saved[name])
        batch, micro, tokens = int(state["batch"]), int(state["micro"]), [int(x) for x in state["tokens"]]
        differ = [k for k in ("names", "weights", "seed", "seq_len", "global_batch_size")
                  if state.get(k) != self.state_dict()[k]]
        if differ:  # the windows drawn so far stay drawn; the sources continue where they were
            log.warning("data.mixture state was saved with other %s: the choice of source per window is not the "
                        "one the saved run would have made from here", ", ".join(differ))
            done = (batch + (1 if micro else 0)) * int(state["global_batch_size"])  # windows counted so far
            self._batch, self._micro = -(-done // self._G), 0
            self._tokens = tokens if state["names"] == self._names else [0] * len(self._names)
            return
        if micro and any(state.get(k) != v for k, v in self._layout().items()):
            # saved mid-batch by another layout: start that batch again (the sources do the same)
            counts = np.bincount(choices(self._seed, batch * self._G, self._G, self._probs), minlength=len(tokens))
            tokens = [t - int(c) * self._T for t, c in zip(tokens, counts, strict=True)]
            micro = 0
        self._batch, self._micro, self._tokens = batch, micro, tokens

    @property
    def source_tokens(self) -> dict[str, int]:
        """Training tokens (seq_len per window) drawn from each source by all ranks together, through the
        current global batch (the same on every rank; resumes with the state)."""
        return dict(zip(self._names, self._tokens, strict=True))

    @property
    def stats(self) -> dict:
        out = {"retries": 0, "skipped_shards": 0}
        for s in self._streams:
            for k in out:
                out[k] += s.stats[k]
        return out

    # ----------------------------------------------------------------------------------- iterate
    def __iter__(self) -> Iterator:
        self.close()
        self._active = self._run()
        return self._active

    def close(self) -> None:
        if self._active is not None:
            self._active.close()
            self._active = None
        for s in self._streams:
            s.close()

    def _run(self):
        import torch
        its = [iter(s) for s in self._streams]
        try:
            while True:
                if self._micro == 0:  # a new global batch: count all of its windows
                    counts = np.bincount(choices(self._seed, self._batch * self._G, self._G, self._probs),
                                         minlength=len(self._streams))
                    self._tokens = [t + int(c) * self._T for t, c in zip(self._tokens, counts, strict=True)]
                first = self._batch * self._G + self._rank * (self._G // self._D) + self._micro * self._B
                picks = choices(self._seed, first, self._B, self._probs)  # (B,) source of each row
                rows = [next(it) for it in its]  # every source's micro-batch at this position: (B, T) each
                x = torch.stack([rows[k][0][i] for i, k in enumerate(picks)])
                y = torch.stack([rows[k][1][i] for i, k in enumerate(picks)])
                self._micro += 1
                if self._micro == self._A:
                    self._batch, self._micro = self._batch + 1, 0
                yield x, y
        finally:
            for s in self._streams:
                s.close()


class Mixture:
    """The Dataset interface over weighted sources (hgscale/data/dataset.py), plus ``sources``."""

    def __init__(self, sources: list[tuple[str, float, Any]]):
        self.sources = sources  # [(name, weight, Dataset)]
        first = sources[0][2]
        self.manifest = self._summary()
        self.modality, self.vocab_size, self.metric_name = first.modality, first.vocab_size, first.metric_name
        self.tokenizer_url = first.tokenizer_url
        self.root = "mixture(" + ", ".join(n for n, _, _ in sources) + ")"

    @property
    def names(self) -> list[str]:
        return [n for n, _, _ in self.sources]

    @property
    def probs(self) -> list[float]:
        total = sum(w for _, w, _ in self.sources)
        return [w / total for _, w, _ in self.sources]

    def _summary(self) -> dict:
        first = self.sources[0][2].manifest
        splits = set.intersection(*(set(ds.splits) for _, _, ds in self.sources))
        return {"name": "mixture", "modality": first["modality"], "vocab_size": first["vocab_size"],
                "dtype": first["dtype"], "tokenizer": first.get("tokenizer"),
                "splits": {s: {"num_tokens": self.num_tokens(s)} for s in sorted(splits)},
                "sources": {n: {"url": ds.root, "weight": w, "name": ds.manifest.get("name"),
                                "num_tokens": {s: ds.num_tokens(s) for s in ds.splits}}
                            for n, w, ds in self.sources}}

    # ---------------------------------------------------------------------------------- facts
    @property
    def splits(self) -> list[str]:
        return sorted(set.intersection(*(set(ds.splits) for _, _, ds in self.sources)))

    def num_tokens(self, split: str) -> int:
        return sum(ds.num_tokens(split) for _, _, ds in self.sources)

    def eval_windows(self, split: str, seq_len: int) -> int:
        """The fewest of any source: every source must fill its own validation batches."""
        return min(ds.eval_windows(split, seq_len) for _, _, ds in self.sources)

    @property
    def bits_per_nat_token(self) -> float:
        return self._factor([ds.bits_per_nat_token for _, _, ds in self.sources], self.probs)

    def bits_per_nat_token_for(self, split: str) -> float:
        """Bits per byte of the mixture's tokens: tokens come from source k with probability p_k, so the bytes
        per token are sum_k p_k x bytes per token of k."""
        return self._factor([ds.bits_per_nat_token_for(split) for _, _, ds in self.sources], self.probs)

    @staticmethod
    def _factor(factors: list[float], weights: list[float]) -> float:
        """Combine per-source (1 / ln 2 / bytes per token) with token weights: 1 / ln 2 / sum w_k bpt_k."""
        inv_ln2 = 1.0 / math.log(2)
        bytes_per_token = sum(w * inv_ln2 / f for f, w in zip(factors, weights, strict=True)) / sum(weights)
        return inv_ln2 / bytes_per_token

    # --------------------------------------------------------------------------------- reading
    def stream(self, split: str, micro_batch_size: int, seq_len: int, dp_rank: int = 0, dp_size: int = 1,
               seed: int | None = None, num_workers: int | None = None, shuffle: bool | None = None,
               global_batch_size: int | None = None) -> MixtureStream:
        first_cfg = self.sources[0][2].cfg
        seed = int(getattr(first_cfg, "seed", 1234) if seed is None else seed)
        G = int(global_batch_size or micro_batch_size * dp_size)
        streams = [ds.stream(split, micro_batch_size, seq_len, dp_rank, dp_size, seed=seed + k,
                             num_workers=num_workers, shuffle=shuffle, global_batch_size=G)
                   for k, (_, _, ds) in enumerate(self.sources)]
        return MixtureStream(streams, self.names, [w for _, w, _ in self.sources], seed, dp_rank, dp_size,
                             micro_batch_size, seq_len, G)

    def eval_sets(self, split: str, batch_size: int, seq_len: int, dp_rank: int = 0, dp_size: int = 1,
                  max_batches: int | None = None) -> list[tuple[str, list, float]]:
        """Per source: (name, this rank's validation batches, bits per nat-token of that source's split)."""
        return [(n, list(ds.eval_batches(split, batch_size, seq_len, dp_rank, dp_size, max_batches)),
                 ds.bits_per_nat_token_for(split)) for n, _, ds in self.sources]

    def eval_batches(self, split: str, batch_size: int, seq_len: int, dp_rank: int = 0, dp_size: int = 1,
                     max_batches: int | None = None) -> Iterator:
        """Every source's validation batches, one source after the other."""
        for _, batches, _ in self.eval_sets(split, batch_size, seq_len, dp_rank, dp_size, max_batches):
            yield from batches

    def split_tokens(self, split: str):
        raise DataError(f"a mixture has no single {split!r} split to score; pass the url of one source "
                        f"({', '.join(f'{n}={ds.root}' for n, _, ds in self.sources)})")


def combine_eval(losses: list[tuple[float, int, float]]) -> tuple[float, float]:
    """Overall (mean loss in nats/token, bits per byte) from per-source (mean loss, tokens scored, bits per
    nat-token): total bits over total bytes."""
    tokens = sum(n for _, n, _ in losses)
    loss = sum(v * n for v, n, _ in losses) / tokens
    inv_ln2 = 1.0 / math.log(2)
    nbytes = sum(n * inv_ln2 / f for _, n, f in losses)
    return loss, sum(v * n * inv_ln2 for v, n, _ in losses) / nbytes


def _tokenizer_digest(ds) -> str | None:
    if ds.modality != "text_sentencepiece":
        return None
    if ds.manifest.get("tokenizer_sha256"):
        return ds.manifest["tokenizer_sha256"]
    if not ds.tokenizer_url:
        return None
    return hashlib.sha256(read_bytes(ds.tokenizer_url, ds.opts)).hexdigest()


def open_mixture(data_cfg: Any, open_one) -> Mixture:
    """Open every source of ``data_cfg.mixture`` with ``open_one(source DataConfig)``; they must agree."""
    problems = mixture_problems(data_cfg.mixture)
    if problems:
        raise DataError("; ".join(problems))
    sources = []
    for e in data_cfg.mixture:
        sub = dataclasses.replace(data_cfg, url=e["url"], mixture=[])
        sources.append((e["name"], float(e["weight"]), open_one(sub)))
    ref_name, _, ref = sources[0]
    ref_tok = _tokenizer_digest(ref)
    for name, _, ds in sources[1:]:
        if (ds.modality, ds.vocab_size) != (ref.modality, ref.vocab_size):
            raise DataError(f"data.mixture sources {ref_name!r} ({ref.root}: {ref.modality}, vocab {ref.vocab_size}) "
                            f"and {name!r} ({ds.root}: {ds.modality}, vocab {ds.vocab_size}) differ; every source "
                            f"must be prepared with the same tokenizer")
        if _tokenizer_digest(ds) != ref_tok:
            raise DataError(f"data.mixture sources {ref_name!r} ({ref.root}) and {name!r} ({ds.root}) use different "
                            f"SentencePiece models; prepare them with one shared --tokenizer-model")
    return Mixture(sources)


__all__ = ["Mixture", "MixtureStream", "combine_eval", "open_mixture"]
