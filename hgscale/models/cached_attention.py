"""Attention of new queries over cached keys and values, for incremental decoding (decode.py).

The full forward (attention.py) sees a whole sequence at once. Here the m queries of one decoding call,
at indices q0 .. q0+m-1 of their level, attend to every key cached so far plus the keys of this call,
with the Attention module's own weights (fused qkv projection or its q and k/v slices, output projection,
W_r, the shared u/v). Visibility and distances come from ``attention.Geometry`` (original-token units):

    self  query i, key j <= i                   distance (j - i) P
    down  pooled query i, key j < (i+1) f       distance (j - f i) P    keys: the (f-1)-shifted sequence
    up    query i, shortened key j <= i // f    distance (f j - i) P

Relative attention computes the position term (q_i + v) . W_r s(d) for the new queries only, against a
per-layer table of projected distances ``RelTable`` that grows with the sequence: each distance is
projected once (one (D, D) product per new distance, shared by the batch) instead of the whole table
per call. Rotary attention caches its keys already rotated.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from hgscale.models.attention import Attention, Geometry, _inv_freq, sinusoid


class KVCache:
    """Keys and values of one attention layer, (B, H, n, dh) each, in buffers that grow when full.

    ``capacity`` (rows) sizes the first allocation; a longer sequence doubles it (amortised O(1) per row)."""

    def __init__(self, capacity: int = 0):
        self.capacity, self.n = int(capacity), 0
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add (B, H, m, dh) rows; return views of every cached row, (B, H, n, dh)."""
        m = k.shape[2]
        have = 0 if self.k is None else self.k.shape[2]
        if self.n + m > have:
            cap = max(self.n + m, self.capacity if self.k is None else 2 * have)
            B, H, _, dh = k.shape
            new_k, new_v = k.new_empty(B, H, cap, dh), v.new_empty(B, H, cap, dh)
            if self.n:
                new_k[:, :, : self.n] = self.k[:, :, : self.n]
                new_v[:, :, : self.n] = self.v[:, :, : self.n]
            self.k, self.v = new_k, new_v
        self.k[:, :, self.n: self.n + m] = k
        self.v[:, :, self.n: self.n + m] = v
        self.n += m
        return self.k[:, :, : self.n], self.v[:, :, : self.n]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.k, self.v) if t is not None)


class RelTable:
    """Projected relative embeddings W_r s(d P) of distances d = hi, hi-1, hi-2, ...: (H, rows, dh).

    Row r holds distance hi - r; hi is the largest visible distance (0 for self and up, f-1 for down).
    The first call builds ``rows`` (what the cache's max_len needs); longer sequences double it, up to
    ``max_rows`` (what model.max_seq_len needs)."""

    def __init__(self, hi: int, P: int, rows: int, max_rows: int):
        self.hi, self.P, self.first_rows, self.max_rows = hi, P, rows, max_rows
        self.R: torch.Tensor | None = None

    def rows(self, n: int, Wr: torch.Tensor, H: int) -> torch.Tensor:
        """(H, n, dh) projected rows of distances hi .. hi - n + 1, projecting only those not yet in the table."""
        have = 0 if self.R is None else self.R.shape[1]
        if n > have:
            new = max(n, self.first_rows if self.R is None else min(2 * have, self.max_rows))
            d = self.hi - torch.arange(have, new, device=Wr.device)  # distances in units of P
            E = sinusoid(d * self.P, Wr.shape[1]).to(Wr.dtype)  # (new - have, D), as attention._sinusoid_table
            R = F.linear(E, Wr).view(new - have, H, -1).transpose(0, 1)  # (H, new - have, dh)
            self.R = R.contiguous() if self.R is None else torch.cat([self.R, R], dim=1)
        return self.R[:, :n]

    def nbytes(self) -> int:
        return 0 if self.R is None else self.R.numel() * self.R.element_size()


def rotate_at(x: torch.Tensor, first: int, step: int) -> torch.Tensor:
    """Rotary rotation of (B, H, m, dh) rows at positions (first + r) * step, as attention.apply_rotary
    rotates row r of a whole sequence by r * step."""
    m, dh = x.shape[2], x.shape[3]
    pos = torch.arange(first, first + m, device=x.device, dtype=torch.float64) * step
    ang = pos[:, None] * _inv_freq(dh, x.device)[None, :]
    ang = torch.cat([ang, ang], dim=1)  # (m, dh), rotate-half layout
    x1, x2 = x.chunk(2, dim=-1)
    return x * ang.cos().to(x.dtype) + torch.cat([-x2, x1], dim=-1) * ang.sin().to(x.dtype)


def cached_attention(attn: Attention, xq: torch.Tensor, xkv: torch.Tensor | None, uv: torch.Tensor | None,
                     kv: KVCache, rel: RelTable | None, kind: str, q0: int, f: int, P: int) -> torch.Tensor:
    """Attention output (B, m, D) of the new queries ``xq`` (B, m, D), indices q0 .. q0+m-1.

    xkv (B, m_k, D): new key/value inputs, appended to ``kv`` first (None: self-attention, the keys are
    the queries' own inputs). kind, f, P as in attention.Geometry; uv (2, H, dh) for relative attention."""
    B, m, _ = xq.shape
    H, dh = attn.n_heads, attn.d_head
    q, k, v = attn.project(xq, xkv)  # (B, H, n, dh)
    geo = Geometry(kind, q0 + m, kv.n + k.shape[2], f, P)
    if not attn.relative:
        k = rotate_at(k, kv.n, geo.k_step)
    K, V = kv.append(k, v)  # (B, H, n_k, dh)
    if m == 0:  # no new query at this level in this call (down: no window completed); the keys wait in kv
        return xq
    off, vis = geo.offsets(xq.device, first_query=q0)  # (m, n_k) distances in units of P, visibility
    if attn.relative:
        s = _relative_scores(q, K, uv, rel, attn.pos.weight, off, vis)
    else:
        s = torch.matmul(rotate_at(q, q0, geo.q_step), K.transpose(-1, -2)) * (1.0 / math.sqrt(dh))
    o = torch.matmul(s.masked_fill(~vis, float("-inf")).softmax(-1), V)  # (B, H, m, dh)
    return attn.out(o.transpose(1, 2).reshape(B, m, H * dh))


def _relative_scores(q: torch.Tensor, K: torch.Tensor, uv: torch.Tensor, rel: RelTable, Wr: torch.Tensor,
                     off: torch.Tensor, vis: torch.Tensor) -> torch.Tensor:
    """Transformer-XL scores [(q_i + u) . k_j + (q_i + v) . W_r s(d_ij P)] / sqrt(dh), (B, H, m, n_k), of new
    queries q (B, H, m, dh) against every key K (B, H, n_k, dh); off, vis (m, n_k) from Geometry.offsets.
    Invisible entries hold finite garbage: the caller masks them."""
    B, H, _, dh = q.shape
    scale = 1.0 / math.sqrt(dh)
    qu = torch.add(q, uv[0][:, None]).mul_(scale)
    qv = torch.add(q, uv[1][:, None]).mul_(scale)
    n_rows = rel.hi - int(off.masked_fill(~vis, rel.hi).min()) + 1  # distances hi .. the smallest visible
    R = rel.rows(n_rows, Wr, H)  # (H, n_rows, dh)
    idx = (rel.hi - off).clamp_(0, n_rows - 1)  # invisible pairs point anywhere valid; they are masked
    bd = torch.matmul(qv, R.transpose(-1, -2)).gather(-1, idx.expand(B, H, -1, -1))  # (B, H, m, n_k)
    return torch.matmul(qu, K.transpose(-1, -2)) + bd
