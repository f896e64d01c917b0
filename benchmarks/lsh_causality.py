"""How far LSH attention (model.vanilla_attention = "lsh", as trax runs it) lets later tokens move earlier logits.

    python benchmarks/lsh_causality.py            # T 96, chunk 8, d 32, one valley; a few seconds

No query attends to a later key, but the later tokens' buckets shift where the sorted chunks begin, so an
earlier query's window can change. For each t, one model forward with the token at t+1 changed (and one
with every token after t changed) is compared with the forward of the original sequence, the hash
rotations drawn from the same seed in both: the table gives the share of positions <= t whose logits
changed and the largest change. Full attention ("full") is the control: 0. Writes
benchmarks/results/lsh_causality.json.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hgscale.config import ModelConfig  # noqa: E402
from hgscale.models import HourglassLM  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "lsh_causality.json"


def leak(model: HourglassLM, T: int, vocab: int, all_after: bool, seed: int = 0) -> tuple[float, float]:
    """(mean share of positions <= t whose logits change, largest logit change) over t = 0 .. T-2."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(0, vocab, (1, T), generator=g)
    shares, largest = [], 0.0
    with torch.no_grad():
        torch.manual_seed(seed)
        ref = model(base)
        for t in range(T - 1):
            changed = base.clone()
            end = T if all_after else t + 2
            changed[0, t + 1:end] = (changed[0, t + 1:end] + 1 + torch.randint(0, vocab - 1, (end - t - 1,),
                                                                                 generator=g)) % vocab
            torch.manual_seed(seed)  # the same hash rotations as the reference forward
            d = (model(changed)[0, : t + 1] - ref[0, : t + 1]).abs().amax(-1)
            shares.append((d > 0).float().mean().item())
            largest = max(largest, d.max().item())
    return sum(shares) / len(shares), largest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seq-len", type=int, default=96)
    ap.add_argument("--chunk", type=int, default=8)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    for attn in ("full", "lsh"):
        cfg = ModelConfig(vocab_size=32, d_model=32, n_heads=2, d_ff=64, hierarchy="1@1 1@3 1@1", dropout=0.0,
                          max_seq_len=max(256, args.seq_len), vanilla_attention=attn, lsh_chunk_len=args.chunk)
        model = HourglassLM(cfg, seed=1).eval()
        for all_after in (False, True):
            share, largest = leak(model, args.seq_len, 32, all_after)
            rows.append(dict(attention=attn, changed="all after t" if all_after else "t+1", share=share,
                             largest_logit_change=largest))
    print(f"T {args.seq_len}, chunk {args.chunk}, d 32, '1@1 1@3 1@1'")
    print(f"{'attention':>9} {'changed':>12} {'positions <= t changed':>23} {'largest logit change':>21}")
    for r in rows:
        print(f"{r['attention']:>9} {r['changed']:>12} {r['share']:>23.3f} {r['largest_logit_change']:>21.3g}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(dict(seq_len=args.seq_len, chunk=args.chunk, rows=rows), indent=2) + "\n")


if __name__ == "__main__":
    main()
