"""Exact incremental decoding of HourglassLM.

    cache = model.init_cache(batch_size)          # empty; model.eval() first
    logits = model.decode(prompt, cache)          # (B, n0) -> (B, n0, V)
    logits = model.decode(next_tokens, cache)     # (B, n) -> (B, n, V), n >= 1, positions n0 .. n0+n-1

The logits are those the full forward gives at the same positions of the cached sequence (fp32: equal to
~1e-6). Each call walks the layer list with the new rows of every level (``start`` = index of the first
new row at that level) and a per-layer state:

    block   KVCache of its self-attention (+ RelTable)                     one row per token of its level
    down    rows seen; the pool-input rows of the incomplete window (< f); attention pooling: KVCache over
            the shifted sequence (+ RelTable). shift_right(x, f-1) puts f-1 zero rows first, so shortened
            token i (window rows if .. if+f-1 of the shifted sequence = inputs (i-1)f+1 .. if) exists as
            soon as input if does: n inputs make ceil(n/f) shortened tokens, the inner level advances once
            per completed group, and its rows are final (causal) the moment they exist.
    up      output t needs the inner row t // f: keeps the upsampled rows of the newest inner row (f rows,
            the ones the next outer positions of that group read); attention upsampling: KVCache over the
            inner rows (+ RelTable).

Cache memory: K/V rows of every attention site (a level at factor P holds T/P rows), tables of projected
distances (shared by the batch) and the < f pending rows per resampling layer. Eval mode only (dropout
would make cached and full logits differ); sequences up to model.max_seq_len.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

from hgscale.models.attention import Attention
from hgscale.models.cached_attention import KVCache, RelTable, cached_attention
from hgscale.models.resampling import avg_pool

if TYPE_CHECKING:
    from hgscale.config import ModelConfig

# ``model`` below is an HourglassLM, typed as nn.Module: decoding reads only its ``cfg`` and ``layers``, and
# hourglass.py imports this module (HourglassLM.init_cache / .decode), so this one does not import it back.


class _LayerState:
    """Decoding state of one layer (see the module docstring); unused fields stay None / 0."""

    def __init__(self, kv: KVCache | None = None, rel: RelTable | None = None):
        self.kv, self.rel = kv, rel
        self.n_in = 0       # rows of its input seen so far
        self.n_out = 0      # down: shortened rows produced
        self.pending: torch.Tensor | None = None  # down: (B, r < f, D) rows of the incomplete window; up: (B, f, D)

    def nbytes(self) -> int:
        n = sum(c.nbytes() for c in (self.kv, self.rel) if c is not None)
        return n + (0 if self.pending is None else self.pending.numel() * self.pending.element_size())


class DecodeCache:
    """Everything ``decode`` keeps between calls for ``batch_size`` sequences of one model."""

    def __init__(self, model: nn.Module, batch_size: int, max_len: int | None = None):
        cfg = model.cfg
        if int(batch_size) < 1:
            raise ValueError(f"batch_size = {batch_size} must be >= 1")
        if max_len is not None and int(max_len) < 1:
            raise ValueError(f"max_len = {max_len} must be >= 1 (or None: model.max_seq_len)")
        if cfg.vanilla_attention == "lsh":  # named here: _attention_of would only name the module's class
            raise NotImplementedError("incremental decoding does not support model.vanilla_attention = 'lsh'; "
                                      "generate with use_cache=False (a full forward per token) for this model")
        self.model_id, self.batch_size, self.length = id(model), int(batch_size), 0
        self.max_len = min(int(max_len or cfg.max_seq_len), cfg.max_seq_len)  # sizes the first buffers
        self.kinds = [layer.kind for layer in model.layers]
        self.states = [_state_for(layer, cfg, self.max_len) for layer in model.layers]

    def nbytes(self) -> int:
        """Bytes held by the cache (buffers as allocated, tables, pending rows)."""
        return sum(s.nbytes() for s in self.states)

    def kv_nbytes(self) -> int:
        """Bytes of the key/value buffers alone."""
        return sum(s.kv.nbytes() for s in self.states if s.kv is not None)

    def kv_rows(self) -> list[tuple[str, int]]:
        """(layer kind, cached key rows) for every layer with a K/V cache, in layer order."""
        return [(kind, s.kv.n) for kind, s in zip(self.kinds, self.states, strict=True) if s.kv is not None]


def _attention_of(layer: nn.Module) -> Attention | None:
    """The Attention module a layer decodes with, or None (embed, head, pooling without attention)."""
    if layer.kind == "block":
        mod = layer.block.attn
    elif layer.kind == "down" and layer.shorten.method.startswith("attention_"):
        mod = layer.shorten.pool.attn
    elif layer.kind == "up" and layer.upsample.method.startswith("attention_"):
        mod = layer.upsample.up.attn
    else:
        return None
    if type(mod) is not Attention:
        raise NotImplementedError(f"incremental decoding has no cached form of {type(mod).__name__} "
                                  f"(layer kind {layer.kind!r}); generate with use_cache=False")
    return mod


def rows_needed(layer: nn.Module, n: int) -> tuple[int, int]:
    """(K/V rows, distance-table rows) a layer's attention holds after n tokens at full resolution."""
    if layer.kind == "block":  # keys: its own rows; distances -i .. 0
        m = math.ceil(n / layer.factor)
        return m, m
    m = math.ceil(n / layer.outer)  # rows of the outer sequence
    if layer.kind == "down":  # keys: the (f-1)-shifted outer rows; distances j - f i in [-(f i), f-1]
        return m + layer.f - 1, layer.f * math.ceil(m / layer.f)
    return math.ceil(m / layer.f), m  # up: keys: the inner rows; distances f j - i in [-i, 0]


