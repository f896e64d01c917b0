"""Exact incremental decoding of HourglassLM.

    cache = model.init_cache(batch_size)          # empty; model.eval() first
    logits = model.decode(prompt, cache)          # (B, n0) -> (B, n0, V)
    logits = model.decode(next_tokens, cache)     # (B, n) -> (B, n, V), n >= 1, positions n0 .. n0+n-1
    cache.reorder(beam_index)                     # (B',) rows of the batch to keep (beam search)

The logits are those the full forward gives at the same positions of the cached sequence (fp32: equal to
~1e-6). After L tokens a level at cumulative factor P holds ceil(L/P) rows; every count below follows from
L = cache.length. Per layer:

    block   Site: K/V of its self-attention (+ position table)              one row per token of its level
    down    attention pooling: Site over the shifted sequence (+ table); ``pend`` (B, f, D) the pool-input rows
            of the incomplete window. shift_right(x, f-1) puts f-1 zero rows first, so shortened token i
            (window rows if .. if+f-1 of the shifted sequence = inputs (i-1)f+1 .. if) exists as soon as
            input if does: n inputs make ceil(n/f) shortened tokens, the inner level advances once per
            completed group, and its rows are final (causal) the moment they exist.
    up      output t needs the inner row t // f: ``pend`` (B, f, D) holds the upsampled rows of the newest
            inner row (those the next outer positions of its group read); attention upsampling: Site over
            the inner rows (+ table).

Two paths. A one-token call after the prompt (every generation step) runs ``_step``: each level that gains a
row this step runs once on that row, with functional calls on the layers' weights, keys written in place,
attention over a prefix of the buffers (cached_attention.attend_one). Any other call (the prompt, chunks)
runs the general path, masks and all. generation.GraphStep replays ``_step`` as CUDA graphs (opt-in).

Buffers are allocated for max_len tokens (default model.max_seq_len) at the first call and grow, by
doubling up to model.max_seq_len, only if a sequence outgrows them; position tables cover max_len when it
is given, else what the sequence needs (then doubling). Eval mode only (dropout would make cached and full
logits differ).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from hgscale.models.attention import Attention
from hgscale.models.cached_attention import (
    Plan,
    Site,
    attend_one,
    attend_static,
    cached_attention,
    ffn,
    lnorm,
    norm_args,
)
from hgscale.models.resampling import avg_pool

# ``model`` below is an HourglassLM, typed as nn.Module: decoding reads only its ``cfg`` and ``layers``, and
# hourglass.py imports this module (HourglassLM.init_cache / .decode), so this one does not import it back.


class _LayerState:
    """Decoding state of one layer: its attention Site (or None) and the resampling rows ``pend`` (B, f, D)."""

    def __init__(self, site: Site | None = None):
        self.site = site
        self.pend: torch.Tensor | None = None

    def nbytes(self) -> int:
        n = 0 if self.site is None else self.site.nbytes()
        return n + (0 if self.pend is None else self.pend.numel() * self.pend.element_size())


class DecodeCache:
    """Everything ``decode`` keeps between calls for ``batch_size`` sequences of one model: ``length`` tokens
    so far; per layer its state (K/V buffers, position table, resampling rows) and, between the embedding and
    the head, its ``plans`` (the weights a one-token step reads, gathered here once). ``max_len``: the tokens
    the buffers hold (they grow past it by doubling); ``table_len``: those the position tables cover."""

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
        self.max_len = min(int(max_len or cfg.max_seq_len), cfg.max_seq_len)  # tokens the buffers hold
        self.table_len, self.table_target = 0, self.max_len if max_len is not None else 0
        self.kinds = [layer.kind for layer in model.layers]
        self.states = [_state_for(layer) for layer in model.layers]
        self.plans = [Plan(layer) for layer in model.layers[1:-1]]
        embed, head = model.layers[0], model.layers[-1]  # their Parameters, as the plans hold theirs
        self.embed, self.uv = embed.embed.weight, getattr(embed, "uv", None)
        self.head = norm_args(head.ln), head.proj.weight, head.proj.bias
        self.allocated = False

    def reserve(self, model: nn.Module, n: int, full: bool = False) -> None:
        """Buffers for n tokens: allocated for max_len at the first call; doubled if n outgrows them. Tables
        for n (doubling); ``full``: for max_len (what a step over the whole buffer reads: GraphStep)."""
        if n > self.max_len or not self.allocated:
            if n > self.max_len:
                self.max_len = min(max(n, 2 * self.max_len), model.cfg.max_seq_len)
            self._reserve(model, self.max_len, False)
            self.allocated = True
        if n > self.table_len or (full and self.table_len < self.max_len):
            self.table_len = min(self.max_len, max(n, 2 * self.table_len, self.table_target,
                                                   self.max_len if full else 0))
            self._reserve(model, self.table_len, True)

    def sync(self, model: nn.Module, length: int) -> None:
        """Set the length and every K/V fill count to what ``length`` tokens make (after graph replays, which
        write the buffers without touching Python state)."""
        self.length = length
        for layer, st in zip(model.layers, self.states, strict=True):
            if st.site is not None:
                st.site.kv.n = _sizes(layer, length)[0]

    def _reserve(self, model: nn.Module, n: int, tables: bool) -> None:
        like = model.layers[0].embed.weight
        B, D = self.batch_size, like.shape[1]
        for layer, st in zip(model.layers, self.states, strict=True):
            if layer.kind in ("down", "up") and st.pend is None:
                st.pend = like.new_zeros(B, layer.f, D)
            if st.site is not None:
                kv_rows, q_rows, cols = _sizes(layer, n)
                if tables:
                    st.site.reserve(st.site.kv.cap, q_rows, cols, B, like)
                else:
                    st.site.reserve(kv_rows, q_rows, 0, B, like)

    def reorder(self, index: torch.Tensor) -> None:
        """Keep the batch rows ``index`` (B',) in that order (beam search); the position tables are shared."""
        index = index.to(torch.long)
        for st in self.states:
            if st.site is not None:
                st.site.reorder(index)
            if st.pend is not None:
                st.pend = st.pend.index_select(0, index.to(st.pend.device))
        self.batch_size = int(index.numel())

    def nbytes(self) -> int:
        """Bytes held by the cache (buffers as allocated, tables, pending rows)."""
        return sum(s.nbytes() for s in self.states)

    def kv_nbytes(self) -> int:
        """Bytes of the key/value buffers alone."""
        return sum(s.site.kv.nbytes() for s in self.states if s.site is not None)

    def kv_rows(self) -> list[tuple[str, int]]:
        """(layer kind, cached key rows) for every layer with a K/V cache, in layer order."""
        return [(kind, s.site.kv.n) for kind, s in zip(self.kinds, self.states, strict=True) if s.site is not None]


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


def _sizes(layer: nn.Module, n: int) -> tuple[int, int, int]:
    """(K/V rows, queries, position-table columns per residue) of a layer's attention after n tokens."""
    if layer.kind == "block":  # keys: its own rows; distances -i .. 0
        m = math.ceil(n / layer.factor)
        return m, m, m
    m = math.ceil(n / layer.outer)  # rows of the outer sequence
    if layer.kind == "down":  # keys: the (f-1)-shifted outer rows; query i sees distances -f i .. f-1
        w = math.ceil(m / layer.f)
        return m + layer.f - 1, w, layer.f * w
    w = math.ceil(m / layer.f)  # up: keys: the inner rows; query i = a f + r sees f (j - a) - r, j <= a
    return w, m, w


def rows_needed(layer: nn.Module, n: int) -> tuple[int, int]:
    """(K/V rows, projected distances) a layer's attention holds after n tokens at full resolution."""
    kv_rows, _, cols = _sizes(layer, n)
    return kv_rows, cols * (layer.f if layer.kind == "up" else 1)


def _state_for(layer: nn.Module) -> _LayerState:
    attn = _attention_of(layer)
    if attn is None:
        return _LayerState()
    kind = {"block": "self", "down": "down", "up": "up"}[layer.kind]
    P = layer.factor if layer.kind == "block" else layer.outer
    return _LayerState(Site(attn, kind, getattr(layer, "f", 1), P))


def _check_tokens(model: nn.Module, tokens: torch.Tensor, cache: DecodeCache) -> None:
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
    lo, hi = (int(v) for v in torch.aminmax(tokens))
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
    _check_tokens(model, tokens, cache)
    cache.reserve(model, cache.length + tokens.shape[1])
    if tokens.shape[1] == 1 and cache.length:
        logits = _step(cache, tokens, cache.length)
    else:
        logits = _general(cache, tokens)
    cache.length += tokens.shape[1]
    return logits


# ------------------------------------------------------------------------------------------ one token

def _step(cache: DecodeCache, tokens: torch.Tensor, t: int, tdev: torch.Tensor | None = None) -> torch.Tensor:
    """Logits (B, 1, V) of token t >= 1 (tokens (B, 1)). Rows are (B, D); a level runs only when it gains a row
    (t % P == 0): ``x`` is None where it does not. tdev: static mode (GraphStep), a 0-dim device tensor holding
    t; t itself then only decides which levels run (t mod the total factor), positions come from tdev."""
    pos, att = (t, attend_one) if tdev is None else (tdev, attend_static)
    uv = cache.uv
    uvb = None if uv is None else uv.unsqueeze(2)  # (2, H, 1, dh) shared u, v
    x = torch.embedding(cache.embed, tokens.view(-1))  # (B, D)
    skips: list[torch.Tensor | None] = []
    for w, st in zip(cache.plans, cache.states[1:-1], strict=True):
        if w.kind == "block":
            if x is not None:
                x = x + att(st.site, lnorm(x, w.ln1), None, uvb, pos)
                x = x + ffn(lnorm(x, w.ln2), w.ff)
        elif w.kind == "down":
            skips.append(None if x is None else lnorm(x, w.ln_in))  # (B, D): the residual of the way up
            x = None if x is None else _down_one(w, skips[-1], t, pos, uvb, st, att)
        else:
            skip = skips.pop()
            x = None if skip is None else _up_one(w, x, skip, t, pos, uvb, st, att)
    return _head(cache, x).unsqueeze(1)


def _head(cache: DecodeCache, x: torch.Tensor) -> torch.Tensor:
    """(..., D) -> logits (..., V): the head layer's LayerNorm and projection."""
    ln, w, b = cache.head
    return F.linear(lnorm(x, ln), w, b)


def _down_one(w: Plan, skip: torch.Tensor, t: int, pos, uvb: torch.Tensor | None, st: _LayerState,
              att) -> torch.Tensor | None:
    """The new outer row's skip (B, D) -> the shortened row (B, D) of the window it completes, or None."""
    f = w.f
    r = (t // w.outer + f - 1) % f  # its slot in the window (shifted row t/outer + f - 1)
    attn = w.method.startswith("attention_")
    new = lnorm(skip, w.ln_kv) if attn else skip  # the pool input (attention: also its key and value)
    st.pend.select(1, r).copy_(new)
    if r < f - 1:  # the window is not complete: only the key is new
        if attn:
            att(st.site, None, new, uvb, pos)
        return None
    win = st.pend  # (B, f, D)
    if w.method == "avg":
        return win.mean(dim=1)
    if w.method == "linear":
        return F.linear(win.flatten(1), *w.proj)
    q = lnorm(win.mean(dim=1) if w.proj is None else F.linear(win.flatten(1), *w.proj), w.ln_q)  # pooled query
    q = q + att(st.site, q, new, uvb, pos)
    return q + ffn(lnorm(q, w.ln_ff), w.ff)


def _up_one(w: Plan, y: torch.Tensor | None, skip: torch.Tensor, t: int, pos, uvb: torch.Tensor | None,
            st: _LayerState, att) -> torch.Tensor:
    """The new inner row y (B, D) or None and the skip (B, D) of outer row t/outer -> that row (B, D)."""
    attn = w.method.startswith("attention_")
    keys = None
    if y is not None:  # a new inner row: its f upsampled rows serve this position and the next f - 1
        keys = lnorm(y, w.ln_in)
        keys = lnorm(keys, w.ln_kv) if attn else keys  # (B, D): attention upsampling's key and value
        rows = keys if w.proj is None else F.linear(keys, *w.proj)  # (B, D) repeat, (B, f D) linear
        st.pend.copy_(rows.view(rows.shape[0], -1, keys.shape[1]).expand_as(st.pend))  # (B, f, D)
    r = st.pend.select(1, (t // w.outer) % w.f)  # (B, D)
    if not attn:
        return skip + lnorm(r, w.ln_out)
    q = lnorm(r, w.ln_q) + skip
    q = q + att(st.site, q, keys, uvb, pos)
    return skip + lnorm(q + ffn(lnorm(q, w.ln_ff), w.ff), w.ln_out)


# ------------------------------------------------------------------------------------------ any call

def _general(cache: DecodeCache, tokens: torch.Tensor) -> torch.Tensor:
    """Logits (B, n, V) of tokens (B, n) at positions L = cache.length ..: every level runs on the rows it
    gains in this call (``start``: the index of the first at that level, ceil(L / P))."""
    L, uv = cache.length, cache.uv
    x, start = F.embedding(tokens, cache.embed), L  # (B, n, D); first new row at this level
    skips: list[tuple[torch.Tensor, int]] = []
    for w, st in zip(cache.plans, cache.states[1:-1], strict=True):
        if w.kind == "block":
            if x.shape[1]:  # a shortened level with no completed group in this call has no rows
                x = x + cached_attention(st.site, lnorm(x, w.ln1), None, uv, start)
                x = x + ffn(lnorm(x, w.ln2), w.ff)
        elif w.kind == "down":
            skip = lnorm(x, w.ln_in)  # (B, m, D): the residual of the way up
            skips.append((skip, start))
            x, start = _down(w, skip, start, uv, st)
        else:
            skip, start = skips.pop()
            x = _up(w, x, skip, start, L, uv, st)
    return _head(cache, x)


def _down(w: Plan, skip: torch.Tensor, o0: int, uv: torch.Tensor | None, st: _LayerState) -> tuple[torch.Tensor, int]:
    """New skip rows (B, m, D) of outer rows o0.. -> (new shortened rows (B, k, D), index of the first)."""
    B, m, D = skip.shape
    f = w.f
    s0 = o0 + f - 1 if o0 else 0  # shifted row of the first new input (the first call adds f-1 zero rows)
    i0, r0 = s0 // f, s0 % f  # the window it falls in, and the pending rows of that window
    if m == 0:
        return skip, i0
    xs = skip if o0 else torch.cat([skip.new_zeros(B, f - 1, D), skip], dim=1)  # shift_right, as it grows
    attn = w.method.startswith("attention_")
    new = lnorm(xs, w.ln_kv) if attn else xs  # pool inputs (attention: also its keys and values)
    total = r0 + new.shape[1]
    k = total // f  # completed windows
    if total <= f:
        st.pend[:, r0:total] = new
        rows = st.pend[:, :total]
    else:
        rows = torch.cat([st.pend[:, :r0], new], dim=1)
        st.pend[:, : total - k * f] = rows[:, k * f:]
    win = rows[:, : k * f]
    if w.method == "avg":
        return avg_pool(win, f), i0
    if w.method == "linear":
        return F.linear(win.reshape(B, k, f * D), *w.proj), i0
    q = lnorm(avg_pool(win, f) if w.proj is None else F.linear(win.reshape(B, k, f * D), *w.proj), w.ln_q)
    q = q + cached_attention(st.site, q, new, uv, i0)  # q (B, k, D): the pooled queries
    return q + ffn(lnorm(q, w.ln_ff), w.ff), i0


def _up(w: Plan, y: torch.Tensor, skip: torch.Tensor, o0: int, L: int, uv: torch.Tensor | None,
        st: _LayerState) -> torch.Tensor:
    """New inner rows y (B, m_y, D) and skip rows (B, m, D) of outer rows o0.. -> (B, m, D); L: tokens before."""
    B, m, D = skip.shape
    if m == 0:
        return skip
    f, attn = w.f, w.method.startswith("attention_")
    a0 = math.ceil(L / (w.outer * f))  # inner rows before this call
    keys = lnorm(y, w.ln_in)
    keys = lnorm(keys, w.ln_kv) if attn else keys  # (B, m_y, D): attention upsampling's keys and values
    if w.proj is None:
        up_rows = keys.repeat_interleave(f, dim=1)  # (B, m_y f, D): outer rows of the new inner rows
    else:
        up_rows = F.linear(keys, *w.proj).reshape(B, -1, D)
    if o0 >= a0 * f:  # every row asked for is new
        rows, first = up_rows, a0 * f
    else:  # the first ones belong to the newest inner row before this call
        rows, first = torch.cat([st.pend, up_rows], dim=1), (a0 - 1) * f
    if y.shape[1]:
        st.pend.copy_(up_rows[:, -f:])
    r = rows[:, o0 - first: o0 - first + m]  # (B, m, D) rows of outer positions o0 .. o0+m-1
    if not attn:
        return skip + lnorm(r, w.ln_out)
    q = lnorm(r, w.ln_q) + skip
    q = q + cached_attention(st.site, q, keys, uv, o0)
    return skip + lnorm(q + ffn(lnorm(q, w.ln_ff), w.ff), w.ln_out)
