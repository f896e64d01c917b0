"""Training throughput of the enwik8 Hourglass against the vanilla Transformer of the same depth.

    python benchmarks/model_throughput.py --threads 1           # T=2048, "5@1 24@3 5@1" vs "34@1", ~4 min
    python benchmarks/model_throughput.py --layers-scale 0.25   # same shapes, a quarter of the layers
    python benchmarks/model_throughput.py --attn-dropout 0      # without the paper's attention dropout
    python benchmarks/model_throughput.py --compile --layers-scale 0.25   # + per-layer torch.compile copies
    python benchmarks/model_throughput.py --sweep 1024,2048,4096,8192 --sweep-memory   # d 256 sweep, see below
    python benchmarks/model_throughput.py --memory 2048,8192 --memory-model 6@1        # kernel memory modes

Measured side by side in one run (iterations of the two models interleaved, so machine load hits both
alike; best step of each): forward+backward tokens/s at batch 1, the fp32 matrix-multiply peak (2048^3
GEMM, best of samples taken before, between and after the steps), model FLOPs
(hgscale.models.flops: full-square attention convention) and MFU against that peak, the measured
speed-up against the analytic FLOPs ratio, and the relative-attention kernels (naive / sdpa / blocked)
on one layer's shapes. Prints a table; writes benchmarks/results/model_throughput.json.

--compile adds compiled copies of both models (hgscale.training.compile, regional) to the interleaving
and reports compiled / eager speed. --sweep (benchmarks/seq_sweep.py, fresh processes, d 256) measures the
Hourglass ``--sweep-hierarchy`` against the vanilla Transformer of equal depth and of equal training FLOPs
at each T, with --sweep-memory each one's peak RSS, with --sweep-compile all of them compiled per layer
(as train.compile=true); --memory the blocked kernel's memory modes
(probabilities all kept / default budget / all recomputed) on ``--memory-model``: speed side by side, peak
RSS of one step each. With --sweep or --memory only those run (the enwik8 comparison is skipped).
"""
from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402

from hgscale.config import MODEL_SIZES, ModelConfig, parse_hierarchy  # noqa: E402
from hgscale.models import HourglassLM, flops_per_token  # noqa: E402
from hgscale.models.attention import REL_KERNELS, Geometry  # noqa: E402


def matmul_peak(n: int = 2048, reps: int = 5) -> float:
    """Best fp32 GEMM FLOP/s over a few repetitions."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def scaled(hierarchy: str, scale: float) -> str:
    return " ".join(f"{max(1, round(n * scale))}@{k}" for n, k in parse_hierarchy(hierarchy))


def model_configs(scale: float, impl: str, attn_dropout: float | None) -> dict[str, ModelConfig]:
    extra = {"attn_impl": impl} if attn_dropout is None else {"attn_impl": impl, "attn_dropout": attn_dropout}
    hg = ModelConfig(**{**MODEL_SIZES["enwik8"], **extra})
    hg.hierarchy = scaled(hg.hierarchy, scale)
    depth = sum(n for n, _ in parse_hierarchy(hg.hierarchy))
    van = ModelConfig(**{**MODEL_SIZES["enwik8_baseline"], **extra, "hierarchy": f"{depth}@1"})
    return {"hourglass": hg, "vanilla": van}


def train_step(model, tokens, labels) -> None:
    logits = model(tokens)
    F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)).backward()
    model.zero_grad(set_to_none=True)


def bench_models(cfgs: dict, T: int, batch: int, warmup: int, iters: int, peaks: list[float],
                 compiled: bool = False) -> dict:
    """Best step time of each model; the GEMM peak is sampled between steps into ``peaks``. ``compiled``
    adds a per-layer compiled copy of each model (same weights) as ``<name>_compiled``."""
    torch.manual_seed(0)
    models = {name: HourglassLM(cfg).train() for name, cfg in cfgs.items()}
    if compiled:
        import copy

        from hgscale.training.compile import compile_layers
        for name in list(models):
            twin = copy.deepcopy(models[name])
            if compile_layers(twin.layers):
                models[f"{name}_compiled"], cfgs = twin, {**cfgs, f"{name}_compiled": cfgs[name]}
    tokens = torch.randint(0, 256, (batch, T + 1))
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    times: dict[str, list[float]] = {name: [] for name in models}
    for i in range(warmup + iters):
        for name, model in models.items():  # interleaved: drifting machine load hits both models alike
            t = time.perf_counter()
            train_step(model, inputs, labels)
            if i >= warmup:
                times[name].append(time.perf_counter() - t)
            peaks.append(matmul_peak(reps=3))
    out = {}
    for name, cfg in cfgs.items():
        best = min(times[name])
        fpt, useful = flops_per_token(cfg, T, batch), flops_per_token(cfg, T, batch, causal=True)
        out[name] = {"hierarchy": cfg.hierarchy, "params": models[name].num_params(), "step_s": best,
                     "step_s_all": times[name], "tokens_per_s": batch * T / best, "flops_per_token": fpt,
                     "causal_flops_per_token": useful, "model_flops_per_s": fpt * batch * T / best,
                     "causal_flops_per_s": useful * batch * T / best}
    return out


def bench_kernels(T: int, heads: int, d_head: int, d_model: int, reps: int) -> dict:
    """One self-attention layer's relative-attention core, forward + backward; kernels interleaved, best of reps."""
    torch.manual_seed(0)
    leaves = [torch.randn(1, heads, T, d_head, requires_grad=True) for _ in range(4)] + \
             [torch.randn(d_model, d_model, requires_grad=True)]
    geo = Geometry("self", T, T, 1, 1)
    runs = {name: (lambda name=name: REL_KERNELS[name](*leaves, geo)) for name in ("naive", "sdpa", "blocked")}
    runs["sdpa_causal_no_positions"] = lambda: F.scaled_dot_product_attention(*leaves[:3], is_causal=True)
    best = {name: float("inf") for name in runs}
    for i in range(reps + 1):
        for name, run in runs.items():
            t = time.perf_counter()
            run().sum().backward()
            if i:
                best[name] = min(best[name], time.perf_counter() - t)
    return best


