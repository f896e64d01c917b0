"""Sample text (or pixels) from a trained model, on one device.

    python -m hgscale.sample --checkpoint runs/demo/checkpoints --prompt "The with statement" --tokens 200

Byte-level models only take a text prompt (bytes in, bytes out); other vocabularies take token ids
(``--prompt-ids 1,2,3``). The model has no incremental decoding cache: each new token re-reads the
context window (the last ``model.max_seq_len`` tokens), which costs a full forward per token — fine for
looking at a model, not a serving path.
"""
from __future__ import annotations

import argparse
import sys

import torch

from hgscale.config import ConfigError


@torch.no_grad()
def generate(model, prompt: torch.Tensor, n_tokens: int, temperature: float = 1.0, top_k: int = 0,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """prompt (B, T0) long -> (B, T0 + n_tokens); temperature 0 is greedy (argmax)."""
    model.eval()
    max_len = model.cfg.max_seq_len
    out = prompt
    for _ in range(n_tokens):
        logits = model(out[:, -max_len:])[:, -1].float()  # (B, V): the next token's distribution
        if temperature <= 0:
            nxt = logits.argmax(-1, keepdim=True)
        else:
            logits = logits / temperature
            if top_k:
                kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            nxt = torch.multinomial(logits.softmax(-1), 1, generator=generator)  # (B, 1)
        out = torch.cat([out, nxt], dim=1)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hgscale.sample", description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", required=True, help="training checkpoint directory or exported directory")
    ap.add_argument("--prompt", default="", help="text prompt (byte-level models)")
    ap.add_argument("--prompt-ids", default="", help="comma-separated token ids (any vocabulary)")
    ap.add_argument("--tokens", type=int, default=200, help="tokens to generate")
    ap.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    ap.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0 = all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    from hgscale.checkpoint import CheckpointError, load_any

    try:
        model, cfg = load_any(args.checkpoint, args.device)
    except (CheckpointError, ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.prompt_ids:
        try:
            ids = [int(t) for t in args.prompt_ids.split(",")]
        except ValueError:
            print(f"error: --prompt-ids {args.prompt_ids!r} is not a comma-separated list of integers; "
                  f"pass e.g. --prompt-ids 1,2,3", file=sys.stderr)
            return 2
    elif cfg.model.vocab_size == 256:
        ids = list(args.prompt.encode("utf-8")) or [10]  # an empty prompt starts after a newline
    else:
        print("error: this model's vocabulary is not bytes; pass --prompt-ids", file=sys.stderr)
        return 2
    if any(not 0 <= t < cfg.model.vocab_size for t in ids):
        print(f"error: prompt ids must lie in [0, {cfg.model.vocab_size})", file=sys.stderr)
        return 2
    gen = torch.Generator(device=args.device).manual_seed(args.seed)
    out = generate(model, torch.tensor([ids], device=args.device), args.tokens, args.temperature, args.top_k, gen)
    new = out[0, len(ids):].tolist()
    if cfg.model.vocab_size == 256:
        sys.stdout.write(args.prompt + bytes(new).decode("utf-8", errors="replace") + "\n")
    else:
        print(",".join(map(str, new)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
