"""The offline demo corpus: the Python reference manual (``pydoc_data.topics``) as bytes.

    python -m data_pipelines.demo_corpus --out DIR        # or an s3:// URL

About 466 KB of real English text with code, present on every Python install: enough to see a
byte-level model learn within minutes on a CPU. Split contiguously 90 / 5 / 5 (train / valid / test),
like enwik8. Small shards (32 KiB) so several data-parallel ranks x workers each get their own.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

from . import run_cli
from .shards import DatasetWriter, add_storage_args, opts_from_args, summary

SPLITS = (("train", 0.90), ("valid", 0.05), ("test", 0.05))


def corpus_bytes() -> bytes:
    """The text of every topic of the reference manual, in sorted topic order (deterministic)."""
    from pydoc_data.topics import topics
    return "\n\n".join(topics[k].strip() for k in sorted(topics)).encode("utf-8")


def split_points(n: int, fractions=SPLITS) -> list[tuple[str, int, int]]:
    """Contiguous [start, end) byte ranges of each split."""
    out, start = [], 0
    for i, (name, frac) in enumerate(fractions):
        end = n if i == len(fractions) - 1 else start + int(round(n * frac))
        out.append((name, start, end))
        start = end
    return out


def write_demo_corpus(url: str, shard_bytes: int = 32 << 10, sample_tokens: int = 4096, opts: dict | None = None,
                      overwrite: bool = True) -> dict:
    data = np.frombuffer(corpus_bytes(), dtype=np.uint8)
    with DatasetWriter(url, name="pydoc_topics", modality="text_bytes", vocab_size=256, shard_bytes=shard_bytes,
                       opts=opts, overwrite=overwrite,
                       extra={"source": {"corpus": "pydoc_data.topics", "python": sys.version.split()[0],
                                         "bytes": int(len(data))}}) as w:
        for name, start, end in split_points(len(data)):
            w.write_stream(name, data[start:end], sample_tokens=sample_tokens)
    return w.manifest()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_pipelines.demo_corpus", description=__doc__.splitlines()[0])
    add_storage_args(p)
    p.set_defaults(shard_bytes=32 << 10)
    p.add_argument("--sample-tokens", type=int, default=4096, help="bytes per tar sample")
    args = p.parse_args(argv)
    m = write_demo_corpus(args.out, args.shard_bytes, args.sample_tokens, opts_from_args(args),
                          overwrite=not args.no_overwrite)
    print(summary(m, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
