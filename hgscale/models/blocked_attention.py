"""CPU kernel of causal Transformer-XL relative attention, with a hand-written backward.

Queries sit every ``qs`` keys (qs = 1: self-attention; qs = f: pooled queries of attention shortening),
query i sees keys j < qs*(i+1), and the distance of (i, j) is j - qs*i. Query block [i0, i0+b) attends
only to keys [0, qs*L), L = i0+b: the masked upper part of the score matrix is never computed. The
position term of a block is one matrix multiply against the distances it needs, -qs(L-1) .. qs*b - 1,
followed by a strided view (the Transformer-XL shift without a copy):

    raw[r, c] = (q_{i0+r} + v) . R[c]        c <-> distance c - qs(L-1)          (b, W), W = qs(L+b-1)
    bd[r, j]  = raw[r, j - qs*r + qs(b-1)]   = (q_i + v) . R[j - qs*i]          strides (W - qs, 1)

The backward is written out (flash-attention style, keeping the probabilities of each block) so that
gradients of the key, value and position slices accumulate in place into one buffer each, instead of
autograd materialising a zero-padded full-size gradient for every slice of every block.
Inputs come pre-scaled by 1/sqrt(d_head). Attention dropout masks are regenerated in the backward from
a seed instead of being stored.
"""
from __future__ import annotations

from functools import lru_cache

import torch

from hgscale.models.dropout import keep_mask, keep_scale


