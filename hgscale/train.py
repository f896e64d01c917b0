"""Train Hourglass with DeepSpeed.

    deepspeed hgscale/train.py --config configs/enwik8_xl.json [key=value ...]
    python hgscale/train.py --config configs/demo.json          # one process, the same engine

Every configuration and data problem is reported in one message before any process group starts.
"""
from __future__ import annotations

import argparse
import os
import sys

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hgscale.config import ConfigError, load_config  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="hgscale/train.py", description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True, help="JSON config (see configs/)")
    # the deepspeed launcher passes --local_rank; LOCAL_RANK in the environment is what we read
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.lr=3e-4")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    rank0 = os.environ.get("RANK", "0") == "0"
    from hgscale.data import DataError, open_dataset
    try:
        from hgscale.distributed.ds_config import deepspeed_config
        from hgscale.distributed.engine import rendezvous_env

        cfg = load_config(args.config, args.overrides)
        world = rendezvous_env()
        cfg.validate(world, source=args.config)
        ds_json = deepspeed_config(cfg, world)
        dataset = open_dataset(cfg.data)  # reads and checks the manifest: a bad URL fails here, on every rank
        from hgscale.distributed.preflight import preflight
        problems = preflight(cfg, dataset, world)
        if problems:
            raise ConfigError(problems, args.config)
    except (ConfigError, DataError) as e:
        if rank0:
            print(f"error: {e}", file=sys.stderr)
        return 2
    from hgscale.checkpoint import CheckpointError
    from hgscale.distributed.trainer import Trainer
    try:
        return Trainer(cfg, ds_json, dataset).run()
    # storage failed mid-run (after retries): the message names the URL, resume later; or the checkpoint
    # changed between preflight and loading
    except (DataError, CheckpointError) as e:
        print(f"error (rank {os.environ.get('RANK', '0')}): {e}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
