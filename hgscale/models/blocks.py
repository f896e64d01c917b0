"""Pre-LN Transformer block pieces (trax ``_RelativeDecoderBlock`` and ``FeedForwardBlock``).

    x = x + Dropout(Attention(LayerNorm(x)))
    x = x + Dropout(FeedForward(LayerNorm(x)))
    FeedForward = Linear(d_ff) -> GELU -> Dropout -> Linear(d_model)

GELU is the tanh approximation (trax ``FastGelu``); LayerNorm epsilon is trax's 1e-6.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hgscale.config import ModelConfig
from hgscale.models.attention import Attention, Geometry
from hgscale.models.dropout import dropout
from hgscale.models.lsh_attention import LSHSelfAttention

LN_EPS = 1e-6


def layer_norm(d_model: int) -> nn.LayerNorm:
    return nn.LayerNorm(d_model, eps=LN_EPS)


class FeedForward(nn.Module):
    def __init__(self, d_model: int, d_ff: int, dropout: float):
        super().__init__()
        self.fc1 = nn.Linear(d_model, d_ff)
        self.fc2 = nn.Linear(d_ff, d_model)
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, n, D) -> (B, n, D)
        h = F.gelu(self.fc1(x), approximate="tanh")  # (B, n, d_ff)
        return self.fc2(dropout(h, self.dropout, self.training))


class Block(nn.Module):
    """One pre-LN decoder block at cumulative factor P (positions in original-token units)."""

    def __init__(self, cfg: ModelConfig, P: int):
        super().__init__()
        self.P = P
        self.ln1 = layer_norm(cfg.d_model)
        if P == 1 and cfg.vanilla_attention == "lsh":  # trax vanilla_attn_type = PureLSHSelfAttentionWrapper
            self.attn = LSHSelfAttention(cfg)
        else:
            self.attn = Attention(cfg.d_model, cfg.n_heads, cfg.attention, cfg.attn_dropout, cfg.attn_impl)
        self.ln2 = layer_norm(cfg.d_model)
        self.ff = FeedForward(cfg.d_model, cfg.d_ff, cfg.dropout)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor, uv: torch.Tensor | None) -> torch.Tensor:  # (B, n, D) -> (B, n, D)
        geo = Geometry("self", x.shape[1], x.shape[1], 1, self.P)
        x = x + dropout(self.attn(self.ln1(x), None, uv, geo), self.dropout, self.training)
        return x + dropout(self.ff(self.ln2(x)), self.dropout, self.training)