@lru_cache(maxsize=16)
def _diag_mask(b: int, qs: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(b, qs*b) additive mask of a diagonal block: row r sees columns < qs*(r+1)."""
    with torch.inference_mode(False):
        r = torch.arange(b, device=device)[:, None]
        c = torch.arange(qs * b, device=device)[None, :]
        return torch.zeros(b, qs * b, device=device, dtype=dtype).masked_fill(c >= qs * (r + 1), float("-inf"))


def _blocks(n: int, block: int, qs: int):
    """start i0, rows b, pooled keys seen L (qs*L keys), distances needed W, first table row of the block."""
    for i0 in range(0, n, block):
        b = min(block, n - i0)
        L = i0 + b
        yield i0, b, L, qs * (L + b - 1), qs * (n - L)


def _diag(raw: torch.Tensor, b: int, L: int, W: int, qs: int) -> torch.Tensor:
    """(BH, b, W) contiguous -> (BH, b, qs*L) view: element (r, j) is raw[r, j - qs*r + qs*(b-1)]."""
    return raw.as_strided((raw.shape[0], b, qs * L), (b * W, W - qs, 1), raw.storage_offset() + qs * (b - 1))


def _scatter_diag(ds: torch.Tensor, b: int, L: int, W: int, qs: int) -> torch.Tensor:
    """Inverse of _diag: (BH, b, qs*L) -> (BH, b, W) with zeros where no (r, j) lands.

    Flattened, the covered entries are b runs of qs*L separated by gaps of qs*(b-2), after a head and
    before a tail of qs*(b-1) each: only those are zeroed, not the whole buffer."""
    BH = ds.shape[0]
    draw = torch.empty(BH, b, W, dtype=ds.dtype, device=ds.device)
    _diag(draw, b, L, W, qs).copy_(ds)  # each (r, j) owns a distinct raw entry
    flat = draw.view(BH, b * W)
    edge = qs * (b - 1)
    if edge:
        flat[:, :edge].zero_()
        flat[:, b * W - edge:].zero_()
    if b > 2:  # the gaps between consecutive rows' runs
        flat.as_strided((BH, b - 1, qs * (b - 2)), (b * W, W - qs, 1), edge + qs * L).zero_()
    return draw


def _masks(p_drop: float, seed: int, shapes, dtype, device):
    """Attention-dropout masks of the blocks, regenerated identically in the backward from the seed
    (nothing stored)."""
    if p_drop == 0.0:
        return [None] * len(shapes)
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return [keep_mask(shape, p_drop, dtype, device, gen, scaled=False) for shape in shapes]  # 0/1


class BlockedRelAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qu, qv, k, v, R, block: int, qs: int, p_drop: float, seed: int):
        """qu, qv: (BH, n, dh); k, v: (BH, qs*n, dh), last dimension contiguous;
        R: (BH, qs*(n + block - 1), dh), row c <-> distance c - qs*(n-1). Attention dropout p_drop
        with masks drawn from ``seed``."""
        BH, n, dh = qu.shape
        if R.shape[1] != qs * (n + block - 1) or k.shape[1] != qs * n:
            raise ValueError(f"blocked attention: R has {R.shape[1]} rows and k {k.shape[1]}; "
                             f"expected {qs * (n + block - 1)} and {qs * n}")
        plan = list(_blocks(n, block, qs))
        masks = _masks(p_drop, seed, [(BH, b, qs * L) for _, b, L, _, _ in plan], qu.dtype, qu.device)
        o = torch.empty_like(qu)
        probs = []
        for (i0, b, L, W, c0), mask in zip(plan, masks):
            raw = torch.bmm(qv[:, i0:L], R[:, c0: c0 + W].transpose(1, 2))  # (BH, b, W)
            s = torch.baddbmm(_diag(raw, b, L, W, qs), qu[:, i0:L], k[:, : qs * L].transpose(1, 2))  # (BH, b, qs*L)
            s[:, :, qs * i0:] += _diag_mask(b, qs, qu.device, qu.dtype)
            p = torch.softmax(s, dim=-1)
            if mask is None:
                o[:, i0:L] = torch.bmm(p, v[:, : qs * L])  # (BH, b, dh)
            else:  # the 1/keep scale on the (b, dh) result, not the (b, qs*L) mask
                o[:, i0:L] = torch.bmm(p * mask, v[:, : qs * L]).mul_(keep_scale(p_drop))
            probs.append(p)
        ctx.save_for_backward(qu, qv, k, v, R, o, *probs)
        ctx.block, ctx.qs, ctx.p_drop, ctx.seed = block, qs, p_drop, seed
        return o

    @staticmethod
    def backward(ctx, do):
        qu, qv, k, v, R, o, *probs = ctx.saved_tensors
        BH, n, dh = qu.shape
        qs = ctx.qs
        plan = list(_blocks(n, ctx.block, qs))
        masks = _masks(ctx.p_drop, ctx.seed, [(BH, b, qs * L) for _, b, L, _, _ in plan], qu.dtype, qu.device)
        # softmax backward: ds = p * (g - sum_j p_ij g_ij), g = dL/dp = (do v^T) * mask, and
        # sum_j p_ij g_ij = do_i . o_i because o = (p * mask) v
        delta = (do * o).sum(-1, keepdim=True)  # (BH, n, 1)
        dqu, dqv = torch.empty_like(qu), torch.empty_like(qv)
        dk, dv, dR = torch.zeros_like(k), torch.zeros_like(v), torch.zeros_like(R)
        for (i0, b, L, W, c0), p, mask in zip(plan, probs, masks):
            do_b, Lk = do[:, i0:L], qs * L
            if mask is not None:
                do_b = do_b * keep_scale(ctx.p_drop)  # (BH, b, dh)
            dv[:, :Lk].baddbmm_((p if mask is None else p * mask).transpose(1, 2), do_b)
            ds = torch.bmm(do_b, v[:, :Lk].transpose(1, 2))  # g, then in place: ds = p * (g - delta)
            if mask is not None:
                ds.mul_(mask)
            ds.sub_(delta[:, i0:L]).mul_(p)
            dqu[:, i0:L] = torch.bmm(ds, k[:, :Lk])
            dk[:, :Lk].baddbmm_(ds.transpose(1, 2), qu[:, i0:L])
            draw = _scatter_diag(ds, b, L, W, qs)  # (BH, b, W)
            dqv[:, i0:L] = torch.bmm(draw, R[:, c0: c0 + W])
            dR[:, c0: c0 + W].baddbmm_(draw.transpose(1, 2), qv[:, i0:L])
        return dqu, dqv, dk, dv, dR, None, None, None, None


def blocked_rel_attention(qu, qv, k, v, R, block: int, qs: int = 1, p_drop: float = 0.0,
                          seed: int | None = None) -> torch.Tensor:
    """qu, qv: (B, H, n, dh); k, v: (B, H, qs*n, dh); R: (H, qs*(n + block - 1), dh) -> (B, H, n, dh).
    With p_drop > 0 the dropout masks come from ``seed`` (default: drawn from torch's generator)."""
    B, H, n, dh = qu.shape
    if p_drop > 0.0 and seed is None:
        seed = int(torch.randint(0, 1 << 62, (1,)).item())
    # q, k, v: strided views, not copies, when B = 1 (bmm takes any row stride); R (small) contiguous
    flat = [t.reshape(B * H, -1, dh) for t in (qu, qv, k, v)]
    Rf = R.to(qu.dtype).expand(B, *R.shape).reshape(B * H, *R.shape[1:]).contiguous()
    return BlockedRelAttention.apply(*flat, Rf, block, qs, p_drop, seed or 0).reshape(B, H, n, dh)
