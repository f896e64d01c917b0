"""`train.compile=true` under the trainer's DeepSpeed engine matches eager; `train.profile_steps` writes
traces on every rank of a real 2-rank run and logs them to a real MLflow server."""
import json
import os
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from hgscale.core.net import free_port
from tests.integration.train_helpers import ROOT, demo_data, run_worker, tiny_config  # noqa: F401

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]
PADDED = {"seq_len": 31}  # not a multiple of the total factor: the stages carry padded shapes


@pytest.fixture(scope="module")
def eager_losses(tmp_path_factory, demo_data):  # noqa: F811
    work = tmp_path_factory.mktemp("eager")
    cfg = tiny_config(work, demo_data, data=PADDED)
    return run_worker(1, work / "eager", cfg, "--steps", "3", "--data", "stream")["ranks"][0]["losses"]


@pytest.mark.parametrize("stages", [1, 2])
def test_compiled_layers_train_like_eager(stages, tmp_path, demo_data, eager_losses):  # noqa: F811
    """Regional compilation (every layer, inductor) through the engine, on top of activation checkpointing,
    in one process and as a 2-stage pipeline (each stage compiles its own slice of the layers): first losses
    within 0.5 % of one eager process without either."""
    par = {"activation_checkpointing": True, **({"pipeline_stages": 2} if stages == 2 else {})}
    cfg = tiny_config(tmp_path, demo_data, data=PADDED, parallel=par, train={"compile": True})
    job = run_worker(stages, tmp_path / "compiled", cfg, "--steps", "3", "--data", "stream")
    a = eager_losses
    assert len(a) == 3 and a[0] > 4.0  # a fresh byte-level model: ~ln 256
    for rank in job["ranks"]:  # every stage reports the pipeline's loss
        b = rank["losses"]
        assert len(b) == 3 and all(abs(x - y) <= 0.005 * abs(x) for x, y in zip(a, b, strict=True)), (a, b)
        assert rank["compiled_layers"] > 0  # this rank really compiled its layers


def test_profile_steps_on_every_rank_logged_to_mlflow(tmp_path, demo_data, mlflow_server):  # noqa: F811
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(ROOT / "hgscale" / "train.py"), "--config", str(ROOT / "configs" / "test" / "tiny.json"),
           f"data.url={demo_data}", f"checkpoint.dir={tmp_path / 'ckpt'}", f"run_dir={tmp_path / 'run'}",
           "train.steps=4", "train.profile_steps=2-3", "tracking.enabled=true", f"tracking.uri={mlflow_server.uri}",
           "tracking.experiment=profiles", "tracking.system_metrics=false"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "finished 4 steps" in out
    assert out.count("top 10 operators by self time") == 1  # rank 0 only
    profiles = tmp_path / "run" / "profiles"
    for rank in (0, 1):
        events = json.loads((profiles / f"steps_2-3_rank{rank}.json").read_text())["traceEvents"]
        names = {e.get("name") for e in events}
        assert "aten::addmm" in names and "[memory]" in names
    c = MlflowClient(mlflow_server.uri)
    run = c.search_runs([c.get_experiment_by_name("profiles").experiment_id])[0]
    logged = {f.path for f in c.list_artifacts(run.info.run_id, "profiles")}
    assert logged == {"profiles/steps_2-3_rank0.json", "profiles/steps_2-3_rank1.json"}
