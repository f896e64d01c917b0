"""Analytic training FLOPs and parameter counts, per layer of ``build_layers(cfg)``.

Counted as torch.utils.flop_counter.FlopCounterMode counts them: every matrix multiply (2 FLOPs per
multiply-add), attention scores and values over the full (n_q, n_k) square (the convention of
fused attention kernels and of MFU as usually reported, even though the causal half is masked),
the Transformer-XL position term (q+v) R^T over the table of distances it needs, and the projection
of the sinusoid table. Element-wise work (LayerNorm, softmax, GELU, pooling) is not counted.
``causal=True`` gives the useful work instead: attention only over the (query, key) pairs a query sees.

LSH blocks (``model.vanilla_attention = "lsh"``, factor 1): three projections (qk, v, out), the hashing
product (no gradient: forward only) and attention of n_hashes * L sorted slots over windows of
(1 + lsh_chunks_before) * lsh_chunk_len keys, L being the length padded to a multiple of the chunk. Which
pairs in a window are visible depends on the hashes, so ``causal=True`` counts the windows in full too.

Training = forward + backward = 3 x forward, except the position projection: its input is a constant
table, so its backward only computes the weight gradient (2 x forward in all).
"""
from __future__ import annotations

from hgscale.config import ModelConfig
from hgscale.models.hourglass import _check_config, layer_plan
from hgscale.models.lsh_attention import bucket_factors


def _attention(cfg: ModelConfig, B: int, n_q: int, n_k: int, n_dist: int, visible: int, causal: bool) -> float:
    """Training FLOPs of one attention layer (projections, scores, values, position term).

    causal=False: scores over the full (n_q, n_k) square and the position term over (n_q, n_dist), as
    FlopCounterMode counts them; causal=True: only the ``visible`` (query, key) pairs, the useful work."""
    D = cfg.d_model
    proj = 2 * B * D * D * (n_q * 2 + n_k * 2)  # q and out on queries, k and v on keys
    scores = 4 * B * (visible if causal else n_q * n_k) * D  # (q k^T) and (p v)
    total = 3 * (proj + scores)
    if cfg.attention == "relative":
        total += 3 * 2 * B * (visible if causal else n_q * n_dist) * D  # (q + v) R^T
        total += 2 * 2 * n_dist * D * D  # R = sinusoid table @ W_r^T, once per sequence batch
    return total


def _lsh_attention(cfg: ModelConfig, B: int, n: int) -> float:
    """Training FLOPs of one LSH attention layer over n tokens."""
    D, C = cfg.d_model, cfg.lsh_chunk_len
    L = n + (-n % C)
    slots, window = cfg.lsh_n_hashes * L, (1 + cfg.lsh_chunks_before) * C
    rot = sum(f // 2 for f in bucket_factors(L, C, cfg.lsh_n_buckets))
    proj = 3 * 2 * B * n * D * D
    hashing = 2 * B * L * D * cfg.lsh_n_hashes * rot
    return 3 * (proj + 4 * B * slots * window * D) + hashing


def _ff(cfg: ModelConfig, B: int, n: int) -> float:
    return 3 * 4 * B * n * cfg.d_model * cfg.d_ff


def _layer_total(cfg: ModelConfig, item: tuple, B: int, T: int, causal: bool = False) -> float:
    """Training FLOPs of one layer for B sequences of padded length T."""
    kind, *args = item
    D = cfg.d_model
    if kind == "embed":
        return 0.0
    if kind == "head":
        return 3 * 2 * B * T * D * cfg.vocab_size
    if kind == "block":
        n = T // args[0]
        if args[0] == 1 and cfg.vanilla_attention == "lsh":
            return _lsh_attention(cfg, B, n) + _ff(cfg, B, n)
        return _attention(cfg, B, n, n, n, n * (n + 1) // 2, causal) + _ff(cfg, B, n)
    if kind == "down":
        outer, inner = args
        n, m, f = T // outer, T // inner, inner // outer
        method = cfg.downsample
        total = 3 * 2 * B * n * D * D if method in ("linear", "attention_linear") else 0.0
        if method.startswith("attention_"):
            # pooled query i sees f*(i+1) keys; distances j - f*i: n of them
            total += _attention(cfg, B, m, n, n, f * m * (m + 1) // 2, causal) + _ff(cfg, B, m)
        return total
    inner, outer = args
    n, m = T // outer, T // inner
    method = cfg.upsample
    total = 3 * 2 * B * m * D * (n // m * D) if method in ("linear", "attention_linear") else 0.0
    if method.startswith("attention_"):
        # query i sees i//f + 1 shortened keys; distances f*j - i: n of them
        total += _attention(cfg, B, n, m, n, (n // m) * m * (m + 1) // 2, causal) + _ff(cfg, B, n)
    return total


def layer_flops(cfg: ModelConfig, seq_len: int, batch_size: int = 1, causal: bool = False) -> list[float]:
    """Training FLOPs per input token of each layer, in ``build_layers`` order (sum = flops_per_token).

    seq_len is the real length; the model pads it to a multiple of the total factor and computes on the
    padding, which is counted. batch_size matters only for the position projection (once per batch).
    causal=True counts attention over visible (query, key) pairs only (about half the square)."""
    _check_config(cfg)
    T = seq_len + (-seq_len % cfg.total_factor())
    return [_layer_total(cfg, item, batch_size, T, causal) / (batch_size * seq_len) for item in layer_plan(cfg)]


def flops_per_token(cfg: ModelConfig, seq_len: int, batch_size: int = 1, causal: bool = False) -> float:
    """Training (forward + backward) FLOPs per token of a micro-batch of sequences of seq_len tokens."""
    return float(sum(layer_flops(cfg, seq_len, batch_size, causal)))


def _attn_params(cfg: ModelConfig) -> int:
    D = cfg.d_model
    return 4 * D * D + 4 * D + (D * D if cfg.attention == "relative" else 0)


def _ff_params(cfg: ModelConfig) -> int:
    return 2 * cfg.d_model * cfg.d_ff + cfg.d_ff + cfg.d_model


def layer_params(cfg: ModelConfig) -> list[int]:
    """Parameter count of each layer, in ``build_layers`` order."""
    _check_config(cfg)
    D, out = cfg.d_model, []
    ln = 2 * D
    for kind, *args in layer_plan(cfg):
        if kind == "embed":
            out.append(cfg.vocab_size * D + (2 * D if cfg.attention == "relative" else 0))
        elif kind == "head":
            out.append(ln + D * cfg.vocab_size + cfg.vocab_size)
        elif kind == "block":
            lsh = args[0] == 1 and cfg.vanilla_attention == "lsh"  # qk, v, out with biases
            out.append(2 * ln + (3 * D * D + 3 * D if lsh else _attn_params(cfg)) + _ff_params(cfg))
        else:
            f = max(args) // min(args)
            method = cfg.downsample if kind == "down" else cfg.upsample
            n = ln if kind == "down" else 2 * ln  # ln_in (+ ln_out after upsampling)
            if method in ("linear", "attention_linear"):
                n += f * D * D + (D if kind == "down" else f * D)
            if method.startswith("attention_"):
                n += 3 * ln + _attn_params(cfg) + _ff_params(cfg)
            out.append(n)
    return out
