"""Checkpoint stall seen by the training loop: a local checkpoint.dir against s3:// (a moto server on loopback).

    python -m data_pipelines.demo_corpus --out data/demo
    python benchmarks/checkpoint_stall.py [--models demo,100m] [--saves 3] [--gap 6]

One process (DeepSpeed engine, ZeRO-1, world of one), one run, per model: `--saves` checkpoints into a local
directory with `--gap` training steps between them, then the same into s3://. The stall of one checkpoint is the
time the training loop waits in CheckpointManager.save: the whole write for a local directory; for s3:// the
node-local staging write plus any wait for the previous upload (back-pressure), while the upload itself runs in
a background thread during the next steps. Reported per model: median step time, median stall per checkpoint
(and as a fraction of a step), checkpoint size, and the wait at the end of the run for the last upload.
moto_server runs as its own process, so uploads compete with training for the cores as a real endpoint's
network stack would not (a conservative figure). Goal: s3 stall <= 1.2 x local stall.
Prints a table; writes benchmarks/results/checkpoint_stall.json.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hgscale.config import load_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "checkpoint_stall.json"
MODELS = {  # name: overrides of configs/demo.json
    "demo": [],
    "100m": ["model.d_model=512", "model.n_heads=8", "model.d_ff=2048", "model.hierarchy=5@1 24@3 5@1",
             "model.max_seq_len=256", "data.seq_len=256", "train.micro_batch_size=1"],  # the paper's enwik8 shape
}


def start_moto() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = Path(sys.executable).with_name("moto_server")
    proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.1)
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench-secret", AWS_DEFAULT_REGION="us-east-1",
                      AWS_ENDPOINT_URL=url)
    import boto3
    boto3.client("s3", endpoint_url=url).create_bucket(Bucket="bench")
    return proc, url


def measure(cfg, eng, ds_json, it, stream, saves: int, gap: int, first_step: int) -> dict:
    from hgscale.checkpoint.manager import CheckpointManager

    mgr = CheckpointManager(cfg, eng, ds_json)
    steps, stalls, size = [], [], 0
    step = first_step
    for _ in range(saves):
        for _ in range(gap):
            t0 = time.perf_counter()
            eng.train_step(it)
            steps.append(time.perf_counter() - t0)
            step += 1
        t0 = time.perf_counter()
        tag_dir = mgr.save(step, {"data": stream.state_dict()}, None)
        stalls.append(time.perf_counter() - t0)
        if mgr.remote is None or tag_dir.exists():
            size = max(size, sum(f.stat().st_size for f in tag_dir.rglob("*") if f.is_file()))
    t0 = time.perf_counter()
    if mgr.remote is not None:
        mgr.remote.wait()
    return {"step_s": statistics.median(steps), "stall_s": statistics.median(stalls), "stalls_s": stalls,
            "end_wait_s": time.perf_counter() - t0, "checkpoint_mb": size / 2**20, "last_step": step}


def bench_model(name: str, overrides: list[str], data: str, saves: int, gap: int, tmp: Path) -> dict:
    from hgscale.data import open_dataset
    from hgscale.training.ds_config import deepspeed_config
    from hgscale.training.engine import TrainEngine, init_distributed, world_from_env

    cfg = load_config(ROOT / "configs" / "demo.json", [f"data.url={data}", "tracking.enabled=false", *overrides])
    world_from_env()
    ds_json = deepspeed_config(cfg, 1)
    eng = TrainEngine(cfg, ds_json, init_distributed(cfg))
    n_params = sum(p.numel() for p in eng.engine.module.parameters())
    d = cfg.data
    stream = open_dataset(d).stream(d.train_split, cfg.train.micro_batch_size, d.seq_len, 0, 1, seed=d.seed)
    it = iter(stream)
    for _ in range(2):  # warm-up
        eng.train_step(it)
    out = {"params": n_params}
    step = 2
    for kind, url in (("local", str(tmp / name / "local")), ("s3", f"s3://bench/{name}")):
        c = copy.deepcopy(cfg)
        c.checkpoint.dir, c.checkpoint.staging_dir, c.checkpoint.keep_last = url, str(tmp / name / "staging"), 1
        out[kind] = measure(c, eng, ds_json, it, stream, saves, gap, step)
        step = out[kind]["last_step"]
    out["ratio"] = out["s3"]["stall_s"] / out["local"]["stall_s"]
    if hasattr(stream, "close"):
        stream.close()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="demo,100m", help=f"comma-separated, of {', '.join(MODELS)}")
    ap.add_argument("--data", default="data/demo", help="demo corpus (python -m data_pipelines.demo_corpus)")
    ap.add_argument("--saves", type=int, default=3, help="checkpoints per side")
    ap.add_argument("--gap", type=int, default=6, help="training steps between checkpoints")
    args = ap.parse_args(argv)
    moto, endpoint = start_moto()
    tmp = Path(tempfile.mkdtemp(prefix="ckpt-stall-"))
    results = {}
    try:
        for name in args.models.split(","):
            results[name] = bench_model(name, MODELS[name], args.data, args.saves, args.gap, tmp)
    finally:
        moto.terminate()
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{'model':>6} {'params':>8} {'ckpt MB':>8} {'step s':>7} | {'local stall s':>13} {'/step':>6} | "
          f"{'s3 stall s':>10} {'/step':>6} {'end wait s':>10} | s3/local")
    for name, r in results.items():
        lo, s3 = r["local"], r["s3"]
        print(f"{name:>6} {r['params'] / 1e6:7.1f}M {lo['checkpoint_mb']:8.0f} {lo['step_s']:7.3f} | "
              f"{lo['stall_s']:13.3f} {lo['stall_s'] / lo['step_s']:6.2f} | {s3['stall_s']:10.3f} "
              f"{s3['stall_s'] / s3['step_s']:6.2f} {s3['end_wait_s']:10.2f} | {r['ratio']:.2f}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                                   "saves": args.saves, "gap": args.gap, "results": results}, indent=1))
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
