"""CPU kernel of causal Transformer-XL relative attention, with a hand-written backward.

Queries sit every ``qs`` keys (qs = 1: self-attention; qs = f: pooled queries of attention shortening),
query i sees keys j < qs*(i+1), and the distance of (i, j) is j - qs*i. Query block [i0, i0+b) attends
only to keys [0, qs*L), L = i0+b: the masked upper part of the score matrix is never computed. The
position term of a block is one matrix multiply against the distances it needs, -qs(L-1) .. qs*b - 1,
followed by a strided view (the Transformer-XL shift without a copy):

    raw[r, c] = (q_{i0+r} + v) . R[c]        c <-> distance c - qs(L-1)          (b, W), W = qs(L+b-1)
    bd[r, j]  = raw[r, j - qs*r + qs(b-1)]   = (q_i + v) . R[j - qs*i]          strides (W - qs, 1)

Memory (flash-attention style): the forward keeps the probabilities of its first query blocks (and
their attention-dropout masks, one byte per probability) while they fit in ``keep_bytes`` per call
(KEEP_BYTES: 96 MiB holds all of them for an 8-head layer at T = 2,048: 71 MB, 89 MB with dropout),
and nothing of the others; the backward recomputes the scores, probabilities and masks of those
blocks from q, k, the position table and the seed. Above that budget the memory of one call is
O(n * block) per head instead of O(n^2): at T = 8,192 a 4-head layer keeps 96 MiB, not 570 MB.
Recomputation costs two GEMMs and a softmax per block in the backward (about +10 % on a d 256 stack
at T = 2,048), which is why calls that fit the budget keep what they have.

The backward is written out so that gradients of the key, value and position slices accumulate in place
into one buffer each, instead of autograd materialising a zero-padded full-size gradient for every slice
of every block. The blocks of one call share a few workspaces.
Inputs come pre-scaled by 1/sqrt(d_head). Block i's attention-dropout mask is drawn from a generator
seeded with seed + i alone, so the backward regenerates the mask of any block it did not keep without
drawing the others'.
"""
from __future__ import annotations

from functools import lru_cache

import torch

from hgscale.models.dropout import keep_mask_u8, keep_scale

KEEP_BYTES = 96 << 20  # probabilities (and dropout masks) kept per call for the backward; the rest recomputed


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


def _take(buf: torch.Tensor, *shape: int) -> torch.Tensor:
    """A contiguous ``shape`` view of the front of a flat workspace. The blocks of one call reuse a few
    workspaces of the largest block's size: fresh multi-MB tensors per block would each be page-faulted
    in by the OS (glibc hands large blocks back), which cost as much as the softmax itself here."""
    n = 1
    for d in shape:
        n *= d
    return buf[:n].view(shape)


def _diag(raw: torch.Tensor, b: int, L: int, W: int, qs: int) -> torch.Tensor:
    """(BH, b, W) contiguous -> (BH, b, qs*L) view: element (r, j) is raw[r, j - qs*r + qs*(b-1)]."""
    return raw.as_strided((raw.shape[0], b, qs * L), (b * W, W - qs, 1), raw.storage_offset() + qs * (b - 1))


