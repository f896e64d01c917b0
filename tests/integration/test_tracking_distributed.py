"""A real 2-process torch.distributed (gloo) job records exactly one run with both stages' timings."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from hgscale.core.net import free_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]
SCRIPT = Path(__file__).with_name("tracking_ranks.py")


def test_two_ranks_one_run(tmp_path, mlflow_server):
    exp = "two-ranks"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(SCRIPT), str(tmp_path / "run"), mlflow_server.uri, exp, str(tmp_path / "results")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=150, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = sorted((tmp_path / "results").glob("*.json"))
    assert [f.name for f in files] == ["rank0.json", "rank1.json"], files
    results = {r["rank"]: r for r in (json.loads(f.read_text()) for f in files)}
    assert set(results) == {0, 1}
    run_id = results[0]["run_id"]
    assert run_id and results[0]["closed"] and results[1]["run_id"] is None

    c = MlflowClient(mlflow_server.uri)
    e = c.get_experiment_by_name(exp)
    runs = c.search_runs([e.experiment_id])
    assert [r.info.run_id for r in runs] == [run_id]               # one run, not one per rank
    run = runs[0]
    assert run.info.run_name == "two-ranks" and run.info.status == "FINISHED"
    assert run.data.params["topology.pipeline_stages"] == "2" and run.data.params["topology.world_size"] == "2"
    loss = sorted(c.get_metric_history(run_id, "train/loss"), key=lambda m: m.step)
    assert [m.step for m in loss] == list(range(1, 21))
    assert [m.value for m in loss] == pytest.approx([2.0 / s + 1.0 for s in range(1, 21)])
    for stage, step_s in ((0, 0.1), (1, 0.11)):
        hist = c.get_metric_history(run_id, f"time/stage{stage}/step_s")
        assert sorted(m.step for m in hist) == [5, 10, 15, 20]
        assert {round(m.value, 6) for m in hist} == {step_s}
    assert run.data.metrics["time/step_s"] == pytest.approx(0.11)     # the slower stage sets the pace
    # waiting shares 0.05/0.1 = 0.5 and 0.04/0.11
    assert run.data.metrics["pipeline/bubble_share"] == pytest.approx((0.5 + 0.04 / 0.11) / 2)
    node_keys = [k for k in run.data.metrics if k.startswith("system/") and k.endswith("/rss_gb")]
    assert len(node_keys) == 1                                       # both ranks on one node
    assert run.data.metrics[node_keys[0]] > 0.1                      # two Python+torch processes
    assert run.data.metrics["memory/max_rank_peak_gb"] > 0.05