def parse_args(argv):
    ap = common.parser(__doc__)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--layers-scale", type=float, default=1.0, help="multiply every level's layer count")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--iters", type=int, default=2)
    common.add_threads(ap)
    ap.add_argument("--impl", default="auto", help="model.attn_impl for both models")
    ap.add_argument("--attn-dropout", type=float, default=None,
                    help="override model.attn_dropout (the enwik8 sizes use the paper's 0.2)")
    ap.add_argument("--kernel-reps", type=int, default=3)
    ap.add_argument("--keep-denormals", action="store_true", help="do not flush denormal floats to zero")
    ap.add_argument("--compile", action="store_true", help="also time per-layer compiled copies of both models")
    ap.add_argument("--sweep", default="", help="comma-separated T of the d 256 sweep (e.g. 1024,2048,4096,8192)")
    ap.add_argument("--sweep-hierarchy", default="2@1 8@4 2@1")
    ap.add_argument("--sweep-d", type=int, default=256)
    ap.add_argument("--sweep-memory", action="store_true", help="peak RSS of each sweep model (a process each)")
    ap.add_argument("--sweep-compile", action="store_true", help="sweep models with per-layer torch.compile")
    ap.add_argument("--memory", default="", help="comma-separated T for the blocked kernel's memory modes")
    ap.add_argument("--memory-model", default="6@1")
    common.add_out(ap, "model_throughput")
    return ap.parse_args(argv)


def compare(models: dict, peak: float) -> dict:
    """Adds each model's MFU (full-square and causal count) against ``peak`` and a compiled copy's speed-up
    over its eager model; returns the Hourglass / vanilla ratios, measured and analytic."""
    hg, van = models["hourglass"], models["vanilla"]
    for m in models.values():
        m["mfu"] = m["model_flops_per_s"] / peak
        m["mfu_causal"] = m["causal_flops_per_s"] / peak
    for name in ("hourglass", "vanilla"):
        if f"{name}_compiled" in models:
            compiled = models[f"{name}_compiled"]
            compiled["speedup_over_eager"] = models[name]["step_s"] / compiled["step_s"]
    return {"analytic_flops_ratio": van["flops_per_token"] / hg["flops_per_token"],
            "analytic_causal_flops_ratio": van["causal_flops_per_token"] / hg["causal_flops_per_token"],
            "measured_speedup": hg["tokens_per_s"] / van["tokens_per_s"]}


