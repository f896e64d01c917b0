"""model.init: 'trax' draws trax's distributions (Glorot-uniform Dense, fan-out uniform Embedding, N(0, 1e-6)
biases); 'normal' reproduces the N(0, init_std) weights the model had before model.init existed."""
import math

import pytest
import torch
from torch import nn

from hgscale.config import ModelConfig, field_docs
from hgscale.core.notation import parse_init_layers
from hgscale.models import HourglassLM
from hgscale.models.hourglass import init_layer_

CFG = dict(vocab_size=512, d_model=128, n_heads=4, d_ff=512, hierarchy="1@1 1@2 1@1", downsample="attention_linear",
           upsample="linear", dropout=0.0, max_seq_len=64)


def test_default_is_trax():
    assert ModelConfig().init == "trax"


@pytest.mark.parametrize("attention", ["relative", "rotary"])
def test_normal_weights_are_the_layer_generators_draws_in_module_order(attention):
    """init = 'normal', the weights the model had before model.init existed: in each layer, every Dense and
    Embedding weight is the next N(0, init_std) draw of the layer's generator (seed * 1_000_003 + index), in
    module order, then u, v ~ N(0, 1e-6); Dense biases 0, LayerNorms scale 1 and bias 0. Every parameter is
    one of these."""
    cfg = ModelConfig(**CFG, attention=attention, init="normal", init_std=0.02)
    model = HourglassLM(cfg, seed=3)
    for i, layer in enumerate(model.layers):
        gen, seen = torch.Generator().manual_seed(3 * 1_000_003 + i), set()
        for name, m in layer.named_modules(prefix=f"layers.{i}"):
            if isinstance(m, (nn.Linear, nn.Embedding)):
                want = torch.empty_like(m.weight).normal_(0.0, cfg.init_std, generator=gen)
                assert torch.equal(m.weight, want), name
                seen.add(f"{name}.weight")
            if isinstance(m, nn.Linear) and m.bias is not None:
                assert torch.equal(m.bias, torch.zeros_like(m.bias)), name
                seen.add(f"{name}.bias")
        if hasattr(layer, "uv"):
            assert torch.equal(layer.uv, torch.empty_like(layer.uv).normal_(0.0, 1e-6, generator=gen))
            seen.add(f"layers.{i}.uv")
        seen |= _unit_norms(layer, f"layers.{i}")
        assert seen == {f"layers.{i}.{n}" for n, _ in layer.named_parameters()}, i
    assert hasattr(model.layers[0], "uv") == (attention == "relative")


def _unit_norms(module: nn.Module, prefix: str = "") -> set[str]:
    """Asserts every LayerNorm has scale 1 and bias 0; returns the names of their parameters."""
    names = set()
    for name, m in module.named_modules(prefix=prefix):
        if isinstance(m, nn.LayerNorm):
            assert torch.equal(m.weight, torch.ones_like(m.weight)) and torch.equal(m.bias, torch.zeros_like(m.bias))
            names |= {f"{name}.weight", f"{name}.bias"}
    return names


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
    assert _unit_norms(model)
    # every kind of dense layer was looked at: attention, LSH, feed-forward, pools, head
    assert {"qkv", "out", "pos", "qk", "v", "fc1", "fc2", "proj", "embed"} <= seen
    uv = model.layers[0].uv
    assert uv.std().item() == pytest.approx(1e-6, rel=0.5)


def test_trax_init_is_deterministic_per_seed():
    cfg = ModelConfig(**CFG)
    a, b, c = (HourglassLM(cfg, seed=s).state_dict() for s in (1, 1, 2))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["layers.1.block.attn.qkv.weight"], c["layers.1.block.attn.qkv.weight"])


def test_unknown_scheme_is_an_error():
    with pytest.raises(ValueError, match="init scheme 'glorot' is not one of trax, normal"):
        init_layer_(nn.Linear(2, 2), 0.02, torch.Generator(), "glorot")


def test_init_layers_give_each_named_group_its_scheme_and_the_rest_model_init():
    """model.init_layers: a layer of a named group holds exactly the weights the whole model would have under that
    scheme (the same generator per layer), every other layer those of model.init."""
    groups = {"embed": [0], "full": [1, 5], "down": [2], "shortened": [3], "up": [4], "head": [6]}
    trax, normal = (HourglassLM(ModelConfig(**CFG, init=s), seed=5).layers for s in ("trax", "normal"))
    for named in (("down", "up"), ("shortened",), ("embed", "head", "full")):
        spec = " ".join(f"{g}=normal" for g in named)
        mixed = HourglassLM(ModelConfig(**CFG, init="trax", init_layers=spec), seed=5).layers
        want = {i for g in named for i in groups[g]}
        for i, layer in enumerate(mixed):
            ref = normal[i] if i in want else trax[i]
            assert all(torch.equal(a, b) for a, b in zip(layer.state_dict().values(), ref.state_dict().values(),
                                                          strict=True)), (spec, i)


def test_a_named_recipe_is_its_pairs():
    """model.init_layers = "small_budget" builds exactly the weights of "full=normal", and a config shows its pairs."""
    named, pairs = (HourglassLM(ModelConfig(**CFG, init="trax", init_layers=s), seed=5).state_dict()
                    for s in ("small_budget", "full=normal"))
    assert named.keys() == pairs.keys() and all(torch.equal(named[k], pairs[k]) for k in named)
    assert parse_init_layers(" small_budget ") == {"full": "normal"}
    assert "'small_budget' = 'full=normal'" in dict((k, doc) for k, doc, _ in field_docs())["model.init_layers"]


@pytest.mark.parametrize("spec, why", [
    ("middle=normal", "'middle=normal' is not group=scheme with a group of embed, full, down, shortened, up, head"),
    ("down=glorot", "'down=glorot' is not group=scheme"),
    ("down=normal down=trax", "'down=trax' names its group twice"),
])
def test_bad_init_layers_is_one_config_problem(spec, why):
    problems = ModelConfig(**CFG, init_layers=spec).problems()
    assert len(problems) == 1 and problems[0].startswith(f"model.init_layers = {spec!r}: ") and why in problems[0]
