"""`hgscale export --register NAME`: a tracked checkpoint becomes a pyfunc model in its training run and a version in
the MLflow Model Registry of a real `mlflow server`, loadable by mlflow.pyfunc and `mlflow models predict`."""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from hgscale.checkpoint.layout import CheckpointError
from hgscale.commands.evaluate import main as evaluate_main
from hgscale.commands.export import main as export_main
from hgscale.core.net import free_port
from hgscale.core.status import USER_ERROR
from hgscale.core.storage import StorageError
from tests.integration.train_helpers import ROOT, TRAIN, demo_data, launch, tiny_config  # noqa: F401

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]
NAME = "hourglass-registry-test"
GREEDY = {"max_tokens": 20, "temperature": 0}


@pytest.fixture(scope="module")
def tracked(tmp_path_factory, demo_data, mlflow_server):  # noqa: F811
    """One checkpoint tracked into the server and scored on the test split (test/bpc at its step); every test here
    reads it. 150 steps at a high rate: enough that greedy text is not all spaces."""
    tmp = tmp_path_factory.mktemp("registry")
    cfg = tiny_config(tmp, demo_data, "reg.json", train={"steps": 150, "lr": 0.01, "log_interval": 50},
                      tracking={"enabled": True, "uri": mlflow_server.uri, "experiment": "registry"})
    launch(1, TRAIN, ["--config", str(cfg)])
    ckpt = tmp / "reg_ckpt"
    assert evaluate_main(["--checkpoint", str(ckpt), "--chunk", "32", "--context-chunks", "1",
                          "--max-chunks", "4"]) == 0
    client = MlflowClient(mlflow_server.uri)
    (run,) = client.search_runs([client.get_experiment_by_name("registry").experiment_id])
    return SimpleNamespace(ckpt=ckpt, tmp=tmp, uri=mlflow_server.uri, client=client, run=run)


