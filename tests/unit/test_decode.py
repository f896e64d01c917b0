"""Incremental decoding equals the full forward (fp32, atol ATOL) for every resampling x attention combination
at 1, 2 and 3 levels: a prompt whose length no factor divides, batch 2, then chunks of 1 .. k+1 tokens.
Plus: shortened levels advance once per completed group, long sequences (several kernel blocks, table
growth), batch 8 one token at a time to max_seq_len in the buffers of the first call, growth past max_len,
the static steps CUDA graphs replay (run eagerly on CPU), cache.reorder, and the errors a caller can cause."""
import itertools
import math

import pytest
import torch

from hgscale.config import DOWNSAMPLE, UPSAMPLE, ModelConfig
from hgscale.models import HourglassLM
from hgscale.models.decode import _attention_of, rows_needed
from hgscale.models.generation import GraphStep, generate

HIERARCHIES = {1: "1@1 1@3 1@1", 2: "1@1 1@2 1@6 1@2 1@1", 3: "1@1 1@2 0@4 1@8 1@4 1@2 1@1"}
COMBOS = list(itertools.product(DOWNSAMPLE, UPSAMPLE, ("relative", "rotary")))
# Logits of these models reach ~2.6; cached and full differ by at most 7.2e-7 (a few fp32 ulps: the same
# products summed in another order) over every combination here: 2e-6 leaves a margin of ~3.
ATOL = 2e-6


def tiny(hierarchy="1@1 1@3 1@1", down="attention_avg", up="attention_repeat", attention="relative", **kw):
    return ModelConfig(**{**dict(vocab_size=32, d_model=16, n_heads=2, d_ff=32, hierarchy=hierarchy,
                                 downsample=down, upsample=up, attention=attention, dropout=0.0, max_seq_len=64),
                          **kw})


