"""Autoregressive property of every resampling x attention combination, at 1, 2 and 3 levels.

1. Logits at t do not change (bit for bit) when any token after t changes.
2. Each valley (down layer .. matching up layer, at its own resolution) sees exactly what it may:
   output t changes when input floor(t/f)*f changes, the newest input the shortened path may see,
   and does not change when anything but inputs 0..floor(t/f)*f and t itself changes.
"""
import itertools

import pytest
import torch

from hgscale.config import DOWNSAMPLE, UPSAMPLE, ModelConfig
from hgscale.models import HourglassLM

HIERARCHIES = {1: "1@1 1@3 1@1", 2: "1@1 1@2 1@6 1@2 1@1", 3: "1@1 1@2 0@4 1@8 1@4 1@2 1@1"}
COMBOS = list(itertools.product(DOWNSAMPLE, UPSAMPLE, ("relative", "rotary")))


def tiny(hierarchy, down, up, attention, **kw):
    return ModelConfig(vocab_size=32, d_model=16, n_heads=2, d_ff=32, hierarchy=hierarchy, downsample=down,
                       upsample=up, attention=attention, dropout=0.0, max_seq_len=256, **kw)


def fold(layers, state):
    for layer in layers:
        state = layer(state)
    return state


def valleys(model):
    """(down index, matching up index) for every valley, outermost first."""
    stack, pairs = [], []
    for i, layer in enumerate(model.layers):
        if layer.kind == "down":
            stack.append(i)
        elif layer.kind == "up":
            pairs.append((stack.pop(), i))
    return sorted(pairs)


@pytest.mark.parametrize("levels", [1, 2, 3])
@pytest.mark.parametrize("down,up,attention", COMBOS, ids=["-".join(c) for c in COMBOS])
def test_autoregressive(down, up, attention, levels):
    torch.manual_seed(0)
    cfg = tiny(HIERARCHIES[levels], down, up, attention)
    model = HourglassLM(cfg, seed=1).eval()
    k = cfg.total_factor()
    for T in (2 * k, 2 * k + k // 2 + 1):  # divisible and not divisible by the total factor
        base = torch.randint(0, 32, (1, T))
        changed = base.repeat(T, 1)  # row t: every token after t replaced
        for t in range(T):
            changed[t, t + 1:] = (base[0, t + 1:] + 1 + torch.randint(0, 30, (T - t - 1,))) % 32
        with torch.no_grad():
            ref = model(base.repeat(T, 1))
            out = model(changed)
        assert out.shape == (T, T, 32)
        for t in range(T):
            assert torch.equal(out[t, : t + 1], ref[t, : t + 1]), f"T={T}: logits at {t} see the future"
        assert not torch.equal(out[0, 1:], ref[0, 1:])  # and the later logits do react


@pytest.mark.parametrize("levels", [1, 2, 3])
@pytest.mark.parametrize("down,up,attention", COMBOS, ids=["-".join(c) for c in COMBOS])
def test_valley_sees_newest_allowed_input(down, up, attention, levels):
    torch.manual_seed(0)
    cfg = tiny(HIERARCHIES[levels], down, up, attention)
    model = HourglassLM(cfg, seed=2).eval()
    T = 2 * cfg.total_factor()
    with torch.no_grad():
        for d, u in valleys(model):
            state = fold(model.layers[:d], torch.randint(0, 32, (1, T)))
            x, rest = state[0], state[1:]
            n, f = x.shape[1], model.layers[d].f
            rows = x.repeat(n, 1, 1)
            newest = rows.clone()  # row t: input floor(t/f)*f perturbed
            others = rows.clone()  # row t: every input except 0..floor(t/f)*f and t perturbed
            for t in range(n):
                s = t // f * f
                newest[t, s] += torch.randn(x.shape[-1])
                keep = torch.zeros(n, dtype=torch.bool)
                keep[: s + 1] = True
                keep[t] = True
                others[t, ~keep] += torch.randn(int((~keep).sum()), x.shape[-1])
            expand = tuple(r.expand(n, *r.shape[1:]) if r.shape[0] == 1 and r.dim() == 3 else r for r in rest)
            run = lambda inp, layers=model.layers[d: u + 1], rest=expand: fold(layers, (inp, *rest))[0]  # noqa: E731
            ref, out_new, out_oth = run(rows), run(newest), run(others)
            for t in range(n):
                s = t // f * f
                assert (out_new[t, t] - ref[t, t]).abs().max() > 1e-6, \
                    f"valley {d}-{u}: output {t} does not see input {s}"
                assert torch.equal(out_oth[t, t], ref[t, t]), f"valley {d}-{u}: output {t} sees inputs after {s}"
