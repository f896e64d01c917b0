"""Elastic resume: checkpoint conversion cost, and the data read amplification of the global order.

    .venv/bin/python benchmarks/elastic_resume.py [--corpora 256:equal,256:uneven,64:equal,8:equal]
                                                  [--ranks 1-16] [--skip-conversion] [--out FILE]

1. Read amplification: synthetic byte corpora of N shards each (equal: 32 KiB each as the writer cuts them, the
   last one 13 KiB; uneven: 16-48 KiB drawn uniformly), read for one epoch by D = 1 ... 16 simulated
   data-parallel ranks (each rank's real stream, in this process, one after the other), windows of 512 tokens.
   The global batch G of a row is the smallest multiple of lcm(L, D) >= 64 (L: the split's lanes; a stream
   needs D | G, the order's lane rounds L | G). Every shard load of epoch 0 is counted with its size:
   amplification = bytes read by all ranks / bytes in the split (1.0 = each shard read once). Beside it:
   ``lane_reads(L, D)`` (lanes read over lanes there are) and the plan's own count (the shards of every block
   of every lane a rank's slices touch, from order.EpochPlan, without reading). Goal: <= 1.1 at D = 16.
2. Conversion: the enwik8_xl model (configs/enwik8_xl.json, 123 M parameters, bf16, ZeRO-1) as a checkpoint
   of 4 pipeline stages x 2 data-parallel ranks (8 real processes on gloo; the engine's Adam state initialised,
   no training step), converted into the layout-free per-parameter form that any other layout (1 x 8 here)
   loads. Reported: wall time and peak RSS of the converting process (a fresh one). Goal: < 60 s.
   (A 377 M-parameter checkpoint after a real step: benchmarks/convert_throughput.py.)
Prints tables and writes benchmarks/results/elastic_resume.json (--out).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import common  # noqa: E402
import numpy as np  # noqa: E402

G_MIN, SEQ = 64, 512


def global_batch(lanes: int, dp: int) -> int:
    """The smallest multiple of lcm(lanes, dp) that is >= G_MIN."""
    step = math.lcm(lanes, dp)
    return -(-G_MIN // step) * step


def plan_reads(plan, G: int, dp: int, sizes: list[int]) -> int:
    """Bytes the ranks read per the plan: for every (rank, lane) its slices touch, the shards of every block
    holding a window it takes (reader._Lane keeps a shard two neighbouring blocks share)."""
    total = 0
    for rank in range(dp):
        touched: dict[int, set[int]] = {}
        for off in range(0, plan.usable(G), G):
            for lane, idx in plan.rank_slots(off, G, rank, dp):
                touched.setdefault(int(lane), set()).add(int(idx) // plan.block)
        for lane, blocks in touched.items():
            shards = {s for j in blocks for s in plan.block_shards(lane, j)}
            total += sum(sizes[s] for s in shards)
    return total


def amplification(root: Path, dp: int) -> dict:
    from hgscale.config import DataConfig
    from hgscale.data import open_dataset, reader
    from hgscale.data.order import EpochPlan, lane_count, lane_reads

    ds = open_dataset(DataConfig(url=str(root), num_workers=0))
    sizes = [int(s["size"]) for s in ds.manifest["splits"]["train"]["shards"]]
    G = global_batch(lane_count(len(sizes)), dp)
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
    split = sum(sizes)
    return {"shards": len(sizes), "dp": dp, "lanes": plan.n_lanes, "global_batch": G, "batches_per_epoch": batches,
            "bytes_read": read["bytes"], "bytes_in_split": split, "amplification": read["bytes"] / split,
            "plan": plan_reads(plan, G, dp, sizes) / split, "lane_reads": lane_reads(plan.n_lanes, dp),
            "seconds": secs}


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


def amplification_table(work: Path, corpora: list[tuple[int, str]], ranks: list[int]) -> list[dict]:
    rows = []
    print(f"read amplification, one epoch, windows of {SEQ} tokens, G = the smallest multiple of lcm(L, D) >= {G_MIN}:")
    print(f"{'shards':>10} {'D':>3} {'L':>3} {'G':>4} {'batches':>8} {'MB read':>8} {'MB split':>9} "
          f"{'measured':>9} {'plan':>7} {'lane_reads':>11}")
    for n, kind in corpora:
        root = work / f"{n}_{kind}"
        write_corpus(root, n, kind == "uneven")
        for dp in ranks:
            r = {"corpus": kind, **amplification(root, dp)}
            rows.append(r)
            print(f"{n:>4} {kind:>5} {dp:>3} {r['lanes']:>3} {r['global_batch']:>4} {r['batches_per_epoch']:>8} "
                  f"{r['bytes_read'] / 1e6:>8.2f} {r['bytes_in_split'] / 1e6:>9.2f} {r['amplification']:>9.3f} "
                  f"{r['plan']:>7.3f} {r['lane_reads']:>11.3f}", flush=True)
    return rows


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


def parse_ranks(spec: str) -> list[int]:
    """'1-16' or '1,4,16'."""
    lo, _, hi = spec.partition("-")
    return list(range(int(lo), int(hi) + 1)) if hi else [int(x) for x in spec.split(",")]


def main(argv: list[str] | None = None) -> None:
    ap = common.parser(__doc__)
    ap.add_argument("--corpora", default="256:equal,256:uneven,64:equal,8:equal",
                    help="shards:equal|uneven, comma-separated")
    ap.add_argument("--ranks", default="1-16", help="data-parallel sizes: '1-16' or '1,4,16'")
    ap.add_argument("--skip-conversion", action="store_true")
    common.add_out(ap, "elastic_resume")
    ap.add_argument("--source-worker", help=argparse.SUPPRESS)
    ap.add_argument("--convert-worker", help=argparse.SUPPRESS)
    ap.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.source_worker:
        return source_worker(args.source_worker)
    if args.convert_worker:
        return convert_worker(args.convert_worker)
    corpora = [(int(n), kind) for n, _, kind in (c.partition(":") for c in args.corpora.split(","))]
    result = {"command": common.command(__file__, argv), "machine": f"{os.cpu_count()} cores", "seq_len": SEQ,
              "global_batch": f"smallest multiple of lcm(lanes, D) >= {G_MIN}"}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        result["amplification"] = amplification_table(work, corpora, parse_ranks(args.ranks))
        if not args.skip_conversion:
            c = conversion(work)
            result["conversion"] = c
            print(f"\nconversion of enwik8_xl ({c['source']}, {c['source_bytes'] / 1e9:.2f} GB of DeepSpeed files; "
                  f"written by 8 processes in {c['make_source_s']:.0f} s):")
            print(f"  {c['seconds']:.1f} s, peak RSS {c['peak_rss_mb']:.0f} MB, {c['param_files']} parameter files, "
                  f"{c['bytes'] / 1e9:.2f} GB")
    common.write_result(args.out, result, indent=1)


if __name__ == "__main__":
    main()
