"""Dropout masks keyed by (seed, step, global micro-batch, layer): the same micro-batch gets the same masks whether
one rank accumulates it or another rank holds it, whether the layers run as one model or as pipeline stages, and
with activation checkpointing (whose recompute must redraw the very masks of the forward)."""
import torch
from torch import nn

from hgscale.config import config_from_dict
from hgscale.models import HourglassLM
from hgscale.models.dropout import DropoutKeys
from hgscale.training.recompute import recompute_in_backward


def model(seed=3):
    cfg = config_from_dict({"model": {"size": "debug", "dropout": 0.3, "attn_dropout": 0.2,
                                      "attn_impl": "blocked"}, "data": {"url": "/d", "seq_len": 32}}).model
    return HourglassLM(cfg, seed=seed).train()


class Stage(nn.Module):
    """A slice of the layers, entered as one module (what a pipeline stage is)."""

    def __init__(self, layers):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, state):
        for layer in self.layers:
            state = layer(state)
        return state


def keyed_whole(m, seed=7):
    keys = DropoutKeys(seed)
    keys.attach(m, list(enumerate(m.layers)))
    return keys


def batches(n=3):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 256, (2, 32), generator=g) for _ in range(n)]


def test_the_same_micro_batch_gets_the_same_masks_on_another_rank():
    m = model()
    keys = keyed_whole(m)
    xs = batches(4)
    keys.begin_step(5, first_micro=0)  # one rank accumulating micro-batches 0..3 of step 5
    one = [m(x) for x in xs]
    for rank in range(2):  # two ranks, two micro-batches each
        keys.begin_step(5, first_micro=rank * 2)
        for k in range(2):
            assert torch.equal(m(xs[rank * 2 + k]), one[rank * 2 + k])
    keys.begin_step(6, first_micro=0)
    assert not torch.equal(m(xs[0]), one[0])  # another step draws other masks
    assert not torch.equal(one[0], m.eval()(xs[0]))  # and dropout did act


def test_pipeline_stages_and_checkpointing_draw_the_masks_of_the_whole_model():
    whole = model()
    keys = keyed_whole(whole)
    x = batches(1)[0]
    keys.begin_step(2, first_micro=1)
    want = whole(x)
    want.sum().backward()
    want_grads = [p.grad.clone() for p in whole.parameters()]

    split = model()  # the same weights, as two stages, with activation checkpointing
    for layer in split.layers[1:-1]:  # every layer but the embedding and the head: the policy "all"
        recompute_in_backward(layer)
    k = len(split.layers) // 2
    stages = [Stage(split.layers[:k]), Stage(split.layers[k:])]
    per_stage = [DropoutKeys(7), DropoutKeys(7)]  # each stage is a process of its own, counting its micro-batches
    per_stage[0].attach(stages[0], [(i, split.layers[i]) for i in range(k)])
    per_stage[1].attach(stages[1], [(i, split.layers[i]) for i in range(k, len(split.layers))])
    for keys_of_stage in per_stage:
        keys_of_stage.begin_step(2, first_micro=1)
    got = stages[1](stages[0](x))
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    got.sum().backward()
    for p, g in zip(split.parameters(), want_grads, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-6, atol=1e-7)
