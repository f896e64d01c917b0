"""Preparation tools on small files in the official formats, written by the tests."""
from __future__ import annotations

import hashlib
import io
import pickle
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from data_pipelines import enwik8, images, text_sentencepiece
from data_pipelines.demo_corpus import corpus_bytes
from hgscale.config import DataConfig
from hgscale.data import DataError, open_dataset

REPO = Path(__file__).resolve().parents[2]


def run(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, cwd=REPO, timeout=120)


# ---------------------------------------------------------------------------------------------- enwik8

@pytest.fixture
def fake_enwik8(tmp_path) -> tuple[Path, bytes]:
    data = (corpus_bytes() * 3)[:1_000_000]
    z = tmp_path / "enwik8.zip"
    with zipfile.ZipFile(z, "w", zipfile.ZIP_DEFLATED) as f:
        f.writestr("enwik8", data)
    return z, data


def test_enwik8_zip_split_90_5_5(tmp_path, fake_enwik8):
    z, data = fake_enwik8
    proc = run("data_pipelines.enwik8", "--source", str(z), "--out", str(tmp_path / "out"), "--no-progress",
               "--expected-size", str(len(data)), "--expected-sha256", hashlib.sha256(data).hexdigest(),
               "--shard-bytes", "100000")
    assert proc.returncode == 0, proc.stderr
    ds = open_dataset(DataConfig(url=str(tmp_path / "out"), verify_checksums=True))
    assert [ds.num_tokens(s) for s in ("train", "valid", "test")] == [900_000, 50_000, 50_000]
    got = torch.cat([ds.split_tokens(s) for s in ("train", "valid", "test")]).to(torch.uint8).numpy().tobytes()
    assert got == data
    assert ds.manifest["source"]["sha256"] == hashlib.sha256(data).hexdigest()
    assert len(ds.manifest["splits"]["train"]["shards"]) == 7  # 900,000 bytes in ~100 kB shards


def test_enwik8_download_from_a_url_once(tmp_path, fake_enwik8):
    import functools
    import http.server
    import threading
    z, data = fake_enwik8
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(z.parent))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/enwik8.zip"
        m = enwik8.prepare(url, str(tmp_path / "out"), len(data), hashlib.sha256(data).hexdigest(),
                           cache_dir=tmp_path / "cache", progress=False)
        assert (tmp_path / "cache" / "enwik8.zip").read_bytes() == z.read_bytes()
        assert m["splits"]["test"]["num_tokens"] == 50_000
        with pytest.raises(DataError, match="cannot download .*/missing.zip"):
            enwik8.prepare(url.replace("enwik8.zip", "missing.zip"), str(tmp_path / "o"), cache_dir=tmp_path / "c")
    finally:
        server.shutdown()


def test_enwik8_standard_split_sizes():
    assert enwik8.split_sizes(100_000_000) == (90_000_000, 5_000_000, 5_000_000)
    assert enwik8.SIZE == 100_000_000 and len(enwik8.SHA256) == 64


def test_enwik8_rejects_wrong_size_and_checksum(tmp_path, fake_enwik8):
    z, data = fake_enwik8
    proc = run("data_pipelines.enwik8", "--source", str(z), "--out", str(tmp_path / "o"), "--no-progress")
    assert proc.returncode == 2 and "has 1,000,000 bytes; enwik8 has 100,000,000" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "o" / "manifest.json").exists()
    raw = tmp_path / "enwik8"
    raw.write_bytes(data[:-1] + b"!")
    with pytest.raises(DataError, match="has sha256 .* not enwik8's"):
        enwik8.prepare(str(raw), str(tmp_path / "o"), len(data), hashlib.sha256(data).hexdigest(), progress=False)
    with pytest.raises(DataError, match="does not exist"):
        enwik8.prepare(str(tmp_path / "missing"), str(tmp_path / "o"), progress=False)


# ----------------------------------------------------------------------------------------- sentencepiece

@pytest.mark.parametrize("model_type", ["unigram", "bpe"])
def test_sentencepiece_on_the_reference_manual(tmp_path, model_type):
    from data_pipelines.text import assign_split
    from tests.unit.test_text_pipeline import documents
    text = tmp_path / "manual.txt"
    text.write_bytes(corpus_bytes())
    out = tmp_path / "sp"
    m = text_sentencepiece.prepare([str(text)], str(out), vocab_size=600, model_type=model_type, workers=2,
                                   shard_bytes=40_000, progress=False)
    ds = open_dataset(DataConfig(url=str(out), verify_checksums=True))
    assert ds.modality == "text_sentencepiece" and ds.metric_name == "bpc"
    assert 300 < ds.vocab_size <= 600 and m["dtype"] == "uint16"
    model = (out / "tokenizer.model").read_bytes()
    assert ds.tokenizer_url == f"{out}/tokenizer.model"
    # the valid split decodes back to its documents (the tokenizer is the one stored beside the shards)
    valid_docs = [d for d in documents() if assign_split(d.encode(), 0.05, 0.05) == "valid"]
    assert text_sentencepiece.decode_documents(model, ds.split_tokens("valid").tolist()) == valid_docs
    bpt = m["bytes_per_token"]
    assert 1.5 < bpt < 6.0  # subwords: several bytes per token
    assert ds.bits_per_nat_token == pytest.approx(1 / np.log(2) / bpt)
    x, y = next(iter(ds.stream("train", 2, 64, num_workers=0)))
    assert int(x.max()) < ds.vocab_size and torch.equal(x[:, 1:], y[:, :-1])


