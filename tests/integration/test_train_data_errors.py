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
