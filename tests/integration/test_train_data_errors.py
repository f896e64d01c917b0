"""Storage that fails once training has started stops it with one message naming the shard, not a traceback."""
import json
import shutil
import subprocess

import pytest

from tests.integration.train_helpers import TRAIN, command, demo_data, env, tiny_config  # noqa: F401

pytestmark = pytest.mark.integration


def test_corrupt_shard_during_training_is_named(demo_data, tmp_path):  # noqa: F811
    data = tmp_path / "data"
    shutil.copytree(demo_data, data)
    manifest = json.loads((data / "manifest.json").read_text())
    names = []
    for shard in manifest["splits"]["train"]["shards"]:
        path = data / shard["path"]
        raw = bytearray(path.read_bytes())
        raw[0:100] = b"\xff" * 100  # the first tar header's file name: same size, so the open-time check passes
        path.write_bytes(bytes(raw))
        names.append(path.name)
    cfg = tiny_config(tmp_path, data)
    r = subprocess.run(command(1, TRAIN, ["--config", str(cfg)]), capture_output=True, text=True, env=env(),
                       timeout=240)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "error (rank 0)" in r.stderr and any(n in r.stderr for n in names), r.stderr[-2000:]


def test_skipped_corrupt_shard_is_counted_in_mlflow(demo_data, tmp_path):  # noqa: F811
    """data.on_corrupt=skip: training goes on, and the skipped shard shows up as data/skipped_shards."""
    data = tmp_path / "data"
    shutil.copytree(demo_data, data)
    shards = json.loads((data / "manifest.json").read_text())["splits"]["train"]["shards"]
    assert len(shards) > 1
    for shard in shards[:-1]:  # all but one: whichever shards the first steps read, they meet corrupt ones
        path = data / shard["path"]
        raw = bytearray(path.read_bytes())
        raw[0:100] = b"\xff" * 100
        path.write_bytes(bytes(raw))
    cfg = tiny_config(tmp_path, data, data={"on_corrupt": "skip"}, tracking={"enabled": True})
    r = subprocess.run(command(1, TRAIN, ["--config", str(cfg)]), capture_output=True, text=True, env=env(),
                       timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'c_run' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("hgscale").experiment_id])
    skipped = run.data.metrics["data/skipped_shards"]
    assert skipped >= 1 and run.data.metrics["data/retries"] == 0.0
    # every skipped read is also logged, naming the shard (a shard that later blocks need again is met again)
    assert (r.stderr + r.stdout).count("skipped shard") == skipped
