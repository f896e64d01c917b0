"""Sequence parallelism on long sequences: per-rank peak memory and step time, one rank vs two sharing each sequence.

    python benchmarks/sequence_parallel.py                      # 6@1 and 2@1 8@4 2@1, d 256, T 16384 (the table)
    python benchmarks/sequence_parallel.py --lengths 4096 8192 16384 --hierarchies "2@1 8@4 2@1"

For each hierarchy and length: one training step (fp32, micro-batch 1, ZeRO-1, relative attention on the CPU's
blocked kernel) on 1 rank with 2 threads and on 2 ranks with `parallel.sequence_parallel=2` and 1 thread each, so
both use the machine's 2 cores. Measured per rank:

    peak_mb       the step's memory high-water mark above the process before the model was built (Linux VmHWM,
                  reset through /proc/self/clear_refs just before the step, minus VmRSS before TrainEngine):
                  parameters, gradients, Adam states and activations, as the allocator holds them
    step_s        the step's wall time (forward, backward, optimizer)
    all_to_all_s  time inside the all-to-alls (torch profiler, ops named *alltoall*), forward and backward

The longest T within a memory budget (`--budget-gb`, 20) is extrapolated from the measured peaks: with the blocked
kernel every term grows linearly in T, so a line through the two longest measured lengths gives it.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common

ROOT = Path(__file__).resolve().parents[1]
DEEPSPEED = Path(sys.executable).parent / "deepspeed"


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def _config(hierarchy: str, T: int, sp: int) -> dict:
    return {"model": {"vocab_size": 256, "d_model": 256, "n_heads": 4, "d_ff": 1024, "hierarchy": hierarchy,
                      "max_seq_len": T, "dropout": 0.0, "attn_dropout": 0.0, "attn_impl": "blocked"},
            "data": {"url": "unused", "seq_len": T},
            "train": {"micro_batch_size": 1, "grad_accum_steps": 1, "steps": 1, "precision": "fp32",
                      "warmup_steps": 0, "lr_schedule": "constant", "hang_timeout_s": 0},
            "parallel": {"zero_stage": 1, "sequence_parallel": sp}, "tracking": {"enabled": False}}


def worker(cfg_path: str, out: str) -> None:
    """One step of the trainer's engine on synthetic tokens; writes this rank's figures to ``out``.rank<r>.json."""
    import torch

    from hgscale.config import config_from_dict
    from hgscale.training.ds_config import deepspeed_config
    from hgscale.training.engine import TrainEngine, init_distributed, world_from_env

    world = world_from_env()
    cfg = config_from_dict(json.loads(Path(cfg_path).read_text()))
    rt = init_distributed(cfg)
    base_kb = _status_kb("VmRSS")
    eng = TrainEngine(cfg, deepspeed_config(cfg, world), rt)
    T = cfg.data.seq_len
    tokens = torch.randint(0, 256, (1, T + 1), generator=torch.Generator().manual_seed(0))
    batches = iter([(tokens[:, :-1], tokens[:, 1:])])
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS: the high-water mark of this step alone
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        loss = eng.train_step(batches)
        step_s = time.perf_counter() - t0
    a2a = sum(e.self_cpu_time_total for e in prof.key_averages() if "alltoall" in e.key.lower().replace("_", "")) / 1e6
    Path(f"{out}.rank{rt.rank}.json").write_text(json.dumps({
        "rank": rt.rank, "loss": loss, "step_s": step_s, "all_to_all_s": a2a,
        "peak_mb": (_status_kb("VmHWM") - base_kb) / 1024}))


def measure(hierarchy: str, T: int, sp: int, tmp: Path) -> dict:
    """Launch one configuration; the worst rank's figures."""
    cfg = tmp / f"sp{sp}_{T}.json"
    cfg.write_text(json.dumps(_config(hierarchy, T, sp)))
    out = tmp / f"sp{sp}_{T}"
    env = {**os.environ, "OMP_NUM_THREADS": str(2 // sp), "PYTHONPATH": str(ROOT)}
    args = [__file__, "--worker", str(cfg), str(out)]
    cmd = [sys.executable, *args] if sp == 1 else [str(DEEPSPEED), "--num_gpus", str(sp), *args]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    if r.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    ranks = [json.loads(Path(f"{out}.rank{i}.json").read_text()) for i in range(sp)]
    worst = max(ranks, key=lambda x: x["peak_mb"])
    return {"hierarchy": hierarchy, "T": T, "sequence_parallel": sp, "loss": ranks[0]["loss"],
            "peak_mb": worst["peak_mb"], "step_s": max(x["step_s"] for x in ranks),
            "all_to_all_share": max(x["all_to_all_s"] for x in ranks) / max(x["step_s"] for x in ranks)}


def longest_within(rows: list[dict], budget_mb: float) -> int | None:
    """T at which the line through the two longest measured (T, peak) points reaches the budget."""
    pts = sorted((r["T"], r["peak_mb"]) for r in rows)[-2:]
    if len(pts) < 2:
        return None
    (t1, m1), (t2, m2) = pts
    slope = (m2 - m1) / (t2 - t1)
    return int(t2 + (budget_mb - m2) / slope) if slope > 0 else None


def main(argv: list[str] | None = None) -> None:
    ap = common.parser(__doc__)
    ap.add_argument("--hierarchies", nargs="+", default=["6@1", "2@1 8@4 2@1"])
    ap.add_argument("--lengths", nargs="+", type=int, default=[8192, 16384])
    ap.add_argument("--budget-gb", type=float, default=20.0)
    common.add_out(ap, "sequence_parallel")
    args = ap.parse_args(argv)
    rows, longest = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for h in args.hierarchies:
            for sp in (1, 2):
                mine = [measure(h, T, sp, Path(tmp)) for T in args.lengths]
                for row in mine:
                    print(json.dumps(row), flush=True)
                rows += mine
                longest[f"{h} sp{sp}"] = longest_within(mine, args.budget_gb * 1024)
    common.write_result(args.out, {"command": common.command(__file__, argv), "rows": rows,
                                   "longest_T_within_budget": longest, "budget_gb": args.budget_gb})


if __name__ == "__main__":
    own = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the deepspeed launcher adds --local_rank
    if own[:1] == ["--worker"]:
        sys.path.insert(0, str(ROOT))
        worker(own[1], own[2])
    else:
        main()
