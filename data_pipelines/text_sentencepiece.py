"""Text corpora tokenized with SentencePiece, as token-id shards with the tokenizer beside them.

    python -m data_pipelines.text_sentencepiece --input books/*.txt --vocab-size 8000 --out s3://bucket/books
    python -m data_pipelines.text_sentencepiece --input a.txt --model old/tokenizer.model --out DIR

The inputs (paths or fsspec URLs) are read as one text, split by lines into train / valid / test
(contiguous, ``--valid-fraction`` / ``--test-fraction``). A unigram or BPE model is trained on the train
part only (or ``--model`` is reused) and stored as ``<out>/tokenizer.model``. Lines are tokenized in
parallel across ``--workers`` processes; each line ends with the ``<nl>`` piece, so the text round-trips.
The manifest records bytes per token (UTF-8 bytes of the text / tokens) so training reports bits per
byte ("bpc"), comparable with byte-level models.
"""
from __future__ import annotations

import argparse
import io
import multiprocessing as mp
import os
import sys
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from hgscale.data.storage import DataError, filesystem, storage_options

from . import run_cli
from .shards import DatasetWriter, add_storage_args, opts_from_args, summary

NEWLINE = "<nl>"


def read_texts(inputs: list[str], opts: dict | None = None) -> list[str]:
    """All lines of all inputs, in order (without their newline characters)."""
    lines: list[str] = []
    for url in inputs:
        fs, path = filesystem(url, opts or storage_options())
        if not fs.exists(path):
            raise DataError(f"input {url} does not exist; pass existing text files to --input")
        lines += fs.cat_file(path).decode("utf-8", errors="replace").splitlines()
    return lines


def split_lines(lines: list[str], valid_fraction: float, test_fraction: float) -> dict[str, list[str]]:
    n = len(lines)
    n_valid, n_test = int(n * valid_fraction), int(n * test_fraction)
    n_train = n - n_valid - n_test
    if n_train <= 0:
        raise DataError(f"{n} input lines leave nothing for training with --valid-fraction {valid_fraction} and "
                        f"--test-fraction {test_fraction}")
    return {"train": lines[:n_train], "valid": lines[n_train:n_train + n_valid], "test": lines[n_train + n_valid:]}


def train_model(lines: list[str], vocab_size: int, model_type: str, threads: int) -> bytes:
    """A serialized SentencePiece model trained on ``lines``."""
    import sentencepiece as spm
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([ln for ln in lines if ln.strip()]), model_writer=buf, vocab_size=vocab_size,
        model_type=model_type, character_coverage=1.0, user_defined_symbols=[NEWLINE], hard_vocab_limit=False,
        remove_extra_whitespaces=False,  # keep indentation: the corpora hold code
        num_threads=max(1, threads), minloglevel=2, input_sentence_size=2_000_000, shuffle_input_sentence=True)
    return buf.getvalue()


_SP = None


def _init(model: bytes) -> None:
    global _SP
    import sentencepiece as spm
    _SP = spm.SentencePieceProcessor(model_proto=model)


def _encode(lines: list[str]) -> np.ndarray:
    nl = _SP.piece_to_id(NEWLINE)
    ids: list[int] = []
    for pieces in _SP.encode(lines):  # one call per chunk: the C++ side does the work
        ids += pieces
        ids.append(nl)
    return np.asarray(ids, dtype=np.int64)


def encode_parallel(model: bytes, lines: list[str], workers: int, chunk_lines: int = 2000,
                    progress: bool = False, desc: str = "tokenize") -> np.ndarray:
    """Token ids of ``lines`` (each followed by <nl>), in order, computed by ``workers`` processes."""
    chunks = [lines[i:i + chunk_lines] for i in range(0, len(lines), chunk_lines)]
    if not chunks:
        return np.zeros(0, np.int64)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(chunks), desc=desc, unit="chunk")
    out = []
    if workers <= 1:
        _init(model)
        results = map(_encode, chunks)
        pool = None
    else:  # spawn: the parent may hold s3fs / threads, which fork would copy half-alive
        pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_init, initargs=(model,))
        results = pool.map(_encode, chunks)
    try:
        for r in results:
            out.append(r)
            if bar:
                bar.update(1)
    finally:
        if pool:
            pool.shutdown()
        if bar:
            bar.close()
    return np.concatenate(out)


