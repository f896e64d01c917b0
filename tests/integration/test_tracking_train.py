"""`hgscale/train.py` on 2 gloo ranks records one MLflow run on a real server, and its resume continues it."""
import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from hgscale.core.net import free_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(400)]
ROOT = Path(__file__).resolve().parents[2]


def _train(tmp_path, uri, steps):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(ROOT / "hgscale" / "train.py"), "--config", str(ROOT / "configs" / "test" / "tiny.json"),
           f"data.url={tmp_path / 'data'}", f"checkpoint.dir={tmp_path / 'ckpt'}", f"run_dir={tmp_path / 'run'}",
           f"train.steps={steps}", "train.eval_interval=2", "train.log_interval=1",
           "tracking.enabled=true", f"tracking.uri={uri}", "tracking.experiment=train-e2e",
           "tracking.run_name=tiny-2ranks", "tracking.system_metrics=true"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def _hist(c, run_id, key):
    return [(m.step, m.value) for m in sorted(c.get_metric_history(run_id, key), key=lambda m: m.step)]


def test_train_records_one_run_and_resume_continues_it(tmp_path, mlflow_server):
    subprocess.run([sys.executable, "-m", "data_pipelines.demo_corpus", "--out", str(tmp_path / "data")],
                   check=True, capture_output=True, cwd=ROOT, timeout=120)
    out = _train(tmp_path, mlflow_server.uri, steps=4)
    assert "finished 4 steps" in out
    c = MlflowClient(mlflow_server.uri)
    exp = c.get_experiment_by_name("train-e2e")
    runs = c.search_runs([exp.experiment_id])
    assert len(runs) == 1                                   # one run for two ranks
    run_id = runs[0].info.run_id
    first = c.get_run(run_id)
    assert first.info.status == "FINISHED" and first.info.run_name == "tiny-2ranks"
    p = first.data.params
    assert p["model.hierarchy"] == "1@1 2@2 1@1" and p["train.micro_batch_size"] == "2"
    assert p["topology.world_size"] == "2" and p["topology.data_parallel_size"] == "2"
    assert p["ds.train_batch_size"] == "8"                  # 2 x 2 accumulation x 2 ranks
    assert p["dataset.vocab_size"] == "256" and int(p["dataset.splits.train.num_tokens"]) > 100_000
    assert p["version.torch"].startswith("2.") and p["version.deepspeed"]
    # the end of the run links the UI's training runs and the run's metrics, in machine-learning mode
    base = mlflow_server.uri.rstrip("/")
    assert (f"MLflow training runs: {base}/#/experiments/{exp.experiment_id}/runs?workflowType=machine_learning"
            in out)
    assert (f"MLflow run metrics:   {base}/#/experiments/{exp.experiment_id}/runs/{run_id}/model-metrics"
            f"?workflowType=machine_learning" in out)
    with urllib.request.urlopen(base + "/", timeout=30) as page:  # the server serves the UI those links open
        assert page.status == 200 and b"<div id=\"root\"" in page.read()

    out = _train(tmp_path, mlflow_server.uri, steps=6)      # the same command, longer: resumes at step 4
    assert "resumed from" in out and "finished 6 steps" in out
    runs = c.search_runs([exp.experiment_id])
    assert [r.info.run_id for r in runs] == [run_id]        # the resume continued the same run
    run = c.get_run(run_id)
    assert run.info.status == "FINISHED"
    loss = _hist(c, run_id, "train/loss")
    assert [s for s, _ in loss] == [1, 2, 3, 4, 5, 6]
    assert all(3.0 < v < 6.5 for _, v in loss)              # nats/byte of an untrained byte model: about ln 256
    assert [s for s, _ in _hist(c, run_id, "val/bpc")] == [2, 4, 6]
    flops = [v for _, v in _hist(c, run_id, "train/flops")]
    per_step = flops[0]
    assert per_step > 0 and flops == pytest.approx([per_step * s for s in range(1, 7)])  # cumulative across resume
    assert [v for _, v in _hist(c, run_id, "train/tokens")] == [8 * 32 * s for s in range(1, 7)]
    m = run.data.metrics
    assert m["perf/tokens_per_s"] > 0 and 0 < m["perf/mfu"] < 1.5
    assert m["time/step_s"] > 0 and "train/lr" in m and "train/grad_norm" in m
    assert any(k.startswith("system/") and k.endswith("/rss_gb") for k in m)
    arts = {a.path for a in c.list_artifacts(run_id, "run_info")}
    assert {"run_info/config.json", "run_info/deepspeed.json", "run_info/manifest.json"} <= arts
    cfg = json.loads(Path(c.download_artifacts(run_id, "run_info/config.json", str(tmp_path / "dl"))).read_text())
    assert cfg["model"]["hierarchy"] == "1@1 2@2 1@1"
    png = Path(c.download_artifacts(run_id, "plots/loss_vs_flops.png", str(tmp_path / "dl")))
    assert png.read_bytes()[:4] == b"\x89PNG"
