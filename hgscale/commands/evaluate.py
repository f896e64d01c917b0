"""Score a whole split with a trained model, on one device, without DeepSpeed.

    hgscale evaluate --checkpoint runs/enwik8_xl/checkpoints --split test [--data-url URL]

Text (enwik8 protocol of the paper): the split is cut into chunks of 128 tokens; each chunk is scored
with the 53 x 128 tokens before it as context (6912 tokens per window), so every token but the first is
scored exactly once with long context. A model built for shorter sequences (model.max_seq_len) gets as
many context chunks as fit; the output says how many. Images (and ``--protocol windows``): non-overlapping windows of
data.seq_len tokens, as in validation. Prints bits per character (text) or per dimension (images).

--checkpoint takes a training checkpoint directory (consolidated in memory) or an exported one.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch

from hgscale.core.status import USER_ERROR
from hgscale.models.scoring import sliding_nll, windows_nll


def evaluate(checkpoint: str, split: str = "test", data_url: str | None = None, protocol: str = "auto",
             chunk: int = 128, context_chunks: int | None = None, batch_size: int = 8, max_chunks: int | None = None,
             device: str = "auto") -> dict:
    from hgscale.checkpoint.export import load_any
    from hgscale.data import open_dataset

    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    model, cfg = load_any(checkpoint, dev)
    if data_url:
        cfg.data.url = data_url
    ds = open_dataset(cfg.data)
    if protocol == "auto":
        protocol = "sliding" if ds.modality.startswith("text") else "windows"
    if context_chunks is None:  # the paper's 53 chunks of context, or as many as the model was built for
        context_chunks = max(0, min(53, cfg.model.max_seq_len // chunk - 1))
    if protocol == "sliding" and context_chunks * chunk + chunk > cfg.model.max_seq_len:
        raise ValueError(f"a window of ({context_chunks} + 1) x {chunk} tokens exceeds model.max_seq_len = "
                         f"{cfg.model.max_seq_len}; lower --context-chunks")
    t0 = time.perf_counter()
    if protocol == "sliding":
        total, count = sliding_nll(model, ds.split_tokens(split), chunk, context_chunks, batch_size, max_chunks, dev)
    else:
        batches = ds.eval_batches(split, batch_size, cfg.data.seq_len, max_batches=max_chunks)
        total, count = windows_nll(model, batches, dev)
    nats = total / max(count, 1)
    factor = ds.bits_per_nat_token_for(split)
    return {"split": split, "protocol": protocol, "tokens": count, "loss_nats": nats,
            "metric": ds.metric_name, "value": nats * factor, "bits_per_token": nats / math.log(2),
            "chunk": chunk, "context_chunks": context_chunks, "seconds": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> int:
    from hgscale.checkpoint.layout import CheckpointError
    from hgscale.config import ConfigError
    from hgscale.core.storage import StorageError

    ap = argparse.ArgumentParser(prog="hgscale evaluate", description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", required=True, help="training checkpoint directory or exported directory")
    ap.add_argument("--split", default="test")
    ap.add_argument("--data-url", default=None, help="dataset root (default: data.url of the checkpoint's config)")
    ap.add_argument("--protocol", choices=("auto", "sliding", "windows"), default="auto",
                    help="auto: sliding chunks for text, windows for images")
    ap.add_argument("--chunk", type=int, default=128, help="tokens scored per window (sliding)")
    ap.add_argument("--context-chunks", type=int, default=None,
                    help="chunks of context before each scored chunk (default 53; fewer if model.max_seq_len "
                         "is shorter)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-chunks", type=int, default=None, help="score only the first N chunks/batches (quick look)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--json", default=None, help="also write the result to this JSON file")
    ap.add_argument("--no-track", action="store_true",
                    help="do not log the result into the checkpoint's MLflow run")
    args = ap.parse_args(argv)
    try:
        r = evaluate(args.checkpoint, args.split, args.data_url, args.protocol, args.chunk, args.context_chunks,
                     args.batch_size, args.max_chunks, args.device)
    except (CheckpointError, ConfigError, StorageError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return USER_ERROR
    how = (f"{r['chunk']}-token chunks with {r['context_chunks']} x {r['chunk']} tokens of context"
           if r["protocol"] == "sliding" else "non-overlapping windows")
    print(f"{r['split']} {r['metric']} {r['value']:.4f} ({r['loss_nats']:.4f} nats/token) over {r['tokens']:,} "
          f"tokens; {how}; {r['seconds']:.1f}s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=1)
    if not args.no_track:
        _log_to_training_run(args.checkpoint, r)
    return 0


def _log_to_training_run(checkpoint: str, r: dict) -> None:
    """``<split>/<metric>`` and ``<split>/loss`` into the run that trained the checkpoint (the report's test
    column reads ``test/<metric>``)."""
    from hgscale.tracking.checkpoint_run import checkpoint_run, log_to_run

    run = checkpoint_run(checkpoint)
    metrics = {f"{r['split']}/{r['metric']}": r["value"], f"{r['split']}/loss": r["loss_nats"]}
    if log_to_run(run, metrics=metrics):
        print(f"logged {', '.join(metrics)} to MLflow run {run.run_id} at step {run.step}")


if __name__ == "__main__":
    sys.exit(main())
