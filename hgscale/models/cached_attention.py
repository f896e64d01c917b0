"""Attention of new queries over cached keys and values, for incremental decoding (decode.py).

The full forward (attention.py) sees a whole sequence at once. Here the m queries of one decoding call,
at indices q0 .. q0+m-1 of their level, attend to every key cached so far plus the keys of this call,
with the Attention module's own weights (fused qkv projection or its q and k/v slices, output projection,
W_r, the shared u/v). Visibility follows ``attention.Geometry``: query i sees the keys j <= last(i),

    self  last(i) = i               distance (j - i) P
    down  last(i) = (i+1) f - 1     distance (j - f i) P       keys: the (f-1)-shifted sequence
    up    last(i) = i // f          distance (f j - i) P

so a query sees a prefix of the keys, and the query of a one-token step sees all of them.

Everything position-dependent is built once per cache, not per token: ``KVBuffer`` holds the keys and values
in buffers allocated for the whole sequence; ``PosTable`` holds the projected relative embeddings W_r s(d P)
of every distance the site can see, laid out so that the distances of one query's keys are the LAST columns
of the table (a view, no gather); rotary sites read the cos/sin rows of attention._rotary_table, the table
the full forward rotates with. Buffers are head-major, (H, B, ...): a one-token step is then a handful of
batched products over the H B (head, row) pairs, the batch sharing each head's table columns.

``attend_one`` is the attention of a one-token step: no mask, no index tensor. ``attend_static`` does the
same arithmetic over the whole buffer with a mask, the positions read from a device tensor: fixed shapes
and control flow, so a CUDA graph can capture it (generation.GraphStep). ``cached_attention`` serves calls
with several queries (the prompt, chunks): visibility mask, table columns gathered.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from hgscale.models.attention import Attention, _rotary_table, sinusoid


class KVBuffer:
    """Keys stored transposed, (H, B, dh, cap) -- a query's scores are (1, dh) x (dh, n) products, the layout a
    GEMM reads fastest -- and values (H, B, cap, dh) of one attention site; the first ``n`` rows are filled.
    Allocated by ``reserve``, which only grows them (never per token)."""

    def __init__(self):
        self.n, self.cap = 0, 0
        self.kt: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def reserve(self, rows: int, B: int, H: int, dh: int, like: torch.Tensor) -> None:
        """Room for ``rows`` rows (a copy of the filled ones when it grows); rows past ``n`` are not cleared."""
        if rows <= self.cap:
            return
        kt, v = like.new_empty(H, B, dh, rows), like.new_empty(H, B, rows, dh)
        if self.n:
            kt[..., : self.n] = self.kt[..., : self.n]
            v[:, :, : self.n] = self.v[:, :, : self.n]
        self._set(kt, v)

    def _set(self, kt: torch.Tensor, v: torch.Tensor) -> None:
        """Adopt buffers kt, v; ``kt_flat`` (H B, dh, cap) and ``v_flat`` (H B, cap, dh) are their views
        as batches of (head, row) matrices, made once here rather than per token."""
        self.kt, self.v, self.cap = kt, v, kt.shape[3]
        self.kt_flat, self.v_flat = kt.flatten(0, 1), v.flatten(0, 1)

    def clear_unfilled(self) -> None:
        """Zero the rows past ``n``: a static step reads the whole buffer, and its probability 0 times a stale
        NaN would still be NaN."""
        self.kt[..., self.n:] = 0
        self.v[:, :, self.n:] = 0

    def reorder(self, index: torch.Tensor) -> None:
        if self.kt is not None:
            self._set(self.kt.index_select(1, index), self.v.index_select(1, index))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.kt, self.v) if t is not None)


class PosTable:
    """Projected relative embeddings W_r s(d P) of every distance a site can see: ``R`` (H, dh, Rs, M), Rs = f
    for 'up' (one table per residue i mod f), else 1. Entry [:, :, r, c] is distance step (c - (M-1)) + hi - r
    (step f for up, else 1; hi = f - 1 for down, else 0), so query i sees the columns M - (last(i)+1) .. M-1
    of residue r = i mod f (up) in key order. Shared by the batch; rebuilt only when the sequence outgrows it."""

    def __init__(self, kind: str, f: int, P: int):
        self.kind, self.f, self.P = kind, f, P
        self.R: torch.Tensor | None = None
        self.M, self.parts = 0, ()

    def reserve(self, M: int, Wr: torch.Tensor, H: int) -> None:
        """Columns for M keys per residue (every distance projected once, the batch sharing them)."""
        if M <= self.M:
            return
        up, f = self.kind == "up", self.f
        r = torch.arange(f if up else 1, device=Wr.device)[:, None]
        c = torch.arange(M, device=Wr.device)[None, :]
        d = (f if up else 1) * (c - (M - 1)) + (f - 1 if self.kind == "down" else 0) - r  # (Rs, M)
        E = sinusoid(d.flatten() * self.P, Wr.shape[1]).to(Wr.dtype)  # (Rs M, D), as attention._sinusoid_table
        self.R = F.linear(E, Wr).view(r.shape[0], M, H, -1).permute(2, 3, 0, 1).contiguous()
        self.M, self.parts = M, self.R.unbind(2)  # parts[r] (H, dh, M): residue r's columns

    def nbytes(self) -> int:
        return 0 if self.R is None else self.R.numel() * self.R.element_size()


def last_visible(kind: str, f: int, i):
    """Index of the last key query i sees (int or tensor i)."""
    if kind == "self":
        return i
    if kind == "down":
        return (i + 1) * f - 1
    return i // f


class Site:
    """One attention layer's decoding state: its kind, f, P (the cumulative factor of its full-resolution side:
    the block's level, the outer level of a resampling), weights (the Parameter objects: in-place updates and
    .to() are seen), K/V buffer, position table (relative) or rotary steps (original tokens between
    consecutive queries / keys), and ``quv`` (2, H, B, dh), the scratch rows of (q + u, q + v) / sqrt(dh)."""

    def __init__(self, attn: Attention, kind: str, f: int, P: int):
        self.kind, self.f, self.P = kind, f, P
        self.H, self.dh = attn.n_heads, attn.d_head
        self.w_qkv, self.b_qkv, self.w_out, self.b_out = attn.qkv.weight, attn.qkv.bias, attn.out.weight, attn.out.bias
        self.w_pos = attn.pos.weight if attn.relative else None
        self.kv = KVBuffer()
        self.table = PosTable(kind, f, P) if attn.relative else None
        self.q_step, self.k_step = P * (f if kind == "down" else 1), P * (f if kind == "up" else 1)
        self.rot_rows = 0  # rows of the rotary tables rot_q, rot_k ((cos, sin) of the queries', keys' positions)
        self.rot_q = self.rot_k = None
        self.quv: torch.Tensor | None = None

    def reserve(self, kv_rows: int, q_rows: int, table_cols: int, B: int, like: torch.Tensor) -> None:
        self.kv.reserve(kv_rows, B, self.H, self.dh, like)
        if self.table is not None:
            self.table.reserve(table_cols, self.w_pos, self.H)
        if self.quv is None or self.quv.shape[2] != B:
            self._scratch(B, like)
        if self.table is None and max(kv_rows, q_rows) > self.rot_rows:
            self.rot_rows = max(kv_rows, q_rows)
            self.rot_q, self.rot_k = self.rotary(self.q_step, like), self.rotary(self.k_step, like)

    def nbytes(self) -> int:
        n = self.kv.nbytes() + (0 if self.table is None else self.table.nbytes())
        return n + (0 if self.quv is None else self.quv.numel() * self.quv.element_size())

    def reorder(self, index: torch.Tensor) -> None:
        """Keep the batch rows ``index`` (B',): K/V rows follow, the table is shared."""
        self.kv.reorder(index.to(self.w_qkv.device))
        if self.quv is not None:
            self._scratch(index.numel(), self.quv)

    def _scratch(self, B: int, like: torch.Tensor) -> None:
        """``quv`` (2, H, B, dh) and its views qu (H B, 1, dh), qv (H, B, dh); the scale 1/sqrt(dh) as a tensor
        of the buffers' dtype (what the float becomes in the product anyway, without converting it per call)."""
        self.quv = like.new_empty(2, self.H, B, self.dh)
        self.qu, self.qv = self.quv[0].view(self.H * B, 1, self.dh), self.quv[1]
        self.scale = torch.tensor(1.0 / math.sqrt(self.dh), dtype=like.dtype, device=like.device)

    def rotary(self, step: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) rows, (rot_rows, dh), of positions 0, step, 2 step, ...: the full forward's own table."""
        return _rotary_table(self.rot_rows, step, self.dh, like.device, like.dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rows (..., dh) rotated by cos/sin rows broadcast against them, as attention.apply_rotary."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def _project(site: Site, xq: torch.Tensor | None, xkv: torch.Tensor | None) -> tuple:
    """q (H, B, m, dh) of xq (B, m, D), k and v (H, B, m_k, dh) of xkv (B, m_k, D), as Attention.project: a
    self-attention site projects xq once with the fused (D, 3D) weight; otherwise the q and k/v slices, each
    skipped (None) when its input is None."""
    W, b, H, dh = site.w_qkv, site.b_qkv, site.H, site.dh
    D = H * dh
    if site.kind == "self":
        return F.linear(xq, W, b).unflatten(-1, (3, H, dh)).permute(2, 3, 0, 1, 4).unbind(0)
    q = k = v = None
    if xq is not None:
        q = F.linear(xq, W[:D], b[:D]).unflatten(-1, (H, dh)).permute(2, 0, 1, 3)
    if xkv is not None:
        k, v = F.linear(xkv, W[D:], b[D:]).unflatten(-1, (2, H, dh)).permute(2, 3, 0, 1, 4).unbind(0)
    return q, k, v


def _project_rows(site: Site, xq: torch.Tensor | None, xkv: torch.Tensor | None) -> tuple:
    """_project of one row per sequence: xq, xkv (B, D) -> q, k, v (H, B, dh) (views, no copy)."""
    W, b, H, dh = site.w_qkv, site.b_qkv, site.H, site.dh
    if site.kind == "self":
        return F.linear(xq, W, b).view(-1, 3, H, dh).permute(1, 2, 0, 3).unbind(0)
    D = H * dh
    q = None if xq is None else F.linear(xq, W[:D], b[:D]).view(-1, H, dh).transpose(0, 1)
    if xkv is None:
        return q, None, None
    k, v = F.linear(xkv, W[D:], b[D:]).view(-1, 2, H, dh).permute(1, 2, 0, 3).unbind(0)
    return q, k, v


def _scores(site: Site, q: torch.Tensor, uvb: torch.Tensor | None, Kt: torch.Tensor, R: torch.Tensor | None):
    """Scores (H B, 1, n) of one query per (head, row): q (H, B, dh); Kt (H B, dh, n) its keys; relative: R
    (H, dh, n) the table columns of those keys, uvb (2, H, 1, dh). Transformer-XL: [(q+u).k + (q+v).R]/sqrt(dh)."""
    if R is None:
        return torch.bmm(q.reshape(-1, 1, q.shape[2]), Kt).mul_(site.scale)
    torch.add(q, uvb, out=site.quv).mul_(site.scale)  # (2, H, B, dh): the full forward's (q + u) * scale
    bd = torch.bmm(site.qv, R)  # (H, B, n): one product per head, the batch sharing its columns
    return torch.baddbmm(bd.view(-1, 1, R.shape[2]), site.qu, Kt)


def _heads_out(site: Site, o: torch.Tensor) -> torch.Tensor:
    """(H B, 1, dh) per-head outputs -> (B, D) after the output projection."""
    H, dh = site.H, site.dh
    B = o.shape[0] // H
    o = o.view(B, H * dh) if B == 1 else o.view(H, B, dh).transpose(0, 1).reshape(B, H * dh)
    return F.linear(o, site.w_out, site.b_out)


def _rows(site: Site, t):
    """(query index, new key row) at the site's level of the step decoding token t (int, or a 0-dim device
    tensor): self (o, o), o = t / P its row; down (s // f, s), s = o + f - 1 its row of the shifted sequence,
    whose window the query is when s completes one; up (o, o // f), the inner row (when new)."""
    o, f = t // site.P, site.f
    if site.kind == "self":
        return o, o
    return ((o + f - 1) // f, o + f - 1) if site.kind == "down" else (o, o // f)


def attend_one(site: Site, xq: torch.Tensor | None, xkv: torch.Tensor | None, uvb: torch.Tensor | None,
               t: int) -> torch.Tensor | None:
    """The attention of the step that decodes token t: the new key row (self: of xq (B, D); else of xkv (B, D),
    none when None) goes to the buffer, then the query xq (None: no query, returns None) attends to the keys
    it sees -> (B, D) after the output projection; uvb (2, H, 1, dh) the shared u, v (relative). The keys of
    a one-token step's query are all the filled rows (last(i) is the newest key): no mask, no index tensor,
    the table columns a view."""
    q, k, v = _project_rows(site, xq, xkv)  # (H, B, dh)
    f, kv = site.f, site.kv
    i, krow = _rows(site, t)
    if site.table is None:  # rotary: keys cached rotated, the query rotated at its own position
        (cq, sq), (ck, sk) = site.rot_q, site.rot_k
        q = None if q is None else rotate(q, cq[i], sq[i])
        k = None if k is None else rotate(k, ck[krow], sk[krow])
    if k is not None:
        kv.kt.select(3, krow).copy_(k)
        kv.v.select(2, krow).copy_(v)
        kv.n = krow + 1
    if q is None:
        return None
    n, T = krow + 1, site.table  # the query sees keys 0 .. krow
    R = None if T is None else T.parts[i % f if site.kind == "up" else 0][..., T.M - n:]  # (H, dh, n)
    s = _scores(site, q, uvb, kv.kt_flat[..., :n], R)  # (H B, 1, n)
    return _heads_out(site, torch.bmm(torch.softmax(s, -1), kv.v_flat[:, :n]))


def attend_static(site: Site, xq: torch.Tensor | None, xkv: torch.Tensor | None, uvb: torch.Tensor | None,
                  t: torch.Tensor) -> torch.Tensor | None:
    """attend_one with t a 0-dim device tensor: the same arithmetic over the whole buffer, keys after the
    query's last masked, rows written by index_copy_ and table columns gathered at device positions, so the
    shapes and the Python control flow are fixed (a CUDA graph replays it: generation.GraphStep)."""
    q, k, v = _project_rows(site, xq, xkv)
    f, kv, T = site.f, site.kv, site.table
    i, krow = _rows(site, t)
    if T is None:
        (cq, sq), (ck, sk) = site.rot_q, site.rot_k
        q = None if q is None else rotate(q, cq.index_select(0, i.view(1)), sq.index_select(0, i.view(1)))
        k = None if k is None else rotate(k, ck.index_select(0, krow.view(1)), sk.index_select(0, krow.view(1)))
    if k is not None:
        kv.kt.index_copy_(3, krow.view(1), k.unsqueeze(3))
        kv.v.index_copy_(2, krow.view(1), v.unsqueeze(2))
    if q is None:
        return None
    j = torch.arange(kv.cap, device=q.device)
    last = last_visible(site.kind, f, i)
    R = None
    if T is not None:
        col = (j - last + T.M - 1).clamp_(0, T.M - 1)  # (cap,); masked keys point anywhere valid
        R = T.R.flatten(2).index_select(2, col + (i % f) * T.M if site.kind == "up" else col)  # (H, dh, cap)
    s = _scores(site, q, uvb, kv.kt_flat, R).masked_fill_(j > last, float("-inf"))  # (H B, 1, cap)
    return _heads_out(site, torch.bmm(torch.softmax(s, -1), kv.v_flat))


def cached_attention(site: Site, xq: torch.Tensor, xkv: torch.Tensor | None, uv: torch.Tensor | None,
                     q0: int) -> torch.Tensor:
    """Attention output (B, m, D) of the new queries ``xq`` (B, m, D), indices q0 .. q0+m-1, over every key
    cached so far and the new ones: xkv (B, m_k, D), appended to the buffer first (None: self-attention,
    the keys are the queries' own inputs); uv (2, H, dh) for relative attention."""
    B, m, D = xq.shape
    q, k, v = _project(site, xq, xkv if site.kind != "self" else None)  # (H, B, m, dh)
    kv, n0, m_k = site.kv, site.kv.n, k.shape[2]
    if site.table is None:
        cos, sin = site.rot_k
        k = rotate(k, cos[n0: n0 + m_k], sin[n0: n0 + m_k])
    kv.kt[..., n0: n0 + m_k] = k.transpose(2, 3)
    kv.v[:, :, n0: n0 + m_k] = v
    kv.n = n = n0 + m_k
    if m == 0:  # no new query at this level in this call (down: no window completed); the keys wait
        return xq
    Kt, V = kv.kt[..., :n], kv.v[:, :, :n]  # (H, B, dh, n), (H, B, n, dh)
    i = torch.arange(q0, q0 + m, device=xq.device)[:, None]
    j = torch.arange(n, device=xq.device)[None, :]
    last = last_visible(site.kind, site.f, i)  # (m, 1)
    if site.table is None:
        cos, sin = site.rot_q
        s = torch.matmul(rotate(q, cos[q0: q0 + m], sin[q0: q0 + m]), Kt) * (1.0 / math.sqrt(site.dh))
    else:
        quv = torch.add(q, uv[:, :, None, None]).mul_(1.0 / math.sqrt(site.dh))  # (2, H, B, m, dh)
        c = last_visible(site.kind, site.f, q0 + m - 1) + 1  # the most keys a query sees: the last query's
        R = site.table.R[..., site.table.M - c:].flatten(2)  # (H, dh, Rs c): the columns those keys need
        col = (j - last + c - 1).clamp_(0, c - 1)  # invisible pairs point anywhere valid; they are masked
        if site.kind == "up":
            col = col + (i % site.f) * c
        bd = torch.bmm(quv[1].reshape(site.H, B * m, site.dh), R).view(site.H, B, m, -1)  # every query, column
        s = torch.matmul(quv[0], Kt) + bd.gather(-1, col.expand(site.H, B, m, n))
    o = torch.matmul(s.masked_fill(j > last, float("-inf")).softmax(-1), V)  # (H, B, m, dh)
    return F.linear(o.permute(1, 2, 0, 3).reshape(B, m, D), site.w_out, site.b_out)


# ------------------------------------------------------------------------------- a layer's weights

def norm_args(ln: nn.LayerNorm) -> tuple:
    return ln.normalized_shape, ln.weight, ln.bias, ln.eps


def _lin(lin: nn.Module) -> tuple:
    return lin.weight, lin.bias


class Plan:
    """What one layer's one-token step reads, gathered once per cache so a step does no module lookups: layer
    norms as (shape, weight, bias, eps), linears as (weight, bias) -- the Parameter objects themselves, so
    in-place updates and .to() are seen -- and the resampling method."""

    def __init__(self, layer: nn.Module):
        self.kind, self.f, self.outer = layer.kind, getattr(layer, "f", 1), getattr(layer, "outer", 1)
        if layer.kind == "block":
            b = layer.block
            self.ln1, self.ln2, self.ff = norm_args(b.ln1), norm_args(b.ln2), _lin(b.ff.fc1) + _lin(b.ff.fc2)
            return
        self.ln_in, self.proj = norm_args(layer.ln_in), None
        mod = layer.shorten if layer.kind == "down" else layer.upsample
        self.method, pool = mod.method, getattr(mod, "pool" if layer.kind == "down" else "up", None)
        if layer.kind == "up":
            self.ln_out = norm_args(layer.ln_out)
        if self.method == "linear":
            self.proj = _lin(pool.proj)
        elif self.method.startswith("attention_"):
            self.ln_kv, self.ln_q, self.ln_ff = norm_args(pool.ln_in), norm_args(pool.ln_q), norm_args(pool.ln_ff)
            self.ff = _lin(pool.ff.fc1) + _lin(pool.ff.fc2)
            self.proj = _lin(pool.resample.proj) if hasattr(pool, "resample") else None


def lnorm(x: torch.Tensor, w: tuple) -> torch.Tensor:
    return torch.layer_norm(x, *w)


def ffn(x: torch.Tensor, w: tuple) -> torch.Tensor:
    """FeedForward in eval mode (no dropout), (..., D) -> (..., D); w = (fc1 weight, bias, fc2 weight, bias)."""
    return F.linear(F.gelu(F.linear(x, w[0], w[1]), approximate="tanh"), w[2], w[3])