def random_model(cfg: ModelConfig, seed: int) -> HourglassLM:
    """Every parameter random (LayerNorm gains and biases, u and v included): a wrong shift, window or
    distance changes the logits far beyond ATOL."""
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
    torch.testing.assert_close(got, full, atol=ATOL, rtol=0)
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
    torch.testing.assert_close(decode_in_chunks(model, tokens, 150, [1]), full, atol=ATOL, rtol=0)


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
    torch.testing.assert_close(torch.cat(outs_a, 1)[0], both[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(torch.cat(outs_b, 1)[0], both[1], atol=ATOL, rtol=0)
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


def one_at_a_time(model, tokens, first: int, cache):
    """Logits of model.decode over tokens[:, :first], then of one token per call, concatenated."""
    outs = [model.decode(tokens[:, :first], cache)]
    outs += [model.decode(tokens[:, pos: pos + 1], cache) for pos in range(first, tokens.shape[1])]
    assert cache.length == tokens.shape[1]
    return torch.cat(outs, dim=1)


def buffers(cache) -> list[int]:
    """Addresses of every K/V buffer and position table of a cache."""
    sites = [s.site for s in cache.states if s.site is not None]
    return [t.data_ptr() for s in sites for t in (s.kv.kt, s.kv.v, *([s.table.R] if s.table else []))]


@pytest.mark.parametrize("attention", ["relative", "rotary"])
def test_batch_of_8_one_token_at_a_time_to_max_seq_len_in_the_buffers_of_the_first_call(attention):
    """Factors 2, 4, 8: single-token steps cross every level's group boundary; a 5-token prompt (no factor
    divides it); the whole max_seq_len. Sized by max_len, no buffer or table is allocated after the prompt."""
    cfg = tiny(HIERARCHIES[3], attention=attention, max_seq_len=48)
    model = random_model(cfg, seed=11)
    tokens = torch.randint(0, 32, (8, 48), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(tokens)
    cache = model.init_cache(8, max_len=48)
    model.decode(tokens[:, :5], cache)
    before = buffers(cache)
    outs = [model.decode(tokens[:, p: p + 1], cache) for p in range(5, 48)]
    assert buffers(cache) == before
    torch.testing.assert_close(torch.cat(outs, 1), full[:, 5:], atol=ATOL, rtol=0)
    assert (full[:, 1:] - full[:, :-1]).abs().max() > 1e-2
    with pytest.raises(ValueError, match="exceeds model.max_seq_len = 48"):
        model.decode(tokens[:, :1], cache)


def test_buffers_grow_past_max_len_by_doubling():
    """max_len only sizes the first buffers: a longer sequence doubles them (and the tables), exactly."""
    model = random_model(tiny(HIERARCHIES[2], max_seq_len=64), seed=12)
    tokens = torch.randint(0, 32, (2, 41), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(tokens)
    cache = model.init_cache(2, max_len=3)
    got = one_at_a_time(model, tokens, 2, cache)
    torch.testing.assert_close(got, full, atol=ATOL, rtol=0)
    assert cache.max_len == 48  # 3 -> 6 -> 12 -> 24 -> 48


@pytest.mark.parametrize("levels", [1, 3])
@pytest.mark.parametrize("down,up,attention", COMBOS, ids=["-".join(c) for c in COMBOS])
def test_static_steps_equal_forward(down, up, attention, levels):
    """The arithmetic the CUDA graphs replay (GraphStep: attention over the whole buffer, masked, positions
    from a device tensor) run eagerly on CPU, interleaved with model.decode on the same cache; NaN in the
    buffers' unfilled rows (which the static attention reads with probability 0) must not leak in."""
    cfg = tiny(HIERARCHIES[levels], down, up, attention, max_seq_len=40)
    model = random_model(cfg, seed=levels + 20)
    tokens = torch.randint(0, 32, (3, 37), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = model(tokens)
    cache = model.init_cache(3, max_len=37)
    outs = [model.decode(tokens[:, :3], cache)]
    for kv in (s.site.kv for s in cache.states if s.site is not None):  # stale rows: GraphStep must clear them
        kv.kt[..., kv.n:], kv.v[:, :, kv.n:] = float("nan"), float("nan")
    step = GraphStep(model, cache, graphs=False)
    for pos in range(3, 37):
        t = tokens[:, pos: pos + 1]
        outs.append(model.decode(t, cache) if pos % 7 == 0 else step(t))
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=ATOL, rtol=0)
    rows = [layer for layer in model.layers if layer.kind in ("block", "down", "up")]
    assert [n for _, n in cache.kv_rows()] == [rows_needed(layer, 37)[0] for layer in rows
                                               if _attention_of(layer) is not None]


def test_graph_step_refusals():
    model = random_model(tiny(HIERARCHIES[1], max_seq_len=12), seed=13)
    cache = model.init_cache(1, max_len=6)
    with pytest.raises(ValueError, match=r"after a prompt: call model.decode\(prompt, cache\) first"):
        GraphStep(model, cache, graphs=False)
    model.decode(torch.tensor([[1, 2, 3]]), cache)
    with pytest.raises(ValueError, match="CUDA graphs need the model on a CUDA device"):
        GraphStep(model, cache)
    step = GraphStep(model, cache, graphs=False)
    for _ in range(3):
        step(torch.tensor([[4]]))
    with pytest.raises(ValueError, match="within the cache's max_len = 6"):
        step(torch.tensor([[4]]))
    with pytest.raises(ValueError, match="one token per row"):
        step(torch.tensor([[4, 5]]))


def test_reorder_keeps_the_chosen_rows():
    """cache.reorder(index): beam search's row selection; the continuation equals the forward of the chosen
    rows' sequences."""
    model = random_model(tiny(HIERARCHIES[2]), seed=14)
    tokens = torch.randint(0, 32, (3, 23), generator=torch.Generator().manual_seed(5))
    cache = model.init_cache(3)
    model.decode(tokens[:, :9], cache)
    index = torch.tensor([2, 0, 0, 1])
    cache.reorder(index)
    assert cache.batch_size == 4
    kept = tokens[index]
    outs = [model.decode(kept[:, p: p + 1], cache) for p in range(9, 20)] + [model.decode(kept[:, 20:], cache)]
    with torch.no_grad():
        full = model(kept)
    torch.testing.assert_close(torch.cat(outs, 1), full[:, 9:], atol=ATOL, rtol=0)
