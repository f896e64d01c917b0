"""Each shortening / upsampling module against a slow reference written here with loops."""
import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from hgscale.config import ModelConfig
from hgscale.models.attention import Geometry
from hgscale.models.hourglass import DownLayer, UpLayer, init_layer_
from hgscale.models.resampling import LinearPool, LinearUpsample, Shorten, Upsample, avg_pool, shift_right
from tests.unit.test_model_attention import attention_ref, double  # noqa: F401  (double: autouse fixture)


def cfg_for(down="avg", up="repeat", attention="relative"):
    return ModelConfig(vocab_size=32, d_model=8, n_heads=2, d_ff=12, hierarchy="1@1 1@2 1@1", downsample=down,
                       upsample=up, attention=attention, dropout=0.0)


def randomise(module):
    gen = torch.Generator().manual_seed(3)
    init_layer_(module, 0.5, gen)
    for m in module.modules():  # non-trivial LayerNorm affine parameters and biases too
        for name, p in m.named_parameters(recurse=False):
            if name == "bias" or isinstance(m, torch.nn.LayerNorm):
                with torch.no_grad():
                    p.normal_(0, 0.3, generator=gen)
    return module


def test_shift_right_reference():
    x = torch.randn(2, 7, 3)
    for n in range(4):
        out = shift_right(x, n)
        for t in range(7):
            assert torch.equal(out[:, t], x[:, t - n] if t >= n else torch.zeros(2, 3))


@pytest.mark.parametrize("f", [2, 3])
def test_pools_and_upsamplings_reference(f):
    x = torch.randn(2, 4 * f, 8)
    pooled = avg_pool(x, f)
    lin_pool, lin_up = randomise(LinearPool(8, f)), randomise(LinearUpsample(8, f))
    lp, lu = lin_pool(x), lin_up(x[:, :4])
    rep = Upsample(cfg_for(up="repeat"), f, 1)(x[:, :4], x, None)
    for i in range(4):
        window = [x[:, i * f + m] for m in range(f)]
        assert_close(pooled[:, i], sum(window) / f)
        assert_close(lp[:, i], torch.cat(window, -1) @ lin_pool.proj.weight.T + lin_pool.proj.bias)
        full = x[:, i] @ lin_up.proj.weight.T + lin_up.proj.bias  # (2, f*D)
        for m in range(f):
            assert_close(lu[:, i * f + m], full[:, m * 8:(m + 1) * 8])
            assert torch.equal(rep[:, i * f + m], x[:, i])


def ln(x, mod):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + mod.eps) * mod.weight + mod.bias


def ff_ref(x, ff):
    h = x @ ff.fc1.weight.T + ff.fc1.bias
    h = 0.5 * h * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (h + 0.044715 * h ** 3)))
    return h @ ff.fc2.weight.T + ff.fc2.bias


@pytest.mark.parametrize("attention", ["relative", "rotary"])
@pytest.mark.parametrize("method", ["attention_avg", "attention_linear"])
@pytest.mark.parametrize("f,P", [(2, 1), (3, 2)])
def test_attention_shortening_reference(method, attention, f, P):
    torch.manual_seed(0)
    mod = randomise(Shorten(cfg_for(down=method, attention=attention), f, P)).pool
    xs, uv = torch.randn(2, 4 * f, 8), torch.randn(2, 2, 4)
    h = ln(xs, mod.ln_in)
    if method == "attention_avg":
        pooled = torch.stack([h[:, i * f:(i + 1) * f].mean(1) for i in range(4)], 1)
    else:
        W, b = mod.resample.proj.weight, mod.resample.proj.bias
        pooled = torch.stack([h[:, i * f:(i + 1) * f].reshape(2, -1) @ W.T + b for i in range(4)], 1)
    q = ln(pooled, mod.ln_q)
    q = q + attention_ref(mod.attn, q, h, uv, Geometry("down", 4, 4 * f, f, P))
    want = q + ff_ref(ln(q, mod.ln_ff), mod.ff)
    assert_close(mod(xs, uv), want)


@pytest.mark.parametrize("attention", ["relative", "rotary"])
@pytest.mark.parametrize("method", ["attention_repeat", "attention_linear"])
@pytest.mark.parametrize("f,P", [(2, 1), (3, 2)])
def test_attention_upsampling_reference(method, attention, f, P):
    torch.manual_seed(0)
    mod = randomise(Upsample(cfg_for(up=method, attention=attention), f, P)).up
    y, skip, uv = torch.randn(2, 4, 8), torch.randn(2, 4 * f, 8), torch.randn(2, 2, 4)
    h = ln(y, mod.ln_in)
    if method == "attention_repeat":
        up = torch.stack([h[:, t // f] for t in range(4 * f)], 1)
    else:
        W, b = mod.resample.proj.weight, mod.resample.proj.bias
        up = torch.stack([(h[:, t // f] @ W.T + b)[:, (t % f) * 8:(t % f + 1) * 8] for t in range(4 * f)], 1)
    q = ln(up, mod.ln_q) + skip
    q = q + attention_ref(mod.attn, q, h, uv, Geometry("up", 4 * f, 4, f, P))
    want = q + ff_ref(ln(q, mod.ln_ff), mod.ff)
    assert_close(mod(y, uv, skip), want)


@pytest.mark.parametrize("down,up", [("avg", "repeat"), ("linear", "linear"), ("attention_avg", "attention_linear")])
def test_down_and_up_layers_push_and_pop_the_skip(down, up):
    """DownLayer: skip = LN(x), shortened = Shorten(shift(skip, f-1)); UpLayer: skip + LN(Upsample(LN y))."""
    cfg = cfg_for(down=down, up=up)
    dl, ul = randomise(DownLayer(cfg, 1, 2)), randomise(UpLayer(cfg, 2, 1))
    x, uv, outer_skip = torch.randn(2, 6, 8), torch.randn(2, 2, 4), torch.randn(2, 6, 8)
    y, uv_out, s1, s2 = dl((x, uv, outer_skip))
    assert uv_out is uv and s1 is outer_skip
    assert_close(s2, ln(x, dl.ln_in))
    assert_close(y, dl.shorten(F.pad(s2, (0, 0, 1, 0))[:, :6], uv))
    x2, uv2, s3 = ul((y, uv, s1, s2))
    assert s3 is s1 and uv2 is uv
    assert_close(x2, s2 + ln(ul.upsample(ln(y, ul.ln_in), s2, uv), ul.ln_out))
