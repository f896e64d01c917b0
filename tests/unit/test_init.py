"""model.init: 'trax' draws trax's distributions (Glorot-uniform Dense, fan-out uniform Embedding, N(0, 1e-6)
biases); 'normal' reproduces the N(0, init_std) weights the model had before model.init existed."""
import math

import pytest
import torch
from torch import nn

from hgscale.config import ModelConfig
from hgscale.models import HourglassLM
from hgscale.models.hourglass import _CLASSES, EmbedLayer, layer_plan

CFG = dict(vocab_size=512, d_model=128, n_heads=4, d_ff=512, hierarchy="1@1 1@2 1@1", downsample="attention_linear",
           upsample="linear", dropout=0.0, max_seq_len=64)


def old_init_(layer, init_std, generator):
    """The initialiser as it was before model.init (the contract of init = 'normal')."""
    with torch.no_grad():
        for m in layer.modules():
            if isinstance(m, nn.Linear):
                m.weight.normal_(0.0, init_std, generator=generator)
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.Embedding):
                m.weight.normal_(0.0, init_std, generator=generator)
            elif isinstance(m, nn.LayerNorm):
                m.weight.fill_(1.0)
                m.bias.zero_()
        if isinstance(layer, EmbedLayer) and hasattr(layer, "uv"):
            layer.uv.normal_(0.0, 1e-6, generator=generator)


def test_default_is_trax():
    assert ModelConfig().init == "trax"


@pytest.mark.parametrize("attention", ["relative", "rotary"])
def test_normal_reproduces_the_previous_weights_exactly(attention):
    cfg = ModelConfig(**CFG, attention=attention, init="normal", init_std=0.02)
    model = HourglassLM(cfg, seed=3)
    for i, (kind, *args) in enumerate(layer_plan(cfg)):
        ref = _CLASSES[kind](cfg, *args)
        old_init_(ref, cfg.init_std, torch.Generator().manual_seed(3 * 1_000_003 + i))
        got = model.layers[i].state_dict()
        assert got.keys() == ref.state_dict().keys()
        for name, want in ref.state_dict().items():
            assert torch.equal(got[name], want), (i, name)


def _uniform_ok(w: torch.Tensor, a: float):
    """U(-a, a): bounded by a, variance a^2/3, half the mass inside a/2."""
    assert w.abs().max() <= a
    assert w.var().item() == pytest.approx(a * a / 3, rel=0.05)
    assert (w.abs() < a / 2).float().mean().item() == pytest.approx(0.5, abs=0.02)


def test_trax_distributions():
    cfg = ModelConfig(**CFG, vanilla_attention="lsh", lsh_chunk_len=8, attention="relative")
    model = HourglassLM(cfg, seed=0)
    D = cfg.d_model
    seen = set()
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            fan_in, fan_out = m.in_features, m.out_features
            if name.endswith(".qkv"):  # three trax Dense(D) layers fused: each slice has fans (D, D)
                fan_out //= 3
                assert fan_out == D
            _uniform_ok(m.weight, math.sqrt(6.0 / (fan_in + fan_out)))
            if m.bias is not None:
                assert m.bias.std().item() == pytest.approx(1e-6, rel=0.5) and m.bias.abs().max() < 1e-5
            seen.add(name.rsplit(".", 1)[-1])
        elif isinstance(m, nn.Embedding):
            _uniform_ok(m.weight, math.sqrt(3.0 / D))  # trax Embedding: fan_out uniform, variance 1/d_model
            seen.add("embed")
        elif isinstance(m, nn.LayerNorm):
            assert torch.equal(m.weight, torch.ones(D)) and torch.equal(m.bias, torch.zeros(D))
    # every kind of dense layer was looked at: attention, LSH, feed-forward, pools, head
    assert {"qkv", "out", "pos", "qk", "v", "fc1", "fc2", "proj", "embed"} <= seen
    uv = model.layers[0].uv
    assert uv.std().item() == pytest.approx(1e-6, rel=0.5)


def test_trax_init_is_deterministic_per_seed():
    cfg = ModelConfig(**CFG)
    a, b, c = (HourglassLM(cfg, seed=s).state_dict() for s in (1, 1, 2))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["layers.1.block.attn.qkv.weight"], c["layers.1.block.attn.qkv.weight"])
