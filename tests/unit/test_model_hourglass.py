"""Structure of HourglassLM: the flat layer list, the state tuple, initialisation, bad input."""
import pytest
import torch
from torch.testing import assert_close

from hgscale.config import MODEL_SIZES, ModelConfig, config_from_dict
from hgscale.models import HourglassLM, build_layer, build_layers, layer_constructors, state_shapes

CFG = dict(vocab_size=32, d_model=16, n_heads=2, d_ff=32, hierarchy="1@1 1@2 2@6 1@2 1@1", dropout=0.0)


def test_forward_is_a_fold_over_the_layer_list():
    model = HourglassLM(ModelConfig(**CFG), seed=3).eval()
    tokens = torch.randint(0, 32, (2, 17))  # 17 is not a multiple of the total factor 6
    state = tokens
    for layer in build_layers(ModelConfig(**CFG), seed=3):
        state = layer.eval()(state)
    assert state.shape == (2, 18, 32)  # padded to a multiple of 6
    assert torch.equal(model(tokens), state[:, :17])
    assert [(layer.kind, layer.factor) for layer in model.layers] == [
        ("embed", 1), ("block", 1), ("down", 2), ("block", 2), ("down", 6), ("block", 6), ("block", 6),
        ("up", 2), ("block", 2), ("up", 1), ("block", 1), ("head", 1)]


@pytest.mark.parametrize("attention", ["relative", "rotary"])
def test_state_tuple_shapes(attention):
    cfg = ModelConfig(**{**CFG, "attention": attention})
    model = HourglassLM(cfg)
    state = torch.randint(0, 32, (3, 20))
    for layer, want in zip(model.layers, state_shapes(cfg, 3, 20), strict=True):
        state = layer(state)
        got = [tuple(state.shape)] if layer.kind == "head" else [tuple(t.shape) for t in state]
        assert got == [tuple(w) for w in want], layer.kind
        if layer.kind != "head":
            assert all(t.is_floating_point() and t.requires_grad for t in state)  # all on the gradient path
    uv = [(2, 2, 8)] if attention == "relative" else []
    assert state_shapes(cfg, 3, 20)[2] == [(3, 12, 16), *uv, (3, 24, 16)]  # after the first down layer


def test_uv_biases_are_one_parameter_shared_by_every_attention_layer():
    cfg = ModelConfig(**CFG, downsample="attention_avg", upsample="attention_repeat")
    model = HourglassLM(cfg)
    names = [n for n, _ in model.named_parameters() if n.endswith("uv")]
    assert names == ["layers.0.uv"]
    model(torch.randint(0, 32, (1, 12))).sum().backward()
    assert model.layers[0].uv.grad.abs().sum() > 0
    # every attention layer reads the u/v it is handed in the state tuple
    state = model.layers[0](torch.randint(0, 32, (1, 12)))
    x, uv = state
    uv2 = uv.detach().clone().requires_grad_()
    out = model.layers[1]((x, uv2))
    out[0].sum().backward()
    assert uv2.grad.abs().sum() > 0


def test_state_dict_keys_and_pure_construction():
    cfg = ModelConfig(**CFG)
    model = HourglassLM(cfg, seed=7)
    keys = list(model.state_dict())
    assert all(k.startswith("layers.") and k.split(".")[1].isdigit() for k in keys)
    assert "layers.0.embed.weight" in keys and "layers.11.proj.weight" in keys
    # any layer alone, from (cfg, index, seed), equals the same layer of the whole model: a pipeline stage
    # that builds only its own layers gets the same weights as a single process
    ctors = layer_constructors(cfg, seed=7)
    assert len(ctors) == len(model.layers)
    for i in (0, 4, 7, 11):
        fn, args = ctors[i]
        alone = fn(*args)
        ref = model.layers[i].state_dict()
        assert alone.state_dict().keys() == ref.keys()
        for k, v in alone.state_dict().items():
            assert torch.equal(v, ref[k])
    assert not torch.equal(build_layer(cfg, 3, seed=8).block.ff.fc1.weight, model.layers[3].block.ff.fc1.weight)


def test_initialisation():
    cfg = ModelConfig(**{**CFG, "d_model": 64, "d_ff": 256, "init": "normal", "init_std": 0.05})
    model = HourglassLM(cfg)
    w = model.layers[1].block.ff.fc1.weight
    assert w.std().item() == pytest.approx(0.05, rel=0.05)
    assert torch.equal(model.layers[1].block.ff.fc1.bias, torch.zeros(256))
    assert model.layers[0].uv.abs().max() < 1e-5
    assert not torch.equal(model.layers[-1].proj.weight, model.layers[0].embed.weight.T)  # no tying


