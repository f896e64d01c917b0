"""The streaming text pipeline: formats, compression, document splits, tasks + merge, bad records, memory."""
from __future__ import annotations

import bz2
import gzip
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data_pipelines import merge, text
from data_pipelines.demo_corpus import corpus_bytes
from data_pipelines.text import assign_split, partition
from data_pipelines.tokenizers import DOC_END_BYTE, decode_documents
from hgscale.config import DataConfig
from hgscale.data import DataError, open_dataset

REPO = Path(__file__).resolve().parents[2]
SPLITS = ("train", "valid", "test")


def documents() -> list[str]:
    """Paragraphs of the reference manual without blank lines inside: documents of a blank-line txt file."""
    out = []
    for para in corpus_bytes().decode().split("\n\n"):
        lines = [ln for ln in para.split("\n") if ln.strip()]
        if lines:
            out.append("\n".join(lines))
    return out


def expected_stream(docs: list[str], split: str, valid=0.05, test=0.05) -> bytes:
    end = bytes([DOC_END_BYTE])
    return b"".join(d.encode() + end for d in docs if assign_split(d.encode(), valid, test) == split)


def tokens(url, split) -> bytes:
    ds = open_dataset(DataConfig(url=str(url), verify_checksums=True))
    return ds.split_tokens(split).numpy().astype(np.uint8).tobytes()


def prep(*args) -> None:
    assert text.main([str(a) for a in args]) == 0


@pytest.fixture(scope="module")
def docs():
    return documents()


