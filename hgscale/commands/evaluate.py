"""Score a whole split with a trained model, on one device, without DeepSpeed; or run lm-evaluation-harness tasks.

    hgscale evaluate --checkpoint runs/enwik8_xl/checkpoints --split test [--data-url URL]
    hgscale evaluate --checkpoint runs/demo/checkpoints --harness TASK[,TASK...] [--harness-include DIR] [--limit N]

Text (enwik8 protocol of the paper): the split is cut into chunks of 128 tokens; each chunk is scored
with the 53 x 128 tokens before it as context (6912 tokens per window), so every token but the first is
scored exactly once with long context. A model built for shorter sequences (model.max_seq_len) gets as
many context chunks as fit; the output says how many. Images (and ``--protocol windows``): non-overlapping windows of
data.seq_len tokens, as in validation. Prints bits per character (text) or per dimension (images).

--harness: lm-evaluation-harness tasks (lm_eval >= 0.4, the hf extra) with the model itself on one device;
perplexity tasks roll each document through the same sliding chunks (--chunk, --context-chunks), so their
bits_per_byte is this command's bpc on the same text. Task YAML of your own: --harness-include DIR.

--checkpoint takes a training checkpoint directory (consolidated in memory) or an exported one.
"""
from __future__ import annotations

import argparse
import json
import sys

from hgscale.core.status import USER_ERROR


def _parser() -> argparse.ArgumentParser:
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
    ap.add_argument("--harness", default=None, metavar="TASKS",
                    help="comma-separated lm-evaluation-harness tasks or groups, instead of a split")
    ap.add_argument("--harness-include", action="append", default=[], metavar="DIR",
                    help="a directory of extra task YAML files (lm_eval's include_path); repeatable")
    ap.add_argument("--limit", type=float, default=None,
                    help="--harness: the first N documents of each task (below 1: that fraction)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--json", default=None, help="also write the result to this JSON file")
    ap.add_argument("--no-track", action="store_true",
                    help="do not log the result into the checkpoint's MLflow run")
    return ap


def _log(args: argparse.Namespace, metrics: dict) -> None:
    from hgscale.checkpoint.run_link import log_to_training_run

    run = log_to_training_run(args.checkpoint, metrics=metrics)
    if run is not None:
        shown = ", ".join(metrics) if len(metrics) <= 4 else f"{len(metrics)} metrics"
        print(f"logged {shown} to MLflow run {run.run_id} at step {run.step}")


def _split(args: argparse.Namespace) -> int:
    from hgscale.checkpoint.layout import CheckpointError
    from hgscale.config import ConfigError
    from hgscale.core.storage import StorageError
    from hgscale.evaluation.splits import evaluate
    from hgscale.tracking import names

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
        _log(args, {names.split_metric(r["split"], r["metric"]): r["value"],
                    names.split_metric(r["split"], "loss"): r["loss_nats"]})
    return 0


def _harness(args: argparse.Namespace) -> int:
    from hgscale.core.status import UserError
    from hgscale.evaluation.textlm import HarnessError

    tasks = [t.strip() for t in args.harness.split(",") if t.strip()]
    limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
    try:
        if not tasks:
            raise HarnessError(f"--harness {args.harness!r} names no task; pass e.g. --harness lambada_openai")
        from hgscale.evaluation.harness import run_harness, tracked_metrics  # imports lm_eval

        results = run_harness(args.checkpoint, tasks, args.harness_include, limit, args.batch_size, args.device,
                              args.chunk, args.context_chunks, args.data_url)
    except UserError as e:  # HarnessError, CheckpointError, ConfigError, DataError (a tokenizer file) ...
        print(f"error: {e}", file=sys.stderr)
        return USER_ERROR
    from lm_eval.utils import handle_non_serializable, make_table

    print(make_table(results))
    if results.get("groups"):
        print(make_table(results, "groups"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=handle_non_serializable)
    if not args.no_track:
        _log(args, tracked_metrics(results))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.harness is None and (args.harness_include or args.limit is not None):
        print("error: --harness-include and --limit apply to --harness TASKS; a split takes --max-chunks",
              file=sys.stderr)
        return USER_ERROR
    if args.harness is not None and args.max_chunks is not None:
        print("error: --max-chunks applies to a split; --harness TASKS takes --limit N (documents per task)",
              file=sys.stderr)
        return USER_ERROR
    return _harness(args) if args.harness is not None else _split(args)


if __name__ == "__main__":
    sys.exit(main())
