"""Score a whole split with a trained model, on one device, without DeepSpeed.

    hgscale evaluate --checkpoint runs/enwik8_xl/checkpoints --split test [--data-url URL]

Text (enwik8 protocol of the paper): the split is cut into chunks of 128 tokens; each chunk is scored
with the 53 x 128 tokens before it as context (6912 tokens per window), so every token but the first is
scored exactly once with long context. A model built for shorter sequences (model.max_seq_len) gets as
many context chunks as fit; the output says how many. Images (and ``--protocol windows``): non-overlapping windows of
data.seq_len tokens, as in validation. Prints bits per character (text) or per dimension (images).

--checkpoint takes a training checkpoint directory (consolidated in memory) or an exported one.
"""
from __future__ import annotations

import argparse
import json
import sys

from hgscale.core.status import USER_ERROR


def main(argv: list[str] | None = None) -> int:
    from hgscale.checkpoint.layout import CheckpointError
    from hgscale.checkpoint.run_link import log_to_training_run
    from hgscale.config import ConfigError
    from hgscale.core.storage import StorageError
    from hgscale.evaluation.splits import evaluate
    from hgscale.tracking import names

    ap = argparse.ArgumentParser(prog="hgscale evaluate", description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", required=True, help="training checkpoint directory or exported directory")
    ap.add_argument("--split", default="test")
    ap.add_argument("--data-url", default=None, help="dataset root (default: data.url of the checkpoint's config)")
    ap.add_argument("--protocol", choices=("auto", "sliding", "windows"), default="auto",
                    help="auto: sliding chunks for text, windows for images")
    ap.add_argument("--chunk", type=int, default=128, help="tokens scored per window (sliding)")
    ap.add_argument("--context-chunks", type=int, default=None,
                    help="chunks of context before each scored chunk (default 53; fewer if model.max_seq_len "
                         "is shorter)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-chunks", type=int, default=None, help="score only the first N chunks/batches (quick look)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--json", default=None, help="also write the result to this JSON file")
    ap.add_argument("--no-track", action="store_true",
                    help="do not log the result into the checkpoint's MLflow run")
    args = ap.parse_args(argv)
    try:
        r = evaluate(args.checkpoint, args.split, args.data_url, args.protocol, args.chunk, args.context_chunks,
                     args.batch_size, args.max_chunks, args.device)
    except (CheckpointError, ConfigError, StorageError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return USER_ERROR
    how = (f"{r['chunk']}-token chunks with {r['context_chunks']} x {r['chunk']} tokens of context"
           if r["protocol"] == "sliding" else "non-overlapping windows")
    print(f"{r['split']} {r['metric']} {r['value']:.4f} ({r['loss_nats']:.4f} nats/token) over {r['tokens']:,} "
          f"tokens; {how}; {r['seconds']:.1f}s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=1)
    if not args.no_track:  # the report's test column reads <split>/<metric>
        metrics = {names.split_metric(r["split"], r["metric"]): r["value"],
                   names.split_metric(r["split"], "loss"): r["loss_nats"]}
        run = log_to_training_run(args.checkpoint, metrics=metrics)
        if run is not None:
            print(f"logged {', '.join(metrics)} to MLflow run {run.run_id} at step {run.step}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
