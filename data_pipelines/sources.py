"""Raw text inputs of the text pipeline: listing, formats, compression, documents, bad records.

    files = list_inputs(["s3://bucket/crawl/*.jsonl.zst", "books/"], opts)   # [(url, size)], deterministic order
    for doc in read_documents(url, fmt="auto", field="text", txt_document="blank-line", bad=BadRecords("error")):
        ...                                                                  # one str per document

What a document is (README "Data"):
- jsonl: one JSON object per line; the document is its ``--field`` (a string; ``a.b`` reaches into objects).
- parquet: one row; the document is the ``--field`` column (a string).
- txt: ``--txt-document blank-line`` (default): lines up to an empty line (nothing but spaces, tabs, \\r, \\f,
  \\v); ``line``: every line;
  ``file``: the whole file. The document is its lines joined by "\\n" (no trailing newline).
Empty documents are dropped. Compression follows the name: ``.gz``, ``.bz2``, ``.zst`` (streamed, never
unpacked to disk). Bad records (a record without the field or not a string, a line that is not UTF-8 or not
JSON, an input that cannot be read or holds nothing) go to :class:`BadRecords`, which stops at the first
(``error``) or counts and reports each with its file and line (``skip``); of an input that breaks off
half-way, the documents before the break are kept.
"""
from __future__ import annotations

import bz2
import gzip
import io
import json
import logging
from typing import Iterator

from hgscale.data.errors import DataError
from hgscale.data.io import StorageError, filesystem, user_error, with_retries

log = logging.getLogger("data_pipelines")

FORMATS = ("auto", "txt", "jsonl", "parquet")
TXT_DOCUMENTS = ("blank-line", "line", "file")
COMPRESSIONS = {".gz": "gzip", ".bz2": "bz2", ".zst": "zstd"}
_EXT_FORMAT = {".txt": "txt", ".text": "txt", ".md": "txt", ".jsonl": "jsonl", ".ndjson": "jsonl",
               ".json": "jsonl", ".parquet": "parquet", ".pq": "parquet"}
REPORTED = 20  # bad records named one by one in the log; the rest are only counted


class BadRecords:
    """Bad input records: ``error`` raises DataError naming the first; ``skip`` counts and reports them."""

    def __init__(self, policy: str = "error"):
        if policy not in ("error", "skip"):
            raise DataError(f"--on-bad-record {policy!r} is not one of error, skip")
        self.policy, self.count, self.examples = policy, 0, []

    def add(self, where: str, why: str) -> None:
        msg = f"{where}: {why}"
        if self.policy == "error":
            raise DataError(f"bad record at {msg} (pass --on-bad-record skip to skip and count such records)")
        self.count += 1
        if len(self.examples) < REPORTED:
            self.examples.append(msg)
            log.warning("skipped bad record at %s", msg)

    def state(self) -> dict:
        return {"count": self.count, "examples": list(self.examples)}


def _is_glob(s: str) -> bool:
    return any(c in s for c in "*?[")


def _expand(pat: str, opts: dict) -> list[tuple[str, int]]:
    """(path without protocol, size) of the files one --input names, sorted."""
    fs, path = filesystem(pat, opts)
    if _is_glob(path):
        found = with_retries(pat, lambda: fs.glob(path, detail=True), opts, what="list")
        entries = sorted((p, i.get("size") or 0) for p, i in found.items() if i.get("type") != "directory")
        if not entries:
            raise DataError(f"--input {pat} matches no file; check the pattern (quote it so the shell does not "
                            f"expand it)")
        return entries
    try:
        info = with_retries(pat, lambda: fs.info(path), opts, what="read")
    except (StorageError, FileNotFoundError):
        raise DataError(f"--input {pat} does not exist; pass existing files, directories or globs") from None
    if info.get("type") != "directory":
        return [(path, info.get("size") or 0)]
    entries = sorted(with_retries(pat, lambda: fs.find(path, detail=True), opts, what="list").items())
    if not entries:
        raise DataError(f"--input {pat} is an empty directory")
    return [(p, i.get("size") or 0) for p, i in entries]


def list_inputs(patterns: list[str], opts: dict) -> list[tuple[str, int]]:
    """(URL, size in bytes) of every input file: patterns in the order given, each glob or directory
    expanded in sorted order, duplicates dropped. Every task of a parallel preparation computes the same list."""
    out, seen = [], set()
    for pat in patterns:
        proto = pat.split("://", 1)[0] + "://" if "://" in pat else ""
        for p, size in _expand(pat, opts):
            url = proto + p  # fsspec paths carry no protocol: put back the one given
            if url not in seen:
                seen.add(url)
                out.append((url, int(size)))
    return out


def split_name(url: str) -> tuple[str, str | None]:
    """(format by extension or '', compression or None) of an input name."""
    name = url.rsplit("/", 1)[-1].lower()
    comp = None
    for ext, c in COMPRESSIONS.items():
        if name.endswith(ext):
            comp, name = c, name[: -len(ext)]
    dot = name.rfind(".")
    return (_EXT_FORMAT.get(name[dot:], "") if dot >= 0 else ""), comp


def input_format(url: str, fmt: str) -> str:
    if fmt not in FORMATS:
        raise DataError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    if fmt != "auto":
        return fmt
    found, _ = split_name(url)
    if not found:
        raise DataError(f"cannot tell the format of input {url} from its name; pass --format txt, jsonl or parquet")
    return found


def _open_binary(url: str, opts: dict):
    """A streaming binary reader of the decompressed content of ``url``."""
    fs, path = filesystem(url, opts)
    raw = with_retries(url, lambda: fs.open(path, "rb"), opts)
    comp = split_name(url)[1]
    if comp == "gzip":
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if comp == "bz2":
        return bz2.BZ2File(raw, "rb")
    if comp == "zstd":
        import zstandard
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True),
                                 buffer_size=1 << 20)
    return io.BufferedReader(raw, buffer_size=1 << 20) if not isinstance(raw, io.BufferedReader) else raw


