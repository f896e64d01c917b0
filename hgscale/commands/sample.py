"""Sample text or images from a trained model, on one device, with the incremental decoding cache.

    hgscale sample --checkpoint runs/demo/checkpoints --prompt "The with statement" --tokens 200
    hgscale sample --checkpoint runs/demo/checkpoints --samples 4 --top-p 0.9 --out samples.txt
    hgscale sample --checkpoint runs/cifar10/checkpoints --images 16 --out grid.png
    hgscale sample --checkpoint runs/cifar10/checkpoints --complete 8 --out completions.png

Text: byte-level models take a text prompt (bytes in, bytes out); other vocabularies take token ids
(``--prompt-ids 1,2,3``). One sample streams to stdout as it is produced; ``--out FILE`` also writes every
sample there. Images (the checkpoint's dataset, or ``--data-url``, must be an image dataset): ``--images N``
samples N images, each from the first sub-pixel of a test image (training windows start at image
boundaries, so the model never predicts a first sub-pixel); ``--complete N`` gives the model the top half of
N test images and samples the bottom half, each completion beside its original. When the checkpoint belongs
to an MLflow run (hgscale.checkpoint.run_link), the file written by ``--out`` is logged to that run.
"""
from __future__ import annotations

import argparse
import codecs
import sys
from pathlib import Path

import numpy as np
import torch

from hgscale.config import ConfigError
from hgscale.core.status import USER_ERROR
from hgscale.data.codec import parse_ids, prompt_ids
from hgscale.models.generation import Streamer, generate, sample_text

# --------------------------------------------------------------------------------------------- CLI

class UsageError(ValueError):
    """Bad command-line input; the message names the value and the fix."""


def _prompt_ids(args: argparse.Namespace, V: int) -> list[int]:
    if args.prompt_ids:
        try:
            return parse_ids(args.prompt_ids, V)
        except ValueError as e:
            raise UsageError(f"--prompt-ids {e}") from None
    if V != 256:
        raise UsageError("this model's vocabulary is not bytes; pass --prompt-ids")
    return prompt_ids(args.prompt, V)


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


def _text(args: argparse.Namespace, model, cfg, gen: torch.Generator, dev: str) -> Path | None:
    V = cfg.model.vocab_size
    ids, stop = _prompt_ids(args, V), _stop_id(args, V)
    prompt = torch.tensor([ids] * args.samples, device=dev)
    streamer = Streamer(sys.stdout, V == 256) if args.samples == 1 else None
    if streamer and V == 256:
        sys.stdout.write(args.prompt)
    out = generate(model, prompt, args.tokens, args.temperature, args.top_k, gen, top_p=args.top_p, stop=stop,
                   use_cache=not args.no_cache, on_token=streamer)
    if streamer:
        streamer.close()
    listing = "".join(f"--- sample {i} ---\n{sample_text(row, len(ids), args.prompt, stop, V == 256)}\n"
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
    from hgscale.core.storage import StorageError
    from hgscale.data import open_dataset

    flag = f"--images {args.images}" if args.images else f"--complete {args.complete}"
    if args.data_url:
        cfg.data.url = args.data_url
    try:
        ds = open_dataset(cfg.data)
    except StorageError as e:
        raise UsageError(f"{flag} needs the model's image dataset (image size, test images), and {cfg.data.url!r} "
                         f"cannot be opened ({e}); pass --data-url DIR of the prepared dataset") from None
    if ds.modality != "image":
        raise UsageError(f"{flag}: this model was trained on {ds.modality} data ({cfg.data.url}), not images; "
                         f"sample text with --prompt (and --out samples.txt) instead")
    return ds


def _images(args: argparse.Namespace, model, cfg, gen: torch.Generator) -> Path:
    from hgscale.tracking.images import first_images, image_spec, images_grid, sample_images, write_png

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
    ap = argparse.ArgumentParser(prog="hgscale sample", description=__doc__.split("\n")[0])
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
    from hgscale.checkpoint.export import load_any
    from hgscale.checkpoint.layout import CheckpointError

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
        return USER_ERROR
    except NotImplementedError as e:  # a model without an exact cache (LSH attention)
        print(f"error: {e} (on this command line: --no-cache)", file=sys.stderr)
        return USER_ERROR
    if path is not None and not args.no_track:
        from hgscale.checkpoint.run_link import log_to_training_run

        run = log_to_training_run(args.checkpoint, artifacts=[path])
        if run is not None:
            print(f"logged {path} to MLflow run {run.run_id}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
