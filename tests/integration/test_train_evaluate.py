"""`python -m hgscale evaluate`: the enwik8 sliding-chunk protocol, on a checkpoint `hgscale/train.py` wrote."""
import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from hgscale.config import load_config
from hgscale.models import HourglassLM
from hgscale.models.scoring import sliding_nll
from tests.integration.train_helpers import ROOT, TRAIN, demo_data, launch, tiny_config  # noqa: F401

pytestmark = pytest.mark.integration


def reference_chunks(model, tokens, chunk, context_chunks):
    """Each chunk scored from an unpadded window of its own length: the protocol written out plainly."""
    total, count, ctx = 0.0, 0, chunk * context_chunks
    for s in range(1, len(tokens), chunk):
        e = min(s + chunk, len(tokens))
        a = max(0, s - 1 - ctx)
        with torch.no_grad():
            logits = model(tokens[a:e - 1][None])[0]  # (e-1-a, V)
        total += float(F.cross_entropy(logits[s - 1 - a:], tokens[s:e], reduction="sum"))
        count += e - s
    return total, count


def test_sliding_protocol_scores_every_token_once_with_its_context():
    cfg = load_config(ROOT / "configs" / "test" / "tiny.json", ["data.url=unused"])
    torch.manual_seed(0)
    model = HourglassLM(cfg.model, seed=3).eval()
    with torch.no_grad():  # a non-trivial model: random init gives near-uniform predictions
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    tokens = torch.randint(0, 256, (203,))
    got = sliding_nll(model, tokens, chunk=16, context_chunks=3, batch_size=5)
    want = reference_chunks(model, tokens, 16, 3)
    assert got[1] == want[1] == len(tokens) - 1
    assert_close(torch.tensor(got[0]), torch.tensor(want[0]), rtol=1e-5, atol=1e-4)
    # more context changes the score: the windows really are the chunk plus what precedes it
    assert abs(sliding_nll(model, tokens, chunk=16, context_chunks=0)[0] - got[0]) > 1e-3


def test_evaluate_cli_on_a_training_checkpoint(tmp_path, demo_data):  # noqa: F811
    cfg = tiny_config(tmp_path, demo_data, "ev.json", tracking={"enabled": True})
    launch(1, TRAIN, ["--config", str(cfg)])
    out = tmp_path / "result.json"
    r = subprocess.run([sys.executable, "-m", "hgscale", "evaluate", "--checkpoint", str(tmp_path / "ev_ckpt"),
                        "--split", "test", "--chunk", "32", "--context-chunks", "3", "--max-chunks", "12",
                        "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert res["protocol"] == "sliding" and res["metric"] == "bpc" and res["tokens"] == 12 * 32
    assert f"test bpc {res['value']:.4f}" in r.stdout

    from hgscale.checkpoint.export import load_any
    from hgscale.data import open_dataset
    model, c = load_any(tmp_path / "ev_ckpt")
    tokens = open_dataset(c.data).split_tokens("test")[:12 * 32 + 1]
    nll, n = reference_chunks(model, tokens, 32, 3)
    assert n == 12 * 32
    assert res["value"] == pytest.approx(nll / n / math.log(2), rel=1e-5)  # bytes: bpc = nats / ln 2
    assert 4.0 < res["value"] < 8.5  # 4 steps from a uniform 8 bits

    # the score went into the training run, at the checkpoint's step, where the report's test column reads it
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'ev_run' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("hgscale")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    (run,) = client.search_runs([exp.experiment_id])
    hist = client.get_metric_history(run.info.run_id, "test/bpc")
    assert [(m.step, m.value) for m in hist] == [(4, pytest.approx(res["value"]))]
    assert f"logged test/bpc, test/loss to MLflow run {run.info.run_id} at step 4" in r.stdout

    # an exported model keeps the link to its run
    from hgscale.checkpoint.export import export
    from hgscale.checkpoint.run_link import checkpoint_run
    exported = checkpoint_run(export(tmp_path / "ev_ckpt", tmp_path / "export"))
    assert (exported.run_id, exported.step) == (run.info.run_id, 4)


def test_evaluate_cli_names_a_missing_checkpoint(tmp_path):
    r = subprocess.run([sys.executable, "-m", "hgscale", "evaluate", "--checkpoint", str(tmp_path / "none")],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "no complete checkpoint at" in r.stderr and "Traceback" not in r.stderr
