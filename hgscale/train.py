"""Train Hourglass with DeepSpeed.

    deepspeed hgscale/train.py --config configs/enwik8_xl.json [key=value ...]
    python hgscale/train.py --config configs/demo.json          # one process, the same engine
    hgscale train --config configs/demo.json                    # the same

Every configuration and data problem is reported in one message before any process group starts; the exit
status says what happened (hgscale.core.status: OK, USER_ERROR, NAN, HANG, INFRA).
"""
from __future__ import annotations

import argparse
import os
import sys

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hgscale.config import ConfigError, load_config  # noqa: E402
from hgscale.core.status import InfraError, UserError, status_of  # noqa: E402


def parse_args(argv=None, prog: str = "hgscale/train.py") -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True, help="JSON config (see configs/)")
    # the deepspeed launcher passes --local_rank; LOCAL_RANK in the environment is what we read
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.lr=3e-4")
    return ap.parse_args(argv)


def prepare(args: argparse.Namespace):
    """(cfg, DeepSpeed JSON, dataset), every problem raised at once before any process group starts."""
    from hgscale.data import open_dataset
    from hgscale.training.ds_config import deepspeed_config
    from hgscale.training.engine import world_from_env
    from hgscale.training.layout import ParallelLayout
    from hgscale.training.preflight import convert_for_layout, preflight, read_amplification_warning

    cfg = load_config(args.config, args.overrides)
    world = world_from_env()
    ParallelLayout.of(cfg, world, source=args.config).resolve(cfg)  # train.grad_accum_steps=0: derived here
    ds_json = deepspeed_config(cfg, world)
    dataset = open_dataset(cfg.data)  # reads and checks the manifest: a bad URL fails here, on every rank
    problems = preflight(cfg, dataset, world)
    if problems:
        raise ConfigError(problems, args.config)
    warning = read_amplification_warning(cfg, dataset, world)
    if warning and os.environ.get("RANK", "0") == "0":
        print(warning, file=sys.stderr, flush=True)
    convert_for_layout(cfg, world, int(os.environ.get("RANK", "0")))
    return cfg, ds_json, dataset


def main(argv=None, prog: str = "hgscale/train.py") -> int:
    args = parse_args(argv, prog)
    rank = os.environ.get("RANK", "0")
    try:
        cfg, ds_json, dataset = prepare(args)
    except (UserError, InfraError) as e:  # config, data, credentials, checkpoint; storage down after retries: INFRA
        if rank == "0":
            print(f"error: {e}", file=sys.stderr)
        return status_of(e)
    from hgscale.training.engine import leave_process_group
    from hgscale.training.trainer import Trainer
    try:
        status = Trainer(cfg, ds_json, dataset).run()
    # storage failed mid-run (after retries) or the rendezvous did: the message names the URL, a requeued job
    # resumes later (INFRA); or the checkpoint changed between preflight and loading (USER_ERROR)
    except (UserError, InfraError) as e:
        print(f"error (rank {rank}): {e}", file=sys.stderr, flush=True)
        return leave_process_group(status_of(e), clean=False)
    return leave_process_group(status, clean=True)


if __name__ == "__main__":
    sys.exit(main())
