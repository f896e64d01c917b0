"""Shard writing, the manifest, and the checks that stop bad data before training (local paths)."""
from __future__ import annotations

import hashlib
import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from data_pipelines.demo_corpus import corpus_bytes, write_demo_corpus
from data_pipelines.shards import DatasetWriter
from hgscale.config import DataConfig
from hgscale.data import DataError, open_dataset

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def demo(tmp_path) -> Path:
    root = tmp_path / "demo"
    write_demo_corpus(str(root))
    return root


def _manifest(root: Path) -> dict:
    return json.loads((root / "manifest.json").read_text())


def test_demo_corpus_cli_and_manifest_describe_the_shards(tmp_path):
    out = tmp_path / "cli"
    proc = subprocess.run([sys.executable, "-m", "data_pipelines.demo_corpus", "--out", str(out)],
                          capture_output=True, text=True, cwd=REPO, timeout=60)
    assert proc.returncode == 0, proc.stderr
    m = _manifest(out)
    assert m["modality"] == "text_bytes" and m["vocab_size"] == 256 and m["dtype"] == "uint8"
    total = len(corpus_bytes())
    assert total > 400_000
    assert sum(s["num_tokens"] for s in m["splits"].values()) == total
    assert abs(m["splits"]["train"]["num_tokens"] / total - 0.9) < 0.01
    for split in m["splits"].values():
        for shard in split["shards"]:
            data = (out / shard["path"]).read_bytes()
            assert len(data) == shard["size"] and hashlib.sha256(data).hexdigest() == shard["sha256"]
    assert len(m["splits"]["train"]["shards"]) >= 8  # enough for 2 ranks x 4 workers


def test_splits_reassemble_the_corpus_exactly(demo):
    ds = open_dataset(DataConfig(url=str(demo)))
    parts = [ds.split_tokens(s) for s in ("train", "valid", "test")]
    assert all(p.dtype == torch.int64 for p in parts)
    assert bytes(torch.cat(parts).to(torch.uint8).numpy()) == corpus_bytes()
    assert ds.metric_name == "bpc"
    assert ds.bits_per_nat_token == pytest.approx(1 / np.log(2))


def test_manifest_is_written_last(tmp_path):
    root = tmp_path / "half"
    with pytest.raises(RuntimeError):
        with DatasetWriter(str(root), name="x", modality="text_bytes", vocab_size=256, shard_bytes=1024) as w:
            w.write_stream("train", np.arange(10_000, dtype=np.uint8), sample_tokens=512)
            raise RuntimeError("interrupted")
    assert list((root / "train").glob("*.tar")) and not (root / "manifest.json").exists()
    with pytest.raises(DataError, match=rf"no dataset at {root}.*not completely written"):
        open_dataset(DataConfig(url=str(root)))


def test_rewriting_removes_the_old_manifest_first(demo):
    w = DatasetWriter(str(demo), name="x", modality="text_bytes", vocab_size=256)
    assert not (demo / "manifest.json").exists()  # a dataset being rewritten never looks complete
    w.finish()
    assert (demo / "manifest.json").exists()


def test_truncated_shard_is_caught_at_open(demo):
    shard = demo / "train" / "shard-000004.tar"
    shard.write_bytes(shard.read_bytes()[:-3000])
    with pytest.raises(DataError, match=rf"shard {demo}/train/shard-000004.tar has \d+ bytes but the manifest says"):
        open_dataset(DataConfig(url=str(demo)))


def test_count_mismatch_is_caught_at_open(demo):
    m = _manifest(demo)
    m["splits"]["valid"]["num_tokens"] += 1
    (demo / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DataError, match="split 'valid' says num_tokens = .* shards add up to"):
        open_dataset(DataConfig(url=str(demo)))


