"""A weighted mixture of prepared datasets, seen by the trainer as one dataset.

    "data": {"mixture": [{"name": "web", "url": "s3://b/web", "weight": 0.8},
                         {"name": "code", "url": "s3://b/code", "weight": 0.2}]}
    ds = open_dataset(cfg.data)                  # a Mixture: the Dataset interface, plus .sources
    stream = ds.stream("train", B, T, dp_rank, dp_size, seed)
    stream.source_tokens                         # {name: training tokens drawn so far by this rank}
    ds.eval_sets("valid", B, T, dp_rank, dp_size, max_batches)   # [(name, batches, bits factor)] per source

Every window of a micro-batch comes from source k with probability weight_k / sum(weights): the choice of
window i of data-parallel rank r is a pure function of (data.seed, r, i), and each source is an ordinary
:class:`~hgscale.data.stream.Stream` (its own shards, workers, shuffling and exact cursor) of one-window
batches. The mixture's state is the number of windows drawn plus every source's state, so a resumed run
draws exactly the windows the uninterrupted one would have. Sources must agree on modality, vocabulary
and tokenizer (checked when opened, before any process group starts).
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import re
from typing import Any, Iterator

import numpy as np

from .storage import DataError, read_bytes

log = logging.getLogger("hgscale.data")

STATE_VERSION = 1
NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")  # metric names: val/<name>/bpc, data/share/<name>
_BLOCK = 4096  # source choices drawn per RNG block: window i's choice needs only block i // _BLOCK


def entry_problems(mixture: Any) -> list[str]:
    """Problems of a ``data.mixture`` list (no I/O): shape, names, weights."""
    if not isinstance(mixture, list):
        return [f"data.mixture must be a list of {{\"name\", \"url\", \"weight\"}} objects, got {mixture!r:.60}"]
    out, names = [], []
    for i, e in enumerate(mixture):
        where = f"data.mixture[{i}]"
        if not isinstance(e, dict) or set(e) != {"name", "url", "weight"}:
            keys = sorted(e) if isinstance(e, dict) else type(e).__name__
            out.append(f"{where} must be an object with exactly the keys name, url, weight (got {keys})")
            continue
        name, url, w = e["name"], e["url"], e["weight"]
        if not isinstance(name, str) or not NAME_RE.match(name):
            out.append(f"{where}.name = {name!r} must be a non-empty string of letters, digits, '_', '.', '-' "
                       f"(it names metrics such as val/<name>/bpc)")
        elif name in names:
            out.append(f"{where}.name = {name!r} is used twice; give every source its own name")
        names.append(name)
        if not isinstance(url, str) or not url:
            out.append(f"{where}.url must be the dataset root of the source (a path, file:// or s3:// URL)")
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w <= 0:
            out.append(f"{where}.weight = {w!r} must be a number > 0 (weights are relative: 0.8 and 0.2, or 4 and 1)")
    if not mixture:
        out.append("data.mixture is an empty list; list at least one source, or use data.url")
    return out


def choices(seed: int, dp_rank: int, start: int, n: int, probs: np.ndarray) -> np.ndarray:
    """Sources of windows start .. start + n - 1 of data-parallel rank ``dp_rank`` (a pure function)."""
    out, i = [], start
    while i < start + n:
        block = i // _BLOCK
        rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(dp_rank), block, 0x313])
        picks = rng.choice(len(probs), size=_BLOCK, p=probs)
        lo, hi = i - block * _BLOCK, min(_BLOCK, start + n - block * _BLOCK)
        out.append(picks[lo:hi])
        i += hi - lo
    return np.concatenate(out) if out else np.zeros(0, np.int64)


class MixtureStream:
    """(inputs, labels) LongTensor (B, T) batches whose rows come from the sources' streams."""

    def __init__(self, streams: list, names: list[str], weights: list[float], seed: int, dp_rank: int,
                 micro_batch_size: int, seq_len: int):
        self._streams, self._names = streams, names
        self._probs = np.asarray(weights, np.float64) / float(sum(weights))
        self._seed, self._dp_rank, self._B, self._T = int(seed), int(dp_rank), int(micro_batch_size), int(seq_len)
        self._draws = 0
        self._tokens = [0] * len(streams)
        self._weights = [float(w) for w in weights]
        self._active: Iterator | None = None

    # ------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "kind": "mixture", "names": list(self._names), "weights": self._weights,
                "seed": self._seed, "dp_rank": self._dp_rank, "micro_batch_size": self._B, "seq_len": self._T,
                "draws": self._draws, "tokens": list(self._tokens),
                "sources": [s.state_dict() for s in self._streams]}

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or state.get("kind") != "mixture" or state.get("version") != STATE_VERSION:
            raise DataError(f"data stream state {str(state)[:80]!r} is not a version-{STATE_VERSION} mixture state; "
                            f"the checkpoint was written by a run without this data.mixture")
        self.close()
        saved = dict(zip(state["names"], state["sources"], strict=True))
        mine = self.state_dict()
        differ = [k for k in ("names", "weights", "seed", "dp_rank", "micro_batch_size", "seq_len")
                  if state.get(k) != mine[k]]
        for name, s in zip(self._names, self._streams, strict=True):
            if name in saved:
                s.load_state_dict(saved[name])
        if differ:  # the draws would mean other windows: keep the sources' positions, draw afresh
            log.warning("data.mixture state was saved with other %s: the sources continue where they were, the "
                        "choice of source per window restarts", ", ".join(differ))
            return
        self._draws, self._tokens = int(state["draws"]), [int(x) for x in state["tokens"]]

    @property
    def source_tokens(self) -> dict[str, int]:
        """Training tokens (seq_len per window) drawn from each source by this rank so far (resumes too)."""
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
                picks = choices(self._seed, self._dp_rank, self._draws, self._B, self._probs)
                rows = [next(its[k]) for k in picks]  # each (1, T) inputs, (1, T) labels
                for k in picks:
                    self._tokens[k] += self._T
                self._draws += self._B
                yield torch.cat([x for x, _ in rows]), torch.cat([y for _, y in rows])
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
               seed: int | None = None, num_workers: int | None = None, shuffle: bool | None = None) -> MixtureStream:
        first_cfg = self.sources[0][2].cfg
        seed = int(getattr(first_cfg, "seed", 1234) if seed is None else seed)
        streams = [ds.stream(split, 1, seq_len, dp_rank, dp_size, seed=seed + k, num_workers=num_workers,
                             shuffle=shuffle) for k, (_, _, ds) in enumerate(self.sources)]
        return MixtureStream(streams, self.names, [w for _, w, _ in self.sources], seed, dp_rank, micro_batch_size,
                             seq_len)

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
    problems = entry_problems(data_cfg.mixture)
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


__all__ = ["Mixture", "MixtureStream", "combine_eval", "entry_problems", "open_mixture"]
