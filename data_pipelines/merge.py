"""The one manifest of a dataset prepared by several tasks, written once every task has finished.

    python -m data_pipelines.merge s3://bucket/crawl        # after every task of data_pipelines.text

Reads ``<url>/tasks/task-I-of-N.json`` (one per finished task), checks that all N are there and come from
the same preparation (same inputs, settings and tokenizer), and writes manifest.json with every shard
(checksums and counts as the tasks recorded them) in task order. While any task is missing it refuses and
names the missing ones: the dataset never looks complete before it is.
"""
from __future__ import annotations

import argparse
import json
import re
import sys

from hgscale.data.errors import DataError
from hgscale.data.io import StorageError, filesystem, join, read_bytes, storage_options, with_retries

from . import run_cli
from .shards import DatasetWriter, add_split_totals, build_manifest, summary

_RECORD = re.compile(r"task-(\d+)-of-(\d+)\.json$")


# what merge reads of each task record, by type (data_pipelines.text writes them)
_FIELDS = {"task": int, "num_tasks": int, "fingerprint": str, "name": str, "modality": str, "vocab_size": int,
           "tokenizer": str, "document_end": int, "tokenizer_sha256": (str, type(None)), "settings": dict,
           "splits": dict, "documents": dict, "bad_records": dict, "inputs": int}
_TYPE_NAMES = {int: "an integer", str: "a string", dict: "an object", list: "a list"}


def _record_problem(rec, file: str) -> str | None:
    """What is wrong with one task record (None when merge can use it)."""
    if not isinstance(rec, dict):
        return "is not a JSON object"
    missing = [k for k in _FIELDS if k not in rec]
    if missing:
        return f"lacks {', '.join(missing)}"
    for key, tp in _FIELDS.items():
        if not isinstance(rec[key], tp) or (tp is int and isinstance(rec[key], bool)):
            return f"has {key} = {json.dumps(rec[key])[:40]}, not {_TYPE_NAMES.get(tp, 'a string or null')}"
    named = tuple(int(g) for g in _RECORD.search(file).groups())
    if (rec["task"], rec["num_tasks"]) != named or not 0 <= rec["task"] < rec["num_tasks"]:
        return f"holds task {rec['task']} of {rec['num_tasks']}, not task {named[0]} of {named[1]} as its name says"
    if not isinstance(rec["bad_records"].get("count"), int) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in rec["documents"].values()):
        return "has bad_records.count or documents that are not integers"
    for name, split in rec["splits"].items():
        if not (isinstance(split, dict) and isinstance(split.get("shards"), list) and all(
                isinstance(split.get(k), int) and not isinstance(split.get(k), bool)
                for k in ("num_samples", "num_tokens", "num_bytes"))):
            return f"has a split {name!r} without integer num_samples, num_tokens, num_bytes and a shards list"
    return None


def read_record(url: str, file: str, opts: dict) -> dict:
    """One task record, checked: a truncated or damaged one is a DataError naming its file."""
    where = join(url, "tasks/" + file)
    rerun = (f"re-run task {int(_RECORD.search(file).group(1))} (the same arguments and --num-tasks), then merge "
             f"again")
    try:
        rec = json.loads(read_bytes(where, opts))
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError: cut short or not text
        raise DataError(f"task record {where} is not valid JSON ({type(e).__name__}: {str(e)[:80]}): it was cut "
                        f"short or damaged; {rerun}") from None
    problem = _record_problem(rec, file)
    if problem:
        raise DataError(f"task record {where} {problem}: it is damaged or from another version; {rerun}")
    rec["_file"] = file
    return rec


def task_records(url: str, opts: dict) -> list[dict]:
    fs, base = filesystem(url, opts)
    tasks_dir = join(base, "tasks")
    fs.invalidate_cache(tasks_dir)
    try:
        names = with_retries(url, lambda: fs.ls(tasks_dir, detail=False), opts, what="list")
    except (StorageError, OSError):  # no tasks/ folder (or a file in its place): no record
        names = []
    return [read_record(url, name.rsplit("/", 1)[-1], opts) for name in sorted(n for n in names if _RECORD.search(n))]


def _check(url: str, records: list[dict]) -> int:
    if not records:
        raise DataError(f"{url}/tasks holds no task record: run python -m data_pipelines.text ... --out {url} "
                        f"(every task) before merging")
    runs = {(r["num_tasks"], r["fingerprint"]) for r in records}
    if len(runs) > 1:
        files = ", ".join(r["_file"] for r in records)
        raise DataError(f"the task records under {url}/tasks come from {len(runs)} different preparations (other "
                        f"inputs, settings, tokenizer or task count): {files}; delete the stale ones (or the whole "
                        f"tasks/ folder) and re-run the tasks")
    n = records[0]["num_tasks"]
    missing = sorted(set(range(n)) - {r["task"] for r in records})
    if missing:
        shown = ", ".join(str(i) for i in missing[:10]) + (" ..." if len(missing) > 10 else "")
        raise DataError(f"{len(missing)} of {n} tasks of {url} have not finished (task index {shown}); manifest.json "
                        f"is not written until they have: run or wait for them, then merge again")
    return n


def merge(url: str, opts: dict | None = None) -> dict:
    """Write ``<url>/manifest.json`` from the task records; returns the manifest."""
    opts = opts or storage_options()
    url = url.rstrip("/")
    records = sorted(task_records(url, opts), key=lambda r: r["task"])
    _check(url, records)
    first = records[0]
    splits: dict[str, dict] = {}
    docs: dict[str, int] = {}
    bad = 0
    for r in records:
        add_split_totals(splits, r["splits"])
        for k, v in r["documents"].items():
            docs[k] = docs.get(k, 0) + v
        bad += r["bad_records"]["count"]
    if not splits:
        raise DataError(f"the tasks of {url} wrote no tokens at all; check --input, --format and --field")
    extra = {"document_end": first["document_end"], "tokenizer_sha256": first["tokenizer_sha256"],
             "source": {"pipeline": "text", "tokenizer": first["tokenizer"], "tasks": first["num_tasks"],
                        "inputs": sum(r["inputs"] for r in records), "documents": docs, "bad_records": bad,
                        "fingerprint": first["fingerprint"], **first["settings"]}}
    m = build_manifest(first["name"], first["modality"], first["vocab_size"],
                       "tokenizer.model" if first["tokenizer_sha256"] else None, splits, extra)
    DatasetWriter(url, first["name"], first["modality"], first["vocab_size"], opts=opts, claim=False).write_manifest(m)
    return m


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_pipelines.merge", description=__doc__.splitlines()[0])
    p.add_argument("url", help="the --out of the tasks")
    p.add_argument("--s3-endpoint-url", default="", help="S3 endpoint; default AWS_ENDPOINT_URL")
    p.add_argument("--s3-region", default="", help="S3 region; default AWS_DEFAULT_REGION")
    args = p.parse_args(argv)
    m = merge(args.url, storage_options(endpoint_url=args.s3_endpoint_url, region=args.s3_region))
    print(summary(m, args.url) + f"\n  bytes per token {m['bytes_per_token']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