def _flip_byte(path: Path, offset: int = 700) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_checksum_mismatch_found_by_verify_flag_and_command(demo):
    _flip_byte(demo / "test" / "shard-000000.tar")
    open_dataset(DataConfig(url=str(demo)))  # sizes agree: the cheap check passes
    with pytest.raises(DataError, match=r"test/shard-000000.tar does not match its sha256"):
        open_dataset(DataConfig(url=str(demo), verify_checksums=True))
    bad = subprocess.run([sys.executable, "-m", "hgscale", "verify", str(demo), "--quiet"],
                         capture_output=True, text=True, cwd=REPO, timeout=60)
    assert bad.returncode == 2 and "test/shard-000000.tar does not match its sha256" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_verify_command_accepts_a_good_dataset(demo):
    ok = subprocess.run([sys.executable, "-m", "hgscale", "verify", str(demo), "--quiet"],
                        capture_output=True, text=True, cwd=REPO, timeout=60)
    assert ok.returncode == 0 and "15 shards" in ok.stdout and f"{len(corpus_bytes()):,d} tokens" in ok.stdout


def test_corrupt_shard_errors_or_is_skipped_by_config(demo, caplog):
    _flip_byte(demo / "train" / "shard-000002.tar")
    ds = open_dataset(DataConfig(url=str(demo), on_corrupt="error", num_workers=0, shuffle=False))
    with pytest.raises(DataError, match=r"train/shard-000002.tar does not match its sha256"):
        for _ in ds.stream("train", 8, 256, seed=0):
            pass
    ds = open_dataset(DataConfig(url=str(demo), on_corrupt="skip", num_workers=0, shuffle=False))
    stream = ds.stream("train", 8, 256, seed=0)
    it = iter(stream)
    with caplog.at_level(logging.WARNING, logger="hgscale.data"):
        batches = [next(it) for _ in range(60)]  # 32 KiB shards: 16 batches each, shard 2 skipped
    stream.close()
    assert stream.stats["skipped_shards"] == 1
    assert "skipped shard" in caplog.text and "shard-000002.tar" in caplog.text
    text = corpus_bytes()
    good = _manifest(demo)["splits"]["train"]["shards"]
    start2 = sum(s["num_tokens"] for s in good[:2])
    end2 = start2 + good[2]["num_tokens"]
    for x, _ in batches:  # nothing of the corrupt shard was used: every row also occurs elsewhere
        for row in x[:, :64]:
            piece = bytes(row.to(torch.uint8).numpy())
            where = [m.start() for m in re.finditer(re.escape(piece), text)]
            assert where and any(not start2 - 64 < i < end2 for i in where)


def test_relative_paths_and_file_urls(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_demo_corpus("data/demo")
    write_demo_corpus(f"file://{tmp_path}/f")
    rel = open_dataset(DataConfig(url="data/demo", verify_checksums=True))
    url = open_dataset(DataConfig(url=f"file://{tmp_path}/f/", verify_checksums=True))
    torch.testing.assert_close(rel.split_tokens("test"), url.split_tokens("test"), rtol=0, atol=0)
    (tmp_path / "f" / "valid" / "shard-000000.tar").unlink()
    with pytest.raises(DataError, match=rf"file://{tmp_path}/f/valid/shard-000000.tar .* does not exist"):
        open_dataset(DataConfig(url=f"file://{tmp_path}/f"))


def test_user_errors_name_the_field(demo):
    ds = open_dataset(DataConfig(url=str(demo)))
    with pytest.raises(DataError, match="has no split 'dev'; it has train, valid, test"):
        ds.stream("dev", 2, 16)
    with pytest.raises(DataError, match=r"global batch 6 is not micro_batch_size 2 x data-parallel size 2 x an"):
        ds.stream("valid", 2, 16, dp_rank=0, dp_size=2, num_workers=0, global_batch_size=6)
    with pytest.raises(DataError, match="no full batch"):
        list(ds.eval_batches("valid", 64, 512))
    with pytest.raises(DataError, match="data.url is empty"):
        open_dataset(DataConfig(url=""))
    with pytest.raises(DataError, match="data.worker_start_method = 'fork' is not one of"):
        open_dataset(DataConfig(url=str(demo), worker_start_method="fork"))