@pytest.fixture(scope="module")
def registered(tracked):
    """The command line's registration: (exit status, stdout, stderr)."""
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = export_main(["--checkpoint", str(tracked.ckpt), "--out", str(tracked.tmp / "export"),
                          "--register", NAME])
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def sampled(tracked) -> str:
    """`hgscale sample`'s greedy output for "The " (it streams the prompt, then the new text)."""
    r = subprocess.run([sys.executable, "-m", "hgscale", "sample", "--checkpoint", str(tracked.ckpt), "--prompt",
                        "The ", "--tokens", "20", "--temperature", "0", "--no-track"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def test_register_makes_version_1_of_the_training_run_and_predicts_like_sample(
        tracked, registered, sampled, monkeypatch):
    rc, out, err = registered
    assert rc == 0, err[-2000:]
    assert f"registered models:/{NAME}/1 (version 1 of {NAME!r})" in out
    assert (tracked.tmp / "export" / "model.safetensors").is_file()  # the export itself happened as before
    mv = tracked.client.get_model_version(NAME, "1")
    assert mv.run_id == tracked.run.info.run_id                      # the version points at the training run
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracked.uri)
    sig = mlflow.models.get_model_info(f"models:/{NAME}/1").signature
    assert {p.name: (p.dtype.name, p.default) for p in sig.params.params} == {
        "max_tokens": ("long", 200), "temperature": ("double", 1.0), "top_p": ("double", 1.0)}
    assert [c.type.name for c in sig.inputs.inputs] == ["string"] == [c.type.name for c in sig.outputs.inputs]

    (completion,) = mlflow.pyfunc.load_model(f"models:/{NAME}/1").predict(["The "], params=GREEDY)
    assert len(completion.encode("utf-8")) == 20 and completion.strip()  # 20 new bytes, not only blanks
    assert sampled == "The " + completion + "\n"                    # hgscale sample streams prompt + text


def test_mlflow_models_predict_generates_the_same(tracked, registered, sampled, tmp_path):
    (tmp_path / "in.json").write_text(json.dumps({"dataframe_records": [{"prompt": "The "}], "params": GREEDY}))
    env = dict(os.environ, MLFLOW_TRACKING_URI=tracked.uri)
    r = subprocess.run([sys.executable, "-m", "mlflow", "models", "predict", "-m", f"models:/{NAME}/1",
                        "--env-manager", "local", "-i", str(tmp_path / "in.json"), "-t", "json",
                        "-o", str(tmp_path / "out.json")], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    (completion,) = json.loads((tmp_path / "out.json").read_text())["predictions"]
    assert "The " + completion + "\n" == sampled


def test_the_model_loads_where_hgscale_is_not_installed(tracked, registered, sampled, tmp_path):
    """code_paths ships the hgscale package: a process that cannot import hgscale loads the model with the copy."""
    script = f"""
import importlib.util, json, sys
sys.meta_path = [f for f in sys.meta_path if "editable" not in getattr(f, "__module__", "")]
sys.path = [p for p in sys.path if p not in ("", {str(ROOT)!r})]
assert importlib.util.find_spec("hgscale") is None
import mlflow, pandas as pd
model = mlflow.pyfunc.load_model("models:/{NAME}/1")
out = model.predict(pd.DataFrame({{"prompt": ["The ", "x"]}}), params={GREEDY!r})
import hgscale
print(json.dumps({{"predictions": out, "hgscale": hgscale.__file__}}))
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["MLFLOW_TRACKING_URI"] = tracked.uri
    r = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert not got["hgscale"].startswith(str(ROOT))                  # the model's own copy of the package
    assert Path(got["hgscale"]).parts[-3:] == ("code", "hgscale", "__init__.py")
    assert "The " + got["predictions"][0] + "\n" == sampled
    assert len(got["predictions"]) == 2 and len(got["predictions"][1].encode("utf-8")) == 20


def test_a_second_registration_is_version_2_with_test_metrics_and_config(tracked, registered, monkeypatch, tmp_path):
    from hgscale.checkpoint.registry import register

    assert register(tracked.ckpt, NAME) == (f"models:/{NAME}/2", 2)
    run_id = tracked.run.info.run_id
    (bpc,) = tracked.client.get_metric_history(run_id, "test/bpc")   # hgscale evaluate's score, at step 150
    assert bpc.step == 150 and 1.0 < bpc.value < 8.0
    mv = tracked.client.get_model_version(NAME, "2")
    assert mv.run_id == run_id and float(mv.tags["test/bpc"]) == pytest.approx(bpc.value)
    assert mv.tags["hgscale.step"] == "150" and mv.tags["hgscale.model.hierarchy"] == "1@1 2@2 1@1"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracked.uri)
    info = mlflow.models.get_model_info(f"models:/{NAME}/2")
    meta = info.metadata["hgscale"]
    assert meta["run_id"] == run_id and meta["step"] == 150
    assert meta["test_metrics"]["test/bpc"] == pytest.approx(bpc.value)
    logged = tracked.client.get_logged_model(info.model_id)            # the run's metrics at that step, linked
    assert {m.key: m.value for m in logged.metrics}["test/bpc"] == pytest.approx(bpc.value)
    assert logged.params["model.hierarchy"] == "1@1 2@2 1@1"          # the run's params: the flattened config
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{NAME}/2", dst_path=str(tmp_path)))
    cfg = json.loads((local / "artifacts" / "model" / "config.json").read_text())
    assert cfg["model"]["hierarchy"] == "1@1 2@2 1@1" and cfg["tracking"]["uri"] == tracked.uri
    # both versions are the same model: version 2 did not disturb version 1 or the training run
    assert [m.step for m in tracked.client.get_metric_history(run_id, "test/bpc")] == [150]
    assert tracked.client.get_run(run_id).info.status == "FINISHED"


def _copy_with_meta(tracked, name: str, edit) -> Path:
    """A copy of the checkpoint with its hgscale.json changed by ``edit(meta)``."""
    dst = tracked.tmp / name
    shutil.copytree(tracked.ckpt, dst)
    (meta_file,) = dst.glob("step*/hgscale.json")
    meta = json.loads(meta_file.read_text())
    edit(meta)
    meta_file.write_text(json.dumps(meta))
    return dst


def _cli(capsys, ckpt: Path, out: Path, name: str):
    rc = export_main(["--checkpoint", str(ckpt), "--out", str(out), "--register", name])
    return rc, capsys.readouterr().err


def test_a_checkpoint_without_a_run_is_refused(tracked, capsys, monkeypatch):
    def untracked(meta):  # what a run with tracking off writes
        meta["run_id"] = None
        meta["config"]["tracking"]["enabled"] = False

    ckpt = _copy_with_meta(tracked, "untracked_ckpt", untracked)
    rc, err = _cli(capsys, ckpt, tracked.tmp / "untracked_export", "never-registered")
    assert rc == USER_ERROR and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "belongs to no MLflow run" in err and "tracking.enabled=true" in err
    with pytest.raises(mlflow.exceptions.MlflowException):
        tracked.client.get_registered_model("never-registered")
    # tracked, but on a URI with credentials the checkpoint keeps masked, and none in the environment
    masked = _copy_with_meta(tracked, "masked_ckpt", lambda m: m["config"]["tracking"].update(
        uri=tracked.uri.replace("http://", "http://hg:***@")))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    rc, err = _cli(capsys, masked, tracked.tmp / "masked_export", "never-registered")
    assert rc == USER_ERROR and "held credentials" in err and "set MLFLOW_TRACKING_URI" in err


def test_an_unreachable_server_is_named_without_its_credentials(tracked, capsys, monkeypatch):
    port = free_port()
    # a checkpoint keeps a URI's credentials masked; the environment supplies them
    ckpt = _copy_with_meta(tracked, "down_ckpt", lambda m: m["config"]["tracking"].update(
        uri=f"http://hg:***@127.0.0.1:{port}"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://hg:pa55w0rd@127.0.0.1:{port}")
    t0 = time.monotonic()
    rc, err = _cli(capsys, ckpt, tracked.tmp / "down_export", NAME)
    assert time.monotonic() - t0 < 60                                  # not MLflow's minutes of retries
    assert rc == USER_ERROR and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert f"the MLflow tracking server http://hg:***@127.0.0.1:{port} cannot be reached" in err
    assert "Connection refused" in err and "pa55w0rd" not in err
    from hgscale.checkpoint.registry import register

    with pytest.raises(StorageError):
        register(ckpt, NAME)
    assert os.environ["MLFLOW_TRACKING_URI"] == f"http://hg:pa55w0rd@127.0.0.1:{port}"  # left as it was


@pytest.mark.filterwarnings("ignore:An input example was not provided")  # the stand-in model needs none
def test_a_name_holding_another_signature_is_refused(tracked, tmp_path, monkeypatch):
    """Same inputs and outputs, but only one of the three parameters: the message names the name and the params."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    from hgscale.checkpoint.registry import register

    code = tmp_path / "echo.py"
    code.write_text("import mlflow\nfrom mlflow.pyfunc.utils import pyfunc\n\n\n@pyfunc\n"
                    "def echo(model_input: list[str]) -> list[str]:\n    return model_input\n\n\n"
                    "mlflow.models.set_model(echo)\n")
    other = ModelSignature(Schema([ColSpec("string")]), Schema([ColSpec("string")]),
                           ParamSchema([ParamSpec("max_tokens", "long", 10)]))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracked.uri)
    mlflow.pyfunc.log_model(name="echo", python_model=str(code), signature=other, pip_requirements=["mlflow"],
                            registered_model_name="echo-model")
    with pytest.raises(CheckpointError) as e:
        register(tracked.ckpt, "echo-model")
    msg = str(e.value)
    assert "registered model 'echo-model' already exists" in msg and "version 1 has another signature" in msg
    assert "params" in msg and "top_p" in msg and "inputs" not in msg and "--register NAME" in msg
    assert [v.version for v in tracked.client.search_model_versions("name = 'echo-model'")] == ["1"]
