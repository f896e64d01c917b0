"""Transformer-XL relative attention through a fused attention kernel, never materialising n_q x n_k.

The position term is a dot product of a query feature with a key feature, because the sinusoid of a
difference factorises (a = w * pos_k, b = w * pos_q, per frequency w):

    sin(a - b) = sin a cos b - cos a sin b          cos(a - b) = cos a cos b + sin a sin b

so with y = W_r,h^T (q_i + v) = [y_s | y_c] (D wide: the halves that meet sin and cos),

    (q_i + v) . W_r,h s(pos_k - pos_q) = phi_i . psi_j
    phi_i = [y_s cos b + y_c sin b | y_c cos b - y_s sin b]        psi_j = s(pos_k(j)) = [sin a | cos a]

and the whole score is one dot product of Q' = [q + u | phi] with K' = [k | psi] (d_head + D wide). Any
fused kernel then computes attention with O(n * (d_head + D)) memory: FlexAttention with a block mask
(CUDA, compiled, without attention dropout) or scaled_dot_product_attention (its memory-efficient kernel
on CUDA, with fused dropout; the math path on CPU, where it is the parity reference of this
factorisation). The price is FLOPs: the score GEMM is (d_head + D) / d_head times wider (9x at d 512,
8 heads), which is why CPUs use the blocked kernel instead.
"""
from __future__ import annotations

import warnings
from functools import lru_cache

import torch
import torch.nn.functional as F


def flex_usable(device: torch.device) -> bool:
    """FlexAttention is fused (and has a backward) only compiled, on CUDA; elsewhere it is a slow
    reference that materialises the scores."""
    if device.type != "cuda":
        return False
    try:
        import triton  # noqa: F401
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


@lru_cache(maxsize=64)
def _angles(n: int, step: int, dim: int, device: torch.device):
    """cos, sin of (position * w) for positions 0, step, 2*step ..: (n, dim/2) float64 each."""
    with torch.inference_mode(False):
        w = 1.0 / (10000 ** (torch.arange(0, dim, 2, device=device, dtype=torch.float64) / dim))
        ang = (torch.arange(n, device=device, dtype=torch.float64) * step)[:, None] * w[None, :]
        return ang.cos(), ang.sin()


def factorised_operands(qu, qv, k, Wr, q_step: int, k_step: int):
    """Q' (B, H, n_q, dh + D) and K' (B, H, n_k, dh + D) whose dot products are the full relative score.
    q_step / k_step: original tokens between consecutive queries / keys."""
    B, H, n_q, dh = qu.shape
    n_k, D = k.shape[2], Wr.shape[1]
    y = torch.matmul(qv, Wr.view(H, dh, D))  # (B, H, n_q, D) = W_r,h^T (q + v)
    ys, yc = y.chunk(2, dim=-1)
    cb, sb = (t.to(y.dtype) for t in _angles(n_q, q_step, D, qu.device))  # (n_q, D/2)
    phi = torch.cat([ys * cb + yc * sb, yc * cb - ys * sb], dim=-1)
    ca, sa = (t.to(k.dtype) for t in _angles(n_k, k_step, D, k.device))
    psi = torch.cat([sa, ca], dim=-1).expand(B, H, n_k, D)  # s(pos_k): sinusoid layout [sin | cos]
    return torch.cat([qu, phi], dim=-1), torch.cat([k, psi], dim=-1)


def _sdpa(Q, K, v, geo, p: float):
    if geo.kind == "self":
        return F.scaled_dot_product_attention(Q, K, v, is_causal=True, dropout_p=p, scale=1.0)
    vis = geo.offsets(Q.device)[1]  # (n_q, n_k) bool; the resampling layers, n_q * n_k / f entries
    return F.scaled_dot_product_attention(Q, K, v, attn_mask=vis, dropout_p=p, scale=1.0)


def _mask_mod(geo):
    f = geo.f
    if geo.kind == "self":
        return lambda b, h, i, j: j <= i
    if geo.kind == "down":
        return lambda b, h, i, j: j < (i + 1) * f
    return lambda b, h, i, j: j <= i // f


@lru_cache(maxsize=32)
def _block_mask(geo, device: torch.device):
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(_mask_mod(geo), None, None, geo.n_q, geo.n_k, device=device)


_FLEX: dict = {}  # "fn": the compiled flex_attention; "broken": it failed once in this process


def _flex(Q, K, v, geo):
    """FlexAttention with the geometry's block mask; compiled once per process on CUDA (eager elsewhere:
    the reference implementation, used by the CPU tests of this path)."""
    from torch.nn.attention.flex_attention import flex_attention

    if Q.device.type == "cuda" and "fn" not in _FLEX:
        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    if Q.device.type == "cuda":  # a warning here means dynamo gave up compiling it: let it be seen
        return _FLEX["fn"](Q, K, v, block_mask=_block_mask(geo, Q.device), scale=1.0)
    with warnings.catch_warnings():  # eager by design off CUDA
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        return flex_attention(Q, K, v, block_mask=_block_mask(geo, Q.device), scale=1.0)


def rel_attention_fused(qu, qv, k, v, Wr, geo, dropout_p=0.0, training=False, use_flex: bool | None = None):
    """Same contract as the other relative kernels (attention.py). ``use_flex`` None: FlexAttention where it
    is fused (CUDA) and there is no attention dropout, else scaled_dot_product_attention. A FlexAttention
    failure (no working compiler backend) warns once and leaves this process on the SDPA path."""
    p = dropout_p if training else 0.0
    Q, K = factorised_operands(qu, qv, k, Wr, geo.q_step, geo.k_step)
    if use_flex or (use_flex is None and p == 0.0 and not _FLEX.get("broken") and flex_usable(Q.device)):
        try:
            return _flex(Q, K, v, geo)
        except Exception as e:  # noqa: BLE001 - a compiler failure of any kind: train on through SDPA
            if use_flex:
                raise
            _FLEX["broken"] = True
            warnings.warn(f"FlexAttention failed ({type(e).__name__}: {e}); relative attention uses "
                          f"scaled_dot_product_attention from now on", stacklevel=2)
    return _sdpa(Q, K, v, geo, p)
