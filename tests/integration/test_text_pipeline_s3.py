"""The text pipeline on a real S3 API (moto_server on loopback): compressed JSONL read by glob from a bucket,
two tasks writing shards and task records to the bucket, the merge CLI listing them, the same token stream as a
local preparation of the same files."""
from __future__ import annotations

import json
import os

import pytest
import zstandard

from data_pipelines import merge, text
from hgscale.config import DataConfig
from hgscale.data import open_dataset
from tests.unit.test_text_pipeline import documents

pytestmark = pytest.mark.integration


def test_prepare_from_and_to_s3_in_two_tasks(s3_bucket, s3_env, tmp_path, capsys):
    docs = documents()
    local = tmp_path / "raw"
    local.mkdir()
    client = s3_env.client()
    bucket = s3_bucket[len("s3://"):]
    for i in range(3):
        blob = zstandard.ZstdCompressor().compress(
            "".join(json.dumps({"text": d}) + "\n" for d in docs[i::3]).encode())
        (local / f"part-{i}.jsonl.zst").write_bytes(blob)
        client.put_object(Bucket=bucket, Key=f"raw/part-{i}.jsonl.zst", Body=blob)
    out = f"{s3_bucket}/ds"
    for task in (0, 1):
        assert text.main(["--input", f"{s3_bucket}/raw/*.jsonl.zst", "--out", out, "--num-tasks", "2",
                          "--task-index", str(task), "--shard-bytes", "65536"]) == 0
    assert merge.main([out]) == 0
    printed = capsys.readouterr()
    assert "wrote s3://" in printed.out and os.environ["AWS_SECRET_ACCESS_KEY"] not in printed.out + printed.err
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="ds/tasks/")["Contents"]}
    assert keys == {"ds/tasks/task-00000-of-00002.json", "ds/tasks/task-00001-of-00002.json"}
    assert text.main(["--input", str(local / "*.jsonl.zst"), "--out", str(tmp_path / "local"), "--shard-bytes",
                      "65536"]) == 0
    remote = open_dataset(DataConfig(url=out, verify_checksums=True))
    here = open_dataset(DataConfig(url=str(tmp_path / "local")))
    assert remote.manifest["source"]["inputs"] == 3 and remote.manifest["source"]["tasks"] == 2
    for split in ("train", "valid", "test"):
        assert remote.split_tokens(split).tolist() == here.split_tokens(split).tolist()
