"""Sequence parallelism (DeepSpeed-Ulysses) for HourglassLM: each sequence is shared by N consecutive ranks.

    seq = UlyssesSequence(n)                 # after init_distributed; every rank calls it (it makes groups)
    model.shard_sequence(seq)                # HourglassLM now runs on 1/N of every sequence
    deepspeed.initialize(..., mpu=seq.groups)

Rank r of a group holds tokens [r*C, (r+1)*C) of every level (hgscale.models.sequence). Attention goes through
DeepSpeed's ``DistributedAttention``: one all-to-all turns q, k, v (B, C, H, dh) into (B, T, H/N, dh), the
unchanged attention core (relative or rotary, every kernel, resampling geometries) runs on all positions for
H/N heads, and a second all-to-all turns the output back. The shift before shortening takes its f-1 positions
from the previous rank (:func:`halo`: one all-gather of a few rows, and one in backward for their gradient).

Gradients: each rank's loss is its shard's summed cross-entropy over the whole sequence's token count, so the
N losses add up to the sequence's mean; DeepSpeed sums gradients over the group and averages them over
data parallelism (its sequence-data-parallel group), which gives the gradient of the mean loss.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from hgscale.models.sequence import WholeSequence


class SequenceGroups:
    """The process groups DeepSpeed reads from an ``mpu`` (Megatron's interface): sequence-parallel groups of N
    consecutive ranks, data-parallel groups of the ranks at the same place in theirs, ZeRO and gradient
    averaging over both (the whole world: no pipeline), and no model parallelism. Each rank creates only the
    groups it belongs to (``use_local_synchronization``), so start-up does not grow with the world."""

    def __init__(self, n: int):
        world, rank = dist.get_world_size(), dist.get_rank()
        self.n, self.dp = n, world // n
        self.seq_rank, self.dp_rank = rank % n, rank // n
        mine = lambda ranks: dist.new_group(ranks, use_local_synchronization=True)  # noqa: E731
        self.seq_group = mine(list(range(self.dp_rank * n, (self.dp_rank + 1) * n)))  # ranks g*n .. g*n+n-1
        self.dp_group = mine(list(range(self.seq_rank, world, n)))  # ranks i, i+n, i+2n, ...
        self.mp_group = mine([rank])  # model parallelism of one rank
        self.seq_dp_group = dist.group.WORLD

    # sequence parallelism
    def get_sequence_parallel_group(self):
        return self.seq_group

    def get_sequence_parallel_world_size(self) -> int:
        return self.n

    def get_sequence_parallel_rank(self) -> int:
        return self.seq_rank

    # ZeRO partitions and gradient averaging: data x sequence
    def get_sequence_data_parallel_group(self):
        return self.seq_dp_group

    def get_sequence_data_parallel_world_size(self) -> int:
        return self.n * self.dp

    def get_sequence_data_parallel_rank(self) -> int:
        return dist.get_rank()

    # data parallelism (what DeepSpeed's batch arithmetic counts)
    def get_data_parallel_group(self):
        return self.dp_group

    def get_data_parallel_world_size(self) -> int:
        return self.dp

    def get_data_parallel_rank(self) -> int:
        return self.dp_rank

    # no model (tensor) parallelism
    def get_model_parallel_group(self):
        return self.mp_group

    def get_model_parallel_world_size(self) -> int:
        return 1

    def get_model_parallel_rank(self) -> int:
        return 0


class _Halo(torch.autograd.Function):
    """The last n rows of the previous rank's shard: forward all-gathers every rank's tail (B, n, D) and takes
    rank r-1's (zeros on rank 0); backward all-gathers the halos' gradients and gives each tail the gradient of
    the next rank's halo (zeros on the last rank)."""

    @staticmethod
    def forward(ctx, tail: torch.Tensor, group, rank: int, n_ranks: int) -> torch.Tensor:
        ctx.group, ctx.rank, ctx.n_ranks = group, rank, n_ranks
        tails = [torch.empty_like(tail) for _ in range(n_ranks)]
        dist.all_gather(tails, tail.contiguous(), group=group)
        return tails[rank - 1] if rank > 0 else torch.zeros_like(tail)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grads = [torch.empty_like(grad) for _ in range(ctx.n_ranks)]
        dist.all_gather(grads, grad.contiguous(), group=ctx.group)
        mine = grads[ctx.rank + 1] if ctx.rank + 1 < ctx.n_ranks else torch.zeros_like(grad)
        return mine, None, None, None


def _local_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, core, heads: slice) -> torch.Tensor:
    """DistributedAttention's local step: q (B, T_q, h, dh), k, v (B, T_k, h, dh) for h = H/N heads -> core's
    output in the same layout."""
    o = core(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), heads)  # (B, h, T_q, dh)
    return o.transpose(1, 2)


class UlyssesSequence(WholeSequence):
    """This rank's shard of each sequence, and the collectives that look past it."""

    def __init__(self, n: int):
        from deepspeed.sequence.layer import DistributedAttention

        self.groups = SequenceGroups(n)
        self.size, self.rank = n, self.groups.seq_rank
        # (B, S, H, dh) tensors: scatter the heads (dim 2), gather the sequence (dim 1)
        self._attention = DistributedAttention(_local_attention, self.groups.seq_group, scatter_idx=2, gather_idx=1)

    def halo(self, x: torch.Tensor, n: int) -> torch.Tensor:
        return _Halo.apply(x[:, -n:], self.groups.seq_group, self.rank, self.size)

    def attend(self, core, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        h = q.shape[1] // self.size
        heads = slice(self.rank * h, (self.rank + 1) * h)  # the all-to-all gives rank r the r-th 1/N of the heads
        o = self._attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0, None, core, heads)
        return o.transpose(1, 2)  # (B, H, C_q, dh)
