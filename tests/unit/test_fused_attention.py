"""The fused relative-attention path (hgscale/models/fused_attention.py) and kernel selection.

The factorised operands are checked against the naive kernel (values and gradients) through the SDPA
executor in test_model_attention.py; here: the FlexAttention executor (its eager reference on CPU,
forward only: FlexAttention has no CPU backward) with each geometry's block mask, the selection logic,
and the fallback when FlexAttention fails."""
import warnings

import pytest
import torch
from torch.testing import assert_close

from hgscale.models import fused_attention
from hgscale.models.attention import Geometry, pick_kernel, rel_attention_naive
from hgscale.models.fused_attention import factorised_operands, flex_usable, rel_attention_fused

GEOS = [Geometry("self", 12, 12, 1, 2), Geometry("down", 4, 12, 3, 1), Geometry("up", 12, 6, 2, 3)]


def leaves(geo, grad=False):
    torch.manual_seed(0)
    B, H, dh, D = 1, 2, 8, 16
    q = [torch.randn(B, H, geo.n_q, dh, requires_grad=grad) for _ in range(2)]
    kv = [torch.randn(B, H, geo.n_k, dh, requires_grad=grad) for _ in range(2)]
    return q + kv + [torch.randn(D, D, requires_grad=grad)]


@pytest.mark.parametrize("geo", GEOS, ids=[g.kind for g in GEOS])
def test_flex_executor_matches_naive(geo):
    with torch.no_grad():
        x = leaves(geo)
        assert_close(rel_attention_fused(*x, geo, use_flex=True), rel_attention_naive(*x, geo), atol=2e-5, rtol=1e-4)


def test_factorised_score_is_the_relative_score():
    """Q'.K' equals (q+u).k + (q+v).W_r s(pos_k - pos_q) at every pair, far from the origin too."""
    geo = Geometry("self", 6, 6, 1, 1000)  # distances of thousands of tokens
    qu, qv, k, _, Wr = leaves(geo)
    Q, K = factorised_operands(qu.double(), qv.double(), k.double(), Wr.double(), geo.q_step, geo.k_step)
    from hgscale.models.attention import _gathered_bias
    want = qu.double() @ k.double().transpose(-1, -2) + _gathered_bias(qv.double(), Wr.double(), geo)
    got = (Q @ K.transpose(-1, -2)).masked_fill(~geo.offsets()[1], float("-inf"))
    assert_close(got, want)


def test_kernel_selection():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert pick_kernel("auto", cpu) == "blocked" and pick_kernel("auto", cuda) == "fused"
    assert pick_kernel("naive", cuda) == "naive" and pick_kernel("fused", cpu) == "fused"
    assert not flex_usable(cpu)  # CPU FlexAttention is an unfused reference: never picked on its own


def test_flex_failure_falls_back_to_sdpa_with_one_warning(monkeypatch):
    """Pretend this platform can fuse: the real FlexAttention then fails (no CPU backward), the call warns
    once, returns the SDPA result, and later calls go straight to SDPA."""
    monkeypatch.setattr(fused_attention, "flex_usable", lambda device: True)
    monkeypatch.setattr(fused_attention, "_FLEX", {})
    geo = GEOS[0]
    x = leaves(geo, grad=True)
    with pytest.warns(UserWarning, match="FlexAttention failed"):
        out = rel_attention_fused(*x, geo)
    assert fused_attention._FLEX["broken"]
    assert_close(out, rel_attention_naive(*x, geo), atol=2e-5, rtol=1e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out.sum().backward()
        rel_attention_fused(*x, geo)  # no second warning
    with pytest.raises(NotImplementedError):  # asked for explicitly, the failure is not hidden
        rel_attention_fused(*x, geo, use_flex=True)
