"""Elastic resume: checkpoint conversion cost, and the data read amplification of the global order.

    .venv/bin/python benchmarks/elastic_resume.py [--shards 256] [--skip-conversion]

1. Read amplification: a synthetic byte corpus of --shards shards (equal: 32 KiB each as the writer cuts them, the
   last one shorter; uneven: 16-48 KiB drawn uniformly), read for one epoch by D = 1, 4 and 16 simulated
   data-parallel ranks (each rank's real stream, in this process, one after the other), global batch 64 x 512
   tokens. Every shard load of epoch 0 is counted with its size: amplification = bytes read by all ranks / bytes
   in the split (1.0 = each shard read once). Goal: <= 1.1 at D = 16.
2. Conversion: the enwik8_xl model (configs/enwik8_xl.json, 123 M parameters, bf16, ZeRO-1) as a checkpoint
   of 4 pipeline stages x 2 data-parallel ranks (8 real processes on gloo; the engine's Adam state initialised,
   no training step), converted into the layout-free per-parameter form that any other layout (1 x 8 here)
   loads. Reported: wall time and peak RSS of the converting process (a fresh one). Goal: < 60 s.
Prints a table and writes benchmarks/results/elastic_resume.json.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

G, SEQ = 64, 512


def amplification(root: Path, dp: int) -> dict:
    from hgscale.config import DataConfig
    from hgscale.data import open_dataset, reader
    from hgscale.data.order import EpochPlan

    ds = open_dataset(DataConfig(url=str(root), num_workers=0))
    sizes = [int(s["size"]) for s in ds.manifest["splits"]["train"]["shards"]]
    read = {"bytes": 0}
    original = reader._Reader.shard

    def counted(self, epoch, idx):
        if epoch == 0:  # the prefetching producer may already read into the next epoch
            read["bytes"] += sizes[idx]
        return original(self, epoch, idx)

    reader._Reader.shard = counted
    try:
        probe = ds.stream("train", G // dp, SEQ, 0, dp, seed=1, global_batch_size=G)
        plan = EpochPlan(probe._spec, 0)
        batches = plan.usable(G) // G
        t0 = time.perf_counter()
        for rank in range(dp):
            it = iter(ds.stream("train", G // dp, SEQ, rank, dp, seed=1, global_batch_size=G))
            for _ in range(batches):
                next(it)
            it.close()
        secs = time.perf_counter() - t0
    finally:
        reader._Reader.shard = original
    return {"dp": dp, "lanes": plan.n_lanes, "batches_per_epoch": batches, "bytes_read": read["bytes"],
            "bytes_in_split": sum(sizes), "amplification": read["bytes"] / sum(sizes), "seconds": secs}


def write_corpus(root: Path, shards: int, uneven: bool) -> None:
    """Shards as DatasetWriter cuts them (32 KiB each, the last one 13 KiB), or (uneven) of 16-48 KiB drawn
    uniformly: lanes of whole shards then run dry at different times."""
    from data_pipelines.shards import DatasetWriter

    rng = np.random.default_rng(0)
    with DatasetWriter(str(root), name="synthetic", modality="text_bytes", vocab_size=256, shard_bytes=1) as w:
        for _ in range(shards):
            n = int(rng.integers(16 << 10, 48 << 10)) if uneven else (32 << 10 if _ < shards - 1 else 13 << 10)
            w.add("train", rng.integers(0, 256, n, dtype=np.uint8))
        w.add("valid", rng.integers(0, 256, 4096, dtype=np.uint8))
        w.add("test", rng.integers(0, 256, 4096, dtype=np.uint8))


# ----------------------------------------------------------------------------------- conversion
def source_worker(ckpt: str) -> None:
    """One rank of the 4 x 2 enwik8_xl job: build the engine, initialise Adam's state, save."""
    import torch

    from hgscale.checkpoint.manager import CheckpointManager
    from hgscale.checkpoint.reshard import link_zero_optimizer_state
    from hgscale.config import load_config
    from hgscale.training.ds_config import deepspeed_config
    from hgscale.training.engine import TrainEngine, init_distributed, world_from_env

    torch.set_num_threads(1)
    world = world_from_env()
    cfg = load_config(str(REPO / "configs" / "enwik8_xl.json"),
                      ["data.seq_len=64", f"checkpoint.dir={ckpt}", "tracking.enabled=false"])
    eng = TrainEngine(cfg, deepspeed_config(cfg, world), init_distributed(cfg))
    link_zero_optimizer_state(eng.engine.optimizer)  # Adam's moments exist (zeros), as after a first step
    CheckpointManager(cfg, eng, deepspeed_config(cfg, world)).save(1, {}, run_id=None)


