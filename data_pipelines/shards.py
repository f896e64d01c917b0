"""Writing datasets: WebDataset tar shards + manifest.json (written last) to any fsspec URL.

    with DatasetWriter("s3://bucket/enwik8", name="enwik8", modality="text_bytes", vocab_size=256) as w:
        w.write_stream("train", train_bytes)          # a contiguous token stream, cut into samples
        w.add("valid", image_tokens, label=3)         # or one sample at a time (images)
    # manifest.json appears only when every shard is written: a half-written dataset is never used

The format is described in hgscale/data/shards.py, which the reader shares.
"""
from __future__ import annotations

import io
import json
import logging
import tarfile
import time
from typing import Any

import numpy as np

from hgscale.data.errors import DataError
from hgscale.data.io import filesystem, join, storage_options, with_retries
from hgscale.data.shards import (
    DTYPE_EXT,
    FORMAT,
    MODALITIES,
    VERSION,
    check_manifest,
    dtype_for_vocab,
    encode_sample,
    sha256,
)

log = logging.getLogger("data_pipelines")

DEFAULT_SHARD_BYTES = 4 << 20     # 4 MiB: enough shards for many ranks x workers on enwik8, few requests
DEFAULT_SAMPLE_TOKENS = 1 << 16   # text chunk per tar sample (windows span chunks: they are contiguous)


