"""``hgscale plan``: the pipeline stage plan of a config, or its per-rank memory, without starting anything.

    hgscale plan --config configs/enwik8_xl.json --stages 4 [--json] [key=value ...]
    hgscale plan --config C --memory [--world 8] [--device cuda|cpu] [--json]      # per-rank peak, broken down
    hgscale plan --config C --gpus 64 --gpu-mem 80GB [--top 20] [--json]          # the layouts that fit, fastest first

Stage plan: per stage, layers, training FLOPs share, parameters and an activation-memory estimate, for the split
balanced by per-layer FLOPs (ours) beside DeepSpeed's ``parameters`` split; imbalance = max/mean stage FLOPs.
Memory: hgscale/training/memory.py (its docstring holds the model). Sizes: GB/MB/TB are powers of 1000, GiB/MiB/TiB
powers of 1024.
"""
from __future__ import annotations

import argparse
import json
import re
import sys

from hgscale.config import ConfigError, load_config
from hgscale.core.status import USER_ERROR

_UNITS = {"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "kib": 2**10, "mib": 2**20, "gib": 2**30,
          "tib": 2**40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]+)\s*$", re.IGNORECASE)
_PARTS = ("parameters", "gradients", "optimizer", "activations", "buffers", "transient")


class FlagError(ValueError):
    """A command-line value that cannot be used: the message names the flag and what would work."""


def parse_size(text: str, flag: str = "--gpu-mem") -> float:
    """'80GB' -> 80e9, '80GiB' -> 80 * 2**30, '512MB' -> 512e6; FlagError for anything else."""
    m = _SIZE.match(text or "")
    if not m or m.group(2).lower() not in _UNITS or float(m.group(1)) <= 0:
        raise FlagError(f"{flag} {text!r} is not a memory size: write a positive number and a unit (B, KB, MB, GB, "
                        f"TB or KiB, MiB, GiB, TiB), e.g. {flag} 80GB or {flag} 80GiB")
    return float(m.group(1)) * _UNITS[m.group(2).lower()]


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def format_memory(pred: dict, levels: list[tuple[int, int]], checkpointed: set[int]) -> str:
    lay = pred["layout"]
    lines = [f"per-rank peak {_gib(pred['total'])} on {pred['device']}: {lay['world_size']} process(es), "
             f"{lay['pipeline_stages']} stage(s) x {lay['data_parallel_size']} data-parallel x "
             f"{lay['sequence_parallel_size']} sequence-parallel, ZeRO-{lay['zero_stage']}, micro-batch "
             f"{lay['micro_batch_size']} x accumulation {lay['grad_accum_steps']}, activation_checkpointing "
             f"{lay['activation_checkpointing']!r}, seq_len {pred['seq_len']} (padded {pred['padded_len']})",
             f"at the {pred['peak_at']} of stage {pred['stage']} (layers [{pred['layers'][0]},{pred['layers'][1]}), "
             f"{pred['in_flight']} micro-batch(es) in flight)"]
    lines += [f"  {k:12s}{_gib(pred[k]):>12s}  {pred[k] / pred['total']:6.1%}" for k in _PARTS]
    lines.append("activations kept for backward by level (all in-flight micro-batches):")
    by_level = pred["activations_by_level"]
    for key in sorted(by_level, key=lambda k: int(k) if k.isdigit() else len(levels)):
        i = int(key) if key.isdigit() else None
        name = key if i is None else f"level {i} {levels[i][0]}@{levels[i][1]}" + " checkpointed" * (i in checkpointed)
        val = by_level[key]
        lines.append(f"  {name:28s}{_gib(val):>12s}")
    if len(pred["stages"]) > 1:
        lines.append("per stage: " + ", ".join(f"{_gib(st['total'])} ({st['in_flight']} in flight)"
                                               for st in pred["stages"]))
    return "\n".join(lines)


