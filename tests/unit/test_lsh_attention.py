"""LSH self-attention (model.vanilla_attention = "lsh") against a naive slot-by-slot reference of trax's
PureLSHSelfAttention: parity, causality, chunk locality, and hashing determined by the seed."""
import math

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from hgscale.config import ModelConfig
from hgscale.models import HourglassLM
from hgscale.models.lsh_attention import LSHSelfAttention, bucket_factors, draw_rotations, hash_buckets, lsh_attention


def reference(qk, v, R, C, n_before, factors):
    """trax PureLSHSelfAttention.forward_unbatched, one slot at a time, in float64: python-sorted slots,
    explicit windows and masks, explicit softmax and merge of the rounds. Also returns which outputs saw no
    earlier key in any round (only the position itself, under trax's -1e5 mask: see the parity test)."""
    B, H, T, dh = qk.shape
    L = T + (-T % C)
    out = torch.zeros(B, H, T, dh, dtype=torch.float64)
    self_only = torch.ones(B, H, T, dtype=torch.bool)
    for b in range(B):
        for h in range(H):
            x = torch.cat([qk[b, h].double(), torch.zeros(L - T, dh, dtype=torch.float64)])
            vv = torch.cat([v[b, h].double(), torch.zeros(L - T, dh, dtype=torch.float64)])
            order = _sorted_slots(qk[b, h], R[b, h], L, factors)
            o_r, lse_r, saw_earlier = _attend_slots(order, x, vv, C, n_before, R.shape[3])
            self_only[b, h] = ~saw_earlier[:T]
            w = torch.softmax(lse_r, dim=0)  # (n_hashes, L)
            out[b, h] = (w[..., None] * o_r).sum(0)[:T]
    return out, self_only


def _bucket(proj, factors) -> int:
    """trax hash_vecs of one position: per factor f, the argmax over [x R, -x R] of its f/2 rotations."""
    bucket, start, prod = 0, 0, 1
    for f in factors:
        part = proj[start:start + f // 2]
        bucket += prod * int(torch.cat([part, -part]).argmax())
        start, prod = start + f // 2, prod * f
    return bucket


def _sorted_slots(qk, R, L, factors):
    """One example and head: qk (T, dh), R (dh, n_hashes, rot) -> [(round, round-offset bucket, position)]
    sorted by bucket then position; positions >= T (padding) take an extra last bucket of each round."""
    T = qk.shape[0]
    n_per_round = math.prod(factors) + (1 if L > T else 0)
    slots = []
    for r in range(R.shape[1]):
        proj = (qk.float() @ R[:, r, :]).double()  # hashed in float32, as the kernel
        for t in range(L):
            bucket = _bucket(proj[t], factors) if t < T else n_per_round - 1
            slots.append((r, r * n_per_round + bucket, t))
    return sorted(slots, key=lambda s: (s[1], s[2]))


def _attend_slots(order, x, vv, C, n_before, n_hashes):
    """Each sorted slot's query attends to its chunk and the n_before chunks before it (wrapping around):
    (n_hashes, L, dh) outputs and (n_hashes, L) log-sum-exps per round, and (L,) whether a position saw an
    earlier key in some round."""
    L, dh = x.shape
    keys = x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6) / math.sqrt(dh)
    n_chunks = len(order) // C
    o_r = torch.zeros(n_hashes, L, dh, dtype=torch.float64)
    lse_r = torch.zeros(n_hashes, L, dtype=torch.float64)
    saw_earlier = torch.zeros(L, dtype=torch.bool)
    for s, (r, _, t) in enumerate(order):
        c = s // C
        window = [(c - i) % n_chunks for i in range(n_before, 0, -1)] + [c]
        js = [order[w * C + k][2] for w in window for k in range(C)]
        saw_earlier[t] |= any(j < t for j in js)
        scores = torch.stack([x[t] @ keys[j] - 1e9 * (t < j) - 1e5 * (t == j) for j in js])
        lse = torch.logsumexp(scores, 0)
        o_r[r, t] = (torch.exp(scores - lse)[:, None] * vv[js]).sum(0)
        lse_r[r, t] = lse
    return o_r, lse_r, saw_earlier


def inputs(B, H, T, dh, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, H, T, dh, generator=g), torch.randn(B, H, T, dh, generator=g)


