"""``hgscale plan``: the pipeline stage plan of a config, without starting anything.

    hgscale plan --config configs/enwik8_xl.json --stages 4 [--json] [key=value ...]

Per stage: layers, training FLOPs share, parameters and an activation-memory estimate, for the split
balanced by per-layer FLOPs (ours) beside DeepSpeed's ``parameters`` split; imbalance = max/mean stage FLOPs.
"""
from __future__ import annotations

import argparse
import json
import sys

from hgscale.config import ConfigError, load_config
from hgscale.core.status import USER_ERROR


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="hgscale plan", description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--stages", type=int, default=None, help="pipeline stages (default: parallel.pipeline_stages)")
    ap.add_argument("--json", action="store_true", help="print the plan as JSON")
    ap.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = ap.parse_args(argv)
    from hgscale.training.plan import format_plan, stage_plan
    try:
        cfg = load_config(args.config, args.overrides)
        stages = cfg.parallel.pipeline_stages if args.stages is None else args.stages
        if stages < 1:
            raise ConfigError([f"--stages {stages} must be >= 1"])
        plan = stage_plan(cfg, stages)
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return USER_ERROR
    print(json.dumps(plan, indent=1) if args.json else format_plan(plan))
    return 0