def format_layouts(rows: list[dict], gpus: int, mem: float, top: int) -> str:
    lines = [f"{len(rows)} layout(s) of {gpus} GPUs fit {_gib(mem)} per GPU; fastest predicted step first"
             + (f" (top {top})" if len(rows) > top else ""),
             f"{'dp':>4s}{'pp':>4s}{'sp':>4s}{'zero':>5s}{'micro':>6s}{'accum':>6s}  {'checkpointing':16s}"
             f"{'peak':>11s}{'step s':>10s}  peak at"]
    for r in rows[:top]:
        lines.append(f"{r['dp']:>4d}{r['pp']:>4d}{r['sp']:>4d}{r['zero']:>5d}{r['micro']:>6d}{r['accum']:>6d}  "
                     f"{r['policy']:16s}{_gib(r['total']):>11s}{r['step_s']:>10.4f}  {r['peak_at']}")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="hgscale plan", description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--stages", type=int, default=None, help="pipeline stages (default: parallel.pipeline_stages)")
    ap.add_argument("--json", action="store_true", help="print the plan as JSON")
    ap.add_argument("--memory", action="store_true", help="predict the per-rank peak memory of a training step")
    ap.add_argument("--world", type=int, default=None,
                    help="--memory: processes (default: parallel.pipeline_stages x parallel.sequence_parallel x the "
                         "data-parallel size train.global_batch_size implies, else 1)")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                    help="--memory: the attention kernels and dropout masks of this device (default cuda)")
    ap.add_argument("--gpus", type=int, default=None, help="list the layouts of this many GPUs that fit --gpu-mem")
    ap.add_argument("--gpu-mem", default=None, help="memory per GPU, e.g. 80GB, 80GiB, 512MB")
    ap.add_argument("--top", type=int, default=20, help="--gpus: layouts shown (default 20)")
    ap.add_argument("overrides", nargs="*", help="key=value config overrides")
    return ap


def _memory(cfg, args) -> str:
    from hgscale.training.layout import ParallelLayout
    from hgscale.training.memory import fitting_layouts, predict_layout

    if args.gpus is not None or args.gpu_mem is not None:
        if args.gpus is None or args.gpu_mem is None:
            raise FlagError("--gpus and --gpu-mem go together: e.g. --gpus 64 --gpu-mem 80GB")
        if args.gpus < 1:
            raise FlagError(f"--gpus {args.gpus} must be >= 1: the number of GPUs to lay the run out on, e.g. --gpus 8")
        mem = parse_size(args.gpu_mem)
        rows = fitting_layouts(cfg, args.gpus, mem, args.device)
        if not rows:
            raise FlagError(f"no layout of --gpus {args.gpus} fits --gpu-mem {args.gpu_mem}: add GPUs, or shorten "
                            f"data.seq_len / train.micro_batch_size (--memory shows where the memory goes)")
        return json.dumps(rows[: args.top], indent=1) if args.json else format_layouts(rows, args.gpus, mem, args.top)
    p = cfg.parallel
    if args.stages is not None:  # the memory of the config on that many stages
        p.pipeline_stages = args.stages
        cfg.validate(source=f"--stages {args.stages}")
    world = ParallelLayout.implied_world(cfg) if args.world is None else args.world
    if world < 1:
        raise FlagError(f"--world {world} must be >= 1: the number of processes of the run")
    pred = predict_layout(cfg, ParallelLayout.of(cfg, world, source=f"--world {world}"), device=args.device)
    if args.json:
        return json.dumps(pred, indent=1)
    from hgscale.core.notation import checkpointed_levels

    return format_memory(pred, cfg.model.levels(), checkpointed_levels(p.activation_checkpointing, cfg.model.levels()))


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from hgscale.training.plan import format_plan, stage_plan
    try:
        cfg = load_config(args.config, args.overrides)
        if args.memory or args.gpus is not None or args.gpu_mem is not None:
            print(_memory(cfg, args))
            return 0
        stages = cfg.parallel.pipeline_stages if args.stages is None else args.stages
        if stages < 1:
            raise ConfigError([f"--stages {stages} must be >= 1"])
        plan = stage_plan(cfg, stages)
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return USER_ERROR
    print(json.dumps(plan, indent=1) if args.json else format_plan(plan))
    return 0