def test_sentencepiece_parallel_equals_serial_and_reuses_a_model(tmp_path):
    text = tmp_path / "manual.txt"
    text.write_bytes(corpus_bytes())
    m1 = text_sentencepiece.prepare([str(text)], str(tmp_path / "a"), vocab_size=500, workers=1, progress=False)
    m2 = text_sentencepiece.prepare([str(text)], str(tmp_path / "b"), workers=2, progress=False,
                                    model_path=str(tmp_path / "a" / "tokenizer.model"))
    assert m2["tokenizer_sha256"] == m1["tokenizer_sha256"]
    assert (tmp_path / "b" / "tokenizer.model").read_bytes() == (tmp_path / "a" / "tokenizer.model").read_bytes()
    for split in ("train", "valid", "test"):
        digests = [[s["sha256"] for s in m["splits"][split]["shards"]] for m in (m1, m2)]
        assert digests[0] == digests[1]
    r = run("data_pipelines.text_sentencepiece", "--input", str(text), "--out", str(tmp_path / "c"), "--model",
            str(tmp_path / "a" / "tokenizer.model"), "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "text_sentencepiece" in r.stdout and (tmp_path / "c" / "manifest.json").exists()


# --------------------------------------------------------------------------------------------- images

def _planar(rng, n, side):
    return rng.integers(0, 256, size=(n, 3 * side * side), dtype=np.uint8)


def _expected_raster(planar, side):
    """Raster order, RGB interleaved, computed pixel by pixel (independently of the vectorised code)."""
    out = np.zeros((planar.shape[0], side * side * 3), np.uint8)
    for i in range(planar.shape[0]):
        for r in range(side):
            for c in range(side):
                for ch in range(3):
                    out[i, (r * side + c) * 3 + ch] = planar[i, ch * side * side + r * side + c]
    return out


@pytest.mark.parametrize("name,side", [("imagenet32", 32), ("imagenet64", 64)])
def test_imagenet_npz_to_raster_pixel_bytes(tmp_path, name, side):
    rng = np.random.default_rng(side)
    src = tmp_path / "src" / "Imagenet_npz"
    src.mkdir(parents=True)
    train = [_planar(rng, 7, side) for _ in range(2)]  # batch_1, batch_2 ... (official names)
    for i, d in enumerate(train, 1):
        np.savez(src / f"train_data_batch_{i}.npz", data=d, labels=rng.integers(1, 1001, 7), mean=d.mean(0))
    val = _planar(rng, 4, side)
    np.savez(src / "val_data.npz", data=val, labels=rng.integers(1, 1001, 4))
    proc = run("data_pipelines.images", name, "--source", str(tmp_path / "src"), "--out", str(tmp_path / "out"),
               "--holdout", "3", "--no-progress", "--shard-bytes", str(3 * side * side * 4))
    assert proc.returncode == 0, proc.stderr
    ds = open_dataset(DataConfig(url=str(tmp_path / "out")))
    assert ds.metric_name == "bpd" and ds.manifest["sample_tokens"] == 3 * side * side
    expected = _expected_raster(np.concatenate(train), side)
    tok = lambda s: ds.split_tokens(s).to(torch.uint8).numpy()  # noqa: E731
    np.testing.assert_array_equal(tok("train"), expected[:11].reshape(-1))
    np.testing.assert_array_equal(tok("valid"), expected[11:].reshape(-1))
    np.testing.assert_array_equal(tok("test"), _expected_raster(val, side).reshape(-1))


def test_cifar10_pickles_from_tar_gz(tmp_path):
    rng = np.random.default_rng(1)
    batches = {f"data_batch_{i}": _planar(rng, 3, 32) for i in range(1, 6)}
    batches["test_batch"] = _planar(rng, 2, 32)
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name, d in batches.items():
            blob = pickle.dumps({b"data": d, b"labels": list(range(len(d))), b"batch_label": name.encode()})
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    m = images.prepare("cifar10", str(archive), str(tmp_path / "out"), holdout=2, progress=False)
    assert [m["splits"][s]["num_tokens"] // 3072 for s in ("train", "valid", "test")] == [13, 2, 2]
    ds = open_dataset(DataConfig(url=str(tmp_path / "out")))
    train = np.concatenate([batches[f"data_batch_{i}"] for i in range(1, 6)])
    np.testing.assert_array_equal(ds.split_tokens("valid").to(torch.uint8).numpy(),
                                  _expected_raster(train[13:], 32).reshape(-1))
    with pytest.raises(DataError, match="CIFAR-10 batch data_batch_1 not found"):
        images.prepare("cifar10", str(tmp_path), str(tmp_path / "o2"), progress=False)
