"""The global order of training windows: the same for every layout, read mostly locally by each rank.

Which windows form global batch n depends only on the dataset, the seed, the shuffle settings, seq_len and
the global batch size G: never on the data-parallel size D, the workers, or the pipeline stages.

    epoch e:  perm = permutation(n_shards | seed, e); the shards' windows (counted from the manifest, never by
              reading) concatenated in that order: W windows, each shard's own windows in random order
              lanes: L = the largest power of two <= min(MAX_LANES, n_shards / SHARDS_PER_LANE), a fact of
                     the dataset; lane l = a contiguous range of W/L windows of the concatenation (its first
                     and last shard may be shared with the neighbouring lane), so every lane is equally long
              a lane is shuffled in blocks of shuffle_shards shards' worth of windows
              sequence: round k takes window k of every lane, lanes in order (W = L x rounds + a short one)
              batches: windows [j G, (j + 1) G) of the sequence; the tail of fewer than G windows is dropped,
                       so batches never straddle epochs
    rank r of D:  the G windows of a batch sorted by (lane, index in lane), slice [r G/D, (r + 1) G/D)

A batch is whole rounds of consecutive lanes (for G a multiple of L; else G/L-th rounds), so with D dividing L
rank r reads only lanes r L/D ... (r + 1) L/D - 1, all epoch long: each shard is read once, except those a
lane boundary cuts (at most L - 1 of them, read twice): read amplification <= 1 + (L - 1) / n_shards, at
most 1.0625 when D divides L. Otherwise the ranks share the lanes their slices cut: each such lane is read by
two ranks (:func:`read_amplification`: 3 ranks on 16 lanes of 256 shards read 1.19 of the split, 6 read 1.33,
12 read 1.59), and
with more ranks than lanes every rank reads whole lanes for a part of each (one lane: the whole split each).
MosaicML Streaming fixes the order for a "canonical node" count and reads well only when the physical node count
divides it or is divided by it; its shards are whole per node, so unequal shards leave nodes unequal work at the
epoch's end. Here the lanes are a fact of the dataset, exactly equal, and any layout reads the one order.

A position is (epoch, windows of that epoch already consumed): it survives any layout change, and a change of G
(batches then start at that window; the epoch ends at the last full batch of the new size).
"""
from __future__ import annotations

import numpy as np

from .records import StreamSpec

MAX_LANES = 64
SHARDS_PER_LANE = 16  # lane boundaries cut at most 1 shard in 16: read amplification <= 1.0625


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([int(k) & 0xFFFFFFFF for k in key])


