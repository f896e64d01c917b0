"""Sample text or images from a trained model, on one device, with the incremental decoding cache.

    python -m hgscale.sample --checkpoint runs/demo/checkpoints --prompt "The with statement" --tokens 200
    python -m hgscale.sample --checkpoint runs/demo/checkpoints --samples 4 --top-p 0.9 --out samples.txt
    python -m hgscale.sample --checkpoint runs/cifar10/checkpoints --images 16 --out grid.png
    python -m hgscale.sample --checkpoint runs/cifar10/checkpoints --complete 8 --out completions.png

Text: byte-level models take a text prompt (bytes in, bytes out); other vocabularies take token ids
(``--prompt-ids 1,2,3``). One sample streams to stdout as it is produced; ``--out FILE`` also writes every
sample there. Images (the checkpoint's dataset, or ``--data-url``, must be an image dataset): ``--images N``
samples N images, each from the first sub-pixel of a test image (training windows start at image
boundaries, so the model never predicts a first sub-pixel); ``--complete N`` gives the model the top half of
N test images and samples the bottom half, each completion beside its original. When the checkpoint belongs
to an MLflow run (hgscale.tracking.checkpoint_run), the file written by ``--out`` is logged to that run.

A context longer than model.max_seq_len is handled by a sliding re-prefill: when the sequence outgrows the
window, the cache restarts from its last ``max_seq_len // 2`` tokens (``use_cache=False`` recomputes with the
same windows, a full forward per token).
"""
from __future__ import annotations

import argparse
import codecs
import math
import sys
from pathlib import Path
from typing import Callable, TextIO

import numpy as np
import torch

from hgscale.config import ConfigError

# ----------------------------------------------------------------------------------------- sampling

def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """(B, V) -> the same with -inf outside the k most likely tokens and outside the nucleus: the smallest
    set of most likely tokens whose probability reaches top_p (the most likely token is always kept)."""
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        srt, idx = logits.sort(dim=-1, descending=True)
        p = srt.softmax(-1)
        drop_sorted = (p.cumsum(-1) - p) >= top_p  # the mass before this token already reaches top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, idx, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def next_token(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, V) logits -> (B, 1) token ids; temperature 0 is greedy (argmax)."""
    if temperature <= 0:
        return logits.argmax(-1, keepdim=True)
    probs = filter_logits(logits / temperature, top_k, top_p).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)


def _check_args(model, prompt: torch.Tensor, n_tokens: int, temperature: float, top_k: int, top_p: float,
                stop: int | None) -> None:
    V = model.cfg.vocab_size
    if not isinstance(prompt, torch.Tensor) or prompt.dim() != 2 or min(prompt.shape) < 1 or prompt.dtype != torch.long:
        got = f"{prompt.dtype} {tuple(prompt.shape)}" if isinstance(prompt, torch.Tensor) else type(prompt).__name__
        raise ValueError(f"prompt must be a LongTensor (batch >= 1, length >= 1); got {got}")
    lo, hi = int(prompt.min()), int(prompt.max())
    if lo < 0 or hi >= V:
        raise ValueError(f"prompt id {lo if lo < 0 else hi} is outside the vocabulary: prompt ids must lie in "
                         f"[0, {V}) (model.vocab_size)")
    problems = [f"n_tokens = {n_tokens} must be >= 0" if n_tokens < 0 else "",
                f"temperature = {temperature} must be >= 0 (0 = greedy)" if temperature < 0 else "",
                f"top_k = {top_k} must be >= 0 (0 = all tokens)" if top_k < 0 else "",
                f"top_p = {top_p} must be in (0, 1]" if not 0 < top_p <= 1 else "",
                f"stop = {stop} must lie in [0, {V})" if stop is not None and not 0 <= stop < V else ""]
    problems = [p for p in problems if p]
    if problems:
        raise ValueError("; ".join(problems))


