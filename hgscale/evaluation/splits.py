"""Scores of a whole split with a trained model, on one device, without DeepSpeed (``hgscale evaluate``).

    r = evaluate("runs/enwik8_xl/checkpoints", split="test")    # {"metric": "bpc", "value": ..., "tokens": ...}

Text (enwik8 protocol of the paper): the split is cut into chunks of 128 tokens; each chunk is scored with the
53 x 128 tokens before it as context (6912 tokens per window), so every token but the first is scored exactly once
with long context. A model built for shorter sequences (model.max_seq_len) gets as many context chunks as fit.
Images (and ``protocol="windows"``): non-overlapping windows of data.seq_len tokens, as in validation.
"""
from __future__ import annotations

import math
import time

import torch

from hgscale.models.scoring import default_context_chunks, sliding_nll, windows_nll


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
    if context_chunks is None:
        context_chunks = default_context_chunks(cfg.model.max_seq_len, chunk)
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
