"""Hourglass language model (Nawrot et al. 2021) as a flat, ordered list of layers.

    "2@1 4@3 2@1" (one valley, factor 3):

    tokens (B,T) --embed--> x (B,T,D) --2 blocks @1--+--LN--------------------- skip ---------------+
                                                     |                                              |
                                                     +-shift 2-> shorten -> (B,T/3,D)               |
                                                                   |                                |
                                                              4 blocks @3 -> LN -> upsample (B,T,D) |
                                                                                    |               |
                                                                            x = skip + LN(up) <-----+
                                                                                    |
                                                          2 blocks @1 -> LN -> Linear(vocab) -> logits

The list is what a pipeline slices into stages: ``HourglassLM.forward`` is a fold over it.

    layers[0]   embed  tokens (B, T) -> (x, [uv])           pads T up to a multiple of the total factor (x the
                                                         ranks sharing a sequence, and keeps this rank's shard)
    block              (x, [uv], *skips) -> same shapes
    down               (x, [uv], *skips) -> (x_short, [uv], *skips, skip)   pushes the residual
    up                 (x_short, [uv], *skips, skip) -> (x, [uv], *skips)   pops it
    layers[-1]  head   (x, ...) -> logits (B, T_padded, V)

uv (2, H, d_head) are the Transformer-XL biases u and v shared by all attention layers (relative
attention only); the embedding layer owns them and they travel in the tuple so every pipeline stage
uses, and sends gradients to, the same parameters. Each layer carries ``kind`` and ``factor`` (the
cumulative shortening factor of the sequence it outputs; down/up also carry ``outer`` and ``inner``).

Where trax puts a LayerNorm after each group of blocks, that LayerNorm is the ``ln_in`` of the layer
that follows the group (down, up or head), so a group may hold zero blocks.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from hgscale.config import ConfigError, ModelConfig
from hgscale.core.notation import parse_init_layers
from hgscale.models.attention import Attention
from hgscale.models.blocks import Block, layer_norm
from hgscale.models.decode import DecodeCache, decode
from hgscale.models.dropout import dropout
from hgscale.models.resampling import Shorten, Upsample, shift_right
from hgscale.models.sequence import WHOLE

UV_INIT_STD = 1e-6  # trax get_rel_att_inputs
TRAX_BIAS_STD = 1e-6  # trax core.Dense bias_initializer = RandomNormalInitializer(1e-6)


class EmbedLayer(nn.Module):
    kind, factor = "embed", 1

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.total, self.max_len, self.dropout = cfg.total_factor(), cfg.max_seq_len, cfg.dropout
        self.seq = WHOLE
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        if cfg.attention == "relative":
            self.uv = nn.Parameter(torch.zeros(2, cfg.n_heads, cfg.d_model // cfg.n_heads))

    def forward(self, tokens: torch.Tensor) -> tuple:
        B, T = tokens.shape
        if T > self.max_len:
            raise ValueError(f"sequence of {T} tokens exceeds model.max_seq_len = {self.max_len}; "
                             f"raise model.max_seq_len or feed shorter sequences")
        pad = self.seq.padded_len(T, self.total) - T
        if pad:  # right padding: causal, so no real position ever sees it; stripped after the head
            tokens = F.pad(tokens, (0, pad))
        tokens = self.seq.shard(tokens)  # (B, T_pad / ranks sharing the sequence)
        x = dropout(self.embed(tokens), self.dropout, self.training)  # (B, C, D), C = T_pad / shards
        return (x, self.uv.clone()) if hasattr(self, "uv") else (x,)


def unpack(state: tuple, relative: bool) -> tuple:
    """A layer state (x, [uv], *skips) as (x, uv or None, rest): rest is everything after x, uv included, in
    order, so a layer returns (new_x, *rest), pushes a skip with (y, *rest, skip) or pops one from rest[-1]."""
    x, *rest = state
    return x, (rest[0] if relative else None), tuple(rest)


class BlockLayer(nn.Module):
    kind = "block"

    def __init__(self, cfg: ModelConfig, P: int):
        super().__init__()
        self.factor, self.relative = P, cfg.attention == "relative"
        self.block = Block(cfg, P)

    def forward(self, state: tuple) -> tuple:
        x, uv, rest = unpack(state, self.relative)  # x (B, T/factor, D); rest: [uv], then the valleys' skips
        return (self.block(x, uv), *rest)


class DownLayer(nn.Module):
    kind = "down"

    def __init__(self, cfg: ModelConfig, outer: int, inner: int):
        super().__init__()
        self.outer, self.inner, self.factor = outer, inner, inner
        self.f, self.relative = inner // outer, cfg.attention == "relative"
        self.seq = WHOLE
        self.ln_in = layer_norm(cfg.d_model)  # closes the group of blocks before it
        self.shorten = Shorten(cfg, self.f, outer)

    def forward(self, state: tuple) -> tuple:
        x, uv, rest = unpack(state, self.relative)
        skip = self.ln_in(x)  # (B, n, D): the residual of the way up
        if self.seq.size == 1:
            xs = shift_right(skip, self.f - 1)  # causality: shortened token i sees inputs <= i*f
        else:  # a shard: its first f-1 positions come from the end of the previous rank's
            xs = torch.cat([self.seq.halo(skip, self.f - 1), skip], dim=1)[:, :skip.shape[1]]
        y = self.shorten(xs, uv)  # (B, n/f, D)
        return (y, *rest, skip)


class UpLayer(nn.Module):
    kind = "up"

    def __init__(self, cfg: ModelConfig, inner: int, outer: int):
        super().__init__()
        self.outer, self.inner, self.factor = outer, inner, outer
        self.f, self.relative = inner // outer, cfg.attention == "relative"
        self.ln_in = layer_norm(cfg.d_model)  # closes the group of blocks before it
        self.upsample = Upsample(cfg, self.f, outer)
        self.ln_out = layer_norm(cfg.d_model)

    def forward(self, state: tuple) -> tuple:
        y, uv, rest = unpack(state, self.relative)
        skip = rest[-1]  # (B, n, D), pushed by the matching down layer
        up = self.upsample(self.ln_in(y), skip, uv)  # (B, n, D)
        return (skip + self.ln_out(up), *rest[:-1])


class HeadLayer(nn.Module):
    kind, factor = "head", 1

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln = layer_norm(cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.vocab_size)  # no weight tying (paper)

    def forward(self, state: tuple) -> torch.Tensor:
        return self.proj(self.ln(state[0]))  # (B, T_pad, V)


# ------------------------------------------------------------------------------------------ building

def _plan(cfg: ModelConfig) -> list[tuple[tuple, int | None]]:
    """[((kind, *args), level)]: each layer and the index of the level of model.levels() it belongs to; a down
    layer belongs to the level it shortens, an up layer to the level it restores (both the outer one)."""
    levels = cfg.levels()
    mid = len(levels) // 2
    plan: list[tuple[tuple, int | None]] = [(("embed",), None)]
    for li, (n, k) in enumerate(levels):
        if li > mid:
            plan.append((("up", levels[li - 1][1], k), li))
        plan += [(("block", k), li)] * n
        if li < mid:
            plan.append((("down", k, levels[li + 1][1]), li))
    return plan + [(("head",), None)]


def layer_plan(cfg: ModelConfig) -> list[tuple]:
    """[(kind, *args)] in model order, e.g. ("block", P), ("down", outer, inner), ("up", inner, outer)."""
    return [item for item, _ in _plan(cfg)]


def layer_levels(cfg: ModelConfig) -> list[int | None]:
    """The level index of each layer of :func:`layer_plan` (None for the embedding and the head)."""
    return [level for _, level in _plan(cfg)]


_CLASSES = {"embed": EmbedLayer, "block": BlockLayer, "down": DownLayer, "up": UpLayer, "head": HeadLayer}


def _init_normal_(layer: nn.Module, init_std: float, generator: torch.Generator) -> None:
    """Normal(0, init_std) Dense and Embedding weights, zero Dense biases (model.init = 'normal')."""
    for m in layer.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            m.weight.normal_(0.0, init_std, generator=generator)
        if isinstance(m, nn.Linear) and m.bias is not None:
            m.bias.zero_()


def _init_trax_(layer: nn.Module, generator: torch.Generator) -> None:
    """trax's initialisers (model.init = 'trax'):
    Dense   kernel GlorotUniform: U(-a, a), a = sqrt(6 / (fan_in + fan_out)); bias Normal(0, 1e-6);
    Embedding  ScaledInitializer(mode='fan_out', distribution='uniform'): U(-a, a), a = sqrt(3 / d_model).
    trax projects q, k and v with three Dense(d_model) layers: our fused (3D, D) qkv weight takes each
    (D, D) slice's fans, not those of one (D, 3D) layer."""
    fused = {id(m.qkv) for m in layer.modules() if isinstance(m, Attention)}
    for m in layer.modules():
        if isinstance(m, nn.Linear):
            fan_out = m.out_features // 3 if id(m) in fused else m.out_features
            a = math.sqrt(6.0 / (m.in_features + fan_out))
            m.weight.uniform_(-a, a, generator=generator)
            if m.bias is not None:
                m.bias.normal_(0.0, TRAX_BIAS_STD, generator=generator)
        elif isinstance(m, nn.Embedding):
            a = math.sqrt(3.0 / m.embedding_dim)
            m.weight.uniform_(-a, a, generator=generator)