def write_formats(tmp: Path, docs: list[str]) -> dict[str, Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard
    txt = ("\n\n".join(docs) + "\n").encode()
    jsonl = "".join(json.dumps({"id": i, "text": d}) + "\n" for i, d in enumerate(docs)).encode()
    files = {"txt": tmp / "c.txt", "jsonl": tmp / "c.jsonl", "gz": tmp / "c.jsonl.gz", "zst": tmp / "c.txt.zst",
             "bz2": tmp / "c.txt.bz2", "parquet": tmp / "c.parquet"}
    files["txt"].write_bytes(txt)
    files["jsonl"].write_bytes(jsonl)
    files["gz"].write_bytes(gzip.compress(jsonl))
    files["zst"].write_bytes(zstandard.ZstdCompressor().compress(txt))
    files["bz2"].write_bytes(bz2.compress(txt))
    pq.write_table(pa.table({"text": docs, "n": list(range(len(docs)))}), files["parquet"], row_group_size=500)
    return files


def test_every_format_and_compression_gives_the_plain_texts_token_stream(tmp_path, docs):
    files = write_formats(tmp_path, docs)
    want = {s: expected_stream(docs, s) for s in SPLITS}
    n_valid = sum(assign_split(d.encode(), 0.05, 0.05) == "valid" for d in docs)
    assert 0.03 * len(docs) < n_valid < 0.07 * len(docs)  # the fraction is of documents
    for kind, path in files.items():
        out = tmp_path / f"out_{kind}"
        prep("--input", path, "--out", out, "--shard-bytes", 50_000, "--sample-tokens", 8192)
        for s in SPLITS:
            assert tokens(out, s) == want[s], (kind, s)
        m = json.loads((out / "manifest.json").read_text())
        assert m["document_end"] == DOC_END_BYTE and m["bytes_per_token"] == 1.0
        assert sum(m["source"]["documents"].values()) == len(docs)


def test_two_workers_two_tasks_and_merge_equal_one_task(tmp_path, docs):
    parts = [docs[a:b] for a, b in ((0, 300), (300, 320), (320, 900), (900, len(docs)))]
    inputs = []
    for i, p in enumerate(parts):
        f = tmp_path / "in" / f"part{i}.txt"
        f.parent.mkdir(exist_ok=True)
        f.write_text("\n\n".join(p))
        inputs.append(f)
    glob = str(tmp_path / "in" / "*.txt")
    common = ["--input", glob, "--shard-bytes", 30_000, "--sample-tokens", 4096]
    prep(*common, "--out", tmp_path / "one")
    prep(*common, "--out", tmp_path / "par", "--workers", 2, "--num-tasks", 2, "--task-index", 0)
    assert not (tmp_path / "par" / "manifest.json").exists()
    with pytest.raises(DataError, match=r"1 of 2 tasks of .* have not finished \(task index 1\)"):
        merge.merge(str(tmp_path / "par"))
    r = subprocess.run([sys.executable, "-m", "data_pipelines.merge", str(tmp_path / "par")], cwd=REPO,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "have not finished" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "par" / "manifest.json").exists()
    prep(*common, "--out", tmp_path / "par", "--workers", 2, "--num-tasks", 2, "--task-index", 1)
    m = merge.merge(str(tmp_path / "par"))
    one = json.loads((tmp_path / "one" / "manifest.json").read_text())
    for s in SPLITS:
        for k in ("num_tokens", "num_bytes"):
            assert m["splits"][s][k] == one["splits"][s][k]
        assert tokens(tmp_path / "par", s) == tokens(tmp_path / "one", s) == expected_stream(docs, s)
    assert m["source"]["documents"] == one["source"]["documents"]
    writers = {sh["path"].split("/")[1][len("shard-"):15] for sh in m["splits"]["train"]["shards"]}
    assert writers == {"00000-000", "00000-001", "00001-001"}, writers  # task-worker: 3 writers with inputs
    # records of another preparation (other settings) are not merged with these
    prep(*common, "--out", tmp_path / "par", "--num-tasks", 2, "--task-index", 0, "--valid-fraction", 0.1)
    with pytest.raises(DataError, match="2 different preparations"):
        merge.merge(str(tmp_path / "par"))


def test_partition_is_contiguous_and_balanced():
    ranges = partition([10, 10, 10, 70, 0, 10, 10], 3)
    assert [list(r) for r in ranges] == [[0, 1, 2], [3], [4, 5, 6]]
    assert [list(r) for r in partition([1, 1], 4)] == [[], [0], [], [1]]
    assert [list(r) for r in partition([0, 0, 0], 2)] == [[0, 1], [2]]


def test_bad_records_error_names_file_and_line_or_are_skipped_and_counted(tmp_path):
    good = [json.dumps({"text": f"document {i}"}) for i in range(6)]
    f = tmp_path / "b.jsonl"
    f.write_bytes("\n".join(good[:2] + [json.dumps({"body": "x"})] + good[2:4]).encode() + b"\n\xff\xfe\n"
                  + "\n".join(good[4:]).encode())
    r = subprocess.run([sys.executable, "-m", "data_pipelines.text", "--input", str(f), "--out", str(tmp_path / "o")],
                       cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"bad record at {f} line 3: the record has no field 'text'" in r.stderr
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    broken = tmp_path / "broken.txt.gz"
    broken.write_bytes(gzip.compress(b"")[:10] + bytes(range(256)))  # a gzip header, then no deflate stream
    with pytest.raises(DataError, match=f"{empty}: holds no document"):
        text.main(["--input", str(empty), "--out", str(tmp_path / "o")])
    with pytest.raises(DataError, match=f"{broken}: cannot be read"):
        text.main(["--input", str(broken), "--out", str(tmp_path / "o")])
    prep("--input", f, empty, broken, "--out", tmp_path / "o", "--on-bad-record", "skip", "--valid-fraction", 0,
         "--test-fraction", 0)
    m = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert m["source"]["bad_records"] == 4 and m["source"]["documents"]["train"] == 6
    assert tokens(tmp_path / "o", "train") == b"".join(f"document {i}\x03".encode() for i in range(6))
    rec = json.loads((tmp_path / "o" / "tasks" / "task-00000-of-00001.json").read_text())
    assert rec["bad_records"]["examples"][:2] == [f"{f} line 3: the record has no field 'text' (set --field)",
                                                  f"{f} line 6: not UTF-8 (invalid start byte at byte 0)"]


def test_sentencepiece_sample_training_and_reuse(tmp_path, docs):
    files = write_formats(tmp_path, docs[:1500])
    prep("--input", files["txt"], "--out", tmp_path / "sp", "--tokenizer", "sentencepiece", "--vocab-size", 1000,
         "--tokenizer-sample-bytes", 150_000, "--workers", 2)
    ds = open_dataset(DataConfig(url=str(tmp_path / "sp"), verify_checksums=True))
    assert ds.modality == "text_sentencepiece" and 600 < ds.vocab_size <= 1000
    model = (tmp_path / "sp" / "tokenizer.model").read_bytes()
    n_bytes = sum(len(d.encode()) + 1 for d in docs[:1500])  # + 1: each document's end counts as one byte
    n_tokens = sum(ds.num_tokens(s) for s in SPLITS)
    assert ds.manifest["bytes_per_token"] == pytest.approx(n_bytes / n_tokens) and n_bytes / n_tokens > 1.5
    assert ds.manifest["tokenizer_sha256"] == hashlib.sha256(model).hexdigest()
    want = [d for d in docs[:1500] if assign_split(d.encode(), 0.05, 0.05) == "valid"]
    assert decode_documents(model, ds.split_tokens("valid").tolist()) == want
    # the same model on the Parquet copy: the same token stream
    prep("--input", files["parquet"], "--out", tmp_path / "sp2", "--tokenizer", "sentencepiece",
         "--tokenizer-model", tmp_path / "sp" / "tokenizer.model")
    again = open_dataset(DataConfig(url=str(tmp_path / "sp2")))
    for s in SPLITS:
        assert ds.split_tokens(s).tolist() == again.split_tokens(s).tolist()
    with pytest.raises(DataError, match="needs one shared --tokenizer-model"):
        text.main(["--input", str(files["txt"]), "--out", str(tmp_path / "x"), "--tokenizer", "sentencepiece",
                   "--num-tasks", "2"])


def _peak_rss_mb(args: list[str]) -> float:
    """Peak resident set of one preparation run in its own process (os.wait4 reports the child's)."""
    p = subprocess.Popen([sys.executable, "-m", "data_pipelines.text", *args], cwd=REPO, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE)
    _, status, usage = os.wait4(p.pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, p.stderr.read().decode()[-2000:]
    return usage.ru_maxrss / 1024


def test_peak_memory_does_not_grow_with_the_corpus(tmp_path):
    base = corpus_bytes()
    for name, copies in (("x1", 24), ("x4", 96)):  # ~11 MB and ~45 MB of text
        (tmp_path / name).mkdir()
        with open(tmp_path / name / "c.txt", "wb") as f:
            for _ in range(copies):
                f.write(base + b"\n\n")
    rss = {n: _peak_rss_mb(["--input", str(tmp_path / n / "c.txt"), "--out", str(tmp_path / f"o{n}"),
                            "--shard-bytes", str(1 << 20)]) for n in ("x1", "x4")}
    assert rss["x4"] <= 1.5 * rss["x1"] + 16, rss
    assert json.loads((tmp_path / "ox4" / "manifest.json").read_text())["splits"]["train"]["num_bytes"] > 35e6


def test_block_boundaries_change_neither_documents_nor_line_numbers(tmp_path, monkeypatch, docs):
    from data_pipelines import sources
    from hgscale.core.storage import storage_options
    head = "\n\n".join(docs[:200]) + "\n  \n\n"
    f = tmp_path / "c.txt"
    f.write_bytes(head.encode() + b"\xff bad\nlast doc")
    runs = {}
    for size in (sources.BLOCK_BYTES, 100, 7):
        monkeypatch.setattr(sources, "BLOCK_BYTES", size)
        bad = sources.BadRecords("skip")
        runs[size] = (list(sources.read_documents(str(f), storage_options(), "txt", "text", "blank-line", bad)),
                      bad.examples, list(sources.read_documents(str(f), storage_options(), "txt", "", "line",
                                                                sources.BadRecords("skip"))))
    want_docs = docs[:200] + ["last doc"]
    want_bad = [f"{f} line {head.count(chr(10)) + 1}: not UTF-8 (invalid start byte at byte 0)"]
    want_lines = [ln for ln in head.split("\n") if ln] + ["last doc"]
    for got_docs, got_bad, got_lines in runs.values():
        assert got_docs == want_docs and got_bad == want_bad
        assert [ln for ln in got_lines if ln] == want_lines