def test_dropout_is_active_only_in_training():
    cfg = ModelConfig(**{**CFG, "dropout": 0.2})
    model = HourglassLM(cfg)
    tokens = torch.randint(0, 32, (2, 12))
    model.train()
    assert not torch.equal(model(tokens), model(tokens))
    model.eval()
    assert torch.equal(model(tokens), model(tokens))


@pytest.mark.parametrize("field,value,needle", [
    ("hierarchy", "2@1 4@3", "model.hierarchy '2@1 4@3'"),
    ("hierarchy", "1@1 1@4 1@6 1@4 1@1", "does not strictly grow from 4 and divide by it"),
    ("downsample", "max", "model.downsample = 'max' is not one of avg, linear, attention_avg, attention_linear"),
    ("upsample", "nearest", "model.upsample = 'nearest' is not one of repeat, linear"),
    ("attention", "alibi", "model.attention = 'alibi' is not one of relative, rotary"),
    ("n_heads", 3, "model.d_model = 16 is not divisible by model.n_heads = 3"),
    ("attn_impl", "flash", "model.attn_impl = 'flash' is not one of auto"),
])
def test_bad_config_is_a_clear_value_error_before_any_tensor(field, value, needle, monkeypatch):
    built = []
    monkeypatch.setattr(torch.nn.Module, "__init__", lambda self, *a, **k: built.append(self))
    with pytest.raises(ValueError) as err:
        HourglassLM(ModelConfig(**{**CFG, field: value}))
    assert needle in str(err.value)
    assert built == []  # raised before any module (or tensor) was made


def test_several_problems_are_reported_at_once():
    with pytest.raises(ValueError) as err:
        HourglassLM(ModelConfig(**{**CFG, "downsample": "max", "n_heads": 5}))
    assert "model.downsample" in str(err.value) and "model.n_heads = 5" in str(err.value)


def test_named_sizes_build():
    cfg = config_from_dict({"model": {"size": "debug"}, "data": {"url": "/tmp/x", "seq_len": 256}}).model
    assert cfg.hierarchy == MODEL_SIZES["debug"]["hierarchy"]
    logits = HourglassLM(cfg)(torch.randint(0, 256, (1, 9)))
    assert logits.shape == (1, 9, 256) and torch.isfinite(logits).all()


def test_too_long_sequence_names_the_field():
    model = HourglassLM(ModelConfig(**{**CFG, "max_seq_len": 24}))
    with pytest.raises(ValueError, match="exceeds model.max_seq_len = 24"):
        model(torch.zeros(1, 25, dtype=torch.long))


def test_kernels_agree_on_the_whole_model():
    """The CPU blocked kernel and the sdpa kernel give the model the same logits and gradients."""
    outs = []
    for impl in ("blocked", "sdpa", "naive"):
        model = HourglassLM(ModelConfig(**{**CFG, "attn_impl": impl, "downsample": "attention_avg"}), seed=1)
        logits = model(torch.arange(300).remainder(32)[None])
        logits.square().mean().backward()
        outs.append((logits, model.layers[1].block.attn.pos.weight.grad))
    for logits, grad in outs[1:]:
        assert_close(logits, outs[0][0], atol=1e-5, rtol=1e-4)
        assert_close(grad, outs[0][1], atol=1e-6, rtol=1e-3)


def test_fast_dropout_rate_scale_and_gradient():
    from hgscale.models.dropout import dropout
    torch.manual_seed(0)
    x = torch.ones(1000, 1001, requires_grad=True)  # an odd size: the last 64-bit word is partly used
    y = dropout(x, 0.2, True)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.8) < 0.003
    assert y.mean().item() == pytest.approx(1.0, abs=0.005)  # unbiased
    assert torch.equal(y[kept], torch.full_like(y[kept], 65536 / (65536 - 13107)))
    y.backward(torch.full_like(y, 2.0))
    assert torch.equal(x.grad, 2.0 * y.detach())
    assert torch.equal(dropout(x, 0.2, False), x) and torch.equal(dropout(x, 0.0, True), x)
    torch.manual_seed(5)
    a = dropout(x, 0.5, True)
    torch.manual_seed(5)
    assert torch.equal(a, dropout(x, 0.5, True))  # reproducible from the torch seed