def convert_worker(tag_dir: str) -> None:
    from hgscale.checkpoint.reshard import convert

    t0 = time.perf_counter()
    conv, built = convert(tag_dir)
    secs = time.perf_counter() - t0
    files = list((conv / "params").iterdir())
    print(json.dumps({"seconds": secs, "built": built, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                      / 1024, "param_files": len(files), "bytes": sum(f.stat().st_size for f in files)}))


def conversion(work: Path) -> dict:
    from hgscale.core.net import free_port

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    ds = Path(sys.executable).parent / "deepspeed"
    ckpt = work / "xl_ckpt"
    t0 = time.perf_counter()
    with open(work / "source.log", "w") as log:
        r = subprocess.run([str(ds), "--num_gpus", "8", "--master_port", str(free_port()), __file__,
                            "--source-worker", str(ckpt)], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                           timeout=1800)
    if r.returncode:
        raise SystemExit(f"writing the 4 x 2 checkpoint failed:\n{(work / 'source.log').read_text()[-4000:]}")
    make_s = time.perf_counter() - t0
    tag = ckpt / "step00000001"
    src = sum(f.stat().st_size for f in tag.iterdir() if f.is_file())
    r = subprocess.run([sys.executable, __file__, "--convert-worker", str(tag)], cwd=REPO, env=env, check=True,
                       capture_output=True, text=True, timeout=1800)
    out = json.loads(r.stdout.strip().splitlines()[-1])
    meta = json.loads((tag / "hgscale.json").read_text())["topology"]
    return {"source": f"{meta['pipeline_stages']} stages x {meta['data_parallel_size']} data-parallel, ZeRO-"
                      f"{meta['zero_stage']}", "source_bytes": src, "make_source_s": make_s, **out}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shards", type=int, default=256)
    ap.add_argument("--skip-conversion", action="store_true")
    ap.add_argument("--source-worker", help=argparse.SUPPRESS)
    ap.add_argument("--convert-worker", help=argparse.SUPPRESS)
    ap.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.source_worker:
        return source_worker(args.source_worker)
    if args.convert_worker:
        return convert_worker(args.convert_worker)
    result = {"machine": f"{os.cpu_count()} cores", "global_batch": G, "seq_len": SEQ}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        rows = []
        for shards in ("equal", "uneven"):
            write_corpus(work / shards, args.shards, shards == "uneven")
            rows += [{"shards": shards, **amplification(work / shards, dp)} for dp in (1, 4, 16)]
        result["amplification"] = rows
        print(f"read amplification, one epoch, {args.shards} shards (equal: 32 KiB, the last 13; uneven: 16-48 KiB), "
              f"global batch {G} x {SEQ}:")
        print(f"{'shards':>7} {'ranks':>6} {'lanes':>6} {'batches':>8} {'MB read':>9} {'MB split':>9} "
              f"{'amplification':>14}")
        for r in rows:
            print(f"{r['shards']:>7} {r['dp']:>6} {r['lanes']:>6} {r['batches_per_epoch']:>8} "
                  f"{r['bytes_read'] / 1e6:>9.2f} {r['bytes_in_split'] / 1e6:>9.2f} {r['amplification']:>14.3f}")
        if not args.skip_conversion:
            c = conversion(work)
            result["conversion"] = c
            print(f"\nconversion of enwik8_xl ({c['source']}, {c['source_bytes'] / 1e9:.2f} GB of DeepSpeed files; "
                  f"written by 8 processes in {c['make_source_s']:.0f} s):")
            print(f"  {c['seconds']:.1f} s, peak RSS {c['peak_rss_mb']:.0f} MB, {c['param_files']} parameter files, "
                  f"{c['bytes'] / 1e9:.2f} GB")
    out = REPO / "benchmarks" / "results" / "elastic_resume.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"\nwrote {out.relative_to(REPO)}")


if __name__ == "__main__":
    main()
