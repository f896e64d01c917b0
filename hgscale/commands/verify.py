"""Check a prepared dataset completely: ``hgscale verify URL [--s3-endpoint-url URL]``.

Reads the manifest, checks that every shard exists with its recorded size, then downloads every
shard and checks its sha256, sample and token counts. Exit status 0 when all agree, 2 otherwise
(one line naming the first bad shard). Training does the cheap size check at every start
(``data.verify_manifest``) and this full check with ``data.verify_checksums=true``.
"""
from __future__ import annotations

import argparse
import sys

from hgscale.core.status import USER_ERROR
from hgscale.core.storage import StorageError, storage_options
from hgscale.data.shards import load_manifest, verify_checksums, verify_sizes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="hgscale verify", description=__doc__.splitlines()[0])
    p.add_argument("url", help="dataset root holding manifest.json (path, file:// or s3:// URL)")
    p.add_argument("--s3-endpoint-url", default="", help="S3 endpoint; default AWS_ENDPOINT_URL")
    p.add_argument("--s3-region", default="", help="S3 region; default AWS_DEFAULT_REGION")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    opts = storage_options(endpoint_url=args.s3_endpoint_url, region=args.s3_region)
    url = args.url.rstrip("/")
    try:
        warn = lambda msg: print(msg, file=sys.stderr)  # noqa: E731 - transient storage errors, retried
        manifest = load_manifest(url, opts, warn)
        verify_sizes(url, manifest, opts, warn)
        n = verify_checksums(url, manifest, opts, progress=not args.quiet, on_retry=warn)
    except StorageError as e:
        print(f"error: {e}", file=sys.stderr)
        return USER_ERROR
    tokens = sum(s["num_tokens"] for s in manifest["splits"].values())
    print(f"ok: {url}: {n} shards, {tokens:,d} tokens, sizes, sha256 and counts match the manifest")
    return 0


if __name__ == "__main__":
    sys.exit(main())
