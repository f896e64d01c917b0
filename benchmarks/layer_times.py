"""Where a Hourglass step goes: forward + backward time and FLOP rate of each layer, on its own.

    python benchmarks/layer_times.py --threads 1                               # d 256 "2@1 8@4 2@1", T 1,024
    python benchmarks/layer_times.py --threads 1 --seq-len 2048 --out benchmarks/results/layer_times_2k.json

The model of the sequence-length sweep (benchmarks/seq_sweep.py: d 256, 4 heads, d_ff 1024, dropout 0.2).
Each layer of ``HourglassLM.layers`` runs forward + backward on the state it receives in the full model
(recorded once), layers interleaved over the rounds; CPU time (time.process_time), best round after a
warm-up. FLOPs per layer are hgscale.models.flops' (attention over the full square); the rate shows
which layers run below the full-resolution blocks' efficiency. Writes benchmarks/results/layer_times.json.

--split also divides each layer's CPU time between matrix multiplies and everything else (torch.profiler
self times) and counts the multiply FLOPs the layer really executes (FlopCounterMode: the blocked kernel
skips masked blocks, so this differs from the analytic count). It shows whether a layer is slow because its
multiplies run slower, because it executes fewer of the FLOPs the analytic count credits it with, or because
of per-token work (LayerNorm, GELU, dropout, residual adds) that no FLOP count includes.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
import common  # noqa: E402
from seq_sweep import small_config  # noqa: E402

from hgscale.models import HourglassLM  # noqa: E402
from hgscale.models.flops import layer_flops  # noqa: E402
from hgscale.models.hourglass import layer_plan  # noqa: E402


def layer_inputs(model: HourglassLM, tokens: torch.Tensor) -> list:
    """The state each layer receives in a forward of the whole model."""
    states, state = [], tokens
    with torch.no_grad():
        for layer in model.layers:
            states.append(state)
            state = layer(state)
    return states


def step(layer, state) -> None:
    if isinstance(state, tuple):  # leaves of their own, so the backward stops at this layer
        state = tuple(t.detach().requires_grad_(t.is_floating_point()) for t in state)
    out = layer(state)
    out = out if torch.is_tensor(out) else out[0]
    out.backward(torch.ones_like(out))
    layer.zero_grad(set_to_none=True)


MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm", "aten::baddbmm_"}


def split(layer, state, steps: int = 3) -> dict:
    """Multiply FLOPs one forward + backward executes, and its CPU seconds per step in multiply kernels
    and in all other operators (profiler self times, which include the profiler's own overhead)."""
    with FlopCounterMode(display=False) as counter:
        step(layer, state)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step(layer, state)
    matmul = sum(e.self_cpu_time_total for e in prof.key_averages() if e.key in MATMUL_OPS)
    other = sum(e.self_cpu_time_total for e in prof.key_averages() if e.key not in MATMUL_OPS)
    return {"matmul_flops": counter.get_total_flops(), "matmul_s": matmul / 1e6 / steps,
            "other_s": other / 1e6 / steps}


def print_split(rows: list[dict]) -> None:
    print(f"{'layer':12s} {'executed/counted':>16s} {'matmul GFLOP/s':>14s} {'matmul ms':>9s} {'other ms':>8s}")
    for r in rows:
        if not r["flops"]:  # the embedding multiplies nothing
            continue
        print(f"{r['layer']:12s} {r['matmul_flops'] / r['flops']:16.2f} "
              f"{r['matmul_flops'] / r['matmul_s'] / 1e9:14.1f} {r['matmul_s'] * 1e3:9.1f} {r['other_s'] * 1e3:8.1f}")


def main(argv=None) -> int:
    ap = common.parser(__doc__)
    ap.add_argument("--hierarchy", default="2@1 8@4 2@1")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--attn-dropout", type=float, default=None)
    ap.add_argument("--rounds", type=int, default=8)
    common.add_threads(ap)
    ap.add_argument("--split", action="store_true", help="also split each layer's time: multiplies / the rest")
    common.add_out(ap, "layer_times")
    args = ap.parse_args(argv)
    torch.set_flush_denormal(True)
    common.apply_threads(args.threads)
    cfg = small_config(args.hierarchy, args.seq_len, args.d, args.attn_dropout)
    torch.manual_seed(0)
    model = HourglassLM(cfg).train()
    states = layer_inputs(model, torch.randint(0, cfg.vocab_size, (1, args.seq_len)))
    times: list[list[float]] = [[] for _ in model.layers]
    for r in range(args.rounds + 1):
        for i, layer in enumerate(model.layers):
            t = time.process_time()
            step(layer, states[i])
            if r:
                times[i].append(time.process_time() - t)
    rows = []
    for item, ts, per_token in zip(layer_plan(cfg), times, layer_flops(cfg, args.seq_len), strict=True):
        best, flops = min(ts), per_token * args.seq_len
        rows.append({"layer": " ".join(map(str, item)), "s": best, "flops": flops, "flops_per_s": flops / best})
    if args.split:
        for row, layer, state in zip(rows, model.layers, states, strict=True):
            row.update(split(layer, state))
    total = sum(r["s"] for r in rows)
    print(f"{args.hierarchy}, d {args.d}, T={args.seq_len}, {torch.get_num_threads()} threads, "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"{'layer':12s} {'ms':>8s} {'share':>6s} {'GFLOP':>7s} {'GFLOP/s':>8s}")
    for r in rows:
        print(f"{r['layer']:12s} {r['s'] * 1e3:8.1f} {r['s'] / total:6.1%} {r['flops'] / 1e9:7.2f} "
              f"{r['flops_per_s'] / 1e9:8.1f}")
    print(f"sum {total * 1e3:.0f} ms")
    if args.split:
        print_split(rows)
    common.write_result(args.out, {
        "command": common.command(__file__, argv), "hierarchy": args.hierarchy, "seq_len": args.seq_len,
        "d_model": args.d, "threads": torch.get_num_threads(), "load_average_1m": os.getloadavg()[0], "layers": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