def lane_count(n_shards: int) -> int:
    """Lanes of a split: the largest power of two <= min(MAX_LANES, n_shards / SHARDS_PER_LANE), at least 1."""
    n = max(1, min(MAX_LANES, int(n_shards) // SHARDS_PER_LANE))
    return 1 << (n.bit_length() - 1)


def read_amplification(n_shards: int, dp_size: int) -> float:
    """Bytes of a split all ranks read per epoch, over its size: :func:`lane_reads` times the shards that lane
    boundaries cut, read by both lanes (measured in benchmarks/elastic_resume.py: within 1 % at 1..16 ranks)."""
    lanes = lane_count(n_shards)
    return lane_reads(lanes, dp_size) * (1 + (lanes - 1) / max(n_shards, 1))


def lane_reads(n_lanes: int, dp_size: int) -> float:
    """Lanes read by all ranks together per epoch, over the lanes there are (1.0 = each read once): rank r's slice
    of every batch covers lanes [r L/D, (r + 1) L/D), and a rank reads every lane its slice touches."""
    L, D = n_lanes, dp_size
    touched = sum(-(-(r + 1) * L // D) - (r * L // D) for r in range(D))  # ceil(end) - floor(start) per rank
    return touched / L


def shard_windows(num_tokens: int, seed: int, epoch: int, index: int, seq_len: int, image_tokens: int,
                  shuffle: bool) -> int:
    """Windows of seq_len + 1 tokens shard ``index`` yields in ``epoch`` (the reader's own formula:
    text starts at a random offset in [0, seq_len) drawn first from the shard's generator; images wrap by
    one token)."""
    if image_tokens:
        return num_tokens // seq_len
    offset = int(_rng(seed, epoch, index, 0xD17A).integers(0, seq_len)) if shuffle else 0
    return max(0, (num_tokens - offset - 1) // seq_len)


class EpochPlan:
    """Lanes, blocks and the window sequence of one epoch (a pure function of ``spec`` and ``epoch``)."""

    def __init__(self, spec: StreamSpec, epoch: int):
        shards, seed, self.shuffle = spec.shards, spec.seed, spec.shuffle
        self.seed, self.epoch, n = seed, epoch, len(shards)
        self.n_lanes = L = lane_count(n)
        self.order = _rng(seed, epoch, 0x5EED).permutation(n) if self.shuffle else np.arange(n)
        self.counts = [shard_windows(int(s["num_tokens"]), seed, epoch, i, spec.seq_len, spec.image_tokens,
                                     self.shuffle) for i, s in enumerate(shards)]
        self.ends = np.cumsum([self.counts[s] for s in self.order], dtype=np.int64)  # (n,) concatenation
        self.windows = W = int(self.ends[-1]) if n else 0
        self.rounds, extra = divmod(W, L)  # lanes < extra hold one window more
        self.lane_start = [lane * self.rounds + min(lane, extra) for lane in range(L + 1)]
        self._extra = extra
        self.block = max(1, round(max(1, int(spec.shuffle_shards)) * W / max(n, 1)))  # windows per block

    def usable(self, global_batch: int, offset: int = 0) -> int:
        """End of the last full batch of ``global_batch`` windows starting at ``offset``."""
        return offset + (self.windows - offset) // global_batch * global_batch if self.windows > offset else offset

    def _at(self, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(lane, index in lane) of sequence positions ``pos``."""
        full = self.rounds * self.n_lanes
        lane = np.where(pos < full, pos % self.n_lanes, pos - full)
        return lane, np.where(pos < full, pos // self.n_lanes, self.rounds)

    def rank_slots(self, offset: int, global_batch: int, dp_rank: int, dp_size: int) -> np.ndarray:
        """(G/D, 2) (lane, index in lane) of rank ``dp_rank``'s windows in the batch starting at ``offset``."""
        lanes, idx = self._at(np.arange(offset, offset + global_batch, dtype=np.int64))
        order = np.lexsort((idx, lanes))  # lane-major: a rank's slice covers few, consecutive lanes
        per = global_batch // dp_size
        pick = order[dp_rank * per:(dp_rank + 1) * per]
        return np.stack([lanes[pick], idx[pick]], 1)

    def block_range(self, lane: int, j: int) -> tuple[int, int]:
        """[start, end) of block ``j`` of ``lane`` in the concatenation."""
        start, end = self.lane_start[lane], self.lane_start[lane + 1]
        return start + j * self.block, min(end, start + (j + 1) * self.block)

    def block_shards(self, lane: int, j: int) -> list[int]:
        """Shards holding the windows of block ``j`` of ``lane``."""
        lo, hi = self.block_range(lane, j)
        first, last = np.searchsorted(self.ends, [lo, hi - 1], side="right")
        return [int(s) for s in self.order[first:last + 1]]

    def block_perm(self, lane: int, j: int) -> np.ndarray:
        lo, hi = self.block_range(lane, j)
        return _rng(self.seed, self.epoch, lane, j, 0x6A0F).permutation(hi - lo) if self.shuffle else \
            np.arange(hi - lo)

    def source(self, lane: int, j: int, pos: int) -> tuple[int, int]:
        """(shard, its window number) at position ``pos`` of the block after shuffling (``pos`` = block_perm[i])."""
        g = self.block_range(lane, j)[0] + pos
        i = int(np.searchsorted(self.ends, g, side="right"))
        return int(self.order[i]), g - (int(self.ends[i - 1]) if i else 0)
