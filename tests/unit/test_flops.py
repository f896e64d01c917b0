"""Analytic FLOPs and parameter counts against what torch counts."""
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from hgscale.config import ModelConfig
from hgscale.models import HourglassLM, flops_per_token, layer_flops, layer_params

CONFIGS = {
    "vanilla-relative": dict(hierarchy="3@1"),
    "1level-attn-relative": dict(hierarchy="1@1 2@3 1@1"),
    "1level-linear-rotary": dict(hierarchy="1@1 2@3 1@1", downsample="linear", upsample="linear",
                                 attention="rotary"),
    "2levels-attn-relative": dict(hierarchy="1@1 1@2 2@6 1@2 1@1", downsample="attention_linear",
                                  upsample="attention_repeat"),
    "2levels-avg-rotary": dict(hierarchy="2@1 1@2 1@4 0@2 1@1", downsample="avg", upsample="attention_linear",
                               attention="rotary"),
    "1level-lsh-relative": dict(hierarchy="1@1 2@3 1@1", vanilla_attention="lsh", lsh_chunk_len=8),
}


def make(**kw):
    base = dict(vocab_size=64, d_model=32, n_heads=4, d_ff=64, dropout=0.0, attn_impl="sdpa")
    return ModelConfig(**{**base, **kw})


@pytest.mark.parametrize("T,B", [(48, 2), (50, 1)])
@pytest.mark.parametrize("name", CONFIGS)
def test_flops_per_token_matches_flop_counter(name, T, B):
    cfg = make(**CONFIGS[name])
    model = HourglassLM(cfg)
    tokens = torch.randint(0, 64, (B, T))
    # the math backend decomposes attention into matmuls, which FlopCounterMode sees on CPU
    with sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as counter:
        model(tokens).sum().backward()
    measured = counter.get_total_flops() / (B * T)
    analytic = flops_per_token(cfg, T, batch_size=B)
    assert analytic == pytest.approx(measured, rel=1e-3)  # the brief allows 5 %; the count is exact
    assert sum(layer_flops(cfg, T, B)) == pytest.approx(analytic)


def test_layer_flops_per_layer_matches_counter():
    """Per-layer figures (what pipeline balancing uses), layer by layer."""
    cfg = make(**CONFIGS["2levels-attn-relative"])
    model = HourglassLM(cfg)
    state = torch.randint(0, 64, (1, 24))
    expected = layer_flops(cfg, 24)
    for layer, want in zip(model.layers, expected, strict=True):
        inputs = state if layer.kind == "embed" else tuple(t.detach().requires_grad_() for t in state)
        with sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as counter:
            state = layer(inputs)
            out = state if layer.kind == "head" else state[0]
            out.sum().backward()
        assert counter.get_total_flops() / 24 == pytest.approx(want, rel=1e-3, abs=1.0), layer.kind


def test_hourglass_is_cheaper_than_vanilla_of_same_depth():
    hg = ModelConfig(hierarchy="5@1 24@3 5@1")
    vanilla = ModelConfig(hierarchy="34@1")
    ratio = flops_per_token(vanilla, 2048) / flops_per_token(hg, 2048)
    assert 2.0 < ratio < 3.0  # 10 of 34 layers at full length, 24 at a third


@pytest.mark.parametrize("name", CONFIGS)
def test_layer_params(name):
    cfg = make(**CONFIGS[name])
    model = HourglassLM(cfg)
    assert [sum(p.numel() for p in layer.parameters()) for layer in model.layers] == layer_params(cfg)


@pytest.mark.parametrize("name", ["vanilla-relative", "2levels-attn-relative", "1level-linear-rotary"])
def test_causal_count_is_the_full_count_less_the_masked_pairs(name):
    """causal=True (useful work) = the full-square count minus the attention work on the pairs each
    layer's mask hides, counted here from the masks themselves."""
    cfg = make(**CONFIGS[name])
    T = 24
    full, causal = flops_per_token(cfg, T), flops_per_token(cfg, T, causal=True)
    from hgscale.models.attention import Geometry
    from hgscale.models.hourglass import layer_plan
    masked = 0
    for kind, *args in layer_plan(cfg):
        if kind == "block":
            n = T // args[0]
            geo = Geometry("self", n, n, 1, args[0])
        elif kind == "down" and cfg.downsample.startswith("attention"):
            n, m = T // args[0], T // args[1]
            geo = Geometry("down", m, n, args[1] // args[0], args[0])
        elif kind == "up" and cfg.upsample.startswith("attention"):
            n, m = T // args[1], T // args[0]
            geo = Geometry("up", n, m, args[0] // args[1], args[1])
        else:
            continue
        invisible = int((~geo.offsets()[1]).sum())
        per_pair = 4 * cfg.d_model * 3  # (q k^T) and (p v), forward + backward
        if cfg.attention == "relative":
            n_dist = geo.n_k if kind == "down" else geo.n_q  # the position term's (n_q, n_dist) square
            masked += 6 * cfg.d_model * (geo.n_q * n_dist - (geo.n_q * geo.n_k - invisible))
        masked += invisible * per_pair
    assert causal == pytest.approx(full - masked / T, rel=1e-9)
    assert causal < full