def init_layer_(layer: nn.Module, init_std: float, generator: torch.Generator, scheme: str = "normal") -> nn.Module:
    """Initialise ``layer`` in place by ``scheme`` ('trax' or 'normal', see model.init); LayerNorms get scale 1
    and bias 0 under both (they draw nothing, so the generator's sequence is the scheme's alone); u, v ~
    Normal(0, 1e-6), drawn last."""
    with torch.no_grad():
        if scheme == "trax":
            _init_trax_(layer, generator)
        elif scheme == "normal":
            _init_normal_(layer, init_std, generator)
        else:
            raise ValueError(f"init scheme {scheme!r} is not one of trax, normal (model.init)")
        for m in layer.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.fill_(1.0)
                m.bias.zero_()
        if isinstance(layer, EmbedLayer) and hasattr(layer, "uv"):
            layer.uv.normal_(0.0, UV_INIT_STD, generator=generator)
    return layer


def _check_config(cfg: ModelConfig) -> None:
    problems = cfg.problems()
    if problems:
        raise ConfigError(problems, "model config")


def layer_group(cfg: ModelConfig, index: int) -> str:
    """The model.init_layers group of layer ``index``: embed, full (a block at factor 1), down, shortened (a block of
    a shortened level), up or head."""
    kind, *args = layer_plan(cfg)[index]
    return kind if kind != "block" else "full" if args[0] == 1 else "shortened"


