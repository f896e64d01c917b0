"""Text corpora tokenized with SentencePiece: ``data_pipelines.text --tokenizer sentencepiece`` by its old name.

    python -m data_pipelines.text_sentencepiece --input books/*.txt --vocab-size 8000 --out s3://bucket/books
    python -m data_pipelines.text_sentencepiece --input a.txt --model old/tokenizer.model --out DIR

Every option of ``python -m data_pipelines.text`` works here too; ``--model`` is ``--tokenizer-model``.
The model (trained on a sample of the train documents, or reused) is stored as ``<out>/tokenizer.model``.
"""
from __future__ import annotations

import sys

from . import run_cli, text
from .tokenizers import NEWLINE, SentencePieceTokenizer, decode_documents  # noqa: F401 - its interface


def prepare(inputs: list[str], out: str, vocab_size: int = 8000, model_type: str = "unigram",
            model_path: str | None = None, valid_fraction: float = 0.05, test_fraction: float = 0.05,
            workers: int = 1, shard_bytes: int = 4 << 20, opts: dict | None = None, progress: bool = False,
            overwrite: bool = True, **more: str) -> dict:
    """The library form of the command line: returns the manifest. ``more``: other options of
    data_pipelines.text by their long names (``txt_document="line"``)."""
    from hgscale.data.io import storage_options
    from hgscale.data.shards import load_manifest
    argv = ["--input", *inputs, "--out", out, "--tokenizer", "sentencepiece", "--vocab-size", str(vocab_size),
            "--model-type", model_type, "--valid-fraction", str(valid_fraction), "--test-fraction",
            str(test_fraction), "--workers", str(max(1, workers)), "--shard-bytes", str(shard_bytes)]
    argv += ["--tokenizer-model", model_path] if model_path else []
    argv += [] if overwrite else ["--no-overwrite"]
    for k, v in more.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    opts = opts or storage_options()
    if opts.get("endpoint_url"):
        argv += ["--s3-endpoint-url", opts["endpoint_url"]]
    text.main(argv)
    return load_manifest(out.rstrip("/"), opts)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    argv = ["--tokenizer-model" if a == "--model" else a for a in argv]
    argv = [a for a in argv if a != "--no-progress"]  # accepted for old scripts; nothing to switch off
    return text.main(["--tokenizer", "sentencepiece", *argv], prog="python -m data_pipelines.text_sentencepiece")


if __name__ == "__main__":
    sys.exit(run_cli(main))
