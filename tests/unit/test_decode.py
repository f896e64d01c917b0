"""Incremental decoding equals the full forward (fp32, atol 1e-5) for every resampling x attention combination
at 1, 2 and 3 levels: a prompt whose length no factor divides, batch 2, then chunks of 1 .. k+1 tokens.
Plus: shortened levels advance once per completed group, long sequences (several kernel blocks, table
growth), and the errors a caller can cause."""
import itertools
import math

import pytest
import torch

from hgscale.config import DOWNSAMPLE, UPSAMPLE, ModelConfig
from hgscale.models import HourglassLM
from hgscale.models.generation import generate

HIERARCHIES = {1: "1@1 1@3 1@1", 2: "1@1 1@2 1@6 1@2 1@1", 3: "1@1 1@2 0@4 1@8 1@4 1@2 1@1"}
COMBOS = list(itertools.product(DOWNSAMPLE, UPSAMPLE, ("relative", "rotary")))


def tiny(hierarchy="1@1 1@3 1@1", down="attention_avg", up="attention_repeat", attention="relative", **kw):
    return ModelConfig(**{**dict(vocab_size=32, d_model=16, n_heads=2, d_ff=32, hierarchy=hierarchy,
                                 downsample=down, upsample=up, attention=attention, dropout=0.0, max_seq_len=64),
                          **kw})


def random_model(cfg: ModelConfig, seed: int) -> HourglassLM:
    """Every parameter random (LayerNorm gains and biases, u and v included): a wrong shift, window or
    distance changes the logits far beyond 1e-5."""
    model = HourglassLM(cfg, seed=seed).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model


def decode_in_chunks(model, tokens, first: int, sizes):
    """Logits of model.decode over tokens[:, :first], then chunks of the cycled sizes, concatenated."""
    cache = model.init_cache(tokens.shape[0])
    outs, pos, sizes = [model.decode(tokens[:, :first], cache)], first, itertools.cycle(sizes)
    while pos < tokens.shape[1]:
        n = min(next(sizes), tokens.shape[1] - pos)
        outs.append(model.decode(tokens[:, pos: pos + n], cache))
        pos += n
    assert cache.length == tokens.shape[1]
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("levels", [1, 2, 3])
@pytest.mark.parametrize("down,up,attention", COMBOS, ids=["-".join(c) for c in COMBOS])
def test_decode_equals_forward(down, up, attention, levels):
    cfg = tiny(HIERARCHIES[levels], down, up, attention)
    model = random_model(cfg, seed=levels)
    k = cfg.total_factor()
    T = 3 * k + 3  # no factor divides it
    tokens = torch.randint(0, 32, (2, T), generator=torch.Generator().manual_seed(k))
    with torch.no_grad():
        full = model(tokens)
    got = decode_in_chunks(model, tokens, k + 1, [1, 2, 1, k - 1, 1, k + 1])  # prompt k + 1: not divisible
    torch.testing.assert_close(got, full, atol=1e-5, rtol=0)
    assert (full[:, 1:] - full[:, :-1]).abs().max() > 1e-2  # the logits do vary with the position