@torch.no_grad()
def generate(model, prompt: torch.Tensor, n_tokens: int, temperature: float = 1.0, top_k: int = 0,
             generator: torch.Generator | None = None, *, top_p: float = 1.0, stop: int | None = None,
             use_cache: bool = True, on_token: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
    """prompt (B, T0) long -> (B, T0 + n), n <= n_tokens: fewer once every row has produced ``stop`` (a row
    that stopped earlier is padded with ``stop``). ``on_token((B,) ids)`` is called after each step.

    use_cache: model.decode with one cache per window (one token of work per step); False: a full forward
    over the window per step (the reference). Both use the same windows: the last <= max_seq_len tokens,
    restarted from the last max_seq_len // 2 tokens whenever the sequence outgrows the window."""
    _check_args(model, prompt, n_tokens, temperature, top_k, top_p, stop)
    model.eval()  # dropout off: sampling is inference, and decode refuses training mode
    L = model.cfg.max_seq_len
    B, T0 = prompt.shape
    start = max(0, T0 - L)  # first token of the window
    out, cache = prompt, None
    done = torch.zeros(B, dtype=torch.bool, device=prompt.device)
    for step in range(n_tokens):
        if out.shape[1] - start > L:
            start, cache = out.shape[1] - max(1, L // 2), None  # slide: re-prefill the newer half
        if not use_cache:
            logits = model(out[:, start:])[:, -1]
        elif cache is None:
            cache = model.init_cache(B, max_len=min(L, out.shape[1] - start + n_tokens - step))
            logits = model.decode(out[:, start:], cache)[:, -1]
        else:
            logits = model.decode(out[:, -1:], cache)[:, -1]
        nxt = next_token(logits.float(), temperature, top_k, top_p, generator)  # (B, 1)
        if stop is not None:
            nxt = nxt.masked_fill(done[:, None], stop)
            done |= nxt[:, 0] == stop
        out = torch.cat([out, nxt], dim=1)
        if on_token is not None:
            on_token(nxt[:, 0])
        if stop is not None and bool(done.all()):
            break
    return out


# ------------------------------------------------------------------------------------------ images

def image_spec(ds) -> tuple[int, int, int]:
    """(H, W, C) of an image dataset's samples."""
    if ds.manifest.get("image_shape"):
        return tuple(int(v) for v in ds.manifest["image_shape"])
    side = math.isqrt(int(ds.manifest["sample_tokens"]) // 3)
    return side, side, 3


def first_images(ds, split: str, n: int, tokens_per_image: int) -> np.ndarray:
    """The first n images of ``split`` (cycled when it has fewer): (n, tokens_per_image) int64."""
    parts, have = [], 0
    for part in ds.iter_split(split):
        parts.append(part)
        have += len(part)
        if have >= n * tokens_per_image:
            break
    flat = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    imgs = flat[: len(flat) // tokens_per_image * tokens_per_image].reshape(-1, tokens_per_image).astype(np.int64)
    if not len(imgs):
        raise ValueError(f"split {split!r} of {ds.root} holds no whole image of {tokens_per_image} tokens")
    return imgs[np.arange(n) % len(imgs)]


def sample_images(model, originals: np.ndarray, given: int, generator: torch.Generator | None = None,
                  **kw) -> np.ndarray:
    """Complete each original (N, T) after its first ``given`` tokens -> (N, T) sampled images."""
    prompt = torch.from_numpy(originals[:, :given]).to(next(model.parameters()).device)
    out = generate(model, prompt, originals.shape[1] - given, generator=generator, **kw)
    return out.cpu().numpy()


def images_grid(samples: np.ndarray, shape: tuple[int, int, int], originals: np.ndarray | None = None) -> np.ndarray:
    """(N, H*W*C) samples -> a grid image: alone (ceil(sqrt(N)) columns) or each beside its original (pairs
    side by side)."""
    from hgscale.grid import image_grid, tokens_to_images

    imgs = tokens_to_images(samples, shape)
    if originals is None:
        return image_grid(imgs)
    pairs = np.stack([imgs, tokens_to_images(originals, shape)], axis=1).reshape(-1, *imgs.shape[1:])
    return image_grid(pairs, cols=2 * max(1, math.ceil(math.sqrt(len(imgs)))))


# --------------------------------------------------------------------------------------------- CLI

class UsageError(ValueError):
    """Bad command-line input; the message names the value and the fix."""


def _prompt_ids(args: argparse.Namespace, V: int) -> list[int]:
    if args.prompt_ids:
        try:
            ids = [int(t) for t in args.prompt_ids.split(",")]
        except ValueError:
            raise UsageError(f"--prompt-ids {args.prompt_ids!r} is not a comma-separated list of integers; "
                             f"pass e.g. --prompt-ids 1,2,3") from None
    elif V == 256:
        ids = list(args.prompt.encode("utf-8")) or [10]  # an empty prompt starts after a newline
    else:
        raise UsageError("this model's vocabulary is not bytes; pass --prompt-ids")
    bad = [t for t in ids if not 0 <= t < V]
    if bad:
        raise UsageError(f"prompt id {bad[0]} is outside the vocabulary: prompt ids must lie in [0, {V})")
    return ids


def _stop_id(args: argparse.Namespace, V: int) -> int | None:
    if args.stop_id is not None:
        if not 0 <= args.stop_id < V:
            raise UsageError(f"--stop-id {args.stop_id} is outside the vocabulary [0, {V})")
        return args.stop_id
    if args.stop is None:
        return None
    try:
        raw = codecs.decode(args.stop, "unicode_escape").encode("utf-8")  # "\\n" on a command line -> b"\n"
    except UnicodeError:
        raw = args.stop.encode("utf-8")
    if V != 256 or len(raw) != 1:
        raise UsageError(f"--stop {args.stop!r} must be one byte for a byte-level model (e.g. --stop '\\n'); "
                         f"for other vocabularies pass --stop-id")
    return raw[0]


class _Streamer:
    """Writes the new tokens of row 0 to a text stream as they come (UTF-8 decoded incrementally)."""

    def __init__(self, stream: TextIO, as_bytes: bool):
        self.stream, self.as_bytes, self.first = stream, as_bytes, True
        self.dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def __call__(self, ids: torch.Tensor) -> None:
        t = int(ids[0])
        text = self.dec.decode(bytes([t])) if self.as_bytes else ("" if self.first else ",") + str(t)
        self.first = False
        if text:
            self.stream.write(text)
            self.stream.flush()

    def close(self) -> None:
        self.stream.write((self.dec.decode(b"", final=True) if self.as_bytes else "") + "\n")
        self.stream.flush()


def _sample_text(row: list[int], n_prompt: int, prompt: str, stop: int | None, as_bytes: bool) -> str:
    """One generated row -> its text: the prompt and the new bytes (byte-level) or the new ids, cut after
    the first stop token (generate pads a stopped row with it)."""
    new = row[n_prompt:]
    if stop is not None and stop in new:
        new = new[: new.index(stop) + 1]
    return prompt + bytes(new).decode("utf-8", errors="replace") if as_bytes else ",".join(map(str, new))


def _text(args: argparse.Namespace, model, cfg, gen: torch.Generator, dev: str) -> Path | None:
    V = cfg.model.vocab_size
    ids, stop = _prompt_ids(args, V), _stop_id(args, V)
    prompt = torch.tensor([ids] * args.samples, device=dev)
    streamer = _Streamer(sys.stdout, V == 256) if args.samples == 1 else None
    if streamer and V == 256:
        sys.stdout.write(args.prompt)
    out = generate(model, prompt, args.tokens, args.temperature, args.top_k, gen, top_p=args.top_p, stop=stop,
                   use_cache=not args.no_cache, on_token=streamer)
    if streamer:
        streamer.close()
    listing = "".join(f"--- sample {i} ---\n{_sample_text(row, len(ids), args.prompt, stop, V == 256)}\n"
                      for i, row in enumerate(out.tolist()))
    if not streamer:
        sys.stdout.write(listing)
    if not args.out:
        return None
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(listing, encoding="utf-8")
    return path


def _open_image_dataset(args: argparse.Namespace, cfg):
    from hgscale.data import open_dataset
    from hgscale.data.storage import DataError

    flag = f"--images {args.images}" if args.images else f"--complete {args.complete}"
    if args.data_url:
        cfg.data.url = args.data_url
    try:
        ds = open_dataset(cfg.data)
    except DataError as e:
        raise UsageError(f"{flag} needs the model's image dataset (image size, test images), and {cfg.data.url!r} "
                         f"cannot be opened ({e}); pass --data-url DIR of the prepared dataset") from None
    if ds.modality != "image":
        raise UsageError(f"{flag}: this model was trained on {ds.modality} data ({cfg.data.url}), not images; "
                         f"sample text with --prompt (and --out samples.txt) instead")
    return ds


def _images(args: argparse.Namespace, model, cfg, gen: torch.Generator) -> Path:
    from hgscale.grid import write_png

    ds = _open_image_dataset(args, cfg)
    shape = image_spec(ds)
    T = int(np.prod(shape))
    if T > cfg.model.max_seq_len:
        raise UsageError(f"an image is {T} tokens but model.max_seq_len = {cfg.model.max_seq_len}: this model cannot "
                         f"hold a whole image")
    n = args.images or args.complete
    originals = first_images(ds, cfg.data.test_split, n, T)
    given = 1 if args.images else (shape[0] // 2) * shape[1] * shape[2]  # first sub-pixel, or the top half rows
    samples = sample_images(model, originals, given, gen, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, use_cache=not args.no_cache)
    grid = images_grid(samples, shape, originals if args.complete else None)
    path = write_png(args.out or "grid.png", grid)
    print(f"wrote {path}: {n} {'completions beside their originals' if args.complete else 'samples'}, "
          f"{shape[0]}x{shape[1]}, grid {grid.shape[1]}x{grid.shape[0]}")
    return path


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m hgscale.sample", description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", required=True, help="training checkpoint directory or exported directory")
    ap.add_argument("--prompt", default="", help="text prompt (byte-level models)")
    ap.add_argument("--prompt-ids", default="", help="comma-separated token ids (any vocabulary)")
    ap.add_argument("--tokens", type=int, default=200, help="tokens to generate")
    ap.add_argument("--samples", type=int, default=1, help="text samples of the prompt, generated as one batch")
    ap.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    ap.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0 = all)")
    ap.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: the most likely tokens of this mass")
    ap.add_argument("--stop", default=None, help="stop after this byte (byte-level models; escapes such as \\n)")
    ap.add_argument("--stop-id", type=int, default=None, help="stop after this token id")
    ap.add_argument("--images", type=int, default=0, help="image models: sample this many images into a PNG grid")
    ap.add_argument("--complete", type=int, default=0, help="image models: complete the lower half of this many "
                                                            "test images, each beside its original")
    ap.add_argument("--data-url", default="", help="the image dataset (default: the checkpoint's data.url)")
    ap.add_argument("--out", default="", help="write the samples here (.txt for text, .png grid for images)")
    ap.add_argument("--no-cache", action="store_true", help="recompute a full forward per token (reference)")
    ap.add_argument("--no-track", action="store_true", help="do not log --out to the checkpoint's MLflow run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from hgscale.checkpoint import CheckpointError, load_any

    try:
        for name, least in (("samples", 1), ("images", 0), ("complete", 0), ("tokens", 0)):
            if getattr(args, name) < least:
                raise UsageError(f"--{name} {getattr(args, name)} must be >= {least}")
        if args.images and args.complete:
            raise UsageError("pass --images N or --complete N, not both")
        model, cfg = load_any(args.checkpoint, args.device)
        gen = torch.Generator(device=args.device).manual_seed(args.seed)
        if args.images or args.complete:
            path = _images(args, model, cfg, gen)
        else:
            path = _text(args, model, cfg, gen, args.device)
    except (UsageError, CheckpointError, ConfigError, FileNotFoundError, ValueError) as e:  # + generate's checks
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NotImplementedError as e:  # a model without an exact cache (LSH attention)
        print(f"error: {e} (on this command line: --no-cache)", file=sys.stderr)
        return 2
    if path is not None and not args.no_track:
        _log_to_training_run(args.checkpoint, path)
    return 0


def _log_to_training_run(checkpoint: str, path: Path) -> None:
    from hgscale.tracking.checkpoint_run import checkpoint_run, log_to_run

    run = checkpoint_run(checkpoint)  # the run that trained it; tracking trouble is one warning
    if log_to_run(run, artifacts=[path]):
        print(f"logged {path} to MLflow run {run.run_id}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
