"""Attention kernels against a slow, obviously-correct reference written here with loops.

The reference places query i and key j at their original-token positions (``pos_q``, ``pos_k``), writes
the Transformer-XL score term by term with math.sin / math.cos, and normalises with explicit exp."""
import math

import pytest
import torch
from torch.testing import assert_close

from hgscale.models.attention import (
    Attention,
    Geometry,
    rel_attention_blocked,
    rel_attention_naive,
    rel_attention_sdpa,
    rotary_attention,
    rotary_attention_naive,
)
from hgscale.models.fused_attention import rel_attention_fused


@pytest.fixture(autouse=True)
def double():
    """The reference is exact: compare in double precision (the fast-kernel test opts out)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def positions(geo):
    """Original-token positions of queries and keys, and who may see whom, written out."""
    if geo.kind == "self":
        pq = [i * geo.P for i in range(geo.n_q)]
        pk = [j * geo.P for j in range(geo.n_k)]
        vis = lambda i, j: j <= i  # noqa: E731
    elif geo.kind == "down":  # pooled query i covers (shifted) keys i*f .. i*f + f - 1
        pq = [i * geo.f * geo.P for i in range(geo.n_q)]
        pk = [j * geo.P for j in range(geo.n_k)]
        vis = lambda i, j: j < (i + 1) * geo.f  # noqa: E731
    else:  # up: full-resolution query i sees shortened tokens 0 .. i // f
        pq = [i * geo.P for i in range(geo.n_q)]
        pk = [j * geo.f * geo.P for j in range(geo.n_k)]
        vis = lambda i, j: j <= i // geo.f  # noqa: E731
    return pq, pk, vis


def sinusoid_ref(dist, dim):
    half = dim // 2
    return torch.tensor([math.sin(dist / 10000 ** (2 * m / dim)) for m in range(half)]
                        + [math.cos(dist / 10000 ** (2 * m / dim)) for m in range(half)])


def rotate_ref(x, pos):
    dh = x.shape[0]
    half = dh // 2
    out = x.clone()
    for m in range(half):
        a = pos / 10000 ** (2 * m / dh)
        out[m] = x[m] * math.cos(a) - x[m + half] * math.sin(a)
        out[m + half] = x[m + half] * math.cos(a) + x[m] * math.sin(a)
    return out


def attention_ref(module: Attention, xq, xkv, uv, geo):
    """Loop reference of Attention.forward (batch 1 slices, one head and one query at a time)."""
    D, H = xq.shape[-1], module.n_heads
    dh = D // H
    W, b = module.qkv.weight, module.qkv.bias
    xkv = xq if xkv is None else xkv
    pq, pk, vis = positions(geo)
    out = torch.zeros(xq.shape[0], xq.shape[1], D)
    for bi in range(xq.shape[0]):
        q = xq[bi] @ W[:D].T + b[:D]
        k = xkv[bi] @ W[D:2 * D].T + b[D:2 * D]
        v = xkv[bi] @ W[2 * D:].T + b[2 * D:]
        for h in range(H):
            sl = slice(h * dh, (h + 1) * dh)
            for i in range(xq.shape[1]):
                seen = [j for j in range(xkv.shape[1]) if vis(i, j)]
                scores = []
                for j in seen:
                    if module.relative:
                        r = (module.pos.weight @ sinusoid_ref(pk[j] - pq[i], D))[sl]
                        s = (q[i, sl] + uv[0, h]) @ k[j, sl] + (q[i, sl] + uv[1, h]) @ r
                    else:
                        s = rotate_ref(q[i, sl], pq[i]) @ rotate_ref(k[j, sl], pk[j])
                    scores.append(s / math.sqrt(dh))
                e = torch.stack([torch.exp(s - max(scores)) for s in scores])
                p = e / e.sum()
                out[bi, i, sl] = sum(p[n] * v[j, sl] for n, j in enumerate(seen))
    return module.out(out)


GEOMETRIES = [Geometry("self", 7, 7, 1, 1), Geometry("self", 5, 5, 1, 3), Geometry("down", 3, 9, 3, 1),
              Geometry("down", 2, 4, 2, 3), Geometry("up", 8, 4, 2, 1), Geometry("up", 6, 2, 3, 2)]


@pytest.mark.parametrize("attention", ["relative", "rotary"])
@pytest.mark.parametrize("kernel", ["naive", "sdpa", "blocked", "fused"])
@pytest.mark.parametrize("geo", GEOMETRIES, ids=[f"{g.kind}{g.n_q}x{g.n_k}f{g.f}P{g.P}" for g in GEOMETRIES])
def test_attention_matches_loop_reference(geo, kernel, attention):
    torch.manual_seed(0)
    m = Attention(8, 2, attention, 0.0)
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.5)
    uv = torch.randn(2, 2, 4)
    xq = torch.randn(2, geo.n_q, 8)
    xkv = None if geo.kind == "self" else torch.randn(2, geo.n_k, 8)
    got = m(xq, xkv, uv, geo, kernel=kernel)
    assert_close(got, attention_ref(m, xq, xkv, uv, geo))


KERNEL_CASES = [("self", 23, 1, 1, 5), ("self", 16, 1, 3, 4), ("self", 9, 1, 2, 9), ("self", 300, 1, 1, 128),
                ("down", 7, 3, 1, 2), ("down", 5, 2, 3, 8), ("up", 7, 3, 1, 2), ("up", 6, 2, 2, 4)]


@pytest.mark.parametrize("kind,m,f,P,block", KERNEL_CASES)
def test_relative_fast_kernels_match_naive_with_grads(kind, m, f, P, block):
    """Blocked (several blocks, a ragged last one, every geometry; probabilities all kept, none kept, and
    some kept with the rest recomputed in the backward), sdpa and fused (SDPA executor) paths: outputs and
    gradients. m is the number of queries (self, down) or keys (up)."""
    torch.set_default_dtype(torch.float32)  # the fixture restores it
    torch.manual_seed(0)
    B, H, dh, D = 2, 2, 8, 16
    n_q, n_k = {"self": (m, m), "down": (m, m * f), "up": (m * f, m)}[kind]
    geo = Geometry(kind, n_q, n_k, f, P)
    leaves = [torch.randn(B, H, n_q, dh, requires_grad=True) for _ in range(2)] + \
             [torch.randn(B, H, n_k, dh, requires_grad=True) for _ in range(2)] + \
             [torch.randn(D, D, requires_grad=True)]
    grad_out = torch.randn(B, H, n_q, dh)
    results = []
    some = 4 * B * H * block * block * (f if kind == "down" else 1)  # about the first block or two
    for fn in (rel_attention_naive, rel_attention_sdpa, rel_attention_fused,
               *(lambda *a, keep=keep: rel_attention_blocked(*a, block=block, keep_bytes=keep)
                 for keep in (None, 0, some))):
        out = fn(*leaves, geo)
        results.append((out, torch.autograd.grad(out, leaves, grad_out)))
    for out, grads in results[1:]:
        assert_close(out, results[0][0], atol=2e-5, rtol=1e-4)
        for g, g_ref in zip(grads, results[0][1], strict=True):
            assert_close(g, g_ref, atol=5e-4, rtol=1e-4)


@pytest.mark.parametrize("qs", [1, 2])
def test_blocked_kernel_attention_dropout_backward_is_exact(qs):
    """With attention dropout the hand-written backward regenerates the forward's masks from the seed:
    gradcheck (float64) of the kernel, several blocks; and the masks really drop."""
    from hgscale.models.blocked_attention import blocked_rel_attention
    torch.manual_seed(0)
    n, block = 7, 3
    qu, qv = (torch.randn(2, 1, n, 3, requires_grad=True) for _ in range(2))
    k, v = (torch.randn(2, 1, qs * n, 3, requires_grad=True) for _ in range(2))
    R = torch.randn(1, qs * (n + block - 1), 3, requires_grad=True)
    for keep in (0, 8 * 2 * 3 * 3 * qs):  # none kept, the first block only (float64 bytes)
        run = lambda *a, keep=keep: blocked_rel_attention(*a, block, qs=qs, p_drop=0.3, seed=11,  # noqa: E731
                                                          keep_bytes=keep)
        assert torch.autograd.gradcheck(run, (qu, qv, k, v, R))
    plain = blocked_rel_attention(qu, qv, k, v, R, block, qs=qs)
    assert not torch.allclose(run(qu, qv, k, v, R), plain)
    assert torch.equal(run(qu, qv, k, v, R), run(qu, qv, k, v, R))  # same seed, same masks


@pytest.mark.parametrize("kind,m,f", [("self", 23, 1), ("down", 7, 3), ("up", 7, 3)])
def test_blocked_kernel_dropout_masks_do_not_depend_on_what_is_kept(kind, m, f):
    """Block i's mask comes from seed + i: keeping every block's probabilities and masks, none, or the first
    few (the rest redrawn in the backward) gives the very same outputs and gradients, bit for bit."""
    torch.manual_seed(0)
    n_q, n_k = {"self": (m, m), "down": (m, m * f), "up": (m * f, m)}[kind]
    geo = Geometry(kind, n_q, n_k, f, 1)
    leaves = [torch.randn(2, 2, n_q, 8, requires_grad=True) for _ in range(2)] + \
             [torch.randn(2, 2, n_k, 8, requires_grad=True) for _ in range(2)] + \
             [torch.randn(16, 16, requires_grad=True)]
    grad_out = torch.randn(2, 2, n_q, 8)
    runs = []
    for keep in (1 << 40, 0, 2 * 2 * 5 * 5 * f * 5):  # all, none, about the first block
        torch.manual_seed(1)  # the same seed drawn for the call
        out = rel_attention_blocked(*leaves, geo, dropout_p=0.3, training=True, block=5, keep_bytes=keep)
        runs.append((out, torch.autograd.grad(out, leaves, grad_out)))
    for out, grads in runs[1:]:
        assert torch.equal(out, runs[0][0])
        assert all(torch.equal(g, g0) for g, g0 in zip(grads, runs[0][1], strict=True))
    torch.manual_seed(1)
    assert not torch.equal(rel_attention_blocked(*leaves, geo, dropout_p=0.0, training=True, block=5), runs[0][0])


def test_attention_dropout_is_unbiased_on_average():
    torch.set_default_dtype(torch.float32)
    torch.manual_seed(0)
    leaves = [torch.randn(1, 2, 12, 8) for _ in range(4)] + [torch.randn(16, 16) * 0.1]
    geo = Geometry("self", 12, 12, 1, 1)
    ref = rel_attention_naive(*leaves, geo)
    n = 2000
    outs = torch.stack([rel_attention_blocked(*leaves, geo, dropout_p=0.2, training=True, block=5) for _ in range(n)])
    z = (outs.mean(0) - ref) / (outs.std(0) / n ** 0.5)  # (1, 2, 12, 8): each ~N(0, 1) if unbiased
    assert z.abs().max() < 5, z.abs().max()  # without the 1/keep scale: |z| > 20
    assert torch.equal(rel_attention_blocked(*leaves, geo, dropout_p=0.2, training=False),
                       rel_attention_blocked(*leaves, geo))


def test_position_term_matters_and_uses_original_token_units():
    """Same inputs at P=1 and P=2 give different outputs (distances scale with the level's factor)."""
    torch.manual_seed(0)
    m = Attention(8, 2, "relative", 0.0)
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.5)
    x, uv = torch.randn(1, 6, 8), torch.randn(2, 2, 4)
    a = m(x, None, uv, Geometry("self", 6, 6, 1, 1))
    b = m(x, None, uv, Geometry("self", 6, 6, 1, 2))
    assert not torch.allclose(a[:, 1:], b[:, 1:])
    assert_close(a[:, 0], b[:, 0])  # the first query sees only distance 0


