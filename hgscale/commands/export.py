"""``hgscale export``: a pipeline/ZeRO checkpoint as one model, in our format or as a Hugging Face model.

    hgscale export --checkpoint runs/ckpt [--tag step00001000] --out runs/export    # model.safetensors + config.json
    hgscale export --checkpoint runs/ckpt --format hf --out runs/hf                 # AutoModelForCausalLM (remote code)
    hgscale export --checkpoint runs/ckpt --out runs/export --register hg-enwik8    # + an MLflow registered model

``--format hgscale`` (the default) is what ``hgscale sample/evaluate`` and ``model.init_from`` read; ``--format hf``
writes a directory ``huggingface_hub.upload_folder`` publishes as it is (config.json with auto_map, a
self-contained modeling file, model.safetensors, a tokenizer); ``model.init_from`` reads it too. The exported
directory remembers the MLflow run that trained it: later scores (``hgscale evaluate``) go there.
"""
from __future__ import annotations

import argparse
import sys

from hgscale.checkpoint.layout import CheckpointError
from hgscale.config import ConfigError
from hgscale.core.status import USER_ERROR
from hgscale.core.storage import StorageError


def _arguments() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="hgscale export", description=__doc__.split("\n")[0].strip("`"))
    ap.add_argument("--checkpoint", required=True, help="checkpoint directory (its latest) or one step directory")
    ap.add_argument("--tag", default=None, help="step directory name inside --checkpoint (default: latest)")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--format", choices=("hgscale", "hf"), default="hgscale",
                    help="hgscale: model.safetensors + our config.json; hf: a Hugging Face model directory")
    ap.add_argument("--register", metavar="NAME", default=None,
                    help="also log the model into the checkpoint's MLflow run as a pyfunc model and register a "
                         "version under NAME in the MLflow Model Registry")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _arguments().parse_args(argv)
    try:
        if args.format == "hf":
            from hgscale.checkpoint.hf.writer import export_hf

            out = export_hf(args.checkpoint, args.out, args.tag)
            print(f"exported a Hugging Face model to {out} (AutoModelForCausalLM.from_pretrained(DIR, "
                  f"trust_remote_code=True))")
        else:
            from hgscale.checkpoint.export import export

            out = export(args.checkpoint, args.out, args.tag)
            print(f"exported {out / 'model.safetensors'} and {out / 'config.json'}")
        if args.register:
            from hgscale.checkpoint.registry import register

            uri, version = register(args.checkpoint, args.register, args.tag)
            print(f"registered {uri} (version {version} of {args.register!r})")
    except (CheckpointError, ConfigError, StorageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return USER_ERROR
    return 0
