"""How the model sees its sequence: whole (one rank), or one shard of it (sequence parallelism).

With sequence parallelism over N ranks, rank r holds tokens [r*C, (r+1)*C) of every sequence, C = T_pad / N, and
every level of the hierarchy is sharded the same way (T_pad is a multiple of N x the total shortening factor, so
a level at factor P holds C/P tokens per rank and no shortening window straddles two ranks). Three places look
across a shard boundary, and each asks this object:

    tokens = seq.shard(tokens)             # (B, T_pad) -> (B, C): this rank's tokens (the embedding)
    halo = seq.halo(x, n)                  # (B, n, D): the n positions before this shard (zeros on rank 0)
    o = seq.attend(core, q, k, v)          # attention over all positions (DeepSpeed-Ulysses all-to-all)

:class:`WholeSequence` is the one-rank form the model uses by default; the sharded form lives in
:mod:`hgscale.training.sequence` (the model imports no distributed code).
"""
from __future__ import annotations

import torch


class WholeSequence:
    """The whole sequence on this rank: no sharding, attention on all heads."""

    size, rank = 1, 0

    def padded_len(self, T: int, total_factor: int) -> int:
        """T padded up to a multiple of the total shortening factor x the ranks sharing the sequence."""
        m = total_factor * self.size
        return T + (-T % m)

    def shard(self, t: torch.Tensor) -> torch.Tensor:
        """(B, T_pad, ...) -> this rank's (B, T_pad / size, ...)."""
        if self.size == 1:
            return t
        C = t.shape[1] // self.size
        return t[:, self.rank * C:(self.rank + 1) * C]

    def shard_labels(self, labels: torch.Tensor, total_factor: int, n: int) -> torch.Tensor:
        """labels (B, T) -> (B, n): those of this rank's shard, n = its unpadded positions (the model's output)."""
        if self.size == 1:
            return labels
        C = self.padded_len(labels.shape[1], total_factor) // self.size
        return labels[:, self.rank * C:self.rank * C + n]

    def valid(self, T: int, C: int) -> slice:
        """The positions of this rank's shard of length C that fall within the first T (the unpadded ones)."""
        return slice(0, max(0, min(C, T - self.rank * C)))

    def halo(self, x: torch.Tensor, n: int) -> torch.Tensor:
        """The n positions before this shard of x (B, C, D): zeros, as the sequence starts here."""
        return x.new_zeros(x.shape[0], n, x.shape[2])

    def attend(self, core, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """core(q, k, v, heads) over every position: q (B, H, n_q, dh), k and v (B, H, n_k, dh) -> (B, H, n_q, dh).
        ``heads`` is the slice of the model's heads the core sees (all of them here)."""
        return core(q, k, v, slice(None))


WHOLE = WholeSequence()
