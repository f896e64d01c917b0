"""The language-modelling loss of HourglassLM (single device; the pipeline's last stage uses it too)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (nats) of logits (B, T_padded, V) against labels (B, T); strips the
    embedding layer's right padding."""
    T = labels.shape[1]
    logits = logits[:, :T]  # (B, T, V)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1))


def lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy (nats) of logits (B, n, V) against labels (B, n): a shard's share of a
    mean taken over more tokens than it holds (sequence parallelism)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), reduction="sum")
