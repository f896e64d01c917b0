"""Data loader throughput vs. the token consumption of a training step, measured in one run.

    .venv/bin/python benchmarks/data_throughput.py [--config configs/demo.json] [--seconds 3]

Streams (inputs, labels) micro-batches of the config's shape from a local directory and from a real
S3 API (``moto_server`` on loopback) with 0 and 2 workers, on two datasets: the demo corpus (32 KiB
shards: request-bound) and 32 MiB of bytes in 4 MiB shards (enwik8's shard size). For each it reports
tokens/s and the first-batch latency (stream creation -> first batch; "cold" includes starting the
worker server). The trainer's consumption is a real step (forward, backward, AdamW) of the config's
model on the same batch shape. Goal: loader >= 20x the trainer, first batch < 2 s.
Prints a table and writes benchmarks/results/data_throughput.json.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from data_pipelines.demo_corpus import write_demo_corpus  # noqa: E402
from data_pipelines.shards import DatasetWriter  # noqa: E402
from hgscale.config import DataConfig, config_from_dict, load_config  # noqa: E402
from hgscale.core.storage import storage_options  # noqa: E402
from hgscale.data import open_dataset  # noqa: E402


def trainer_tokens_per_s(cfg, seconds: float) -> float:
    """Tokens per second consumed by forward + backward + AdamW of the config's model (inputs only)."""
    from hgscale.models import HourglassLM
    torch.manual_seed(0)
    model = HourglassLM(cfg.model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    B, T = cfg.train.micro_batch_size, cfg.data.seq_len
    x = torch.randint(0, cfg.model.vocab_size, (B, T))
    y = torch.randint(0, cfg.model.vocab_size, (B, T))

    def step():
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()  # warm-up
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        step()
        n += 1
    return n * B * T / (time.perf_counter() - start)


def loader(url: str, workers: int, B: int, T: int, seconds: float) -> dict:
    ds = open_dataset(DataConfig(url=url, num_workers=workers, seq_len=T))
    t0 = time.perf_counter()
    stream = ds.stream("train", B, T, seed=0)
    it = iter(stream)
    next(it)
    first = time.perf_counter() - t0
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        x, y = next(it)
        n += x.numel()
    rate = n / (time.perf_counter() - start)
    stream.close()
    return {"first_batch_s": first, "tokens_per_s": rate}


def start_moto() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = Path(sys.executable).with_name("moto_server")
    proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    for _ in range(300):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.1)
    else:
        proc.terminate()
        raise SystemExit(f"error: {exe} did not listen on port {port} within 30 s; install moto[server]")
    return proc, f"http://127.0.0.1:{port}"


def write_bytes_dataset(url: str, n_bytes: int) -> None:
    rng = np.random.default_rng(0)
    with DatasetWriter(url, name="bytes", modality="text_bytes", vocab_size=256, opts=storage_options()) as w:
        for split, n in (("train", n_bytes), ("valid", 1 << 20)):
            w.write_stream(split, rng.integers(0, 256, n, dtype=np.uint8))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(REPO / "configs" / "demo.json"))
    ap.add_argument("--seconds", type=float, default=3.0, help="measuring time per figure")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "data_throughput.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    if Path(args.config).is_file():
        cfg = load_config(args.config, validate=False)
    else:
        cfg = config_from_dict({"model": {"size": "debug"}, "data": {"url": "x", "seq_len": 256}}, validate=False)
    B, T = cfg.train.micro_batch_size, cfg.data.seq_len

    proc, endpoint = start_moto()
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                      AWS_ENDPOINT_URL=endpoint)
    rows = []
    try:
        import boto3
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")
        with tempfile.TemporaryDirectory() as tmp:
            sources = {"demo corpus, local": f"{tmp}/demo", "demo corpus, S3": "s3://bench/demo",
                       "32 MiB / 4 MiB shards, local": f"{tmp}/bytes", "32 MiB / 4 MiB shards, S3": "s3://bench/bytes"}
            write_demo_corpus(sources["demo corpus, local"])
            write_demo_corpus(sources["demo corpus, S3"], opts=storage_options())
            write_bytes_dataset(sources["32 MiB / 4 MiB shards, local"], 32 << 20)
            write_bytes_dataset(sources["32 MiB / 4 MiB shards, S3"], 32 << 20)
            train = trainer_tokens_per_s(cfg, args.seconds)
            cold = True
            for name, url in sources.items():
                for workers in (0, 2):
                    r = loader(url, workers, B, T, args.seconds)
                    rows.append({"source": name, "workers": workers, **r, "x_trainer": r["tokens_per_s"] / train,
                                 "cold_start": cold and workers > 0})
                    cold = cold and workers == 0
    finally:
        proc.terminate()
        proc.wait(timeout=10)

    print(f"\nbatch {B} x {T}, model {cfg.model.hierarchy} d={cfg.model.d_model}: trainer consumes "
          f"{train:,.0f} tokens/s (fwd+bwd+AdamW, {torch.get_num_threads()} threads)\n")
    print(f"{'source':32s} {'workers':>7s} {'tokens/s':>14s} {'x trainer':>10s} {'first batch':>12s}")
    for r in rows:
        note = " (cold: starts the worker server)" if r["cold_start"] else ""
        print(f"{r['source']:32s} {r['workers']:>7d} {r['tokens_per_s']:>14,.0f} {r['x_trainer']:>9.0f}x "
              f"{r['first_batch_s']:>10.3f} s{note}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"batch": [B, T], "trainer_tokens_per_s": train, "loaders": rows,
                                          "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                                          "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, indent=1))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
