"""A debug-size model memorises one small batch of real text (the Python reference manual)."""
import pydoc_data.topics

import torch
import torch.nn.functional as F

from hgscale.config import MODEL_SIZES, ModelConfig
from hgscale.models import HourglassLM


def text_batch(batch: int, seq_len: int) -> torch.Tensor:
    data = "".join(pydoc_data.topics.topics.values()).encode("utf-8")
    return torch.tensor(list(data[10_000: 10_000 + batch * (seq_len + 1)]), dtype=torch.long).view(batch, -1)


def test_debug_model_overfits_one_batch():
    torch.manual_seed(0)
    cfg = ModelConfig(**MODEL_SIZES["debug"])
    model = HourglassLM(cfg, seed=0)
    seq = text_batch(4, 96)
    inputs, labels = seq[:, :-1], seq[:, 1:]  # GPT convention: logits at t predict token t+1
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, betas=(0.9, 0.98), eps=1e-9)
    losses = []
    for _ in range(150):
        loss = F.cross_entropy(model(inputs).reshape(-1, cfg.vocab_size), labels.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 5.0  # ~ln(256) at initialisation
    assert losses[-1] < 0.1 * losses[0], losses[::10]  # reaches ~0.05 from ~5.5
