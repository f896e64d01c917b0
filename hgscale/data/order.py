"""The global order of training windows: the same for every layout, read mostly locally by each rank.

Which windows form global batch n depends only on the dataset, the seed, the shuffle settings, seq_len and
the global batch size G: never on the data-parallel size D, the workers, or the pipeline stages.

    epoch e:  perm = permutation(n_shards | seed, e)
              lanes: L = the largest power of two <= min(n_shards, MAX_LANES) (a fact of the dataset);
                     shard perm[i] joins the lane with the fewest windows so far (lanes stay within one
                     shard of each other), its windows counted from the manifest, never by reading it
              a lane reads its shards shuffle_shards at a time; a group's windows are shuffled together
              sequence: round k takes window k of every lane that still has one, lanes in order
              batches: windows [j G, (j + 1) G) of the sequence; the tail of fewer than G windows is dropped,
                       so batches never straddle epochs and every epoch starts at round 0
    rank r of D:  the G windows of a batch sorted by (lane, index in lane), slice [r G/D, (r + 1) G/D)

So a batch holds whole rounds of consecutive lanes, and for power-of-two G and D <= L rank r only ever reads
its own lanes (r L/D ... (r + 1) L/D - 1 when L divides G): bytes read per epoch = bytes in the split, except
at the epoch's tail where lanes run dry unevenly. MosaicML Streaming fixes the order for a
"canonical node" count and reads well only when the physical node count divides it or is divided by it;
here the lanes are a fact of the dataset and any layout reads the one order.

A position is (epoch, windows of that epoch already consumed): it survives any layout change, and a change
of G (batches then start at that window; the epoch ends at the last full batch of the new size).
"""
from __future__ import annotations

import heapq

import numpy as np

MAX_LANES = 64


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([int(k) & 0xFFFFFFFF for k in key])


def lane_count(n_shards: int) -> int:
    """Lanes of a split: the largest power of two <= min(n_shards, MAX_LANES)."""
    n = max(1, min(int(n_shards), MAX_LANES))
    return 1 << (n.bit_length() - 1)


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
    """Lanes, groups and the window sequence of one epoch (a pure function of ``spec`` and ``epoch``)."""

    def __init__(self, spec: dict, epoch: int):
        shards, seed, shuffle = spec["shards"], spec["seed"], spec["shuffle"]
        self.epoch, n = epoch, len(shards)
        self.n_lanes = lane_count(n)
        perm = _rng(seed, epoch, 0x5EED).permutation(n) if shuffle else np.arange(n)
        counts = [shard_windows(int(s["num_tokens"]), seed, epoch, i, spec["seq_len"], spec["image_tokens"], shuffle)
                  for i, s in enumerate(shards)]
        self.counts = counts
        lanes: list[list[int]] = [[] for _ in range(self.n_lanes)]
        heap = [(0, lane) for lane in range(self.n_lanes)]  # (windows so far, lane): fewest first, then lowest
        for s in perm:
            have, lane = heapq.heappop(heap)
            lanes[lane].append(int(s))
            heapq.heappush(heap, (have + counts[s], lane))
        g = max(1, int(spec["shuffle_shards"]))
        self.groups = [[lane[i:i + g] for i in range(0, len(lane), g)] for lane in lanes]  # [lane][group] shards
        self.group_ends = [np.cumsum([sum(counts[s] for s in grp) for grp in lane_groups], dtype=np.int64)
                           for lane_groups in self.groups]
        lane_len = np.array([int(e[-1]) if len(e) else 0 for e in self.group_ends], np.int64)
        # the sequence: round k = window k of every lane longer than k, lanes in order
        rounds = np.concatenate([np.arange(m, dtype=np.int64) for m in lane_len]) if lane_len.sum() else \
            np.zeros(0, np.int64)
        lane_of = np.repeat(np.arange(self.n_lanes, dtype=np.int64), lane_len)
        seq = np.lexsort((lane_of, rounds))
        self.lane_of, self.index_of = lane_of[seq], rounds[seq]  # (W,) each
        self.windows = int(lane_len.sum())

    def usable(self, global_batch: int, offset: int = 0) -> int:
        """End of the last full batch of ``global_batch`` windows starting at ``offset``."""
        return offset + (self.windows - offset) // global_batch * global_batch if self.windows > offset else offset

    def rank_slots(self, offset: int, global_batch: int, dp_rank: int, dp_size: int) -> np.ndarray:
        """(G/D, 2) (lane, index in lane) of rank ``dp_rank``'s windows in the batch starting at ``offset``."""
        lanes = self.lane_of[offset:offset + global_batch]
        idx = self.index_of[offset:offset + global_batch]
        order = np.lexsort((idx, lanes))  # lane-major: a rank's slice covers few, consecutive lanes
        per = global_batch // dp_size
        pick = order[dp_rank * per:(dp_rank + 1) * per]
        return np.stack([lanes[pick], idx[pick]], 1)

    def locate(self, lane: int, index: int) -> tuple[int, int]:
        """(group, position in group) of window ``index`` of ``lane``."""
        ends = self.group_ends[lane]
        g = int(np.searchsorted(ends, index, side="right"))
        return g, index - (int(ends[g - 1]) if g else 0)
