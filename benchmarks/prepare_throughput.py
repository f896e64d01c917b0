"""Text pipeline throughput and memory: MB/s of raw text per worker, and peak RSS against corpus size.

    .venv/bin/python benchmarks/prepare_throughput.py [--mb 32]

The corpus is the Python reference manual's paragraphs (``pydoc_data.topics``) as JSONL records, repeated to
``--mb`` MB of text in 8 files (1x) and to 4x that. Each run is one ``python -m data_pipelines.text`` process,
timed from start to exit (start-up included); MB/s per worker = text bytes / wall seconds / workers. The
SentencePiece model (vocab 8000, unigram) is trained once beforehand with ``--tokenizer-only`` and reused, so
the runs time tokenizing and writing only. CPU seconds are those of all the run's processes (a loaded machine
stretches wall time, not CPU time); peak RSS is the largest process of the run (os.wait4). Everything is
measured side by side in this one run. Prints a table, writes benchmarks/results/prepare_throughput.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data_pipelines.demo_corpus import corpus_bytes  # noqa: E402

FILES = 8


def paragraphs() -> list[str]:
    out = []
    for para in corpus_bytes().decode().split("\n\n"):
        lines = [ln for ln in para.split("\n") if ln.strip()]
        if lines:
            out.append("\n".join(lines))
    return out


def write_corpus(root: Path, mb: float) -> int:
    """JSONL files holding ``mb`` MB of text; returns the text bytes."""
    docs = paragraphs()
    lines = [json.dumps({"text": d}) + "\n" for d in docs]
    unit = sum(len(d.encode()) for d in docs)
    copies = max(1, round(mb * 1e6 / unit))
    root.mkdir(parents=True)
    for i in range(FILES):
        with open(root / f"part-{i:02d}.jsonl", "w") as f:
            for _ in range(i, copies, FILES):
                f.writelines(lines)
    return unit * copies


def run(args: list[str]) -> tuple[float, float, float]:
    """(wall seconds, CPU seconds of all its processes, peak RSS MB of the largest) of one preparation."""
    t0 = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-m", "data_pipelines.text", *args], cwd=REPO, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE)
    _, status, usage = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(p.stderr.read().decode()[-2000:])
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=32.0, help="text of the 1x corpus, MB")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sizes = {"1x": write_corpus(tmp / "c1", args.mb), "4x": write_corpus(tmp / "c4", 4 * args.mb)}
        run(["--input", str(tmp / "c1"), "--out", str(tmp / "tok"), "--tokenizer", "sentencepiece",
             "--vocab-size", "8000", "--tokenizer-sample-bytes", "4000000", "--tokenizer-only"])
        tok = {"bytes": [], "sentencepiece": ["--tokenizer-model", str(tmp / "tok" / "tokenizer.model")]}
        rows = []
        for tokenizer, extra in tok.items():
            for corpus, workers in (("1x", 1), ("1x", 2), ("4x", 1)):
                wall, cpu, rss = run(["--input", str(tmp / f"c{corpus[0]}"), "--out", str(tmp / "out"), "--tokenizer",
                                 tokenizer, "--workers", str(workers), *extra])
                mb = sizes[corpus] / 1e6
                rows.append({"tokenizer": tokenizer, "corpus": corpus, "text_mb": round(mb, 1), "workers": workers,
                             "seconds": round(wall, 2), "mb_per_s": round(mb / wall, 2),
                             "mb_per_s_per_worker": round(mb / wall / workers, 2), "cpu_s": round(cpu, 2),
                             "mb_per_cpu_s": round(mb / cpu, 2), "peak_rss_mb": round(rss, 1)})
    print(f"{'tokenizer':14s} {'corpus':>6s} {'text MB':>8s} {'workers':>7s} {'s':>7s} {'MB/s':>7s} "
          f"{'MB/s/worker':>11s} {'CPU s':>7s} {'MB/CPU-s':>8s} {'peak RSS MB':>11s}")
    for r in rows:
        print(f"{r['tokenizer']:14s} {r['corpus']:>6s} {r['text_mb']:8.1f} {r['workers']:7d} {r['seconds']:7.2f} "
              f"{r['mb_per_s']:7.2f} {r['mb_per_s_per_worker']:11.2f} {r['cpu_s']:7.2f} {r['mb_per_cpu_s']:8.2f} "
              f"{r['peak_rss_mb']:11.1f}")
    out = REPO / "benchmarks" / "results" / "prepare_throughput.json"
    out.write_text(json.dumps({"cpus": os.cpu_count(), "files": FILES, "rows": rows}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
