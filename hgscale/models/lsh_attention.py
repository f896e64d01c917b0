"""LSH self-attention as trax runs it at full resolution in the ImageNet64 Hourglass (``model.vanilla_attention
= "lsh"``): ``PureLSHSelfAttentionWrapper(num_weights=2, weights_format='model', bias=True,
rotary_position_emb=True)`` around ``PureLSHSelfAttention(causal=True, chunk_len=256, n_hashes=2,
n_chunks_before=1, n_chunks_after=0)`` (trax/layers/research/efficient_attention.py).

    qk = Rotate(Dense(x)), v = Dense(x)    (B, T, D); rotary over the whole d_model, before the heads split
    per (example, head), per hashing round r:
        bucket(t) = argmax([qk_t R_r, -qk_t R_r])           R_r ~ N(0, 1), (d_head, n_buckets / 2)
        sort positions by (r, bucket, t)                    -> n_hashes * T slots, chunks of C slots
        a chunk's queries attend to the keys of its own chunk and of `chunks_before` chunks before it
        (wrapping around), keys = qk / rms(qk) / sqrt(d_head) (shared QK), scores minus 1e9 where the key
        is later than the query and minus 1e5 where it is the query itself (trax mask_self_attention)
    rounds are merged by the softmax of their log-sum-exps; out = Dense(merge heads)

Hash rotations are drawn afresh on every call (trax advances a per-head rng each step) from torch's default
generator of the device, like dropout: ``torch.manual_seed`` fixes them, and activation checkpointing,
which restores the RNG state before recomputing, recomputes the same buckets.

Causality, as in trax: no query attends to a later key, and given the buckets an output depends on no later
input. The buckets of later tokens do shift where the sorted chunks begin (a later token hashed into a
lower bucket moves every slot after it), so *which* earlier keys share a query's chunk can depend on later
tokens' hashes. trax has the same property; tests/unit/test_lsh_attention.py pins both facts.

Lengths that are not a multiple of the chunk are padded at the end as trax pads masked tokens: the
padding goes into an extra bucket of its own, so it sorts after the real tokens of each round.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from hgscale.config import ModelConfig
from hgscale.models.attention import apply_rotary

MASK_LATER = 1e9  # trax mask_self_attention: subtracted from scores of later keys
MASK_SELF = 1e5  # ... and of the query's own position (used only when nothing earlier is visible)
RMS_EPS = 1e-6  # trax length_normalized


def bucket_factors(length: int, chunk_len: int, n_buckets: int = 0) -> list[int]:
    """Buckets per round as trax PureLSHSelfAttention.hash_vectors picks them: 2 * max(1, T // chunk_len),
    factorised into two even factors above 128 (hierarchical hashing); or the given even number."""
    if n_buckets:
        return [n_buckets]
    n = 2 * max(1, length // chunk_len)
    if n <= 128:
        return [n]
    div = 2 ** math.ceil(math.log2(math.sqrt(n)))
    return [div, 2 * (n // (2 * div))]


def draw_rotations(B: int, H: int, d_head: int, n_hashes: int, factors: list[int], device: torch.device | str,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, H, d_head, n_hashes, sum(f/2)) random rotations, one set per example and head (trax per-head rng)."""
    rot = sum(f // 2 for f in factors)
    return torch.randn(B, H, d_head, n_hashes, rot, device=device, dtype=torch.float32, generator=generator)


def hash_buckets(qk: torch.Tensor, rotations: torch.Tensor, factors: list[int]) -> torch.Tensor:
    """trax hash_vecs: (B, H, T, dh) -> (B, H, n_hashes, T) bucket ids in [0, prod(factors))."""
    r = torch.einsum("bhtd,bhdnr->bhntr", qk.detach().float(), rotations)  # (B, H, n_hashes, T, rot)
    buckets, start, prod = torch.zeros(r.shape[:-1], dtype=torch.long, device=qk.device), 0, 1
    for f in factors:
        part = r[..., start:start + f // 2]
        start += f // 2
        buckets += prod * torch.cat([part, -part], dim=-1).argmax(-1)
        prod *= f
    return buckets


def sort_slots(buckets: torch.Tensor, n_valid: int, n_per_round: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, H, n_hashes, L) buckets -> (sorted slot -> position-and-round index, its inverse), both (B, H, n_hashes*L).

    Slots sort by (round, bucket, position); positions >= n_valid (padding) take an extra last bucket."""
    B, H, n_hashes, L = buckets.shape
    if n_valid < L:
        buckets = buckets.clone()
        buckets[..., n_valid:] = n_per_round
        n_per_round += 1
    offsets = torch.arange(n_hashes, device=buckets.device)[:, None] * n_per_round
    ticker = torch.arange(n_hashes * L, device=buckets.device)
    key = L * (buckets + offsets).flatten(-2) + ticker % L  # unique per slot
    sticker = key.argsort(dim=-1)
    return sticker, sticker.argsort(dim=-1)


def _look_back(x: torch.Tensor, n_before: int) -> torch.Tensor:
    """trax look_adjacent on (B, H, n_chunks, C, ...): each chunk's n_before predecessors (wrapping around),
    then the chunk itself -> (B, H, n_chunks, (1 + n_before) * C, ...)."""
    return torch.cat([x.roll(i, dims=2) for i in range(n_before, 0, -1)] + [x], dim=3)


def chunked_attend(sq: torch.Tensor, sv: torch.Tensor, spos: torch.Tensor, chunk_len: int, n_before: int,
                   dropout_p: float = 0.0, training: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """trax attend() over sorted slots. sq, sv (B, H, N, dh), spos (B, H, N) -> out (B, H, N, dh) in sv's dtype,
    lse (B, H, N) float32."""
    B, H, N, dh = sq.shape
    nc, C = N // chunk_len, chunk_len
    k = sq * torch.rsqrt(sq.pow(2).mean(-1, keepdim=True) + RMS_EPS) / math.sqrt(dh)  # shared-QK keys
    q = sq.view(B, H, nc, C, dh)
    k = _look_back(k.view(B, H, nc, C, dh), n_before)  # (B, H, nc, W, dh), W = (1 + n_before) C
    v = _look_back(sv.view(B, H, nc, C, dh), n_before)
    qpos = spos.view(B, H, nc, C, 1)
    kpos = _look_back(spos.view(B, H, nc, C), n_before).unsqueeze(-2)  # (B, H, nc, 1, W)
    # scores, masks and softmax in float32 whatever the matmul precision: the masks are 1e9 and 1e5, and the
    # rounds are merged by their log-sum-exps
    dots = torch.matmul(q, k.transpose(-1, -2)).float()  # (B, H, nc, C, W)
    dots = dots - MASK_LATER * (qpos < kpos).float() - MASK_SELF * (qpos == kpos).float()
    lse = dots.logsumexp(dim=-1, keepdim=True)
    probs = F.dropout((dots - lse).exp(), dropout_p, training).to(v.dtype)
    return torch.matmul(probs, v).view(B, H, N, dh), lse.view(B, H, N)


def lsh_attention(qk: torch.Tensor, v: torch.Tensor, chunk_len: int, n_hashes: int, n_before: int,
                  n_buckets: int = 0, dropout_p: float = 0.0, training: bool = False,
                  rotations: torch.Tensor | None = None) -> torch.Tensor:
    """Causal shared-QK LSH attention. qk, v (B, H, T, dh) -> (B, H, T, dh). ``rotations`` as
    :func:`draw_rotations` (for length T padded to a multiple of chunk_len); drawn afresh when None."""
    B, H, T, dh = qk.shape
    pad = -T % chunk_len
    if pad:
        qk, v = F.pad(qk, (0, 0, 0, pad)), F.pad(v, (0, 0, 0, pad))
    L = T + pad
    factors = bucket_factors(L, chunk_len, n_buckets)
    if rotations is None:
        rotations = draw_rotations(B, H, dh, n_hashes, factors, qk.device)
    want = (B, H, dh, n_hashes, sum(f // 2 for f in factors))
    if tuple(rotations.shape) != want:
        raise ValueError(f"rotations have shape {tuple(rotations.shape)} but length {T} (padded to {L}) with "
                         f"{n_hashes} hashing rounds and buckets {factors} needs {want}: draw them with draw_rotations("
                         f"B, H, d_head, n_hashes, bucket_factors({L}, {chunk_len}, {n_buckets}), device)")
    with torch.no_grad():
        buckets = hash_buckets(qk, rotations, factors)  # (B, H, n_hashes, L)
        sticker, undo = sort_slots(buckets, T, math.prod(factors))
        spos = sticker % L  # position of each sorted slot
    gather = spos.unsqueeze(-1).expand(-1, -1, -1, dh)
    so, slse = chunked_attend(qk.gather(2, gather), v.gather(2, gather), spos, chunk_len, n_before,
                              dropout_p, training)
    o = so.gather(2, undo.unsqueeze(-1).expand(-1, -1, -1, dh)).view(B, H, n_hashes, L, dh)
    lse = slse.gather(2, undo).view(B, H, n_hashes, L, 1)
    o = (o * torch.softmax(lse, dim=2).to(o.dtype)).sum(dim=2) if n_hashes > 1 else o[:, :, 0]
    return o[:, :, :T]


class LSHSelfAttention(nn.Module):
    """The full-resolution attention of ``model.vanilla_attention = "lsh"``; called like ``Attention``
    (xq (B, T, D); xkv None; uv and geometry unused: positions are rotary)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        D = cfg.d_model
        self.n_heads, self.d_head = cfg.n_heads, D // cfg.n_heads
        self.chunk_len, self.n_hashes = cfg.lsh_chunk_len, cfg.lsh_n_hashes
        self.n_before, self.n_buckets, self.attn_dropout = cfg.lsh_chunks_before, cfg.lsh_n_buckets, cfg.attn_dropout
        self.qk = nn.Linear(D, D)  # shared query/key projection (num_weights=2)
        self.v = nn.Linear(D, D)
        self.out = nn.Linear(D, D)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:  # (B, T, D) -> (B, H, T, dh)
        B, T, _ = t.shape
        return t.view(B, T, self.n_heads, self.d_head).transpose(1, 2)

    def forward(self, xq: torch.Tensor, xkv: torch.Tensor | None = None, uv: torch.Tensor | None = None,
                geo: object = None, kernel: str | None = None, rotations: torch.Tensor | None = None) -> torch.Tensor:
        """xq (B, T, D) -> (B, T, D). uv, geo and kernel are Attention's arguments, accepted so that a block
        calls either module alike; ``rotations`` as :func:`lsh_attention` (drawn afresh when None)."""
        if xkv is not None:
            raise ValueError("LSH attention is self-attention only (full-resolution blocks)")
        qk = apply_rotary(self.qk(xq).unsqueeze(1), 1).squeeze(1)  # trax Rotate over d_model: (B, T, D)
        o = lsh_attention(self._heads(qk), self._heads(self.v(xq)), self.chunk_len, self.n_hashes, self.n_before,
                          self.n_buckets, self.attn_dropout, self.training, rotations)
        B, H, T, dh = o.shape
        return self.out(o.transpose(1, 2).reshape(B, T, H * dh))