def decode(model: bytes, ids) -> str:
    """Text of ``ids`` (inverse of encode_parallel up to SentencePiece normalisation)."""
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_proto=model)
    nl = sp.piece_to_id(NEWLINE)
    lines, cur = [], []
    for i in [int(x) for x in ids]:
        if i == nl:
            lines.append(sp.decode(cur))
            cur = []
        else:
            cur.append(i)
    return "\n".join(lines) + ("\n" if lines else "") + (sp.decode(cur) if cur else "")


def prepare(inputs: list[str], out: str, vocab_size: int = 8000, model_type: str = "unigram",
            model_path: str | None = None, valid_fraction: float = 0.05, test_fraction: float = 0.05,
            workers: int = 0, shard_bytes: int = 4 << 20, opts: dict | None = None, progress: bool = True,
            overwrite: bool = True) -> dict:
    import sentencepiece as spm
    workers = workers or max(1, os.cpu_count() or 1)
    splits = split_lines(read_texts(inputs, opts), valid_fraction, test_fraction)
    if model_path:
        fs, path = filesystem(model_path, opts or storage_options())
        if not fs.exists(path):
            raise DataError(f"--model {model_path} does not exist")
        model = fs.cat_file(path)
    else:
        model = train_model(splits["train"], vocab_size, model_type, workers)
    sp = spm.SentencePieceProcessor(model_proto=model)
    if sp.piece_to_id(NEWLINE) == sp.unk_id():
        raise DataError(f"--model {model_path} has no {NEWLINE!r} piece; train one here (leave out --model)")
    vocab = sp.get_piece_size()
    with DatasetWriter(out, name=os.path.basename(inputs[0]), modality="text_sentencepiece", vocab_size=vocab,
                       shard_bytes=shard_bytes, opts=opts, tokenizer="tokenizer.model", overwrite=overwrite,
                       extra={"newline_piece": NEWLINE,
                              "source": {"inputs": [os.path.basename(i) for i in inputs], "model_type": model_type,
                                         "trained": not model_path}}) as w:
        w.put_file("tokenizer.model", model)
        for name, lines in splits.items():
            if not lines:
                continue
            ids = encode_parallel(model, lines, workers, progress=progress, desc=f"tokenize {name}")
            nbytes = sum(len(ln.encode("utf-8")) + 1 for ln in lines)
            w.write_stream(name, ids.astype(w.dtype), sample_tokens=1 << 15, num_bytes=nbytes)
    return w.manifest()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_pipelines.text_sentencepiece",
                                description=__doc__.splitlines()[0])
    add_storage_args(p)
    p.add_argument("--input", nargs="+", required=True, help="text files (paths or fsspec URLs)")
    p.add_argument("--vocab-size", type=int, default=8000, help="SentencePiece vocabulary size (upper bound)")
    p.add_argument("--model-type", choices=("unigram", "bpe"), default="unigram")
    p.add_argument("--model", default=None, help="reuse this SentencePiece model instead of training one")
    p.add_argument("--valid-fraction", type=float, default=0.05)
    p.add_argument("--test-fraction", type=float, default=0.05)
    p.add_argument("--workers", type=int, default=0, help="tokenizer processes (default: all cores)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    m = prepare(args.input, args.out, args.vocab_size, args.model_type, args.model, args.valid_fraction,
                args.test_fraction, args.workers, args.shard_bytes, opts_from_args(args), not args.no_progress,
                not args.no_overwrite)
    print(summary(m, args.out) + f"\n  bytes per token {m['bytes_per_token']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