def _scatter_diag(ds: torch.Tensor, b: int, L: int, W: int, qs: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Inverse of _diag: (BH, b, qs*L) -> (BH, b, W) with zeros where no (r, j) lands, written into
    ``out`` (a workspace of at least BH*b*W elements) when given.

    Flattened, the covered entries are b runs of qs*L separated by gaps of qs*(b-2), after a head and
    before a tail of qs*(b-1) each: only those are zeroed, not the whole buffer."""
    BH = ds.shape[0]
    draw = torch.empty(BH, b, W, dtype=ds.dtype, device=ds.device) if out is None else _take(out, BH, b, W)
    _diag(draw, b, L, W, qs).copy_(ds)  # each (r, j) owns a distinct raw entry
    flat = draw.view(BH, b * W)
    edge = qs * (b - 1)
    if edge:
        flat[:, :edge].zero_()
        flat[:, b * W - edge:].zero_()
    if b > 2:  # the gaps between consecutive rows' runs
        flat.as_strided((BH, b - 1, qs * (b - 2)), (b * W, W - qs, 1), edge + qs * L).zero_()
    return draw


def _keep_mask(p_drop: float, seed: int, idx: int, shape, ws: list[torch.Tensor] | None, fresh: bool):
    """Attention-dropout keep mask of block ``idx`` (uint8 0/1), or None without dropout. From a generator
    seeded with seed + idx: the same mask in the forward and whenever the backward redraws it. ``ws``:
    the mask workspaces (random words, mask); with ``fresh`` the mask gets a tensor of its own (kept)."""
    if p_drop == 0.0:
        return None
    words, buf = ws
    gen = torch.Generator(device=words.device)
    gen.manual_seed(seed + idx)
    return keep_mask_u8(shape, p_drop, words.device, gen, out=None if fresh else _take(buf, *shape), words=words)


def _mask_workspaces(like: torch.Tensor, plan, p_drop: float) -> list[torch.Tensor] | None:
    """Random words (int64, a quarter of the largest block) and one uint8 mask buffer; None without dropout."""
    if p_drop == 0.0:
        return None
    size = like.shape[0] * max(b * W for _, b, _, W, _ in plan)
    return [torch.empty(size // 4 + 1, dtype=torch.int64, device=like.device),
            torch.empty(size, dtype=torch.uint8, device=like.device)]


def _probs(qu, qv, k, R, blk, qs: int, ws, fresh: bool = False) -> torch.Tensor:
    """Softmax probabilities of query block [i0, L) over its visible keys: (BH, b, qs*L), computed in
    the workspaces ``ws`` (raw position term in ws[0], scores in ws[1], returned as a view of ws[1]), or
    in a tensor of its own with ``fresh`` (kept for the backward)."""
    i0, b, L, W, c0 = blk
    BH = qu.shape[0]
    raw = torch.bmm(qv[:, i0:L], R[:, c0: c0 + W].transpose(1, 2), out=_take(ws[0], BH, b, W))  # (BH, b, W)
    s = torch.baddbmm(_diag(raw, b, L, W, qs), qu[:, i0:L], k[:, : qs * L].transpose(1, 2),
                      out=None if fresh else _take(ws[1], BH, b, qs * L))  # (BH, b, qs*L)
    s[:, :, qs * i0:] += _diag_mask(b, qs, qu.device, qu.dtype)
    return torch.softmax(s, dim=-1, out=s)


def _workspaces(like: torch.Tensor, plan, count: int) -> list[torch.Tensor]:
    """``count`` flat buffers, each big enough for the largest (BH, b, W) of the plan (W >= qs*L)."""
    size = like.shape[0] * max(b * W for _, b, _, W, _ in plan)
    return [torch.empty(size, dtype=like.dtype, device=like.device) for _ in range(count)]


def _dropped(p: torch.Tensor, keep: torch.Tensor | None, buf: torch.Tensor) -> torch.Tensor:
    """p * keep (the 0/1 mask, unscaled) in the workspace ``buf``; p itself without dropout."""
    return p if keep is None else torch.mul(p, keep, out=_take(buf, *p.shape))


class BlockedRelAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qu, qv, k, v, R, block: int, qs: int, p_drop: float, seed: int, keep_bytes: int):
        """qu, qv: (BH, n, dh); k, v: (BH, qs*n, dh), last dimension contiguous;
        R: (BH, qs*(n + block - 1), dh), row c <-> distance c - qs*(n-1). Attention dropout p_drop
        with masks drawn from ``seed``. Keeps probabilities of the first blocks up to ``keep_bytes``."""
        BH, n, dh = qu.shape
        if R.shape[1] != qs * (n + block - 1) or k.shape[1] != qs * n:
            raise ValueError(f"blocked attention: R has {R.shape[1]} rows and k {k.shape[1]}; "
                             f"expected {qs * (n + block - 1)} and {qs * n}")
        plan = list(_blocks(n, block, qs))
        o = torch.empty_like(qu)
        ws = _workspaces(qu, plan, 2)
        ws_mask = _mask_workspaces(qu, plan, p_drop)
        room = keep_bytes if any(ctx.needs_input_grad[:5]) else 0
        per_element = qu.element_size() + (1 if p_drop else 0)  # a probability and its dropout-mask byte
        kept, kept_masks = [], []
        for idx, blk in enumerate(plan):
            i0, b, L = blk[:3]
            size = BH * b * qs * L * per_element
            store = len(kept) == idx and size <= room  # a prefix of the blocks: the backward indexes them
            p = _probs(qu, qv, k, R, blk, qs, ws, fresh=store)
            mask = _keep_mask(p_drop, seed, idx, p.shape, ws_mask, fresh=store)
            if store:
                kept.append(p)
                kept_masks += [] if mask is None else [mask]
                room -= size
            pm = _dropped(p, mask, ws[0])  # the raw position term in ws[0] is dead by now
            o[:, i0:L] = torch.bmm(pm, v[:, : qs * L])  # (BH, b, dh)
            if mask is not None:  # the 1/keep scale on the (b, dh) result, not the (b, qs*L) mask
                o[:, i0:L] *= keep_scale(p_drop)
        ctx.save_for_backward(qu, qv, k, v, R, o, *kept, *kept_masks)
        ctx.block, ctx.qs, ctx.p_drop, ctx.seed, ctx.n_kept = block, qs, p_drop, seed, len(kept)
        return o

    @staticmethod
    def backward(ctx, do):
        saved = ctx.saved_tensors  # unpacked once: activation checkpointing allows no second unpack
        with torch.autocast(do.device.type, enabled=False):
            return BlockedRelAttention._backward(ctx, saved, do.to(saved[0].dtype))

    @staticmethod
    def _backward(ctx, saved, do):
        qu, qv, k, v, R, o, *kept = saved
        kept, kept_masks = kept[: ctx.n_kept], kept[ctx.n_kept:]
        BH, n, dh = qu.shape
        qs, p_drop = ctx.qs, ctx.p_drop
        plan = list(_blocks(n, ctx.block, qs))
        # softmax backward: ds = p * (g * keep - sum_j p_ij g_ij keep_ij), g = do v^T the gradient of the
        # dropped probabilities p * keep, and sum_j p_ij keep_ij g_ij = do_i . o_i because o = (p * keep) v
        delta = (do * o).sum(-1, keepdim=True)  # (BH, n, 1)
        dqu, dqv = torch.empty_like(qu), torch.empty_like(qv)
        dk, dv, dR = torch.zeros_like(k), torch.zeros_like(v), torch.zeros_like(R)
        ws = _workspaces(qu, plan, 3)  # raw term, then p * keep, then the position gradient / p / ds
        ws_mask = _mask_workspaces(qu, plan, p_drop) if len(kept) < len(plan) else None
        for idx, blk in enumerate(plan):
            i0, b, L, W, c0 = blk
            Lk = qs * L
            if idx < len(kept):
                p, mask = kept[idx], kept_masks[idx] if kept_masks else None
            else:  # recomputed: probabilities from q, k and R, the mask from the seed
                p = _probs(qu, qv, k, R, blk, qs, ws)
                mask = _keep_mask(p_drop, ctx.seed, idx, p.shape, ws_mask, fresh=False)
            do_b = do[:, i0:L] if mask is None else do[:, i0:L] * keep_scale(p_drop)  # (BH, b, dh)
            pm = _dropped(p, mask, ws[0])
            dv[:, :Lk].baddbmm_(pm.transpose(1, 2), do_b)
            ds = torch.bmm(do_b, v[:, :Lk].transpose(1, 2), out=_take(ws[2], BH, b, Lk))  # g, then in place:
            if mask is None:  # ds = p * (g - delta)
                ds.sub_(delta[:, i0:L]).mul_(p)
            else:  # ds = g * (p * keep) - delta * p
                ds.mul_(pm).addcmul_(p, delta[:, i0:L], value=-1.0)
            dqu[:, i0:L] = torch.bmm(ds, k[:, :Lk])
            dk[:, :Lk].baddbmm_(ds.transpose(1, 2), qu[:, i0:L])
            draw = _scatter_diag(ds, b, L, W, qs, out=ws[0])  # (BH, b, W); p * keep is dead by now
            dqv[:, i0:L] = torch.bmm(draw, R[:, c0: c0 + W])
            dR[:, c0: c0 + W].baddbmm_(draw.transpose(1, 2), qv[:, i0:L])
        return dqu, dqv, dk, dv, dR, None, None, None, None, None


def blocked_rel_attention(qu, qv, k, v, R, block: int, qs: int = 1, p_drop: float = 0.0,
                          seed: int | None = None, keep_bytes: int | None = None) -> torch.Tensor:
    """qu, qv: (B, H, n, dh); k, v: (B, H, qs*n, dh); R: (H, qs*(n + block - 1), dh) -> (B, H, n, dh).
    With p_drop > 0 the dropout masks come from ``seed`` (default: drawn from torch's generator).
    ``keep_bytes`` (default KEEP_BYTES): probabilities kept for the backward; 0 recomputes every block."""
    B, H, n, dh = qu.shape
    if p_drop > 0.0 and seed is None:
        seed = int(torch.randint(0, 1 << 62, (1,)).item())
    dev = qu.device.type  # under autocast the kernel computes in the autocast dtype, else in qu's
    dt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else qu.dtype
    # q, k, v: strided views, not copies, when B = 1 (bmm takes any row stride); R (small) contiguous
    flat = [t.to(dt).reshape(B * H, -1, dh) for t in (qu, qv, k, v)]
    Rf = R.to(dt).expand(B, *R.shape).reshape(B * H, *R.shape[1:]).contiguous()
    keep = KEEP_BYTES if keep_bytes is None else keep_bytes
    with torch.autocast(dev, enabled=False):  # one dtype throughout (softmax writes in place)
        o = BlockedRelAttention.apply(*flat, Rf, block, qs, p_drop, seed or 0, keep)
    return o.reshape(B, H, n, dh)