BLOCK_BYTES = 1 << 20  # decompressed text decoded and split at once: per-line Python work only where needed
_BLANK = " \t\r\f\v"  # a line of only these is empty (ends a blank-line document)


def _line_blocks(url: str, opts: dict, bad: BadRecords) -> Iterator[tuple[int, list[str]]]:
    """(1-based number of the first line, lines without their newline) of consecutive runs of complete
    lines; a line that is not UTF-8 goes to ``bad`` and is left out (its run restarts after it)."""
    with _open_binary(url, opts) as f:
        carry, no = b"", 1
        while True:
            chunk = f.read(BLOCK_BYTES)
            buf = carry + chunk
            cut = buf.rfind(b"\n") + 1 if chunk else len(buf)
            block, carry = buf[:cut], buf[cut:]
            if block:
                lines = block.split(b"\n")
                if block.endswith(b"\n"):
                    lines.pop()
                yield from _decode_lines(url, no, block, lines, bad)
                no += len(lines)
            if not chunk:
                return


def _decode_lines(url: str, no: int, block: bytes, lines: list[bytes], bad: BadRecords):
    try:
        yield no, block.decode("utf-8").split("\n")[:len(lines)]
        return
    except UnicodeDecodeError:
        pass
    run: list[str] = []  # the slow path, line by line, for a block holding a bad line
    start = no
    for i, raw in enumerate(lines):
        try:
            run.append(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            if run:  # the lines before it first: bad records are reported in file order
                yield start, run
            bad.add(f"{url} line {no + i}", f"not UTF-8 ({e.reason} at byte {e.start})")
            run, start = [], no + i + 1
    if run:
        yield start, run


def _txt_documents(url: str, opts: dict, mode: str, bad: BadRecords) -> Iterator[str]:
    if mode not in TXT_DOCUMENTS:
        raise DataError(f"--txt-document {mode!r} is not one of {', '.join(TXT_DOCUMENTS)}")
    cur: list[str] = []  # lines of the document being read (it may span blocks)
    for _, lines in _line_blocks(url, opts, bad):
        if mode == "line":
            yield from lines
        elif mode == "file":
            cur += lines
        else:
            ends = [i for i, ln in enumerate(lines) if not ln.strip(_BLANK)]
            start = 0
            for e in ends:
                cur += lines[start:e]
                if cur:
                    yield "\n".join(cur)
                cur, start = [], e + 1
            cur += lines[start:]
    if cur:
        yield "\n".join(cur)


def _field(obj, field: str):
    for part in field.split("."):
        if not isinstance(obj, dict) or part not in obj:
            return None
        obj = obj[part]
    return obj


def _jsonl_documents(url: str, opts: dict, field: str, bad: BadRecords) -> Iterator[str]:
    for first, lines in _line_blocks(url, opts, bad):
        for no, line in enumerate(lines, first):
            if not line.strip(_BLANK):
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                bad.add(f"{url} line {no}", f"not JSON ({e.msg})")
                continue
            text = _field(obj, field)
            if not isinstance(text, str):
                what = "has no field" if text is None else f"has a {type(text).__name__}, not a string, in field"
                bad.add(f"{url} line {no}", f"the record {what} {field!r} (set --field)")
                continue
            yield text


def _parquet_documents(url: str, opts: dict, field: str, bad: BadRecords) -> Iterator[str]:
    import pyarrow.parquet as pq
    if split_name(url)[1]:
        raise DataError(f"input {url}: Parquet files compress their columns themselves; pass the .parquet file "
                        f"without .gz/.bz2/.zst")
    fs, path = filesystem(url, opts)
    with with_retries(url, lambda: fs.open(path, "rb"), opts) as f:
        pf = pq.ParquetFile(f)
        top = field.split(".")[0]
        if top not in pf.schema_arrow.names:
            raise DataError(f"input {url} has no column {top!r} (it has {', '.join(pf.schema_arrow.names)}); "
                            f"set --field")
        row = 0
        for batch in pf.iter_batches(batch_size=1024, columns=[top]):
            for value in batch.column(0).to_pylist():
                row += 1
                text = _field({top: value}, field)
                if not isinstance(text, str):
                    what = "null" if text is None else f"a {type(text).__name__}, not a string"
                    bad.add(f"{url} row {row}", f"field {field!r} is {what} (set --field)")
                    continue
                yield text


def read_documents(url: str, opts: dict, fmt: str, field: str, txt_document: str, bad: BadRecords
                   ) -> Iterator[str]:
    """Every non-empty document of one input, in file order. An input that cannot be read (corrupt
    compression, missing, denied) or yields no document is a bad record naming the file."""
    kind = input_format(url, fmt)
    n = 0
    try:
        if kind == "txt":
            docs = _txt_documents(url, opts, txt_document, bad)
        elif kind == "jsonl":
            docs = _jsonl_documents(url, opts, field, bad)
        else:
            docs = _parquet_documents(url, opts, field, bad)
        for doc in docs:
            if doc:
                n += 1
                yield doc
    except StorageError:
        raise
    except Exception as e:  # noqa: BLE001 - zlib/bz2/zstd/arrow errors of corrupt or truncated data have no common base
        err = user_error(url, e)
        bad.add(f"{url}", str(err) if err else f"cannot be read ({type(e).__name__}: {str(e)[:160]})")
        return
    if n == 0:
        bad.add(url, f"holds no document ({kind}; check --format / --field)")