def _state_for(layer: nn.Module, cfg: ModelConfig, max_len: int) -> _LayerState:
    """An empty state for ``layer``: K/V buffers sized for max_len tokens; a distance table that may grow to
    what model.max_seq_len needs."""
    attn = _attention_of(layer)
    if attn is None:
        return _LayerState()
    P = layer.factor if layer.kind == "block" else layer.outer
    hi = layer.f - 1 if layer.kind == "down" else 0  # the largest visible distance
    rows, table = rows_needed(layer, max_len)
    rel = RelTable(hi, P, table, rows_needed(layer, cfg.max_seq_len)[1]) if attn.relative else None
    return _LayerState(KVCache(rows), rel)


def _check(model: nn.Module, tokens: torch.Tensor, cache: DecodeCache) -> None:
    if model.training:
        raise RuntimeError("decode runs in eval mode only (dropout would make cached and full logits differ): "
                           "call model.eval() first")
    if not isinstance(cache, DecodeCache) or cache.model_id != id(model):
        raise ValueError("this cache was not made by this model: make one with model.init_cache(batch_size)")
    if not isinstance(tokens, torch.Tensor):
        raise ValueError(f"tokens must be an integer tensor (batch, n >= 1); got {type(tokens).__name__}")
    if tokens.dim() != 2 or tokens.dtype not in (torch.int64, torch.int32) or tokens.shape[1] < 1:
        raise ValueError(f"tokens must be an integer tensor (batch, n >= 1); got {tokens.dtype} of shape "
                         f"{tuple(tokens.shape)}")
    if tokens.shape[0] != cache.batch_size:
        raise ValueError(f"tokens have batch size {tokens.shape[0]} but the cache was made for "
                         f"{cache.batch_size}: make a new cache with model.init_cache({tokens.shape[0]})")
    V, L = model.cfg.vocab_size, model.cfg.max_seq_len
    lo, hi = int(tokens.min()), int(tokens.max())
    if lo < 0 or hi >= V:
        bad = lo if lo < 0 else hi
        raise ValueError(f"token id {bad} is outside the vocabulary [0, {V}): pass ids below model.vocab_size")
    if cache.length + tokens.shape[1] > L:
        raise ValueError(f"decoding to {cache.length + tokens.shape[1]} tokens exceeds model.max_seq_len = {L}: "
                         f"start a new cache with a shorter context (generate() re-prefills a window itself) "
                         f"or raise model.max_seq_len")