@pytest.mark.parametrize("geo", GEOMETRIES, ids=[f"{g.kind}{g.n_q}x{g.n_k}f{g.f}P{g.P}" for g in GEOMETRIES])
def test_rotary_fused_matches_naive_with_grads(geo):
    torch.set_default_dtype(torch.float32)  # the fixture restores it
    torch.manual_seed(0)
    q = torch.randn(2, 2, geo.n_q, 8, requires_grad=True)
    k, v = (torch.randn(2, 2, geo.n_k, 8, requires_grad=True) for _ in range(2))
    grad_out = torch.randn(2, 2, geo.n_q, 8)
    outs = [fn(q, k, v, geo) for fn in (rotary_attention, rotary_attention_naive)]
    grads = [torch.autograd.grad(o, (q, k, v), grad_out) for o in outs]
    assert_close(outs[0], outs[1], atol=2e-6, rtol=1e-5)
    for a, b in zip(*grads, strict=True):
        assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_backward_scatter_zeroes_every_uncovered_entry(monkeypatch):
    """The backward writes the position-term gradient into an uninitialised buffer and zeroes only the
    entries no (query, key) pair maps to: with NaN-filled memory the result still equals zeros + copy."""
    from hgscale.models.blocked_attention import _diag, _scatter_diag
    torch.set_default_dtype(torch.float32)
    real_empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: real_empty(*a, **k).fill_(float("nan")))
    for qs in (1, 2, 3):
        for b in (1, 2, 3, 5):
            for L in (b, b + 4, 3 * b + 1):
                W = qs * (L + b - 1)
                ds = torch.randn(2, b, qs * L)
                want = torch.zeros(2, b, W)
                _diag(want, b, L, W, qs).copy_(ds)
                assert torch.equal(_scatter_diag(ds, b, L, W, qs), want), (qs, b, L)
