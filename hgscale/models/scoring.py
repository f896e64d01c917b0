"""Scoring token sequences with a model on one device (the evaluation protocols of ``hgscale evaluate``).

    total_nats, n = sliding_nll(model, tokens, chunk=128, context_chunks=53)   # enwik8 protocol of the paper
    total_nats, n = windows_nll(model, batches)                                # non-overlapping windows
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def sliding_nll(model, tokens: torch.Tensor, chunk: int = 128, context_chunks: int = 53, batch_size: int = 8,
                max_chunks: int | None = None, device="cpu") -> tuple[float, int]:
    """(sum of NLL in nats, scored tokens) of ``tokens`` (1-D): target chunk [s, e) is predicted from the
    inputs tokens[max(0, s-1-ctx) : e-1], ctx = context_chunks * chunk. Windows are right-padded to one
    length; the model is causal, so padding after a position never changes its prediction."""
    n = len(tokens)
    ctx = context_chunks * chunk
    L = ctx + chunk
    starts = list(range(1, n, chunk))
    if max_chunks is not None:
        starts = starts[:max_chunks]
    total, count = 0.0, 0
    for i in range(0, len(starts), batch_size):
        group = starts[i:i + batch_size]
        inp = torch.zeros(len(group), L, dtype=torch.long)
        tgt = torch.full((len(group), L), -100, dtype=torch.long)  # -100: not scored
        for row, s in enumerate(group):
            e = min(s + chunk, n)
            a = max(0, s - 1 - ctx)
            inp[row, :e - 1 - a] = tokens[a:e - 1]
            tgt[row, s - 1 - a:e - 1 - a] = tokens[s:e]  # input position j predicts token j + 1
        with torch.no_grad():
            logits = model(inp.to(device)).float()  # (B, L, V)
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.to(device).reshape(-1),
                              ignore_index=-100, reduction="sum")
        total += float(nll)
        count += int((tgt != -100).sum())
    return total, count


def windows_nll(model, batches, device="cpu") -> tuple[float, int]:
    total, count = 0.0, 0
    with torch.no_grad():
        for x, y in batches:
            logits = model(x.to(device)).float()
            total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.to(device).reshape(-1),
                                           reduction="sum"))
            count += y.numel()
    return total, count
