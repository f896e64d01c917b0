"""enwik8 (the first 10^8 bytes of an English Wikipedia dump) as byte-level shards.

    python -m data_pipelines.enwik8 --out s3://bucket/enwik8                 # downloads the zip
    python -m data_pipelines.enwik8 --source ~/data/enwik8.zip --out DIR     # or a local enwik8 / enwik8.zip

The file must be the standard one: 100,000,000 bytes with the published checksum. The split is the
standard byte-level one: the first 90M bytes train, the next 5M valid, the last 5M test.
``--expected-size`` / ``--expected-sha256`` exist for tests on small synthetic files; the split then keeps
the same 90 / 5 / 5 proportions.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import sys
import urllib.request
import zipfile
from pathlib import Path

import numpy as np

from hgscale.data.errors import DataError

from . import run_cli
from .shards import DatasetWriter, add_storage_args, opts_from_args, summary

URL = "http://mattmahoney.net/dc/enwik8.zip"
SIZE = 100_000_000
SHA256 = "2b49720ec4d78c3c9fabaee6e4179a5e997302b3a70029f30f2d582218c024a8"
SPLIT = (90_000_000, 5_000_000, 5_000_000)


def download(url: str, cache_dir: Path) -> Path:
    """Fetch ``url`` into ``cache_dir`` once (with a progress bar); returns the local file."""
    from tqdm import tqdm
    cache_dir.mkdir(parents=True, exist_ok=True)
    dest = cache_dir / url.rsplit("/", 1)[-1]
    if dest.exists():
        return dest
    tmp = dest.with_suffix(dest.suffix + ".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as f, \
                tqdm(total=int(r.headers.get("Content-Length") or 0) or None, unit="B", unit_scale=True,
                     desc=f"download {dest.name}") as bar:
            while chunk := r.read(1 << 20):
                f.write(chunk)
                bar.update(len(chunk))
    except OSError as e:
        raise DataError(f"cannot download {url} ({e}); download it yourself and pass --source PATH") from None
    tmp.rename(dest)
    return dest


def read_source(source: str, cache_dir: Path) -> bytes:
    """The raw enwik8 bytes from a URL, a zip holding ``enwik8``, or the plain file."""
    if source.startswith(("http://", "https://")):
        source = str(download(source, cache_dir))
    path = Path(source).expanduser()
    if not path.is_file():
        raise DataError(f"enwik8 source {source} does not exist; pass --source PATH (enwik8 or enwik8.zip) "
                        f"or leave it out to download {URL}")
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            names = [n for n in z.namelist() if not n.endswith("/")]
            if "enwik8" not in names and len(names) != 1:
                raise DataError(f"{path} does not hold a member named enwik8 (it holds {names[:5]})")
            return z.read("enwik8" if "enwik8" in names else names[0])
    return path.read_bytes()


def check(data: bytes, expected_size: int, expected_sha256: str, source: str) -> None:
    if len(data) != expected_size:
        raise DataError(f"{source} has {len(data):,d} bytes; enwik8 has {expected_size:,d}: the file is truncated or "
                        f"not enwik8; download {URL} again")
    digest = hashlib.sha256(data).hexdigest()
    if expected_sha256 and digest != expected_sha256:
        raise DataError(f"{source} has sha256 {digest}, not enwik8's {expected_sha256}: the file is corrupt or "
                        f"not enwik8; download {URL} again")


def split_sizes(n: int) -> tuple[int, int, int]:
    """90M / 5M / 5M, or the same proportions of a test file of another size."""
    if n == SIZE:
        return SPLIT
    valid = n * SPLIT[1] // SIZE
    return n - 2 * valid, valid, valid


def prepare(source: str, out: str, expected_size: int = SIZE, expected_sha256: str = SHA256,
            shard_bytes: int = 4 << 20, opts: dict | None = None, cache_dir: Path | None = None,
            progress: bool = True, overwrite: bool = True) -> dict:
    data = read_source(source, cache_dir or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "hgscale")
    check(data, expected_size, expected_sha256, source)
    arr = np.frombuffer(data, dtype=np.uint8)
    n_train, n_valid, n_test = split_sizes(len(arr))
    bounds = {"train": (0, n_train), "valid": (n_train, n_train + n_valid), "test": (n_train + n_valid, len(arr))}
    with DatasetWriter(out, name="enwik8", modality="text_bytes", vocab_size=256, shard_bytes=shard_bytes, opts=opts,
                       overwrite=overwrite, extra={"source": {"file": os.path.basename(source), "bytes": len(arr),
                                                              "sha256": hashlib.sha256(data).hexdigest(),
                                                              "split_bytes": [n_train, n_valid, n_test]}}) as w:
        for name, (a, b) in bounds.items():
            w.write_stream(name, arr[a:b], progress=progress)
    return w.manifest()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_pipelines.enwik8", description=__doc__.splitlines()[0])
    add_storage_args(p)
    p.add_argument("--source", default=URL, help=f"enwik8, enwik8.zip or a URL (default {URL})")
    p.add_argument("--cache-dir", type=Path, default=None, help="where downloads go (default ~/.cache/hgscale)")
    p.add_argument("--expected-size", type=int, default=SIZE, help=argparse.SUPPRESS)  # tests only
    p.add_argument("--expected-sha256", default=SHA256, help=argparse.SUPPRESS)  # tests only
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    m = prepare(args.source, args.out, args.expected_size, args.expected_sha256, args.shard_bytes,
                opts_from_args(args), args.cache_dir, not args.no_progress, not args.no_overwrite)
    print(summary(m, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
