"""CPU kernel of causal Transformer-XL relative self-attention, with a hand-written backward.

Query block [i0, i0+b) attends only to keys [0, i0+b): the masked upper half of the score matrix is
never computed. The position term of a block is one matrix multiply against the distances it needs,
-(L-1) .. b-1 with L = i0+b, followed by a strided view (the Transformer-XL shift without a copy):

    raw[r, c] = (q_{i0+r} + v) . R[c]         c <-> distance c - (L-1)          (b, W), W = L + b - 1
    bd[r, j]  = raw[r, j - r + b - 1]          = (q_i + v) . R[j - i]            strides (W - 1, 1)

The backward is written out (flash-attention style, keeping the probabilities of each block) so that
gradients of the key, value and position slices accumulate in place into one buffer each, instead of
autograd materialising a zero-padded full-size gradient for every slice of every block.
Inputs come pre-scaled by 1/sqrt(d_head). No attention dropout here (the autograd path handles it).
"""
from __future__ import annotations

from functools import lru_cache

import torch


@lru_cache(maxsize=16)
def _tri(b: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    with torch.inference_mode(False):
        return torch.full((b, b), float("-inf"), device=device, dtype=dtype).triu(1)  # (b, b) additive


def _blocks(n: int, block: int):
    for i0 in range(0, n, block):
        b = min(block, n - i0)
        yield i0, b, i0 + b, 2 * b + i0 - 1  # start, rows, keys seen (L), distances needed (W)


def _diag(raw: torch.Tensor, b: int, L: int, W: int) -> torch.Tensor:
    """(BH, b, W) contiguous -> (BH, b, L) view: element (r, j) is raw[r, j - r + b - 1]."""
    return raw.as_strided((raw.shape[0], b, L), (b * W, W - 1, 1), raw.storage_offset() + b - 1)


class BlockedRelAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qu, qv, k, v, R, block: int):
        """qu, qv, k, v: (BH, n, dh) contiguous; R: (BH, n + block - 1, dh), row c <-> distance c - (n-1)."""
        BH, n, dh = qu.shape
        o = torch.empty_like(qu)
        probs = []
        for i0, b, L, W in _blocks(n, block):
            Rb = R[:, n - L: n - L + W]  # distances -(L-1) .. b-1
            raw = torch.bmm(qv[:, i0:L], Rb.transpose(1, 2))  # (BH, b, W)
            s = torch.baddbmm(_diag(raw, b, L, W), qu[:, i0:L], k[:, :L].transpose(1, 2))  # (BH, b, L)
            s[:, :, i0:] += _tri(b, qu.device, qu.dtype)
            p = torch.softmax(s, dim=-1)
            o[:, i0:L] = torch.bmm(p, v[:, :L])  # (BH, b, dh)
            probs.append(p)
        ctx.save_for_backward(qu, qv, k, v, R, o, *probs)
        ctx.block = block
        return o

    @staticmethod
    def backward(ctx, do):
        qu, qv, k, v, R, o, *probs = ctx.saved_tensors
        BH, n, dh = qu.shape
        do = do.contiguous()
        delta = (do * o).sum(-1, keepdim=True)  # (BH, n, 1): sum_j p_ij dp_ij, the softmax backward term
        dqu, dqv = torch.empty_like(qu), torch.empty_like(qv)
        dk, dv, dR = torch.zeros_like(k), torch.zeros_like(v), torch.zeros_like(R)
        for (i0, b, L, W), p in zip(_blocks(n, ctx.block), probs):
            do_b = do[:, i0:L]
            dv[:, :L].baddbmm_(p.transpose(1, 2), do_b)
            ds = torch.bmm(do_b, v[:, :L].transpose(1, 2))  # dp, then in place: ds = p * (dp - delta)
            ds.sub_(delta[:, i0:L]).mul_(p)
            dqu[:, i0:L] = torch.bmm(ds, k[:, :L])
            dk[:, :L].baddbmm_(ds.transpose(1, 2), qu[:, i0:L])
            draw = torch.zeros(BH, b, W, dtype=ds.dtype, device=ds.device)
            _diag(draw, b, L, W).copy_(ds)  # each (r, j) owns a distinct raw entry
            Rb = R[:, n - L: n - L + W]
            dqv[:, i0:L] = torch.bmm(draw, Rb)
            dR[:, n - L: n - L + W].baddbmm_(draw.transpose(1, 2), qv[:, i0:L])
        return dqu, dqv, dk, dv, dR, None


def blocked_rel_attention(qu, qv, k, v, R, block: int) -> torch.Tensor:
    """qu, qv, k, v: (B, H, n, dh); R: (H, n + block - 1, dh) -> (B, H, n, dh)."""
    B, H, n, dh = qu.shape
    flat = [t.reshape(B * H, n, dh).contiguous() for t in (qu, qv, k, v)]
    Rf = R.to(qu.dtype).expand(B, *R.shape).reshape(B * H, *R.shape[1:]).contiguous()
    return BlockedRelAttention.apply(*flat, Rf, block).view(B, H, n, dh)
