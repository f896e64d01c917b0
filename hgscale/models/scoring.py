"""Scoring token sequences with a model on one device (the evaluation protocols of ``hgscale evaluate``).

    total_nats, n = sliding_nll(model, tokens, chunk=128, context_chunks=53)   # enwik8 protocol of the paper
    [(nats, n), ...] = sliding_nll_docs(model, [doc, ...], chunk, context_chunks)   # the same, per document
    total_nats, n = windows_nll(model, batches)                                # non-overlapping windows
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def default_context_chunks(max_seq_len: int, chunk: int) -> int:
    """The paper's 53 chunks of context, or as many as fit a model built for ``max_seq_len`` tokens."""
    return max(0, min(53, max_seq_len // chunk - 1))


def sliding_windows(n: int, chunk: int = 128, context_chunks: int = 53,
                    max_chunks: int | None = None) -> list[tuple[int, int, int]]:
    """The windows of the sliding protocol over a sequence of ``n`` tokens, as (a, s, e): target chunk
    tokens[s:e] is predicted from the inputs tokens[a:e-1], a = max(0, s-1-ctx), ctx = context_chunks * chunk.
    Chunks start at token 1, so every token but the first is a target exactly once."""
    ctx = context_chunks * chunk
    starts = range(1, n, chunk)
    if max_chunks is not None:
        starts = starts[:max_chunks]
    return [(max(0, s - 1 - ctx), s, min(s + chunk, n)) for s in starts]


def _window_nll(model, rows: list[tuple[torch.Tensor, int, int, int]], device) -> list[float]:
    """Summed NLL (nats) of each window (tokens, a, s, e), one forward for all: windows are right-padded to the
    longest; the model is causal, so padding after a position never changes its prediction."""
    L = max(e - 1 - a for _, a, _, e in rows)
    inp = torch.zeros(len(rows), L, dtype=torch.long)
    tgt = torch.full((len(rows), L), -100, dtype=torch.long)  # -100: not scored
    for row, (tokens, a, s, e) in enumerate(rows):
        inp[row, :e - 1 - a] = tokens[a:e - 1]
        tgt[row, s - 1 - a:e - 1 - a] = tokens[s:e]  # input position j predicts token j + 1
    with torch.no_grad():
        logits = model(inp.to(device)).float()  # (B, L, V)
    nll = F.cross_entropy(logits.transpose(1, 2), tgt.to(device), ignore_index=-100, reduction="none")  # (B, L)
    return nll.sum(1).tolist()


def sliding_nll_docs(model, docs: list[torch.Tensor], chunk: int = 128, context_chunks: int = 53,
                     batch_size: int = 8, max_chunks: int | None = None, device="cpu") -> list[tuple[float, int]]:
    """(sum of NLL in nats, scored tokens) of each 1-D token sequence in ``docs``, each scored on its own with the
    windows of :func:`sliding_windows` (at most ``max_chunks`` per document); windows of different documents
    share batches of ``batch_size``."""
    jobs = [(i, w) for i, doc in enumerate(docs) for w in sliding_windows(len(doc), chunk, context_chunks, max_chunks)]
    totals, counts = [0.0] * len(docs), [0] * len(docs)
    for k in range(0, len(jobs), batch_size):
        group = jobs[k:k + batch_size]
        sums = _window_nll(model, [(docs[i], *w) for i, w in group], device)
        for (i, (_, s, e)), nats in zip(group, sums, strict=True):
            totals[i] += nats
            counts[i] += e - s
    return list(zip(totals, counts, strict=True))


def sliding_nll(model, tokens: torch.Tensor, chunk: int = 128, context_chunks: int = 53, batch_size: int = 8,
                max_chunks: int | None = None, device="cpu") -> tuple[float, int]:
    """(sum of NLL in nats, scored tokens) of ``tokens`` (1-D): target chunk [s, e) is predicted from the
    inputs tokens[max(0, s-1-ctx) : e-1], ctx = context_chunks * chunk (:func:`sliding_windows`)."""
    return sliding_nll_docs(model, [tokens], chunk, context_chunks, batch_size, max_chunks, device)[0]


def windows_nll(model, batches, device="cpu") -> tuple[float, int]:
    total, count = 0.0, 0
    with torch.no_grad():
        for x, y in batches:
            logits = model(x.to(device)).float()
            total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.to(device).reshape(-1),
                                           reduction="sum"))
            count += y.numel()
    return total, count