def print_report(args, cfgs: dict, models: dict, peak: float, ratios: dict, kernels: dict) -> None:
    analytic, speedup = ratios["analytic_flops_ratio"], ratios["measured_speedup"]
    print(f"dropout {cfgs['hourglass'].dropout}, attention dropout {cfgs['hourglass'].attn_dropout}, "
          f"T={args.seq_len}, batch {args.batch}")
    print(f"fp32 matmul peak (2048^3): {peak / 1e9:.1f} GFLOP/s, {torch.get_num_threads()} threads, "
          f"flush denormals: {not args.keep_denormals}, load average {os.getloadavg()[0]:.1f}")
    print(f"{'model':10s} {'hierarchy':16s} {'params':>8s} {'step s':>8s} {'tok/s':>8s} {'GFLOP/tok':>10s} "
          f"{'GFLOP/s':>8s} {'MFU':>6s} {'MFU causal':>10s}")
    for name, m in models.items():
        print(f"{name:10s} {m['hierarchy']:16s} {m['params'] / 1e6:7.1f}M {m['step_s']:8.2f} "
              f"{m['tokens_per_s']:8.1f} {m['flops_per_token'] / 1e9:10.3f} {m['model_flops_per_s'] / 1e9:8.1f} "
              f"{m['mfu']:6.1%} {m['mfu_causal']:10.1%}")
    print("(MFU counts attention over the full square, as FlopCounterMode and fused kernels do; "
          "'MFU causal' only the visible half)")
    print(f"speed-up hourglass/vanilla: measured {speedup:.2f}x, analytic FLOPs ratio {analytic:.2f}x "
          f"(causal count {ratios['analytic_causal_flops_ratio']:.2f}x), measured/analytic {speedup / analytic:.2f} "
          f"(goal >= 0.9)")
    for name in ("hourglass", "vanilla"):
        if f"{name}_compiled" in models:
            print(f"{name}: compiled / eager speed {models[f'{name}_compiled']['speedup_over_eager']:.3f}x")
    speed = kernels["naive"] / kernels["blocked"]
    print(f"relative attention kernel, one layer, T={args.seq_len}, 8 heads x 64, fwd+bwd: "
          + ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in kernels.items())
          + f"; blocked is {speed:.1f}x faster than naive")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.sweep or args.memory:
        return sweeps(args, argv)
    # Denormal floats (softmax tails of peaked attention) run ~2x slower through CPU GEMMs; flush them
    # to zero, as a CPU training process should.
    torch.set_flush_denormal(not args.keep_denormals)
    common.apply_threads(args.threads)

    # best step times against the best GEMM rate seen in the same run: both at the least-loaded moments
    peaks = [matmul_peak()]
    cfgs = model_configs(args.layers_scale, args.impl, args.attn_dropout)
    models = bench_models(cfgs, args.seq_len, args.batch, args.warmup, args.iters, peaks, args.compile)
    kernels = bench_kernels(args.seq_len, 8, 64, 512, args.kernel_reps)
    peak = max(peaks + [matmul_peak()])
    ratios = compare(models, peak)
    print_report(args, cfgs, models, peak, ratios, kernels)
    common.write_result(args.out, {
        "command": common.command(__file__, argv), "seq_len": args.seq_len, "batch": args.batch,
        "layers_scale": args.layers_scale, "dropout": cfgs["hourglass"].dropout,
        "attn_dropout": cfgs["hourglass"].attn_dropout, "threads": torch.get_num_threads(),
        "flush_denormal": not args.keep_denormals, "torch": torch.__version__, "machine": platform.machine(),
        "cpu_count": os.cpu_count(), "load_average_1m": os.getloadavg()[0], "matmul_peak_flops": peak,
        "matmul_peak_samples": peaks, "models": models, **ratios,
        "speedup_over_analytic": ratios["measured_speedup"] / ratios["analytic_flops_ratio"],
        "relative_attention_kernel_s": kernels})
    return 0


def sweeps(args, argv) -> int:
    """--sweep / --memory: measurements in fresh processes (benchmarks/seq_sweep.py)."""
    import seq_sweep

    threads = args.threads or torch.get_num_threads()
    result = {"command": common.command(__file__, argv),
              "threads": threads, "d_model": args.sweep_d, "attn_dropout": args.attn_dropout,
              "torch": torch.__version__, "cpu_count": os.cpu_count(), "load_average_1m": os.getloadavg()[0]}
    if args.sweep:
        rows = seq_sweep.sweep([int(t) for t in args.sweep.split(",")], args.sweep_hierarchy, args.sweep_d,
                               args.iters, threads, args.attn_dropout, args.sweep_memory, args.sweep_compile)
        print(f"{'T':>6s} {'model':20s} {'hierarchy':14s} {'step s':>8s} {'tok/s':>8s} {'speed/hg':>9s} "
              f"{'analytic':>9s} {'meas/anal':>9s} {'paired/anal':>11s} {'executed':>9s} {'meas/exec':>9s} "
              f"{'peak MB':>8s}")
        for r in rows:
            print(f"{r['T']:6d} {r['model']:20s} {r['hierarchy']:14s} {r['step_s']:8.2f} {r['tokens_per_s']:8.0f} "
                  f"{r['speed_vs_hourglass']:9.3f} {r['analytic_speed_vs_hourglass']:9.3f} "
                  f"{r['measured_over_analytic']:9.3f} {r['paired_median_over_analytic']:11.3f} "
                  f"{r['executed_speed_vs_hourglass']:9.3f} "
                  f"{r['measured_over_executed']:9.3f} {r.get('peak_rss_mb', float('nan')):8.0f}")
        print("(speed/hg: that model's speed relative to the Hourglass; analytic: the FLOPs ratio that predicts it;"
              " paired: the median of each round's speed ratio; executed: the ratio of the multiply FLOPs the two steps"
              " really execute)")
        result["sweep"] = rows
    if args.memory:
        rows = seq_sweep.kernel_modes(args.memory_model, [int(t) for t in args.memory.split(",")], args.sweep_d,
                                      args.iters, threads, args.attn_dropout)
        print(f"{'T':>6s} {'model':8s} {'kernel mode':12s} {'step s':>8s} {'peak RSS MB':>12s} {'model RSS MB':>13s}")
        for r in rows:
            step = f"{r['step_s']:8.2f}" if r["step_s"] is not None else "     n/a"
            print(f"{r['T']:6d} {r['hierarchy']:8s} {r['mode']:12s} {step} {r['peak_rss_mb']:12.0f} "
                  f"{r['model_rss_mb']:13.0f}")
        result["memory"] = rows
    common.write_result(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
