"""Multi-head attention with Transformer-XL relative positions or rotary positions.

One module serves the three places attention appears in Hourglass; they differ only in where
queries and keys sit and which keys a query may see (``Geometry``). Positions are measured in
original-token units, so a level at cumulative factor P places its token i at i*P:

    self  (blocks)          query i at i*P,     key j at j*P,     sees j <= i
    down  (attention pool)  query i at i*f*P,   key j at j*P,     sees j <  (i+1)*f   (keys are shifted by f-1)
    up    (attention up)    query i at i*P,     key j at j*f*P,   sees j <= i // f

Relative scores follow trax ``rel_attention.py`` (Dai et al. 2019):
    score(i, j) = [(q_i + u) . k_j + (q_i + v) . W_r s(pos_k(j) - pos_q(i))] / sqrt(d_head)
with s() the sinusoidal embedding of width d_model and u, v shared by every layer of the model.
trax leaves the upsampling distances unscaled by P; here they are scaled like every other
distance (identical for one-level models, consistent in original-token units for nested ones).
The projection W_r has no bias: a bias adds (q_i + v) . b to every score of row i, which softmax
cancels, so its gradient would be identically zero.

Kernels for the relative score (chosen by ``ModelConfig.attn_impl``):
    naive    gather the position term from a (Tq, n_distances) table; explicit softmax. Reference.
    sdpa     Transformer-XL relative shift of the position term, passed to
             scaled_dot_product_attention as an additive float mask (fused kernels on GPU).
    blocked  CPU path (blocked_attention.py): blocks of 128 queries against only the keys they may
             see (the masked upper half is never computed), position term by a strided view of
             one matmul per block, hand-written backward that recomputes the probabilities it did
             not keep (O(T * block) memory beyond a fixed budget). ~2.5x faster than naive at T = 2048.
    fused    GPU path (fused_attention.py): the position term factorised into a dot product of
             query and key features, so FlexAttention (CUDA) or SDPA's fused kernels never
             materialise T x T; the score GEMM is (d_head + D) / d_head times wider.
'auto' takes fused on GPU and blocked on CPU.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

from hgscale.models import blocked_attention
from hgscale.models.blocked_attention import blocked_rel_attention
from hgscale.models.fused_attention import rel_attention_fused
from hgscale.models.sequence import WHOLE

BLOCK = 128  # query rows per block of the CPU path (64-128 measured fastest at T=2048, d_head=64)


def _cached(fn):
    """Memoise a constant table. Built outside inference mode, so a table first made during evaluation
    under torch.inference_mode() can later be saved for backward in training."""
    @lru_cache(maxsize=64)
    def wrapper(*args):
        with torch.inference_mode(False):
            return fn(*args)
    return wrapper


@dataclass(frozen=True)
class Geometry:
    """Where queries and keys sit. ``kind`` is 'self', 'down' or 'up'; f is the level's own factor; P the
    cumulative factor of the outer (full-resolution side) sequence."""

    kind: str
    n_q: int
    n_k: int
    f: int = 1
    P: int = 1

    @property
    def q_step(self) -> int:  # original tokens between consecutive queries
        return self.P * (self.f if self.kind == "down" else 1)

    @property
    def k_step(self) -> int:
        return self.P * (self.f if self.kind == "up" else 1)

    def offsets(self, device=None, first_query: int = 0):
        """(n_q - first_query, n_k) integer distance pos_k - pos_q in units of P, and the visibility mask, for
        queries first_query .. n_q-1 (incremental decoding asks for its new queries only)."""
        i = torch.arange(first_query, self.n_q, device=device)[:, None]
        j = torch.arange(self.n_k, device=device)[None, :]
        if self.kind == "self":
            return j - i, j <= i
        if self.kind == "down":
            return j - self.f * i, j < (i + 1) * self.f
        return self.f * j - i, j <= torch.div(i, self.f, rounding_mode="floor")


def _inv_freq(dim: int, device) -> torch.Tensor:
    """(dim/2,) float64 frequencies 10000^(-2m/dim). float64: angles of distances in the thousands keep
    their precision; the tables are built once per level and shape."""
    return 1.0 / (10000 ** (torch.arange(0, dim, 2, device=device, dtype=torch.float64) / dim))


def sinusoid(pos: torch.Tensor, dim: int) -> torch.Tensor:
    """trax Sinusoidal_Embeddings: (n,) positions -> (n, dim) = [sin(pos*w) | cos(pos*w)]."""
    ang = pos.double()[:, None] * _inv_freq(dim, pos.device)[None, :]
    return torch.cat([ang.sin(), ang.cos()], dim=1)


@_cached
def _sinusoid_table(lo: int, hi: int, scale: int, dim: int, device: torch.device, dtype: torch.dtype,
                    step: int = 1, shift: int = 0) -> torch.Tensor:
    # (hi - lo + 1, dim) for distances scale*(step*c - shift), c = lo..hi; shared by every layer at a level
    return sinusoid((torch.arange(lo, hi + 1, device=device) * step - shift) * scale, dim).to(dtype)


@_cached
def _gather_plan(geo: Geometry, device: torch.device):
    """Index into a table of visible distances lo..hi (row c <-> distance lo + c), and the mask."""
    off, vis = geo.offsets(device)
    lo, hi = int(off[vis].min()), int(off[vis].max())
    idx = (off - lo).clamp(0, hi - lo)  # invisible pairs point anywhere valid; they are masked
    return lo, hi, idx, vis


@_cached
def _causal_block_mask(b: int, device: torch.device) -> torch.Tensor:
    return torch.full((b, b), float("-inf"), device=device).triu(1)  # (b, b) additive


def _gathered_bias(qv, Wr, geo: Geometry) -> torch.Tensor:
    """Position term (q+v) . R[dist(i, j)] gathered from a (n_q, n_dist) product; -inf where masked."""
    B, H, _, dh = qv.shape
    lo, hi, idx, vis = _gather_plan(geo, qv.device)
    R = F.linear(_sinusoid_table(lo, hi, geo.P, Wr.shape[1], qv.device, Wr.dtype), Wr)  # (n_dist, D)
    R = R.view(-1, H, dh).transpose(0, 1)  # (H, n_dist, dh)
    bd = torch.matmul(qv, R.transpose(-1, -2)).gather(-1, idx.expand(B, H, -1, -1))  # (B, H, n_q, n_k)
    return bd.masked_fill(~vis, float("-inf"))


def rel_attention_naive(qu, qv, k, v, Wr, geo: Geometry, dropout_p=0.0, training=False):
    """Reference kernel. qu = (q+u)/sqrt(d), qv = (q+v)/sqrt(d), k, v: (B, H, n, dh); Wr: (D, D)."""
    s = torch.matmul(qu, k.transpose(-1, -2)) + _gathered_bias(qv, Wr, geo)  # (B, H, n_q, n_k)
    p = F.dropout(s.softmax(-1), dropout_p, training)
    return torch.matmul(p, v)


def rel_attention_sdpa(qu, qv, k, v, Wr, geo: Geometry, dropout_p=0.0, training=False):
    """Position term as an additive float mask of scaled_dot_product_attention (fused on GPU)."""
    B, H, n, dh = qu.shape
    D = Wr.shape[1]
    if geo.kind != "self":  # resampling geometry: gather (2 layers per level, not the hot path)
        bias = _gathered_bias(qv, Wr, geo)
    else:
        R = F.linear(_sinusoid_table(-(n - 1), 0, geo.P, D, qu.device, Wr.dtype), Wr)  # distances -(n-1)..0
        R = R.view(n, H, dh).transpose(0, 1)  # (H, n, dh)
        raw = torch.matmul(qv, R.transpose(-1, -2))  # (B, H, n, n): column c <-> distance c - (n-1)
        # Transformer-XL shift: pad a zero column, view as (n+1, n), drop the first row -> bd[i, j] = raw[i, j-i+n-1]
        bd = F.pad(raw, (1, 0)).view(B, H, n + 1, n)[:, :, 1:].reshape(B, H, n, n)
        bias = bd + _causal_block_mask(n, qu.device).to(bd.dtype)  # j > i hold garbage -> -inf
    return F.scaled_dot_product_attention(qu, k, v, attn_mask=bias, dropout_p=dropout_p if training else 0.0,
                                          scale=1.0)


def _rel_table(Wr, H, lo, hi, step, shift, P, device, dtype):
    """Projected relative embeddings of distances P*(step*c - shift), c = lo..hi -> (H, hi-lo+1, dh)."""
    E = _sinusoid_table(lo, hi, P, Wr.shape[1], device, dtype, step, shift)
    return F.linear(E, Wr).view(hi - lo + 1, H, -1).transpose(0, 1)


@torch.compiler.disable  # a hand-written kernel with its own backward: compiled layers call it eagerly
def rel_attention_blocked(qu, qv, k, v, Wr, geo: Geometry, dropout_p=0.0, training=False, block=BLOCK,
                          keep_bytes: int | None = None):
    """CPU kernel (blocked_attention.py): query blocks see only the keys they may see.

    self: as is; down: pooled queries every f keys (qs = f); up: full-resolution query i = a*f + r sees
    shortened keys j <= a at distance f*(j - a) - r, so each residue r is a causal self-attention of
    its own with the distance table shifted by r."""
    B, H, n, dh = qu.shape
    p = dropout_p if training else 0.0
    # probabilities kept per layer; read at call time so that benchmarks can change the budget
    keep = blocked_attention.KEEP_BYTES if keep_bytes is None else keep_bytes
    if geo.kind == "up":
        m, f = k.shape[2], geo.f
        block = min(block, m)
        outs = [blocked_rel_attention(qu[:, :, r::f], qv[:, :, r::f], k, v,
                                      _rel_table(Wr, H, -(m - 1), block - 1, f, r, geo.P, qu.device, Wr.dtype),
                                      block, p_drop=p, keep_bytes=keep // f)
                for r in range(f)]  # f x (B, H, m, dh)
        return torch.stack(outs, dim=3).view(B, H, n, dh)  # query a*f + r
    block = min(block, n)
    qs = geo.f if geo.kind == "down" else 1  # down: query i at key position f*i
    # distances -qs(n-1) .. qs*block - 1 (the largest only feed masked entries of diagonal blocks)
    R = _rel_table(Wr, H, -qs * (n - 1), qs * block - 1, 1, 0, geo.P, qu.device, Wr.dtype)
    return blocked_rel_attention(qu, qv, k, v, R, block, qs=qs, p_drop=p, keep_bytes=keep)


REL_KERNELS = {"naive": rel_attention_naive, "sdpa": rel_attention_sdpa, "blocked": rel_attention_blocked,
               "fused": rel_attention_fused}


def pick_kernel(impl: str, device: torch.device) -> str:
    """model.attn_impl -> kernel name: 'auto' is blocked on CPU (fused kernels cost more FLOPs than CPUs
    can spare) and fused elsewhere (O(T) memory; FlexAttention where it compiles, else SDPA)."""
    if impl != "auto":
        return impl
    return "blocked" if device.type == "cpu" else "fused"


# ------------------------------------------------------------------------------------------- rotary

@_cached
def _rotary_table(n: int, step: int, dh: int, device: torch.device, dtype: torch.dtype):
    ang = (torch.arange(n, device=device, dtype=torch.float64) * step)[:, None] * _inv_freq(dh, device)[None, :]
    ang = torch.cat([ang, ang], dim=1)  # (n, dh), rotate-half layout
    return ang.cos().to(dtype), ang.sin().to(dtype)


def apply_rotary(x: torch.Tensor, step: int) -> torch.Tensor:
    """Rotate (B, H, n, dh) by positions 0, step, 2*step, ... (original-token units)."""
    cos, sin = _rotary_table(x.shape[2], step, x.shape[3], x.device, x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


@_cached
def _bool_mask(geo: Geometry, device: torch.device) -> torch.Tensor:
    return geo.offsets(device)[1]


def rotary_attention(q, k, v, geo: Geometry, dropout_p=0.0, training=False):
    q, k = apply_rotary(q, geo.q_step), apply_rotary(k, geo.k_step)
    p = dropout_p if training else 0.0
    if geo.kind == "self":
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=_bool_mask(geo, q.device), dropout_p=p)


def rotary_attention_naive(q, k, v, geo: Geometry, dropout_p=0.0, training=False):
    """Reference: explicit scores and softmax."""
    q, k = apply_rotary(q, geo.q_step), apply_rotary(k, geo.k_step)
    s = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    s = s.masked_fill(~_bool_mask(geo, q.device), float("-inf"))
    return torch.matmul(F.dropout(s.softmax(-1), dropout_p, training), v)


# ------------------------------------------------------------------------------------------- module

class Attention(nn.Module):
    """Multi-head attention. Self-attention uses one fused (D, 3D) projection; resampling attention uses
    its query and key/value slices on different inputs."""

    def __init__(self, d_model: int, n_heads: int, attention: str, attn_dropout: float, impl: str = "auto"):
        super().__init__()
        self.n_heads, self.d_head = n_heads, d_model // n_heads
        self.relative = attention == "relative"
        self.attn_dropout, self.impl = attn_dropout, impl
        self.seq = WHOLE  # the sequence as this rank holds it (hgscale.models.sequence)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)
        if self.relative:
            self.pos = nn.Linear(d_model, d_model, bias=False)  # W_r

    def _heads(self, t: torch.Tensor) -> torch.Tensor:  # (B, n, D) -> (B, H, n, dh)
        B, n, _ = t.shape
        return t.view(B, n, self.n_heads, self.d_head).transpose(1, 2)

    def project(self, xq: torch.Tensor, xkv: torch.Tensor | None) -> tuple:
        """q (B, H, n_q, dh), k and v (B, H, n_k, dh) of xq (B, n_q, D) and xkv (B, n_k, D), or of xq alone
        for self-attention (one fused projection)."""
        D = xq.shape[-1]
        if xkv is None:
            q, k, v = self.qkv(xq).split(D, dim=-1)
        else:
            q = F.linear(xq, self.qkv.weight[:D], self.qkv.bias[:D])
            k, v = F.linear(xkv, self.qkv.weight[D:], self.qkv.bias[D:]).split(D, dim=-1)
        return self._heads(q), self._heads(k), self._heads(v)

    def forward(self, xq: torch.Tensor, xkv: torch.Tensor | None, uv: torch.Tensor | None, geo: Geometry,
                kernel: str | None = None) -> torch.Tensor:
        """xq (B, n_q, D), xkv (B, n_k, D) or None for self-attention; uv (2, H, dh) shared biases. With a sharded
        sequence (``self.seq``), xq and xkv are this rank's shards and ``geo`` their kind and factors; the core
        sees every position for its share of the heads."""
        q, k, v = self.project(xq, xkv)  # (B, H, n, dh)
        o = self.seq.attend(lambda q, k, v, heads: self.core(q, k, v, uv, heads, geo, kernel), q, k, v)
        B, H, n, dh = o.shape
        return self.out(o.transpose(1, 2).reshape(B, n, H * dh))

    def core(self, q, k, v, uv: torch.Tensor | None, heads: slice, geo: Geometry, kernel: str | None = None):
        """Attention of q (B, h, n_q, dh) on k, v (B, h, n_k, dh), the model's heads ``heads`` (h of them) over
        every position: u, v and the rows of W_r are those heads' own."""
        if (q.shape[2], k.shape[2]) != (geo.n_q, geo.n_k):  # a shard's geometry: the gathered lengths
            geo = Geometry(geo.kind, q.shape[2], k.shape[2], geo.f, geo.P)
        if not self.relative:
            fn = rotary_attention_naive if kernel == "naive" else rotary_attention
            return fn(q, k, v, geo, self.attn_dropout, self.training)
        scale = 1.0 / math.sqrt(self.d_head)
        qu = torch.add(q, uv[0][heads][:, None]).mul_(scale)  # scale folded into the (n, dh) operands, not (n, n)
        qv = torch.add(q, uv[1][heads][:, None]).mul_(scale)
        Wr = self.pos.weight  # (D, D): output rows h*dh .. (h+1)*dh project head h's position features
        if heads != slice(None):
            Wr = Wr[heads.start * self.d_head:heads.stop * self.d_head]
        kern = REL_KERNELS[kernel or pick_kernel(self.impl, q.device)]
        if kern is rel_attention_blocked and heads != slice(None):
            # the probabilities kept for backward: a whole call's budget, shared by the ranks holding its heads (each
            # recomputes the same fraction as one rank would, in 1/N of the memory)
            keep = blocked_attention.KEEP_BYTES * (heads.stop - heads.start) // self.n_heads
            return kern(qu, qv, k, v, Wr, geo, self.attn_dropout, self.training, keep_bytes=keep)
        return kern(qu, qv, k, v, Wr, geo, self.attn_dropout, self.training)