def layer_scheme(cfg: ModelConfig, index: int) -> str:
    """The initialisation of layer ``index``: model.init, unless model.init_layers names its group."""
    return parse_init_layers(cfg.init_layers).get(layer_group(cfg, index), cfg.init)


def build_layer(cfg: ModelConfig, index: int, seed: int = 0) -> nn.Module:
    """Layer ``index`` alone, initialised from (seed, index): any pipeline split builds the same weights."""
    kind, *args = layer_plan(cfg)[index]
    layer = _CLASSES[kind](cfg, *args)
    if any(p.device.type != "meta" for p in layer.parameters()):
        gen = torch.Generator(device=next(layer.parameters()).device)
        gen.manual_seed(seed * 1_000_003 + index)
        init_layer_(layer, cfg.init_std, gen, layer_scheme(cfg, index))
    return layer


def layer_constructors(cfg: ModelConfig, seed: int = 0) -> list[tuple]:
    """[(callable, args)]: ``callable(*args)`` builds layer i; a pipeline stage builds only its own."""
    _check_config(cfg)
    return [(build_layer, (cfg, i, seed)) for i in range(len(layer_plan(cfg)))]


def build_layers(cfg: ModelConfig, seed: int = 0) -> list[nn.Module]:
    return [fn(*args) for fn, args in layer_constructors(cfg, seed)]


def state_shapes(cfg: ModelConfig, batch: int, seq_len: int) -> list[list[tuple]]:
    """Shapes of each layer's output (the tuple passed to the next layer; logits for the head)."""
    _check_config(cfg)
    T = seq_len + (-seq_len % cfg.total_factor())
    D, H = cfg.d_model, cfg.n_heads
    uv = [(2, H, D // H)] if cfg.attention == "relative" else []
    skips: list[tuple] = []
    out = []
    for kind, *args in layer_plan(cfg):
        if kind == "down":
            skips.append((batch, T // args[0], D))
        elif kind == "up":
            skips.pop()
        if kind == "head":
            out.append([(batch, T, cfg.vocab_size)])
        else:
            factor = args[1] if kind in ("down", "up") else (args[0] if kind == "block" else 1)
            out.append([(batch, T // factor, D)] + uv + list(skips))
    return out


class HourglassLM(nn.Module):
    """tokens (B, T) -> logits (B, T, V); logits at t predict token t+1 from tokens <= t."""

    def __init__(self, cfg: ModelConfig, seed: int = 0):
        _check_config(cfg)  # every config problem, before any module or tensor is built
        super().__init__()
        self.cfg, self.seq = cfg, WHOLE
        self.layers = nn.ModuleList(build_layers(cfg, seed))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, T) -> logits (B, T, V); with a sharded sequence, this rank's unpadded positions (B, <= C, V)."""
        T = tokens.shape[1]
        state = tokens
        for layer in self.layers:
            state = layer(state)
        return state[:, self.seq.valid(T, state.shape[1])]  # strip the right padding of the embedding layer

    def shard_sequence(self, seq) -> "HourglassLM":
        """Run on one shard of each sequence (hgscale.models.sequence); the weights are unchanged."""
        for m in self.modules():
            if hasattr(m, "seq"):
                m.seq = seq
        return self

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def init_cache(self, batch_size: int, max_len: int | None = None) -> DecodeCache:
        """An empty incremental-decoding cache for ``batch_size`` sequences (hgscale/models/decode.py);
        ``max_len`` (default model.max_seq_len) only sizes its first buffers."""
        return DecodeCache(self, batch_size, max_len)

    def decode(self, tokens: torch.Tensor, cache: DecodeCache) -> torch.Tensor:
        """tokens (B, n) after the cached ones -> (B, n, V): the full forward's logits at those positions."""
        return decode(self, tokens, cache)
