"""Conversion throughput of a large checkpoint: DeepSpeed's files -> the per-parameter form (reshard.convert).

    .venv/bin/python benchmarks/convert_throughput.py [--d-model 896] [--work DIR] [--out FILE]

The source: the enwik8_xl Hourglass (configs/enwik8_xl.json: hierarchy 5@1 24@3 5@1, bf16, ZeRO-1) scaled up to
d_model = --d-model (d_ff = 4 d_model; 896: 377 M parameters), written by a real DeepSpeed engine on 2
data-parallel ranks (2 processes, gloo on CPU) after one optimizer step (one window of 64 tokens per rank), so
the Adam moments are those of a real step. Then:

1. the source's pages are dropped from the page cache (fsync, then posix_fadvise DONTNEED per file; fincore
   reports what stayed cached) and the source is read once sequentially: the disk's cold read rate;
2. dropped again, then ``convert(tag_dir)`` runs in a fresh process that does nothing else. Reported: seconds,
   MB/s (source bytes / seconds), the time inside torch.save of the parameter files (the rest is reading and
   gathering the memory-mapped partitions), peak RSS as ``getrusage(RUSAGE_SELF).ru_maxrss`` of that process
   (it counts the file pages of the memory-mapped source it touched) and peak RssAnon / RssFile sampled every
   10 ms from /proc/self/status (anonymous memory: what the conversion itself holds), and the time a later
   fsync of every output file takes (convert leaves them to the kernel's write-back).

--work DIR keeps the source checkpoint there and reuses it on the next run (a fresh conversion each time).
Prints a summary and writes benchmarks/results/convert_throughput.json.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import common  # noqa: E402

SEQ = 64


def overrides(d_model: int, ckpt: str) -> list[str]:
    return [f"model.d_model={d_model}", f"model.d_ff={4 * d_model}", f"data.seq_len={SEQ}",
            "parallel.pipeline_stages=1", "parallel.zero_stage=1", "train.micro_batch_size=1",
            "train.grad_accum_steps=1", "train.global_batch_size=2", f"checkpoint.dir={ckpt}",
            "tracking.enabled=false"]


def source_worker(ckpt: str, d_model: int) -> None:
    """One of the 2 data-parallel ranks: build the engine, take one optimizer step on random bytes, save."""
    import torch

    from hgscale.checkpoint.manager import CheckpointManager
    from hgscale.config import load_config
    from hgscale.training.ds_config import deepspeed_config
    from hgscale.training.engine import TrainEngine, init_distributed, world_from_env

    torch.set_num_threads(1)
    world = world_from_env()
    cfg = load_config(str(REPO / "configs" / "enwik8_xl.json"), overrides(d_model, ckpt))
    times = {}
    t0 = time.perf_counter()
    eng = TrainEngine(cfg, deepspeed_config(cfg, world), init_distributed(cfg))
    times["build_s"] = time.perf_counter() - t0
    params = sum(p.numel() for p in eng.engine.module.parameters())
    g = torch.Generator().manual_seed(eng.rt.rank)
    tokens = torch.randint(0, 256, (1, SEQ + 1), generator=g)
    t0 = time.perf_counter()
    loss = eng.train_step(iter([(tokens[:, :-1], tokens[:, 1:])]))
    times["step_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    CheckpointManager(cfg, eng, deepspeed_config(cfg, world)).save(1, {}, run_id=None)
    times["save_s"] = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("SOURCE " + json.dumps({"rank": eng.rt.rank, "params": params, "loss": loss, "peak_rss_mb": rss, **times}),
          flush=True)


def _status_kb(keys: tuple[str, ...]) -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in keys:
                out[k] = int(v.split()[0])
    return out


def convert_worker(tag_dir: str) -> None:
    """A fresh process that only converts: time, torch.save's share of it, peak memory."""
    import torch

    from hgscale.checkpoint.layout import fsync_tree
    from hgscale.checkpoint.reshard import convert

    keys = ("VmRSS", "RssAnon", "RssFile")
    peak = dict.fromkeys(keys, 0)
    base = _status_kb(keys)
    done = threading.Event()

    def sample():
        while not done.wait(0.01):
            for k, v in _status_kb(keys).items():
                peak[k] = max(peak[k], v)

    save, spent = torch.save, {"save_s": 0.0, "saves": 0}

    def timed_save(obj, f, *a, **kw):
        t = time.perf_counter()
        save(obj, f, *a, **kw)
        spent["save_s"] += time.perf_counter() - t
        spent["saves"] += 1

    torch.save = timed_save
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    conv, built = convert(tag_dir)
    secs = time.perf_counter() - t0
    done.set()
    sampler.join()
    torch.save = save
    t0 = time.perf_counter()
    fsync_tree(conv)
    fsync_s = time.perf_counter() - t0
    files = list((conv / "params").iterdir())
    big = max(files, key=lambda f: f.stat().st_size)
    shape = tuple(torch.load(big, weights_only=True)["fp32"].shape)
    print("CONVERT " + json.dumps({
        "seconds": secs, "built": built, **spent, "fsync_output_s": fsync_s,
        "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_mb": {k: v / 1024 for k, v in peak.items()}, "before_convert_mb": {k: v / 1024 for k, v in base.items()},
        "param_files": len(files), "bytes_out": sum(f.stat().st_size for f in files),
        "largest_param": {"name": big.stem, "shape": shape, "file_bytes": big.stat().st_size}}), flush=True)