class DatasetWriter:
    def __init__(self, url: str, name: str, modality: str, vocab_size: int, shard_bytes: int = DEFAULT_SHARD_BYTES,
                 opts: dict | None = None, tokenizer: str | None = None, extra: dict | None = None,
                 overwrite: bool = True, shard_prefix: str = "", claim: bool = True):
        if modality not in MODALITIES:
            raise ValueError(f"modality {modality!r} is not one of {', '.join(MODALITIES)}")
        self.url = url.rstrip("/")
        self.opts = opts or storage_options()
        self.fs, self.base = filesystem(self.url, self.opts)
        self.name, self.modality, self.vocab_size = name, modality, int(vocab_size)
        self.dtype = dtype_for_vocab(self.vocab_size)
        self.shard_bytes = int(shard_bytes)
        self.tokenizer = tokenizer
        self.shard_prefix = shard_prefix  # parallel writers of one dataset: each names its shards apart
        self.extra = dict(extra or {})
        self.splits: dict[str, dict] = {}
        self._open: dict[str, tuple[io.BytesIO, tarfile.TarFile, dict]] = {}
        self._keys: dict[str, int] = {}
        self._finished = False
        self._prepare(overwrite, claim)

    def _prepare(self, overwrite: bool, claim: bool) -> None:
        """``claim``: this writer owns the dataset root (the parallel pipeline's workers leave that to their task)."""
        manifest = join(self.base, "manifest.json")
        if claim and self.fs.exists(manifest):
            if not overwrite:
                raise DataError(f"{join(self.url, 'manifest.json')} exists; choose another --out or leave out "
                                f"--no-overwrite to replace it")
            try:
                self.fs.rm(manifest)  # first: a dataset being rewritten must never look complete
            except FileNotFoundError:  # another task of the same preparation was first
                pass
        if self._local:
            self.fs.makedirs(self.base, exist_ok=True)

    @property
    def _local(self) -> bool:
        """A local directory: folders must exist before files go in (object stores have none)."""
        return "://" not in self.url or self.url.startswith("file://")

    def _write(self, rel: str, data: bytes) -> None:
        """``data`` to ``<url>/<rel>``, retrying transient storage errors (each one logged)."""
        path = join(self.base, rel)
        if self._local:
            self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        with_retries(join(self.url, rel), lambda: self.fs.pipe_file(path, data), self.opts,
                     lambda m: log.warning("%s", m), "write")

    # ---------------------------------------------------------------------------------- writing
    def add(self, split: str, tokens: np.ndarray, label: int | None = None) -> None:
        """Append one sample to ``split``; shards roll over at ``shard_bytes``."""
        if split not in self._open:
            self._new_shard(split)
        buf, tar, meta = self._open[split]
        key = f"{self._keys.get(split, 0):09d}"
        self._keys[split] = self._keys.get(split, 0) + 1
        for member, payload in encode_sample(key, tokens, self.dtype, label):
            info = tarfile.TarInfo(member)
            info.size, info.mtime, info.mode = len(payload), 0, 0o644  # mtime 0: identical input, identical shard
            tar.addfile(info, io.BytesIO(payload))
        meta["num_samples"] += 1
        meta["num_tokens"] += int(len(tokens))
        if buf.tell() >= self.shard_bytes:
            self._flush(split)

    def write_stream(self, split: str, tokens: np.ndarray, sample_tokens: int = DEFAULT_SAMPLE_TOKENS,
                     num_bytes: int | None = None, progress: bool = False) -> None:
        """A contiguous token stream (text) as consecutive samples of ``sample_tokens``."""
        it = range(0, len(tokens), sample_tokens)
        if progress:
            from tqdm import tqdm
            it = tqdm(it, desc=f"write {split}", unit="sample", total=-(-len(tokens) // sample_tokens))
        for start in it:
            self.add(split, tokens[start:start + sample_tokens])
        self.add_bytes(split, len(tokens) if num_bytes is None else num_bytes)

    def add_bytes(self, split: str, n: int) -> None:
        """Count raw bytes (UTF-8 text / sub-pixels) behind ``split`` for bytes per token."""
        self._split(split)["num_bytes"] += int(n)

    def _split(self, split: str) -> dict:
        return self.splits.setdefault(split, {"num_samples": 0, "num_tokens": 0, "num_bytes": 0, "shards": []})

    def _new_shard(self, split: str) -> None:
        buf = io.BytesIO()
        tar = tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT)
        index = len(self._split(split)["shards"])
        meta = {"path": f"{split}/shard-{self.shard_prefix}{index:06d}.tar", "num_samples": 0, "num_tokens": 0}
        self._open[split] = (buf, tar, meta)

    def _flush(self, split: str) -> None:
        buf, tar, meta = self._open.pop(split)
        tar.close()
        data = buf.getvalue()
        meta.update(size=len(data), sha256=sha256(data))
        self._write(meta["path"], data)
        s = self._split(split)
        s["shards"].append(meta)
        s["num_samples"] += meta["num_samples"]
        s["num_tokens"] += meta["num_tokens"]

    def put_file(self, rel: str, data: bytes) -> None:
        """A side file beside the shards (the tokenizer model)."""
        self._write(rel, data)

    # --------------------------------------------------------------------------------- finishing
    def manifest(self) -> dict:
        return build_manifest(self.name, self.modality, self.vocab_size, self.tokenizer, self.splits, self.extra)

    def close_shards(self) -> dict:
        """Flush open shards without writing a manifest (one task of a parallel preparation). Returns the splits."""
        for split in list(self._open):
            self._flush(split)
        return self.splits

    def write_manifest(self, m: dict) -> None:
        check_manifest(m, join(self.url, "manifest.json"))
        self._write("manifest.json", json.dumps(m, indent=1).encode())

    def finish(self) -> dict:
        """Flush open shards, then write manifest.json (last). Returns the manifest."""
        self.close_shards()
        m = self.manifest()
        self.write_manifest(m)
        self._finished = True
        return m

    def __enter__(self) -> "DatasetWriter":
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is None and not self._finished:
            self.finish()


def build_manifest(name: str, modality: str, vocab_size: int, tokenizer: str | None, splits: dict,
                   extra: dict | None = None) -> dict:
    """The manifest of a dataset whose shards are ``splits`` (see hgscale/data/shards.py)."""
    tokens = sum(s["num_tokens"] for s in splits.values())
    nbytes = sum(s["num_bytes"] for s in splits.values())
    m: dict[str, Any] = {
        "format": FORMAT, "version": VERSION, "name": name, "modality": modality,
        "vocab_size": int(vocab_size), "dtype": dtype_for_vocab(int(vocab_size)), "tokenizer": tokenizer,
        "bytes_per_token": (nbytes / tokens) if tokens and nbytes else 1.0,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "splits": splits,
    }
    m.update(extra or {})
    return m


def add_split_totals(into: dict, splits: dict) -> None:
    """Add one writer's per-split totals (samples, tokens, bytes, shard list) to ``into`` (split -> totals)."""
    for name, s in splits.items():
        d = into.setdefault(name, {"num_samples": 0, "num_tokens": 0, "num_bytes": 0, "shards": []})
        for k in ("num_samples", "num_tokens", "num_bytes"):
            d[k] += s[k]
        d["shards"] += s["shards"]


def summary(m: dict, url: str) -> str:
    """One line per split for the command-line tools."""
    lines = [f"wrote {url} ({m['name']}, {m['modality']}, vocab {m['vocab_size']}, {m['dtype']})"]
    for name, s in m["splits"].items():
        lines.append(f"  {name:6s} {s['num_tokens']:>12,d} tokens  {s['num_samples']:>8,d} samples  "
                     f"{len(s['shards']):>5d} shards  {sum(x['size'] for x in s['shards']):>12,d} bytes")
    return "\n".join(lines)


def add_storage_args(parser) -> None:
    """--out and the S3 options shared by every preparation tool."""
    parser.add_argument("--out", required=True, help="dataset root: a path, file:// or s3:// URL")
    parser.add_argument("--shard-bytes", type=int, default=DEFAULT_SHARD_BYTES, help="target shard size in bytes")
    parser.add_argument("--s3-endpoint-url", default="", help="S3 endpoint (MinIO, moto ...); default AWS_ENDPOINT_URL")
    parser.add_argument("--s3-region", default="", help="S3 region; default AWS_DEFAULT_REGION")
    parser.add_argument("--no-overwrite", action="store_true", help="refuse to replace an existing dataset")


def opts_from_args(args) -> dict:
    return storage_options(endpoint_url=args.s3_endpoint_url, region=args.s3_region)


__all__ = ["DatasetWriter", "build_manifest", "DTYPE_EXT", "summary", "add_storage_args", "opts_from_args"]
