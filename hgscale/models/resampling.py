"""Shortening and upsampling (trax ``resampling.py``), for one level with factor f.

The caller shifts the sequence right by f-1 before shortening (``shift_right``), so shortened token i
summarises inputs (i-1)f+1 .. if: nothing from the future leaks through the pool, and the newest
input if is not lost (a shift of f would lose it).

Shortening (B, n, D) -> (B, n/f, D):
    avg               mean over each window of f
    linear            reshape to (n/f, f*D) -> Linear(D) -> Dropout
    attention_avg     h = LN(x); q = LN(avgpool(h)); q += Drop(Attn(q, h)); q += Drop(FF(LN q))
    attention_linear  same with a linear pool (no dropout inside, as trax)
    Attention: pooled query i sees the shifted full-resolution keys j < (i+1)f.

Upsampling (B, n/f, D) + skip (B, n, D) -> (B, n, D):
    repeat            each shortened vector f times
    linear            Linear(f*D) -> Dropout -> reshape to (n, D)
    attention_repeat  h = LN(y); q = LN(repeat(h)) + skip; q += Drop(Attn(q, h)); q += Drop(FF(LN q))
    attention_linear  same with a linear upsampling
    Attention: full-resolution query i sees shortened keys j <= i // f (block-causal).
The caller then adds the skip: x = skip + LayerNorm(upsampled).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hgscale.config import ModelConfig
from hgscale.models.attention import Attention, Geometry
from hgscale.models.blocks import FeedForward, layer_norm
from hgscale.models.dropout import dropout


def shift_right(x: torch.Tensor, n: int) -> torch.Tensor:
    """(B, T, D): insert n zero vectors at the front, drop the last n."""
    if n == 0:
        return x
    return F.pad(x, (0, 0, n, 0))[:, : x.shape[1]]


def avg_pool(x: torch.Tensor, f: int) -> torch.Tensor:  # (B, n, D) -> (B, n/f, D)
    B, n, D = x.shape
    return x.view(B, n // f, f, D).mean(dim=2)


class LinearPool(nn.Module):
    def __init__(self, d_model: int, f: int, p_drop: float = 0.0):
        super().__init__()
        self.f, self.dropout = f, p_drop
        self.proj = nn.Linear(f * d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, n, D) -> (B, n/f, D)
        B, n, D = x.shape
        return dropout(self.proj(x.reshape(B, n // self.f, self.f * D)), self.dropout, self.training)


class LinearUpsample(nn.Module):
    def __init__(self, d_model: int, f: int, p_drop: float = 0.0):
        super().__init__()
        self.f, self.dropout = f, p_drop
        self.proj = nn.Linear(d_model, f * d_model)

    def forward(self, y: torch.Tensor) -> torch.Tensor:  # (B, m, D) -> (B, m*f, D)
        B, m, D = y.shape
        return dropout(self.proj(y), self.dropout, self.training).reshape(B, m * self.f, D)


class _AttentionResampling(nn.Module):
    """Shared body of attention shortening / upsampling (trax ``AttentionResampling``)."""

    def __init__(self, cfg: ModelConfig, f: int, P: int, linear: bool, up: bool):
        super().__init__()
        self.f, self.P, self.up, self.dropout = f, P, up, cfg.dropout
        d = cfg.d_model
        self.ln_in = layer_norm(d)
        if linear:
            self.resample = (LinearUpsample if up else LinearPool)(d, f)
        self.ln_q = layer_norm(d)
        self.attn = Attention(d, cfg.n_heads, cfg.attention, cfg.attn_dropout, cfg.attn_impl)
        self.ln_ff = layer_norm(d)
        self.ff = FeedForward(d, cfg.d_ff, cfg.dropout)

    def _resample(self, h: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "resample"):
            return self.resample(h)
        return h.repeat_interleave(self.f, dim=1) if self.up else avg_pool(h, self.f)

    def forward(self, x: torch.Tensor, uv: torch.Tensor | None, skip: torch.Tensor | None = None) -> torch.Tensor:
        h = self.ln_in(x)  # keys and values: (B, n, D) when shortening, (B, n/f, D) when upsampling
        q = self.ln_q(self._resample(h))
        if self.up:
            q = q + skip  # (B, n, D)
        geo = Geometry("up" if self.up else "down", q.shape[1], h.shape[1], self.f, self.P)
        q = q + dropout(self.attn(q, h, uv, geo), self.dropout, self.training)
        return q + dropout(self.ff(self.ln_ff(q)), self.dropout, self.training)


class Shorten(nn.Module):
    """(B, n, D) already shifted by f-1 -> (B, n/f, D). P: cumulative factor of the input."""

    def __init__(self, cfg: ModelConfig, f: int, P: int):
        super().__init__()
        self.method, self.f = cfg.downsample, f
        if self.method == "linear":
            self.pool = LinearPool(cfg.d_model, f, cfg.dropout)
        elif self.method.startswith("attention_"):
            self.pool = _AttentionResampling(cfg, f, P, linear=self.method == "attention_linear", up=False)

    def forward(self, xs: torch.Tensor, uv: torch.Tensor | None) -> torch.Tensor:
        if self.method == "avg":
            return avg_pool(xs, self.f)
        if self.method == "linear":
            return self.pool(xs)
        return self.pool(xs, uv)


class Upsample(nn.Module):
    """(B, n/f, D) and the skip (B, n, D) -> (B, n, D), before the final LayerNorm and residual add."""

    def __init__(self, cfg: ModelConfig, f: int, P: int):
        super().__init__()
        self.method, self.f = cfg.upsample, f
        if self.method == "linear":
            self.up = LinearUpsample(cfg.d_model, f, cfg.dropout)
        elif self.method.startswith("attention_"):
            self.up = _AttentionResampling(cfg, f, P, linear=self.method == "attention_linear", up=True)

    def forward(self, y: torch.Tensor, skip: torch.Tensor, uv: torch.Tensor | None) -> torch.Tensor:
        if self.method == "repeat":
            return y.repeat_interleave(self.f, dim=1)
        if self.method == "linear":
            return self.up(y)
        return self.up(y, uv, skip)
