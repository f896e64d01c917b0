"""The ``hgscale`` command (also ``python -m hgscale``): one subcommand per task, each a thin main over library
functions, in the manner of litgpt, mlflow and deepspeed's own tools.

    hgscale train --config configs/demo.json          # = python hgscale/train.py; deepspeed hgscale/train.py ...
    hgscale evaluate --checkpoint runs/demo/checkpoints --split test
    hgscale sample --checkpoint runs/demo/checkpoints --prompt "The with statement"
    hgscale export --checkpoint runs/demo/checkpoints --out runs/demo/export [--format hf] [--register NAME]
    hgscale sweep --config CONFIG --budgets 3e14,1e15 --seeds 3 --tune train.lr=1e-3,2e-3   # vs matched baselines
    hgscale report --experiment hgscale
    hgscale plan --config configs/enwik8_xl.json --stages 4
    hgscale config configs/demo.json train.lr=3e-4     # the resolved config (--help-keys: every key)
    hgscale verify s3://bucket/enwik8                  # every shard's size, sha256 and counts
    hgscale prepare demo --out data/demo               # data_pipelines: demo, enwik8, text, merge, images
"""
from __future__ import annotations

import importlib
import sys

from hgscale.core.status import USER_ERROR

COMMANDS = {
    "train": "train a model (DeepSpeed: data, pipeline and ZeRO parallelism)",
    "evaluate": "score a split with a checkpoint (the paper's enwik8 protocol)",
    "sample": "sample text or images from a checkpoint",
    "export": "a checkpoint as one model: ours, a Hugging Face model (--format hf), a registered MLflow model",
    "report": "compare MLflow runs by compute",
    "sweep": "Hourglass vs matched baselines at equal training FLOPs: plan, run, resume",
    "plan": "print the pipeline stage plan of a config",
    "config": "print the resolved config, or every key (--help-keys)",
    "verify": "check every shard of a prepared dataset",
    "prepare": "prepare a dataset into shards + manifest",
}


def usage() -> str:
    rows = "\n".join(f"  {name:10s} {text}" for name, text in COMMANDS.items())
    return (f"usage: hgscale COMMAND [ARGS ...]\n\ncommands:\n{rows}\n\n"
            f"'hgscale COMMAND --help' shows a command's options.")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"{usage()}\n\nerror: unknown command {name!r}", file=sys.stderr)
        return USER_ERROR
    return importlib.import_module(f"hgscale.commands.{name}").main(rest) or 0
