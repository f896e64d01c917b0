"""benchmarks/init_scales.py, the figures BENCHMARKS.md explains the small-budget study with: under model.init=normal
the valley's closing LayerNorm (skip + LN(up)) outweighs the token-level stream it is added to; under trax it does
not; the vanilla model has no such step."""
import dataclasses
from pathlib import Path

import pytest

from hgscale.config import load_config

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def init_scales(request):
    mp = pytest.MonkeyPatch()
    mp.syspath_prepend(str(ROOT / "benchmarks"))
    request.addfinalizer(mp.undo)
    import init_scales
    return init_scales


def _scales(mod, hierarchy: str, init: str) -> dict:
    cfg = load_config(ROOT / "configs" / "study_small.json", [])
    model = dataclasses.replace(cfg.model, hierarchy=hierarchy, init=init)
    return mod.scales(model, mod.text_batch(2, 128))


def test_normal_init_lets_the_valley_outweigh_the_token_stream(init_scales):
    trax, normal = (_scales(init_scales, "2@1 8@4 2@1", s) for s in ("trax", "normal"))
    for res, std in ((normal, (0.019, 0.021)), (trax, (0.07, 0.13))):
        kinds = [r["kind"] for r in res["layers"]]
        assert kinds == ["embed", "block", "block", "down", *["block"] * 8, "up", "block", "block", "head"]
        assert all(std[0] < r["weight_std"] < std[1] for r in res["layers"])
    up = 12  # the stream entering the valley is that after layer 2; layer 12 returns skip + LN(up)
    assert normal["layers"][up]["rms"] / normal["layers"][2]["rms"] > 20
    assert trax["layers"][up]["rms"] / trax["layers"][2]["rms"] < 3
    assert trax["layers"][0]["weight_std"] == pytest.approx(1 / 64 ** 0.5, rel=0.02)  # U(+-sqrt(3/d)): sd 1/sqrt(d)
    assert 5.0 < normal["loss"] < 6.0 and 5.0 < trax["loss"] < 6.0  # about ln 256 = 5.55 before any step


def test_the_vanilla_stream_grows_block_by_block(init_scales):
    res = _scales(init_scales, "6@1", "normal")
    rms = [r["rms"] for r in res["layers"][:-1]]
    assert rms == sorted(rms) and rms[-1] < 0.1
