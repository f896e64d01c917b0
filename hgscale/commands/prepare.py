"""``hgscale prepare KIND ...``: offline preparation of datasets into WebDataset shards + manifest.json.

    hgscale prepare demo --out DIR                                   # offline: the Python reference manual
    hgscale prepare enwik8 --source enwik8.zip --out s3://bucket/enwik8
    hgscale prepare text --input 'crawl/*.jsonl.zst' --out s3://bucket/crawl
    hgscale prepare merge s3://bucket/crawl                          # after --num-tasks N tasks
    hgscale prepare images imagenet32 --source DIR --out DIR

Each kind is a module of data_pipelines/ (``python -m data_pipelines.KIND`` is the same tool).
"""
from __future__ import annotations

import importlib
import sys

from hgscale.core.status import USER_ERROR

KINDS = {"demo": "demo_corpus", "enwik8": "enwik8", "text": "text", "text_sentencepiece": "text_sentencepiece",
         "merge": "merge", "images": "images"}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in KINDS:
        print(__doc__.strip(), file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        if argv and argv[0] not in ("-h", "--help"):
            print(f"error: unknown kind {argv[0]!r}: one of {', '.join(KINDS)}", file=sys.stderr)
            return USER_ERROR
        return 0
    from data_pipelines import run_cli

    module = importlib.import_module(f"data_pipelines.{KINDS[argv[0]]}")
    return run_cli(module.main, argv[1:])
