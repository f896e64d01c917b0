"""Any text corpus, any size, to token shards: streamed, in parallel, across machines.

    python -m data_pipelines.text --input 'crawl/*.jsonl.zst' --out s3://bucket/crawl           # bytes
    python -m data_pipelines.text --input books/ --tokenizer sentencepiece --vocab-size 32000 --out DIR
    python -m data_pipelines.text --input ... --out URL --num-tasks 64 --task-index $I           # one machine of 64
    python -m data_pipelines.merge URL                                                          # then the manifest

Inputs are files, directories or globs (any fsspec URL) of ``--format auto|txt|jsonl|parquet``, plain or
``.gz``/``.bz2``/``.zst`` (sources.py says what a document is). Each document goes to train, valid or test
by a hash of its text (``--valid-fraction`` / ``--test-fraction``): deterministic, independent of file
order, task and worker counts, and a duplicated document always lands in the same split.

The sorted input list is cut into ``--num-tasks`` contiguous ranges of about equal bytes, and each task's
range into ``--workers`` ranges, one process each. A worker streams its files document by document and
writes its own shards (``<split>/shard-<task>-<worker>-<n>.tar``): memory holds one shard per split and a
batch of documents per worker, whatever the corpus size. Each task then writes ``tasks/task-I-of-N.json``;
``data_pipelines.merge`` writes manifest.json once all N exist (a single task merges by itself). Shards
are listed in task, worker, file order, so the dataset's token stream is that of the inputs in order,
however many tasks and workers made it.
"""
from __future__ import annotations

import argparse
import bisect
import hashlib
import json
import multiprocessing as mp
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from hgscale.data.errors import DataError
from hgscale.data.io import StorageError, filesystem, join, read_bytes

from . import run_cli
from .shards import DEFAULT_SAMPLE_TOKENS, DatasetWriter, add_split_totals, add_storage_args, opts_from_args, summary
from .sources import FORMATS, TXT_DOCUMENTS, BadRecords, list_inputs, read_documents
from .tokenizers import TOKENIZERS, make_tokenizer, train_sentencepiece

BATCH_BYTES = 1 << 20  # raw text per split a worker tokenizes at once (SentencePiece encodes a list per call)
SPLITS = ("train", "valid", "test")


@dataclass
class Plan:
    """Everything a worker needs (picklable): the same in every task of one preparation."""
    out: str
    opts: dict
    fmt: str = "auto"
    field: str = "text"
    txt_document: str = "blank-line"
    on_bad_record: str = "error"
    valid_fraction: float = 0.05
    test_fraction: float = 0.05
    tokenizer: str = "bytes"
    model: bytes | None = None
    shard_bytes: int = 4 << 20
    sample_tokens: int = DEFAULT_SAMPLE_TOKENS
    num_tasks: int = 1
    task: int = 0
    name: str = ""


def assign_split(raw: bytes, valid_fraction: float, test_fraction: float) -> str:
    """train / valid / test of one document from a hash of its UTF-8 bytes."""
    u = int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "little") / 2.0 ** 64
    return "valid" if u < valid_fraction else "test" if u < valid_fraction + test_fraction else "train"


