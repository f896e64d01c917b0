"""Shard and manifest format, shared by the writers (data_pipelines) and the reader (hgscale.data).

A dataset root holds one WebDataset tar per shard and ``manifest.json``, written last::

    <root>/manifest.json
    <root>/train/shard-000000.tar  ...  <root>/valid/...  <root>/test/...   [<root>/tokenizer.model]

Each tar sample is ``<key>.tokens.<u8|u16|u32>``: the raw little-endian token ids of one sample
(a chunk of a contiguous text stream, or a block of images, each ``sample_tokens`` raster-order RGB
bytes), plus ``<key>.cls`` (the class labels as text) for images. Raw arrays keep shards compact: a byte is a byte.

manifest.json::

    {"format": "hgscale-shards", "version": 1, "name": "enwik8",
     "modality": "text_bytes" | "text_sentencepiece" | "image",
     "vocab_size": 256, "dtype": "uint8", "tokenizer": null | "tokenizer.model",
     "bytes_per_token": 1.0,            # text: UTF-8 bytes per token over all splits (bpc = bits / byte)
     "sample_tokens": 3072,             # images: tokens per image (0 = variable-size text chunks)
     "splits": {"train": {"num_samples": N, "num_tokens": T, "num_bytes": B,
                          "shards": [{"path": "train/shard-000000.tar", "num_samples": n,
                                      "num_tokens": t, "size": bytes, "sha256": hex}, ...]}, ...},
     "source": {...}}
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import tarfile
from typing import Any, Callable

import numpy as np

from .errors import DataError
from .io import StorageError, filesystem, join, read_bytes, with_retries

FORMAT = "hgscale-shards"
VERSION = 1
MODALITIES = ("text_bytes", "text_sentencepiece", "image")
DTYPE_EXT = {"uint8": "u8", "uint16": "u16", "uint32": "u32"}
EXT_DTYPE = {v: k for k, v in DTYPE_EXT.items()}


def dtype_for_vocab(vocab_size: int) -> str:
    """The smallest unsigned integer type that holds every id."""
    return "uint8" if vocab_size <= 256 else "uint16" if vocab_size <= 65536 else "uint32"


class CorruptShard(DataError):
    """A shard that is truncated, corrupt, or disagrees with the manifest (data.on_corrupt decides)."""


def encode_sample(key: str, tokens: np.ndarray, dtype: str, label=None) -> list[tuple[str, bytes]]:
    """Tar members (name, payload) of one sample; ``label``: an int or a list (one per image)."""
    arr = np.ascontiguousarray(tokens, dtype=np.dtype(dtype).newbyteorder("<"))
    out = [(f"{key}.tokens.{DTYPE_EXT[dtype]}", arr.tobytes())]
    if label is not None:
        labels = [label] if np.isscalar(label) else list(label)
        out.append((f"{key}.cls", " ".join(str(int(x)) for x in labels).encode()))
    return out


def decode_shard(data: bytes, dtype: str, url: str) -> list[np.ndarray]:
    """Token arrays of every sample of a tar shard, in file order. Raises DataError naming ``url``
    for anything that is not a complete, well-formed shard of this dataset."""
    ext = "tokens." + DTYPE_EXT[dtype]
    itemsize = np.dtype(dtype).itemsize
    out: list[np.ndarray] = []
    try:
        tar = tarfile.open(fileobj=io.BytesIO(data), mode="r:")
        for info in tar:  # WebDataset's convention: <key>.<suffix> members, a sample's members adjacent
            if not info.isreg():
                continue
            name, payload = info.name, tar.extractfile(info).read()
            if len(payload) != info.size:
                raise EOFError(f"member {name!r} is cut short")
            key, _, suffix = name.partition(".")
            if suffix == "cls":
                continue
            if suffix != ext:
                raise CorruptShard(f"shard {url} holds member {name!r}; expected <key>.{ext} (dtype {dtype})")
            if len(payload) % itemsize:
                raise CorruptShard(f"shard {url}: member {name!r} has {len(payload)} bytes, "
                                   f"not a multiple of {itemsize}")
            out.append(np.frombuffer(payload, dtype=np.dtype(dtype).newbyteorder("<")))
    except CorruptShard:
        raise
    except Exception as exc:  # tarfile.ReadError, EOFError, struct errors on truncated data ...
        raise CorruptShard(f"shard {url} is corrupt or truncated ({type(exc).__name__}: {str(exc)[:120]})") from None
    return out


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_shard_bytes(data: bytes, shard: dict, url: str) -> None:
    """Size and checksum of a downloaded shard against its manifest entry."""
    if len(data) != shard["size"]:
        raise CorruptShard(f"shard {url} has {len(data)} bytes but the manifest says {shard['size']}: it is truncated "
                           f"or was rewritten; re-create the dataset")
    if shard.get("sha256") and sha256(data) != shard["sha256"]:
        raise CorruptShard(f"shard {url} does not match its sha256 in the manifest: it is corrupt; "
                           f"re-create the dataset")


def load_shard(root: str, shard: dict, dtype: str, opts: dict,
               on_retry: Callable[[str], None] | None = None) -> list[np.ndarray]:
    """Read, check and decode one shard (retrying transient storage errors)."""
    url = join(root, shard["path"])
    data = read_bytes(url, opts, on_retry)
    check_shard_bytes(data, shard, url)
    samples = decode_shard(data, dtype, url)
    if len(samples) != shard["num_samples"] or sum(len(s) for s in samples) != shard["num_tokens"]:
        raise CorruptShard(f"shard {url} holds {len(samples)} samples / {sum(len(s) for s in samples)} tokens but the "
                           f"manifest says {shard['num_samples']} / {shard['num_tokens']}; re-create the dataset")
    return samples


# ----------------------------------------------------------------------------------------- manifest

_REQUIRED = ("format", "version", "modality", "vocab_size", "dtype", "splits")


def load_manifest(root: str, opts: dict, on_retry: Callable[[str], None] | None = None) -> dict:
    """Read and check ``<root>/manifest.json``; every problem is a DataError naming the URL."""
    if not root:
        raise DataError("data.url is empty: set it to the dataset root holding manifest.json")
    url = join(root, "manifest.json")
    try:
        raw = read_bytes(url, opts, on_retry)
    except StorageError as e:
        if "no such" in str(e):
            raise DataError(f"no dataset at {root}: {url} does not exist (manifest.json is written last, so the "
                            f"dataset is missing or was not completely written); check data.url or prepare it "
                            f"with python -m data_pipelines.<name> --out {root}") from None
        raise
    try:
        manifest = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{url} is not valid JSON ({e}); re-create the dataset") from None
    check_manifest(manifest, url)
    return manifest


def _shown(v: Any) -> str:
    kind = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null",
            int: "an integer", float: "a number"}.get(type(v), type(v).__name__)
    text = json.dumps(v, default=str)
    return kind if type(v) in (dict, list) and len(text) > 40 else f"{kind} {text[:40]}"


def _is_count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _need(ok: bool, url: str, field: str, want: str, got: Any) -> None:
    """A DataError naming the manifest and the field unless ``ok``."""
    if not ok:
        raise DataError(f"{url}: {field} must be {want}, got {_shown(got)}; the manifest is damaged or was not "
                        f"written by hgscale: re-create the dataset")


def _check_types(m: dict, url: str) -> None:
    """Every field the readers use has its type (a hand-edited or damaged manifest fails here, by name)."""
    _need(isinstance(m["dtype"], str), url, "dtype", "a string", m["dtype"])
    _need(isinstance(m["modality"], str), url, "modality", "a string", m["modality"])
    _need(_is_count(m["vocab_size"]) and m["vocab_size"] > 0, url, "vocab_size", "an integer >= 1", m["vocab_size"])
    for key in ("name", "tokenizer", "tokenizer_sha256"):
        _need(isinstance(m.get(key), (str, type(None))), url, key, "a string or null", m.get(key))
    bpt = m.get("bytes_per_token") or 1.0  # as bits_per_nat_token reads it
    _need(isinstance(bpt, (int, float)) and not isinstance(bpt, bool) and math.isfinite(bpt) and bpt > 0, url,
          "bytes_per_token", "a number > 0", bpt)
    _need(_is_count(m.get("sample_tokens") or 0), url, "sample_tokens", "an integer >= 0", m.get("sample_tokens"))
    shape = m.get("image_shape") or []
    _need(isinstance(shape, list) and all(_is_count(v) and v > 0 for v in shape), url, "image_shape",
          "a list of integers >= 1", shape)
    _need(isinstance(m["splits"], dict), url, "splits", "an object of split name -> split", m["splits"])
    for name, split in m["splits"].items():
        where = f"splits.{name}"
        _need(isinstance(split, dict), url, where, "an object with num_samples, num_tokens, shards", split)
        for key in ("num_samples", "num_tokens"):
            _need(_is_count(split.get(key)), url, f"{where}.{key}", "an integer >= 0", split.get(key))
        _need(_is_count(split.get("num_bytes", 0)), url, f"{where}.num_bytes", "an integer >= 0",
              split.get("num_bytes"))
        _need(isinstance(split.get("shards"), list), url, f"{where}.shards", "a list of shard entries",
              split.get("shards"))
        for i, s in enumerate(split["shards"]):
            _need(isinstance(s, dict), url, f"{where}.shards[{i}]",
                  "an object with path, num_samples, num_tokens, size", s)
            path = s.get("path")
            _need(isinstance(path, str) and bool(path) and not path.startswith("/") and "://" not in path
                  and ".." not in path.split("/"), url, f"{where}.shards[{i}].path",
                  "a path inside the dataset root", path)
            for key in ("num_samples", "num_tokens", "size"):
                _need(_is_count(s.get(key)), url, f"{where}.shards[{i}].{key}", "an integer >= 0", s.get(key))
            _need(isinstance(s.get("sha256", ""), (str, type(None))), url, f"{where}.shards[{i}].sha256",
                  "a hex string", s.get("sha256"))


def check_manifest(m: Any, url: str) -> None:
    """Structure, the type of every field the readers use, and internal arithmetic (split totals = sum over
    shards). Every problem is a DataError naming ``url`` and the field."""
    if not isinstance(m, dict):
        raise DataError(f"{url} is not a JSON object; re-create the dataset")
    missing = [k for k in _REQUIRED if k not in m]
    if missing:
        raise DataError(f"{url} lacks {', '.join(missing)}; it is not an hgscale dataset manifest")
    if m["format"] != FORMAT or m["version"] != VERSION:
        raise DataError(f"{url} has format {m['format']!r} version {m['version']!r}; "
                        f"expected {FORMAT!r} version {VERSION}")
    _check_types(m, url)
    if m["modality"] not in MODALITIES:
        raise DataError(f"{url}: modality {m['modality']!r} is not one of {', '.join(MODALITIES)}")
    if m["dtype"] not in DTYPE_EXT:
        raise DataError(f"{url}: dtype {m['dtype']!r} is not one of {', '.join(DTYPE_EXT)}")
    per_image = m.get("sample_tokens") or 0
    if m["modality"] == "image" and not per_image > 0:
        raise DataError(f"{url}: an image dataset needs sample_tokens (tokens per image) > 0")
    for name, split in m["splits"].items():
        shards = split["shards"]
        if m["modality"] == "image" and any(s["num_tokens"] % per_image for s in shards):
            raise DataError(f"{url}: a shard of split {name!r} holds a partial image ({per_image} tokens each)")
        for key in ("num_samples", "num_tokens"):
            total = sum(s[key] for s in shards)
            if total != split[key]:
                raise DataError(f"{url}: split {name!r} says {key} = {split[key]} but its shards add up to "
                                f"{total}; the manifest and the shards disagree: re-create the dataset")


def verify_sizes(root: str, manifest: dict, opts: dict, on_retry: Callable[[str], None] | None = None) -> None:
    """Every shard exists with the size the manifest records (one listing, no downloads)."""
    fs, base = filesystem(root, opts)
    fs.invalidate_cache(base)  # s3fs caches listings: a re-uploaded dataset must be seen as it is now
    listing = with_retries(root, lambda: fs.find(base, detail=True), opts, on_retry, what="list")
    base = fs._strip_protocol(base).rstrip("/")  # local: absolute, as find() returns them
    sizes = {fs._strip_protocol(p)[len(base):].lstrip("/"): info.get("size") for p, info in listing.items()}
    for name, split in manifest["splits"].items():
        for s in split["shards"]:
            got = sizes.get(s["path"])
            if got is None:
                raise DataError(f"shard {join(root, s['path'])} of split {name!r} is listed in the manifest but does "
                                f"not exist; re-create or re-upload the dataset")
            if got != s["size"]:
                raise DataError(f"shard {join(root, s['path'])} has {got} bytes but the manifest says {s['size']}; "
                                f"the manifest and the shards disagree: re-create or re-upload the dataset")


def verify_checksums(root: str, manifest: dict, opts: dict, progress: bool = False,
                     on_retry: Callable[[str], None] | None = None) -> int:
    """Download every shard and check sha256, sample and token counts. Returns the shards checked."""
    shards = [s for split in manifest["splits"].values() for s in split["shards"]]
    it = shards
    if progress:
        from tqdm import tqdm
        it = tqdm(shards, desc="verify", unit="shard")
    for s in it:
        load_shard(root, s, manifest["dtype"], opts, on_retry)
    return len(shards)


def bits_per_nat_token(manifest: dict) -> float:
    """metric = mean NLL (nats/token) x this: bits per byte (text) or per sub-pixel (images)."""
    return 1.0 / math.log(2) / float(manifest.get("bytes_per_token") or 1.0)