@pytest.mark.parametrize("T,C,n_hashes,n_before,n_buckets", [
    (32, 8, 2, 1, 0),     # the ImageNet64 settings, scaled down
    (29, 8, 2, 1, 0),     # a length that is no multiple of the chunk: padding in a bucket of its own
    (24, 4, 1, 2, 0),     # one round, two chunks before
    (32, 8, 3, 1, 6),     # explicit bucket count
    (8 * 66, 8, 1, 1, 0),  # 132 buckets: factorised as trax does ([16, 8])
])
def test_parity_with_naive_reference(T, C, n_hashes, n_before, n_buckets):
    B, H = (1, 1) if T > 100 else (2, 2)
    qk, v = inputs(B, H, T, 8, seed=T + C)
    L = T + (-T % C)
    factors = bucket_factors(L, C, n_buckets)
    R = draw_rotations(B, H, 8, n_hashes, factors, "cpu", torch.Generator().manual_seed(1))
    out = lsh_attention(qk, v, C, n_hashes, n_before, n_buckets, rotations=R).double()
    ref, self_only = reference(qk, v, R, C, n_before, factors)
    torch.testing.assert_close(out[~self_only], ref[~self_only], rtol=1e-5, atol=1e-5)
    # A position that sees only itself returns its own value. Where both of its slots share a window, trax's
    # float32 scores near -1e5 carry steps of 2**-7, so the weights sum to 1 only to about 0.5 %.
    torch.testing.assert_close(out[self_only], v.double()[self_only], rtol=1e-2, atol=1e-2)
    assert self_only.sum() < self_only.numel() // 4


def test_rotations_of_the_wrong_shape_are_refused_by_name():
    qk, v = inputs(1, 2, 29, 8, seed=0)  # padded to 32: 2 * 32 // 8 = 8 buckets, 4 rotations per round
    R = draw_rotations(1, 2, 8, 2, bucket_factors(24, 8), "cpu")  # drawn for the wrong length
    with pytest.raises(ValueError, match=r"rotations have shape \(1, 2, 8, 2, 3\) but length 29 \(padded to 32\) "
                                         r"with 2 hashing rounds and buckets \[8\] needs \(1, 2, 8, 2, 4\)"):
        lsh_attention(qk, v, 8, 2, 1, rotations=R)
    good = draw_rotations(1, 2, 8, 2, bucket_factors(32, 8), "cpu")
    assert lsh_attention(qk, v, 8, 2, 1, rotations=good).shape == (1, 2, 29, 8)


def test_bucket_factors_follow_trax():
    assert bucket_factors(12288, 256) == [96]  # ImageNet64: 2 * 48
    assert bucket_factors(8 * 66, 8) == [16, 8]
    assert bucket_factors(100, 256) == [2]
    assert bucket_factors(100, 256, n_buckets=10) == [10]


def test_one_chunk_is_dense_causal_shared_qk_attention():
    """With one chunk holding every slot, LSH attention is dense causal attention with normalised shared
    keys and the query's own key masked by 1e5 (trax mask_self_attention)."""
    qk, v = inputs(2, 2, 16, 8, seed=3)
    R = draw_rotations(2, 2, 8, 1, [2], "cpu", torch.Generator().manual_seed(0))
    out = lsh_attention(qk, v, 16, 1, 0, rotations=R)
    k = qk / torch.sqrt(qk.pow(2).mean(-1, keepdim=True) + 1e-6) / math.sqrt(8)
    i = torch.arange(16)
    s = qk @ k.transpose(-1, -2) - 1e9 * (i[:, None] < i[None, :]) - 1e5 * (i[:, None] == i[None, :])
    torch.testing.assert_close(out, s.softmax(-1) @ v, rtol=1e-5, atol=1e-6)


def test_causal_given_the_buckets():
    """Gradients of output t with respect to every later query/key and value are exactly zero."""
    qk, v = inputs(1, 2, 24, 8, seed=5)
    qk.requires_grad_(), v.requires_grad_()
    R = draw_rotations(1, 2, 8, 2, bucket_factors(24, 4), "cpu", torch.Generator().manual_seed(2))
    out = lsh_attention(qk, v, 4, 2, 1, rotations=R)
    for t in range(23):
        gq, gv = torch.autograd.grad(out[:, :, t].sum(), (qk, v), retain_graph=True)
        assert torch.count_nonzero(gq[:, :, t + 1:]) == 0 and torch.count_nonzero(gv[:, :, t + 1:]) == 0, t
        assert torch.count_nonzero(gv[:, :, : t + 1]) > 0


