"""``hgscale export``: consolidate a pipeline/ZeRO checkpoint into ``model.safetensors`` + ``config.json``.

    hgscale export --checkpoint runs/ckpt [--tag step00001000] --out runs/export
    model, cfg = hgscale.checkpoint.export.load_exported("runs/export")     # HourglassLM, no DeepSpeed

The exported directory remembers the MLflow run that trained it: later scores (``hgscale evaluate``) go there.
"""
from __future__ import annotations

import argparse
import sys

from hgscale.checkpoint.export import export
from hgscale.checkpoint.layout import CheckpointError
from hgscale.config import ConfigError
from hgscale.core.status import USER_ERROR


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="hgscale export", description=__doc__.split("\n")[0].strip("`"))
    ap.add_argument("--checkpoint", required=True, help="checkpoint directory (its latest) or one step directory")
    ap.add_argument("--tag", default=None, help="step directory name inside --checkpoint (default: latest)")
    ap.add_argument("--out", required=True, help="output directory")
    args = ap.parse_args(argv)
    try:
        out = export(args.checkpoint, args.out, args.tag)
    except (CheckpointError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return USER_ERROR
    print(f"exported {out / 'model.safetensors'} and {out / 'config.json'}")
    return 0