def partition(sizes: list[int], parts: int) -> list[range]:
    """``parts`` contiguous index ranges of about equal total size (a file lands where its middle byte does)."""
    total = sum(sizes)
    owner, start = [], 0
    for i, s in enumerate(sizes):
        owner.append(min(parts - 1, (2 * start + s) * parts // (2 * total)) if total else i * parts // len(sizes))
        start += s
    return [range(bisect.bisect_left(owner, p), bisect.bisect_left(owner, p + 1)) for p in range(parts)]  # sorted


def fingerprint(plan: Plan, files: list[tuple[str, int]]) -> str:
    """Identifies one preparation: the same inputs, settings and tokenizer in every task."""
    settings = {k: v for k, v in asdict(plan).items() if k not in ("opts", "task", "model", "out")}
    settings["model_sha256"] = hashlib.sha256(plan.model).hexdigest() if plan.model else None
    return hashlib.sha256(json.dumps([settings, files], sort_keys=True).encode()).hexdigest()


# ------------------------------------------------------------------------------------------ one worker

class _SplitSink:
    """Tokens of one split of one worker: documents batched, tokenized, cut into tar samples."""

    def __init__(self, writer: DatasetWriter, split: str, tok, sample_tokens: int):
        self.w, self.split, self.tok, self.sample_tokens = writer, split, tok, sample_tokens
        self.texts, self.raws, self.pending, self.documents = [], [], 0, 0
        self.carry = np.zeros(0, writer.dtype)

    def add(self, text: str, raw: bytes) -> None:
        self.texts.append(text)
        self.raws.append(raw)
        self.pending += len(raw)
        self.documents += 1
        if self.pending >= BATCH_BYTES:
            self.flush()

    def flush(self, last: bool = False) -> None:
        if self.raws:
            tokens = self.tok.encode(self.texts, self.raws)
            self.w.add_bytes(self.split, sum(len(r) + 1 for r in self.raws))  # + 1: the document's end
            self.carry = np.concatenate([self.carry, tokens.astype(self.w.dtype, copy=False)])
            self.texts, self.raws, self.pending = [], [], 0
        st = self.sample_tokens
        n_full = len(self.carry) // st
        for i in range(n_full):
            self.w.add(self.split, self.carry[i * st:(i + 1) * st])
        self.carry = self.carry[n_full * st:]
        if last and len(self.carry):
            self.w.add(self.split, self.carry)
            self.carry = self.carry[:0]


def prepare_files(plan: Plan, files: list[str], worker: int) -> dict:
    """Stream ``files`` (in order) into this worker's shards; returns their splits and counts."""
    tok = make_tokenizer(plan.tokenizer, plan.model)
    w = DatasetWriter(plan.out, name=plan.name, modality=tok.modality, vocab_size=tok.vocab_size,
                      shard_bytes=plan.shard_bytes, opts=plan.opts, claim=False,
                      shard_prefix=f"{plan.task:05d}-{worker:03d}-")
    bad = BadRecords(plan.on_bad_record)
    sinks = {s: _SplitSink(w, s, tok, plan.sample_tokens) for s in SPLITS}
    for url in files:
        for doc in read_documents(url, plan.opts, plan.fmt, plan.field, plan.txt_document, bad):
            raw = doc.encode("utf-8")
            sinks[assign_split(raw, plan.valid_fraction, plan.test_fraction)].add(doc, raw)
    for s in sinks.values():
        s.flush(last=True)
    return {"splits": w.close_shards(), "documents": {s: k.documents for s, k in sinks.items()},
            "bad_records": bad.state(), "inputs": len(files)}


# ----------------------------------------------------------------------------------------- one task

def _combine(results: list[dict]) -> dict:
    """Per-worker results in worker order -> one (splits in shard order, counts)."""
    splits: dict[str, dict] = {}
    out = {"documents": dict.fromkeys(SPLITS, 0), "bad_records": {"count": 0, "examples": []}, "inputs": 0}
    for r in results:
        add_split_totals(splits, r["splits"])
        for k, v in r["documents"].items():
            out["documents"][k] += v
        out["bad_records"]["count"] += r["bad_records"]["count"]
        out["bad_records"]["examples"] = (out["bad_records"]["examples"] + r["bad_records"]["examples"])[:20]
        out["inputs"] += r["inputs"]
    out["splits"] = {s: splits[s] for s in SPLITS if s in splits}
    return out


def task_record_path(num_tasks: int, task: int) -> str:
    return f"tasks/task-{task:05d}-of-{num_tasks:05d}.json"


def run_task(plan: Plan, files: list[tuple[str, int]], workers: int, overwrite: bool = True) -> dict:
    """Prepare this task's range of ``files`` with ``workers`` processes; write its record (and, for a
    single task, the manifest). Returns the record."""
    from . import merge
    mine = [files[i] for i in partition([s for _, s in files], plan.num_tasks)[plan.task]]
    ranges = partition([s for _, s in mine], workers)
    jobs = [[mine[i][0] for i in r] for r in ranges]
    head = DatasetWriter(plan.out, name=plan.name, modality="text_bytes", vocab_size=256, opts=plan.opts,
                         overwrite=overwrite)  # claims the root: an old manifest goes first
    record_rel = task_record_path(plan.num_tasks, plan.task)
    fs, base = filesystem(plan.out, plan.opts)
    if fs.exists(join(base, record_rel)):
        fs.rm(join(base, record_rel))  # a re-run task counts as missing until it has finished again
    if plan.model and plan.task == 0:
        head.put_file("tokenizer.model", plan.model)
    if workers == 1 or len(jobs) == 1:
        results = [prepare_files(plan, jobs[0], 0)]
    else:  # spawn: the parent may hold s3fs / threads, which fork would copy half-alive
        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
            results = list(pool.map(prepare_files, [plan] * len(jobs), jobs, range(len(jobs))))
    tok = make_tokenizer(plan.tokenizer, plan.model)
    record = {"task": plan.task, "num_tasks": plan.num_tasks, "fingerprint": fingerprint(plan, files),
              "name": plan.name, "modality": tok.modality, "vocab_size": tok.vocab_size,
              "tokenizer": plan.tokenizer, "document_end": int(tok.document_end),
              "tokenizer_sha256": hashlib.sha256(plan.model).hexdigest() if plan.model else None,
              "settings": {k: getattr(plan, k) for k in ("fmt", "field", "txt_document", "valid_fraction",
                                                         "test_fraction", "on_bad_record")},
              **_combine(results)}
    head.put_file(record_rel, json.dumps(record, indent=1).encode())
    if plan.num_tasks == 1:
        merge.merge(plan.out, plan.opts)
    return record


# ------------------------------------------------------------------------------------ the tokenizer

def sample_text(plan: Plan, files: list[tuple[str, int]], sample_bytes: int) -> list[str]:
    """Lines of train documents for tokenizer training: about ``sample_bytes`` in all, the first
    ``sample_bytes / len(files)`` of each input (a spread over the corpus, reading little of each file)."""
    quota = max(1, sample_bytes // max(1, len(files)))
    lines: list[str] = []
    bad = BadRecords(plan.on_bad_record)
    for url, _ in files:
        got = 0
        for doc in read_documents(url, plan.opts, plan.fmt, plan.field, plan.txt_document, bad):
            raw = doc.encode("utf-8")
            if assign_split(raw, plan.valid_fraction, plan.test_fraction) != "train":
                continue
            lines += doc.split("\n")
            got += len(raw)
            if got >= quota:
                break
    return lines


def tokenizer_model(args, plan: Plan, files: list[tuple[str, int]]) -> bytes | None:
    if args.tokenizer == "bytes":
        if args.tokenizer_model:
            raise DataError("--tokenizer-model is for --tokenizer sentencepiece")
        return None
    if args.tokenizer_model:
        try:
            model = read_bytes(args.tokenizer_model, plan.opts)
        except StorageError as e:
            raise DataError(f"--tokenizer-model: {e}") from None
        make_tokenizer("sentencepiece", model, f"--tokenizer-model {args.tokenizer_model}")  # checks it
        return model
    if plan.num_tasks > 1 and not args.tokenizer_only:
        raise DataError("--num-tasks > 1 with --tokenizer sentencepiece needs one shared --tokenizer-model: train it "
                        "first with the same arguments plus --tokenizer-only (it writes <out>/tokenizer.model), "
                        "then pass --tokenizer-model <out>/tokenizer.model to every task")
    return train_sentencepiece(sample_text(plan, files, args.tokenizer_sample_bytes), args.vocab_size,
                               args.model_type, max(1, args.workers))


# ----------------------------------------------------------------------------------------------- CLI

def build_parser(prog: str = "python -m data_pipelines.text") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    add_storage_args(p)
    p.add_argument("--input", nargs="+", required=True, help="files, directories or globs (paths or fsspec URLs)")
    p.add_argument("--format", choices=FORMATS, default="auto", help="input format (auto: from the file name)")
    p.add_argument("--field", default="text", help="jsonl/parquet: the field holding the text (a.b for nested)")
    p.add_argument("--txt-document", choices=TXT_DOCUMENTS, default="blank-line",
                   help="txt: a document ends at an empty line (default), at every line, or with the file")
    p.add_argument("--tokenizer", choices=TOKENIZERS, default="bytes", help="UTF-8 bytes (vocab 256) or SentencePiece")
    p.add_argument("--tokenizer-model", default=None, help="reuse this SentencePiece model")
    p.add_argument("--tokenizer-sample-bytes", type=int, default=100_000_000,
                   help="SentencePiece training sample: bytes of train documents, spread over the inputs")
    p.add_argument("--tokenizer-only", action="store_true",
                   help="train the tokenizer, write <out>/tokenizer.model, stop")
    p.add_argument("--vocab-size", type=int, default=8000, help="SentencePiece vocabulary size (upper bound)")
    p.add_argument("--model-type", choices=("unigram", "bpe"), default="unigram")
    p.add_argument("--valid-fraction", type=float, default=0.05, help="share of documents for validation")
    p.add_argument("--test-fraction", type=float, default=0.05, help="share of documents for the test split")
    p.add_argument("--workers", type=int, default=1, help="processes on this machine")
    p.add_argument("--num-tasks", type=int, default=1, help="machines sharing the inputs (a Slurm array)")
    p.add_argument("--task-index", type=int, default=0, help="this machine's task, 0 .. num-tasks - 1")
    p.add_argument("--on-bad-record", choices=("error", "skip"), default="error",
                   help="a bad record or input: stop naming it (default) or skip and count it")
    p.add_argument("--sample-tokens", type=int, default=DEFAULT_SAMPLE_TOKENS, help=argparse.SUPPRESS)
    p.add_argument("--name", default="", help="dataset name in the manifest (default: the last part of --out)")
    return p


def _check_args(args) -> None:
    problems = []
    if not (0 <= args.valid_fraction < 1 and 0 <= args.test_fraction < 1
            and args.valid_fraction + args.test_fraction < 1):
        problems.append(f"--valid-fraction {args.valid_fraction} and --test-fraction {args.test_fraction} must be in "
                        f"[0, 1) and leave documents for training")
    if args.workers < 1 or args.num_tasks < 1:
        problems.append(f"--workers {args.workers} and --num-tasks {args.num_tasks} must be >= 1")
    if not 0 <= args.task_index < max(1, args.num_tasks):
        problems.append(f"--task-index {args.task_index} is not in [0, --num-tasks {args.num_tasks})")
    if args.shard_bytes < 1 or args.sample_tokens < 1:
        problems.append("--shard-bytes and --sample-tokens must be >= 1")
    if problems:
        raise DataError("; ".join(problems))
    _check_out(args.out)


def _check_out(out: str) -> None:
    """A local --out (a path or file:// URL) must be a directory or creatable as one: no file on its way."""
    if "://" in out and not out.startswith("file://"):
        return
    path = Path(out.split("://", 1)[1] if "://" in out else out).absolute()
    for p in (path, *path.parents):
        if p.is_dir():
            return
        if p.exists() or p.is_symlink():
            raise DataError(f"--out {out}: {p} exists and is not a directory, so the dataset cannot be written there; "
                            f"pass a directory path")


def main(argv=None, prog: str | None = None) -> int:
    args = build_parser(prog or "python -m data_pipelines.text").parse_args(argv)
    _check_args(args)
    try:
        return _run(args)
    except (NotADirectoryError, IsADirectoryError, FileExistsError) as e:  # a path in the way of an output
        raise DataError(f"cannot write {e.filename or args.out}: {e.strerror}; check --out {args.out}") from None


def _run(args) -> int:
    opts = opts_from_args(args)
    plan = Plan(out=args.out.rstrip("/"), opts=opts, fmt=args.format, field=args.field, txt_document=args.txt_document,
                on_bad_record=args.on_bad_record, valid_fraction=args.valid_fraction,
                test_fraction=args.test_fraction, tokenizer=args.tokenizer, shard_bytes=args.shard_bytes,
                sample_tokens=args.sample_tokens, num_tasks=args.num_tasks, task=args.task_index,
                name=args.name or args.out.rstrip("/").rsplit("/", 1)[-1])
    files = list_inputs(args.input, opts)
    plan.model = tokenizer_model(args, plan, files)
    if args.tokenizer_only:
        DatasetWriter(plan.out, plan.name, "text_sentencepiece", 256, opts=opts).put_file("tokenizer.model", plan.model)
        print(f"wrote {join(plan.out, 'tokenizer.model')}; pass it to every task as --tokenizer-model")
        return 0
    rec = run_task(plan, files, args.workers, overwrite=not args.no_overwrite)
    bad = rec["bad_records"]
    if bad["count"]:
        print(f"skipped {bad['count']:,d} bad record(s); first: {bad['examples'][0]}", file=sys.stderr)
    if plan.num_tasks == 1:
        from hgscale.data.shards import load_manifest
        m = load_manifest(plan.out, opts)
        print(summary(m, plan.out) + f"\n  bytes per token {m['bytes_per_token']:.3f}")
    else:
        docs = ", ".join(f"{k} {v:,d}" for k, v in rec["documents"].items())
        print(f"task {plan.task} of {plan.num_tasks}: {rec['inputs']} input(s), documents {docs}; "
              f"run python -m data_pipelines.merge {plan.out} when every task has finished")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