@pytest.mark.parametrize("attention", ["relative", "rotary"])
def test_long_sequence_one_token_at_a_time(attention):
    """T = 301: the full forward's blocked kernel runs several 128-query blocks; the decoder's distance
    table grows by doubling; one token per call after a 150-token prompt."""
    cfg = tiny("1@1 1@3 1@1", attention=attention, max_seq_len=320)
    model = random_model(cfg, seed=7)
    tokens = torch.randint(0, 32, (1, 301), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(tokens)
    torch.testing.assert_close(decode_in_chunks(model, tokens, 150, [1]), full, atol=1e-5, rtol=0)


def test_shortened_levels_advance_once_per_completed_group():
    """After n tokens: a block at factor P holds ceil(n/P) keys, attention pooling (outer P, factor f) the
    shifted sequence's ceil(n/P) + f - 1, attention upsampling the ceil(n/(P f)) inner rows."""
    cfg = tiny(HIERARCHIES[2])  # factors 2 and 3: cumulative 1, 2, 6
    model = random_model(cfg, seed=3)
    cache = model.init_cache(1, max_len=19)
    plan = [(layer.kind, layer.factor, getattr(layer, "outer", 1), getattr(layer, "f", 1))
            for layer in model.layers if layer.kind in ("block", "down", "up")]
    for n in range(1, 20):
        model.decode(torch.tensor([[n % 32]]), cache)
        want = []
        for kind, P, outer, f in plan:
            if kind == "block":
                want.append(("block", math.ceil(n / P)))
            elif kind == "down":
                want.append(("down", math.ceil(n / outer) + f - 1))
            else:
                want.append(("up", math.ceil(n / outer / f)))
        assert cache.kv_rows() == want, f"after {n} tokens"
    # sized by max_len, the buffers were allocated once, to exactly the rows 19 tokens need (2 x (1, H, n, dh))
    assert cache.kv_nbytes() == sum(2 * rows * cfg.d_model * 4 for _, rows in want)


def test_rows_of_a_batch_are_independent_and_caches_do_not_share_state():
    model = random_model(tiny(HIERARCHIES[1]), seed=4)
    tokens = torch.randint(0, 32, (2, 11), generator=torch.Generator().manual_seed(1))
    both = decode_in_chunks(model, tokens, 4, [1, 3])
    a, b = model.init_cache(1), model.init_cache(1)  # interleaved calls on two caches
    outs_a, outs_b = [model.decode(tokens[:1, :4], a)], [model.decode(tokens[1:, :5], b)]
    outs_a.append(model.decode(tokens[:1, 4:], a))
    outs_b.append(model.decode(tokens[1:, 5:], b))
    torch.testing.assert_close(torch.cat(outs_a, 1)[0], both[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.cat(outs_b, 1)[0], both[1], atol=1e-5, rtol=0)
    assert a.nbytes() > 0 and a.nbytes() == b.nbytes()


def test_bad_input_errors():
    model = random_model(tiny(HIERARCHIES[1], max_seq_len=12), seed=5)
    cache = model.init_cache(2)
    with pytest.raises(ValueError, match=r"token id 32 is outside the vocabulary \[0, 32\)"):
        model.decode(torch.tensor([[1, 32], [0, 0]]), cache)
    with pytest.raises(ValueError, match=r"token id -1 is outside"):
        model.decode(torch.tensor([[1, -1], [0, 0]]), cache)
    with pytest.raises(ValueError, match=r"batch size 1 but the cache was made for 2: .*model.init_cache\(1\)"):
        model.decode(torch.tensor([[1, 2]]), cache)
    with pytest.raises(ValueError, match=r"integer tensor \(batch, n >= 1\); got torch.int64 of shape \(2, 0\)"):
        model.decode(torch.zeros(2, 0, dtype=torch.long), cache)
    with pytest.raises(ValueError, match=r"integer tensor \(batch, n >= 1\); got torch.float32 of shape \(2, 1\)"):
        model.decode(torch.zeros(2, 1), cache)
    with pytest.raises(ValueError, match=r"integer tensor \(batch, n >= 1\); got list"):
        model.decode([[1], [2]], cache)
    with pytest.raises(ValueError, match="not made by this model"):
        random_model(tiny(HIERARCHIES[1]), seed=6).decode(torch.tensor([[1], [2]]), cache)
    assert cache.length == 0  # a refused call changes nothing
    model.decode(torch.zeros(2, 12, dtype=torch.long), cache)  # exactly max_seq_len: fine
    with pytest.raises(ValueError, match="decoding to 13 tokens exceeds model.max_seq_len = 12"):
        model.decode(torch.zeros(2, 1, dtype=torch.long), cache)
    model.train()
    with pytest.raises(RuntimeError, match=r"eval mode only .* call model.eval\(\) first"):
        model.decode(torch.zeros(2, 1, dtype=torch.long), model.init_cache(2))
    with pytest.raises(ValueError, match="batch_size = 0 must be >= 1"):
        model.init_cache(0)
    with pytest.raises(ValueError, match=r"max_len = -1 must be >= 1 \(or None: model.max_seq_len\)"):
        model.init_cache(1, max_len=-1)


def test_lsh_attention_is_refused_by_name():
    """LSH outputs can depend on later tokens' hashes (README): no exact cache exists; the error says what to do."""
    model = HourglassLM(tiny(HIERARCHIES[1], attention="rotary", vanilla_attention="lsh", lsh_chunk_len=8)).eval()
    with pytest.raises(NotImplementedError, match="model.vanilla_attention = 'lsh'.*use_cache=False"):
        model.init_cache(1)
    prompt = torch.tensor([[1, 2, 3]])
    with pytest.raises(NotImplementedError, match="vanilla_attention = 'lsh'"):
        generate(model, prompt, 2, temperature=0)
    assert generate(model, prompt, 2, temperature=0, use_cache=False).shape == (1, 5)
