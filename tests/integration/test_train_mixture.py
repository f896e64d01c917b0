"""Training on a weighted mixture of two datasets with `hgscale/train.py` (tiny model, CPU, one process; the
mixture's independence of the data-parallel layout is tested in tests/unit/test_data_mixture.py).

The demo corpus (0.8) and the reference manual's paragraphs prepared as JSONL by `data_pipelines.text` (0.2):
the logged data/share/<name> land within 0.05 of the weights, validation reports bpc per source and overall,
and a run resumed from its mid-run checkpoint reproduces exactly the losses and shares of the uninterrupted
run. Bad mixtures stop before any process group starts.
"""
import json
import shutil
import subprocess
import sys

import pytest
import torch
from torch.testing import assert_close

from tests.integration.train_helpers import ROOT, TRAIN, demo_data, launch, metrics, tiny_config  # noqa: F401
from tests.unit.test_text_pipeline import documents

pytestmark = pytest.mark.integration
STEPS = 60


@pytest.fixture(scope="module")
def paragraphs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("paragraphs")
    src = tmp / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in documents()))
    out = tmp / "data"
    subprocess.run([sys.executable, "-m", "data_pipelines.text", "--input", str(src), "--out", str(out),
                    "--shard-bytes", "32768", "--sample-tokens", "4096"], cwd=ROOT, check=True, capture_output=True,
                   timeout=120)
    return out


def mixture_config(tmp, demo, paragraphs, name, **train):
    cfg = tiny_config(tmp, demo, name, train={"steps": STEPS, "micro_batch_size": 8, "grad_accum_steps": 1,
                                              "log_interval": 10, "eval_interval": 30, "eval_batches": 2, **train},
                      checkpoint={"interval": 30})
    c = json.loads(cfg.read_text())
    c["data"]["url"] = ""
    c["data"]["mixture"] = [{"name": "manual", "url": str(demo), "weight": 0.8},
                            {"name": "paragraphs", "url": str(paragraphs), "weight": 0.2}]
    cfg.write_text(json.dumps(c))
    return cfg


def _by_step(run_dir, key):
    return {m["step"]: m[key] for m in metrics(run_dir) if key in m}


def test_mixture_trains_with_logged_shares_and_resumes_exactly(tmp_path, demo_data, paragraphs):  # noqa: F811
    straight = mixture_config(tmp_path, demo_data, paragraphs, "straight.json")
    out = launch(1, TRAIN, ["--config", str(straight)]).stdout
    run = tmp_path / "straight_run"
    shares = _by_step(run, "data/share/manual")
    assert sorted(shares) == list(range(10, STEPS + 1, 10))
    assert abs(shares[STEPS] - 0.8) <= 0.05
    assert shares[STEPS] + _by_step(run, "data/share/paragraphs")[STEPS] == pytest.approx(1.0)
    val = {k: _by_step(run, k) for k in ("val/manual/bpc", "val/paragraphs/bpc", "val/bpc", "val/loss")}
    assert sorted(val["val/bpc"]) == [30, 60]
    for step in (30, 60):
        lo, hi = sorted((val["val/manual/bpc"][step], val["val/paragraphs/bpc"][step]))
        assert lo <= val["val/bpc"][step] <= hi  # overall: both sources' bits over both sources' bytes
    assert "validation at step 60" in out and "manual " in out

    # resume from the step-30 checkpoint of that run, in a fresh checkpoint and run directory
    resumed = mixture_config(tmp_path, demo_data, paragraphs, "resumed.json")
    shutil.copytree(tmp_path / "straight_ckpt" / "step00000030", tmp_path / "resumed_ckpt" / "step00000030")
    (tmp_path / "resumed_ckpt" / "latest").write_text("step00000030")
    again = launch(1, TRAIN, ["--config", str(resumed)])
    assert "at step 30" in again.stdout
    want, got = _by_step(run, "train/loss"), _by_step(tmp_path / "resumed_run", "train/loss")
    assert sorted(got) == list(range(40, STEPS + 1, 10))
    assert_close(torch.tensor([got[s] for s in sorted(got)], dtype=torch.float64),
                 torch.tensor([want[s] for s in sorted(got)], dtype=torch.float64), rtol=1e-6, atol=0)
    got_shares = _by_step(tmp_path / "resumed_run", "data/share/manual")
    assert got_shares == {s: shares[s] for s in got_shares} and len(got_shares) == 3  # counts resume with the data
    assert_close(torch.tensor(_by_step(tmp_path / "resumed_run", "val/paragraphs/bpc")[60]),
                 torch.tensor(val["val/paragraphs/bpc"][60]), rtol=1e-6, atol=0)


def test_bad_mixtures_stop_before_any_process_group(tmp_path, demo_data, paragraphs, capsys):  # noqa: F811
    from hgscale import train
    cfg = mixture_config(tmp_path, demo_data, paragraphs, "bad.json")
    cases = [([f"data.url={demo_data}"], "data.mixture and data.url"),
             (['data.mixture=[{"name": "a", "url": "%s", "weight": 0}]' % demo_data],
              "weight = 0 must be a number > 0"),
             (['data.mixture=[{"name": "a", "url": "%s", "weight": 1}, {"name": "b", "url": "%s", "weight": 1}]'
               % (demo_data, tmp_path / "missing")], "no dataset at")]
    for overrides, msg in cases:
        assert train.main(["--config", str(cfg), *overrides]) == 2
        err = capsys.readouterr().err
        assert msg in err and "Traceback" not in err, err[-2000:]
        assert not (tmp_path / "bad_ckpt").exists()