def test_chunk_locality():
    """Output t mixes exactly the values of the earlier positions that share a sorted chunk (or one of the
    chunks before it) with one of t's slots; with no such position, t itself."""
    T, C, n_hashes, n_before = 32, 4, 2, 1
    qk, _ = inputs(1, 1, T, T, seed=7)
    v = torch.eye(T)[None, None]  # value j = e_j: output row t holds the weight of every key
    factors = bucket_factors(T, C)
    R = draw_rotations(1, 1, T, n_hashes, factors, "cpu", torch.Generator().manual_seed(4))
    weights = lsh_attention(qk, v, C, n_hashes, n_before, rotations=R)[0, 0]  # (T, T)
    buckets = hash_buckets(qk, R, factors)[0, 0]  # (n_hashes, T)
    order = sorted((r * math.prod(factors) + int(buckets[r, t]), t) for r in range(n_hashes) for t in range(T))
    n_chunks = len(order) // C
    allowed = [set() for _ in range(T)]
    for s, (_, t) in enumerate(order):
        c = s // C
        for w in [(c - i) % n_chunks for i in range(n_before, -1, -1)]:
            allowed[t] |= {order[w * C + k][1] for k in range(C)}
    for t in range(T):
        earlier = {j for j in allowed[t] if j < t}
        expect = earlier or {t}
        assert set(torch.nonzero(weights[t] > 1e-30).flatten().tolist()) == expect, t
        assert weights[t].sum() == pytest.approx(1.0, abs=1e-5 if earlier else 1e-2)  # see the parity test
    assert any(len(allowed[t]) < t for t in range(T))  # the windows are local: not every earlier key


def test_later_hashes_can_move_chunk_boundaries_as_in_trax():
    """A later token hashed into another bucket shifts the sorted slots before it, so earlier outputs can
    change although no query ever attends to a later key. trax's LSH has the same property."""
    moved = 0
    for seed in range(10):
        qk, v = inputs(1, 1, 32, 8, seed=seed)
        R = draw_rotations(1, 1, 8, 2, bucket_factors(32, 4), "cpu", torch.Generator().manual_seed(seed))
        base = lsh_attention(qk, v, 4, 2, 1, rotations=R)
        qk2 = qk.clone()
        qk2[:, :, -1] *= -1  # the last token's buckets move by half the rotations
        other = lsh_attention(qk2, v, 4, 2, 1, rotations=R)
        moved += int(not torch.equal(base[:, :, :-1], other[:, :, :-1]))
    assert moved > 0


def lsh_cfg(**kw):
    base = dict(vocab_size=32, d_model=16, n_heads=2, d_ff=32, hierarchy="1@1 1@3 1@1", dropout=0.0,
                max_seq_len=256, vanilla_attention="lsh", lsh_chunk_len=4, lsh_n_hashes=2, lsh_chunks_before=1)
    return ModelConfig(**{**base, **kw})


def test_hashing_is_determined_by_the_seed_and_recomputed_under_checkpointing():
    torch.manual_seed(0)
    layer = LSHSelfAttention(lsh_cfg())
    x = torch.randn(2, 24, 16)
    outs = []
    for seed in (11, 11, 12):
        torch.manual_seed(seed)
        outs.append(layer(x))
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])
    torch.manual_seed(5)
    a = torch.randn(2, 24, 16)
    grads = []
    for ckpt in (False, True):
        xa = a.clone().requires_grad_()
        torch.manual_seed(13)
        y = checkpoint(layer, xa, use_reentrant=False) if ckpt else layer(xa)
        (y * torch.arange(16.0)).sum().backward()
        grads.append(xa.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)


def test_model_uses_lsh_only_at_full_resolution():
    cfg = lsh_cfg(hierarchy="2@1 1@3 2@1")
    model = HourglassLM(cfg, seed=0)
    kinds = [(layer.factor, type(layer.block.attn).__name__) for layer in model.layers if layer.kind == "block"]
    assert kinds == [(1, "LSHSelfAttention")] * 2 + [(3, "Attention")] + [(1, "LSHSelfAttention")] * 2
    tokens = torch.randint(0, 32, (2, 30))
    logits = model(tokens)
    logits.sum().backward()
    assert logits.shape == (2, 30, 32) and all(p.grad is not None for p in model.parameters())
