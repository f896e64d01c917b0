"""Tracker against a real `mlflow server`: params (masked), metric histories, artifacts, resume."""
import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from hgscale.config import Config
from hgscale.tracking import EfficiencyMeter, Tracker, names

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def test_run_recorded_through_the_server_and_resumed(tmp_path, mlflow_server, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)      # the server named by the environment
    cfg = Config()
    cfg.run_dir = str(tmp_path / "run")
    cfg.data.url = "s3://corpus/enwik8"
    cfg.data.s3_endpoint_url = "http://minio:minio-secret-pw@127.0.0.1:9000"
    cfg.deepspeed = {"aws_secret_access_key": "wJalrXUtnFEMI/K7MDENG"}
    cfg.tracking.experiment, cfg.tracking.run_name = "server-roundtrip", "hourglass-debug"
    meter = EfficiencyMeter(flops_per_token=6e6, n_devices=1, peak_flops_per_device=1e11)

    tr = Tracker(cfg, 0, 1)
    assert tr.uri == mlflow_server.uri
    tr.log_run_info(cfg, {"train_batch_size": 8, "gradient_clipping": 1.0}, {"nodes": 1, "dp": 1, "pp": 1},
                    {"name": "demo", "splits": {"train": {"tokens": 1000}}}, {"imbalance": 1.0, "stages": 1})
    for step in range(1, 11):
        m = meter.update(tokens=2048, seconds=0.5, samples=8)
        m.update({names.TRAIN_LOSS: 4.0 / step, "val/bpc": 5.0 / step if step % 5 == 0 else None})
        tr.log_metrics(m, step)
    run_id = tr.run_id
    assert tr.close(status="KILLED")                         # preempted
    state = meter.state_dict()                               # what the checkpoint keeps, with run_id

    meter = EfficiencyMeter(flops_per_token=6e6, n_devices=1, peak_flops_per_device=1e11)
    meter.load_state_dict(state)
    tr = Tracker(cfg, 0, 1, resume_run_id=run_id)
    assert tr.run_id == run_id
    tr.log_run_info(cfg, {"train_batch_size": 8, "gradient_clipping": 1.0}, {"nodes": 1, "dp": 1, "pp": 1}, None, None)
    for step in range(11, 21):
        m = meter.update(tokens=2048, seconds=0.5, samples=8)
        m.update({names.TRAIN_LOSS: 4.0 / step, "val/bpc": 5.0 / step if step % 5 == 0 else None})
        tr.log_metrics(m, step)
    tr.log_metrics({"test/bpc": 0.25}, 20)
    assert tr.close()

    c = MlflowClient(mlflow_server.uri)
    exp = c.get_experiment_by_name("server-roundtrip")
    assert [r.info.run_id for r in c.search_runs([exp.experiment_id])] == [run_id]
    run = c.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "hourglass-debug"
    p = run.data.params
    assert p["deepspeed.aws_secret_access_key"] == "***"
    assert p["data.s3_endpoint_url"] == "http://minio:***@127.0.0.1:9000"
    assert "minio-secret-pw" not in json.dumps(p) and "wJalrXUtnFEMI" not in json.dumps(p)
    assert p["ds.train_batch_size"] == "8" and p["topology.pp"] == "1" and p["dataset.splits.train.tokens"] == "1000"
    assert run.data.tags["mlflow.source.git.commit"] == p["git.commit"] and len(p["git.commit"]) == 40

    flops = sorted(c.get_metric_history(run_id, names.FLOPS), key=lambda m: m.step)
    assert [m.step for m in flops] == list(range(1, 21))
    assert [m.value for m in flops] == pytest.approx([6e6 * 2048 * s for s in range(1, 21)])  # continues after resume
    assert sorted(m.step for m in c.get_metric_history(run_id, "val/bpc")) == [5, 10, 15, 20]
    assert run.data.metrics[names.TOKENS_PER_S] == pytest.approx(4096.0)
    assert run.data.metrics[names.MFU] == pytest.approx(6e6 * 4096.0 / 1e11)
    assert run.data.metrics[names.ELAPSED_S] == pytest.approx(10.0)
    arts = {a.path for a in c.list_artifacts(run_id, "run_info")}
    assert {"run_info/config.json", "run_info/deepspeed.json", "run_info/stage_plan.json",
            "run_info/manifest.json", "run_info/topology.json"} <= arts
    ds = json.loads(Path(c.download_artifacts(run_id, "run_info/deepspeed.json", str(tmp_path))).read_text())
    assert ds == {"train_batch_size": 8, "gradient_clipping": 1.0}
    png = Path(c.download_artifacts(run_id, "plots/loss_vs_flops.png", str(tmp_path)))
    assert png.read_bytes()[:4] == b"\x89PNG"