def drop_cache(files: list[Path]) -> int:
    """Evict ``files`` from the page cache (they are fsynced, so clean); returns the bytes still cached (fincore)."""
    cached = 0
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        r = subprocess.run(["fincore", "--bytes", "--noheadings", "--raw", "--output", "RES", str(f)],
                           capture_output=True, text=True)
        cached += int(r.stdout.split()[0]) if r.returncode == 0 and r.stdout.strip() else 0
    return cached


def cold_read(files: list[Path]) -> dict:
    """Read ``files`` once, 16 MiB at a time, after dropping them from the page cache."""
    cached = drop_cache(files)
    n, t0 = 0, time.perf_counter()
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while chunk := fh.read(16 << 20):
                n += len(chunk)
    secs = time.perf_counter() - t0
    return {"bytes": n, "seconds": secs, "mb_s": n / 1e6 / secs, "cached_before_bytes": cached}


def make_source(work: Path, d_model: int, env: dict) -> dict:
    from hgscale.core.net import free_port

    ds = Path(sys.executable).parent / "deepspeed"
    ckpt = work / "ckpt"
    t0 = time.perf_counter()
    with open(work / "source.log", "w") as log:
        r = subprocess.run([str(ds), "--num_gpus", "2", "--master_port", str(free_port()), __file__,
                            "--source-worker", str(ckpt), "--d-model", str(d_model)], cwd=REPO, env=env,
                           stdout=log, stderr=subprocess.STDOUT, timeout=3600)
    text = (work / "source.log").read_text()
    if r.returncode:
        raise SystemExit(f"writing the checkpoint failed:\n{text[-4000:]}")
    ranks = [json.loads(line.split("SOURCE ", 1)[1]) for line in text.splitlines() if "SOURCE {" in line]
    return {"make_source_s": time.perf_counter() - t0, "ranks": sorted(ranks, key=lambda x: x["rank"])}


def main(argv: list[str] | None = None) -> None:
    ap = common.parser(__doc__)
    ap.add_argument("--d-model", type=int, default=896)
    ap.add_argument("--work", help="keep the source checkpoint here (reused when it holds one)")
    common.add_out(ap, "convert_throughput")
    ap.add_argument("--source-worker", help=argparse.SUPPRESS)
    ap.add_argument("--convert-worker", help=argparse.SUPPRESS)
    ap.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.source_worker:
        return source_worker(args.source_worker, args.d_model)
    if args.convert_worker:
        return convert_worker(args.convert_worker)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    tmp = None if args.work else tempfile.mkdtemp(prefix="convert_throughput.")
    work = Path(args.work or tmp)
    work.mkdir(parents=True, exist_ok=True)
    try:
        tag = work / "ckpt" / "step00000001"
        result = {"command": common.command(__file__, argv), "machine": f"{os.cpu_count()} cores",
                  "d_model": args.d_model}
        if not (tag / "COMPLETE").exists():
            result["source_build"] = make_source(work, args.d_model, env)
        shutil.rmtree(tag / "elastic", ignore_errors=True)
        files = sorted(f for f in tag.iterdir() if f.is_file() and f.suffix == ".pt")
        result["source_files"] = {f.name: f.stat().st_size for f in files}
        result["source_bytes"] = src = sum(result["source_files"].values())
        result["cold_read"] = cold_read(files)
        result["cached_before_convert_bytes"] = drop_cache(files)
        r = subprocess.run([sys.executable, __file__, "--convert-worker", str(tag)], cwd=REPO, env=env, check=True,
                           capture_output=True, text=True, timeout=3600)
        c = json.loads(r.stdout.split("CONVERT ", 1)[1])
        c["mb_s"] = src / 1e6 / c["seconds"]
        result["conversion"] = c
        report(result)
        common.write_result(args.out, result)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


def report(r: dict) -> None:
    c, cold, big = r["conversion"], r["cold_read"], r["conversion"]["largest_param"]
    if "source_build" in r:
        b = r["source_build"]
        print(f"source: {b['ranks'][0]['params'] / 1e6:.1f} M parameters (d_model {r['d_model']}), written by 2 "
              f"ranks in {b['make_source_s']:.0f} s; per rank: " + "; ".join(
                  f"build {x['build_s']:.0f} s, step {x['step_s']:.0f} s, save {x['save_s']:.0f} s, peak RSS "
                  f"{x['peak_rss_mb']:.0f} MB" for x in b["ranks"]))
    print(f"source files: {r['source_bytes'] / 1e9:.2f} GB; cold sequential read {cold['mb_s']:.0f} MB/s "
          f"({cold['cached_before_bytes'] / 1e6:.0f} MB cached before it); cached before converting: "
          f"{r['cached_before_convert_bytes'] / 1e6:.0f} MB")
    print(f"convert: {c['seconds']:.1f} s = {c['mb_s']:.0f} MB/s; torch.save of {c['saves']} parameter files "
          f"{c['save_s']:.1f} s, reading and gathering {c['seconds'] - c['save_s']:.1f} s; fsync of the output "
          f"afterwards {c['fsync_output_s']:.1f} s; {c['bytes_out'] / 1e9:.2f} GB written")
    print(f"memory: ru_maxrss {c['ru_maxrss_mb']:.0f} MB; sampled peak RssAnon {c['peak_mb']['RssAnon']:.0f} MB "
          f"(before converting {c['before_convert_mb']['RssAnon']:.0f}), RssFile {c['peak_mb']['RssFile']:.0f} MB; "
          f"largest parameter {big['name']} {big['shape']}: {big['file_bytes'] / 1e6:.1f} MB of state")


if __name__ == "__main__":
    main()
