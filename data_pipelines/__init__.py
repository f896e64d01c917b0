"""Offline preparation of datasets into WebDataset shards + manifest.json on any fsspec URL.

    python -m data_pipelines.demo_corpus --out DIR              # offline: the Python reference manual
    python -m data_pipelines.enwik8 --source enwik8.zip --out s3://bucket/enwik8
    python -m data_pipelines.text --input 'crawl/*.jsonl.zst' --out s3://bucket/crawl      # any text corpus
    python -m data_pipelines.text --input a.txt --tokenizer sentencepiece --vocab-size 8000 --out DIR
    python -m data_pipelines.merge s3://bucket/crawl     # after --num-tasks N tasks (slurm/prepare.sh)
    python -m data_pipelines.images imagenet32 --source DIR --out DIR     # also imagenet64, cifar10
"""
import sys

from hgscale.core.status import USER_ERROR


def run_cli(main, argv=None) -> int:
    """Run a preparation tool: user errors print one line, not a stack trace."""
    from hgscale.data.io import StorageError
    try:
        return main(argv) or 0
    except (StorageError, FileNotFoundError, PermissionError) as e:
        print(f"error: {e}", file=sys.stderr)
        return USER_ERROR
