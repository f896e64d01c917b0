"""Activation checkpointing by level: per-rank peak memory and step time of each policy, side by side.

    python benchmarks/checkpointing_levels.py                   # 2@1 8@4 2@1, d 256, T 4096 and 8192
    python benchmarks/checkpointing_levels.py --lengths 2048 --policies none all

One rank, 2 threads, one training step (fp32, micro-batch 1, ZeRO-1) per (T, policy), measured as in
benchmarks/sequence_parallel.py (peak: Linux VmHWM above the process before the model was built). The saving of a
policy is the peak it removes against "none"; its cost the step time it adds.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import common
from sequence_parallel import measure


def main(argv: list[str] | None = None) -> None:
    ap = common.parser(__doc__)
    ap.add_argument("--hierarchy", default="2@1 8@4 2@1")
    ap.add_argument("--lengths", nargs="+", type=int, default=[4096, 8192])
    ap.add_argument("--policies", nargs="+", default=["none", "full_resolution", "all"])
    common.add_out(ap, "checkpointing_levels")
    args = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for T in args.lengths:
            for policy in args.policies:
                row = measure(args.hierarchy, T, 1, Path(tmp), {"activation_checkpointing": policy})
                row = {"policy": policy, **{k: row[k] for k in ("T", "peak_mb", "step_s", "loss")}}
                print(json.dumps(row), flush=True)
                rows.append(row)
    common.write_result(args.out, {"command": common.command(__file__, argv), "hierarchy": args.hierarchy,
                                   "rows": rows})


if __name__ == "__main__":
    main()
