"""Sequence-parallel parity, one step: every rank runs HourglassLM on its shard of each sequence and the whole
sequence alone; writes DIR/rank{r}.json with, per case, the largest differences of logits and of gradients.

    deepspeed --num_gpus 2 tests/integration/sp_worker.py --out DIR

Cases: every shortening x upsampling kind, both attention kinds, lengths divisible and not divisible by the
shortening factor, and each relative-attention kernel of the CPU. Gradients of the sharded run are summed over
the group (what DeepSpeed's gradient reduction does) and compared with the whole run's gradients of the mean loss.
"""
import argparse
import itertools
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from hgscale.config import ModelConfig  # noqa: E402
from hgscale.models import HourglassLM, lm_loss  # noqa: E402
from hgscale.models.loss import lm_loss_sum  # noqa: E402
from hgscale.training.engine import release_shm_segment  # noqa: E402
from hgscale.training.sequence import UlyssesSequence  # noqa: E402

DOWN = ("avg", "linear", "attention_avg", "attention_linear")
UP = ("repeat", "linear", "attention_repeat", "attention_linear")


def cases():
    for down, up, attention, T in itertools.product(DOWN, UP, ("relative", "rotary"), (24, 21)):
        yield {"downsample": down, "upsample": up, "attention": attention, "T": T, "attn_impl": "blocked",
               "hierarchy": "1@1 1@2 1@1"}
    for impl, hierarchy in itertools.product(("naive", "sdpa", "blocked"), ("1@1 1@2 1@4 1@2 1@1", "2@1")):
        yield {"downsample": "attention_linear", "upsample": "attention_repeat", "attention": "relative", "T": 29,
               "attn_impl": impl, "hierarchy": hierarchy}


def run_case(case: dict, seq: UlyssesSequence) -> dict:
    T = case.pop("T")
    cfg = ModelConfig(d_model=32, n_heads=4, d_ff=64, vocab_size=50, max_seq_len=64, dropout=0.0,
                      attn_dropout=0.0, **case)
    tokens = torch.randint(0, 50, (2, T + 1), generator=torch.Generator().manual_seed(T))
    x, y = tokens[:, :-1], tokens[:, 1:]
    whole = HourglassLM(cfg, seed=3)
    ref = whole(x)
    lm_loss(ref, y).backward()
    shard = HourglassLM(cfg, seed=3).shard_sequence(seq)
    out = shard(x)  # (B, <= C, V): this rank's unpadded positions
    (lm_loss_sum(out, seq.shard_labels(y, cfg.total_factor(), out.shape[1])) / y.numel()).backward()
    start = seq.rank * (seq.padded_len(T, cfg.total_factor()) // seq.size)  # where the shard sits in the sequence
    logit_err = (out - ref[:, start:start + out.shape[1]]).abs().max().item() if out.shape[1] else 0.0
    grad_err, grad_scale = 0.0, 0.0
    for p, q in zip(whole.parameters(), shard.parameters(), strict=True):
        g = q.grad if q.grad is not None else torch.zeros_like(p)
        dist.all_reduce(g, group=seq.groups.seq_group)
        grad_err = max(grad_err, (g - p.grad).abs().max().item())
        grad_scale = max(grad_scale, p.grad.abs().max().item())
    return {**case, "T": T, "logit_err": logit_err, "logit_scale": ref.abs().max().item(),
            "grad_err": grad_err, "grad_scale": grad_scale, "local_len": out.shape[1]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--local_rank", type=int, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    import deepspeed

    deepspeed.init_distributed("gloo")  # DistributedAttention talks through deepspeed.comm
    release_shm_segment(dist)  # as the trainer does: no /dev/shm segment outlives the job
    seq = UlyssesSequence(dist.get_world_size())
    results = [run_case(dict(c), seq) for c in cases()]
    Path(args.out, f"rank{dist.get_rank()}.json").write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