@torch.no_grad()
def decode(model: nn.Module, tokens: torch.Tensor, cache: DecodeCache) -> torch.Tensor:
    """tokens (B, n) -> logits (B, n, V) at positions cache.length .. cache.length+n-1; advances the cache."""
    _check(model, tokens, cache)
    layers, states = model.layers, cache.states
    uv = getattr(layers[0], "uv", None)  # (2, H, dh) shared u, v (relative attention)
    x, start = layers[0].embed(tokens.long()), cache.length  # (B, n, D); first new row at this level
    skips: list[tuple[torch.Tensor, int]] = []
    for layer, st in zip(layers[1:-1], states[1:-1], strict=True):
        if layer.kind == "block":
            x = _block(layer, x, start, uv, st)
        elif layer.kind == "down":
            skip = layer.ln_in(x)  # (B, n, D): the residual of the way up
            skips.append((skip, start))
            x, start = _down(layer, skip, uv, st)
        else:
            skip, start = skips.pop()
            x = _up(layer, x, skip, start, uv, st)
    cache.length += tokens.shape[1]
    return layers[-1]((x,))


def _block(layer: nn.Module, x: torch.Tensor, start: int, uv: torch.Tensor | None, st: _LayerState) -> torch.Tensor:
    """New rows x (B, m, D) of a level, the first at index ``start`` -> the block's output rows (B, m, D)."""
    if x.shape[1] == 0:  # a shortened level with no completed group in this call
        return x
    b = layer.block
    x = x + cached_attention(b.attn, b.ln1(x), None, uv, st.kv, st.rel, "self", start, 1, b.P)
    return x + b.ff(b.ln2(x))


def _down(layer: nn.Module, skip: torch.Tensor, uv: torch.Tensor | None, st: _LayerState) -> tuple[torch.Tensor, int]:
    """New skip rows (B, m, D) -> (new shortened rows (B, w, D), index of the first)."""
    B, m, D = skip.shape
    sh, f, i0 = layer.shorten, layer.f, st.n_out
    if m == 0:
        return skip, i0
    xs = skip if st.n_in else torch.cat([skip.new_zeros(B, f - 1, D), skip], dim=1)  # shift_right, as it grows
    st.n_in += m
    attn = sh.method.startswith("attention_")
    new = sh.pool.ln_in(xs) if attn else xs  # pool inputs (attention: also its keys and values)
    rows = new if st.pending is None else torch.cat([st.pending, new], dim=1)
    w = rows.shape[1] // f  # completed windows
    win, st.pending = rows[:, : w * f], rows[:, w * f:]
    st.n_out += w
    if sh.method == "avg":
        return avg_pool(win, f), i0
    if sh.method == "linear":
        return sh.pool(win), i0
    p = sh.pool
    q = p.ln_q(p._resample(win))  # (B, w, D) pooled queries
    q = q + cached_attention(p.attn, q, new, uv, st.kv, st.rel, "down", i0, f, p.P)
    return q + p.ff(p.ln_ff(q)), i0


def _up(layer: nn.Module, y: torch.Tensor, skip: torch.Tensor, s0: int, uv: torch.Tensor | None,
        st: _LayerState) -> torch.Tensor:
    """New inner rows y (B, m_y, D) and skip rows (B, m, D) at outer positions s0.. -> (B, m, D)."""
    B, m, D = skip.shape
    if m == 0:
        return skip
    u, f = layer.upsample, layer.f
    attn = u.method.startswith("attention_")
    h = layer.ln_in(y)
    keys = u.up.ln_in(h) if attn else h  # (B, m_y, D): attention upsampling's keys and values
    if u.method == "linear":
        up_rows = u.up(keys)
    elif u.method == "attention_linear":
        up_rows = u.up.resample(keys)
    else:
        up_rows = keys.repeat_interleave(f, dim=1)  # (B, m_y * f, D): outer rows of the new inner rows
    first = f * (st.n_in - 1) if st.n_in else 0  # outer position of the first pending row
    rows = up_rows if st.pending is None else torch.cat([st.pending, up_rows], dim=1)
    st.n_in += y.shape[1]
    st.pending = rows[:, -f:]  # the newest inner row's f outer rows
    r = rows[:, s0 - first: s0 - first + m]  # (B, m, D) rows of outer positions s0 .. s0+m-1
    if not attn:
        return skip + layer.ln_out(r)
    p = u.up
    q = p.ln_q(r) + skip
    q = q + cached_attention(p.attn, q, keys, uv, st.kv, st.rel, "up", s0, f, p.P)
    return skip + layer.ln_out(q + p.ff(p.ln_ff(q)))
