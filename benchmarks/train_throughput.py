"""Training-step throughput: the DeepSpeed engine of hgscale against a plain PyTorch loop.

    python benchmarks/train_throughput.py [--config configs/demo.json] [--steps 40] [key=value ...]
    python benchmarks/train_throughput.py --compile ...   # + a third side: the engine with train.compile=true

One process, one run, the same model (same seed), the same micro-batches (read once from the dataset in
data.url, then replayed to both, so data loading costs neither anything) and the same optimisation
(Adam, lr schedule, gradient clipping, gradient accumulation). The two loops take turns step by step,
so machine load hits both alike; each side reports its median step time. MFU uses the model's training
FLOPs per token and the measured matmul peak of this device.
Prints a table; writes benchmarks/results/train_throughput.json. Goal: DeepSpeed >= 0.9 x plain.
"""
from __future__ import annotations

import itertools
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402

from hgscale.config import load_config  # noqa: E402
from hgscale.core.schedule import lr_multiplier  # noqa: E402
from hgscale.models import HourglassLM, flops_per_token, lm_loss  # noqa: E402
from hgscale.training.ds_config import deepspeed_config  # noqa: E402


class PlainLoop:
    """What one would write without DeepSpeed: model, AdamW, LambdaLR, clip, accumulate."""

    def __init__(self, cfg):
        t = cfg.train
        self.cfg = cfg
        self.model = HourglassLM(cfg.model, seed=t.seed).train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=t.lr, betas=tuple(t.betas), eps=t.eps,
                                     weight_decay=t.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_multiplier(cfg))

    def train_step(self, it) -> float:
        acc, A = 0.0, self.cfg.train.grad_accum_steps
        for _ in range(A):
            x, y = next(it)
            loss = lm_loss(self.model(x), y)
            (loss / A).backward()
            acc += float(loss.detach())
        if self.cfg.train.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.train.grad_clip)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        return acc / A


def breakdown(engine, plain: PlainLoop, batch, steps: int) -> dict:
    """Median ms of forward / backward / optimizer step of one micro-batch, each side, interleaved."""
    x, y = batch
    e, m = engine.engine, plain.model

    def ds_parts():
        t0 = time.perf_counter()
        loss = e(x, y)
        t1 = time.perf_counter()
        e.backward(loss)
        t2 = time.perf_counter()
        e.step()
        return t1 - t0, t2 - t1, time.perf_counter() - t2

    def plain_parts():
        t0 = time.perf_counter()
        loss = lm_loss(m(x), y)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(m.parameters(), plain.cfg.train.grad_clip or float("inf"))
        plain.opt.step()
        plain.sched.step()
        plain.opt.zero_grad(set_to_none=True)
        return t1 - t0, t2 - t1, time.perf_counter() - t2

    parts = {"deepspeed": [], "plain_pytorch": []}
    for _ in range(steps):
        parts["deepspeed"].append(ds_parts())
        parts["plain_pytorch"].append(plain_parts())
    return {k: {n: statistics.median(p[i] for p in v) * 1e3 for i, n in enumerate(("fwd_ms", "bwd_ms", "step_ms"))}
            for k, v in parts.items()}


def timed_round(step_fn, it, steps: int) -> tuple[float, list[float]]:
    """Wall seconds and losses of ``steps`` optimizer steps."""
    losses = []
    t0 = time.perf_counter()
    for _ in range(steps):
        losses.append(step_fn(it))
    return time.perf_counter() - t0, losses


def parse_args(argv):
    ap = common.parser(__doc__)
    ap.add_argument("--config", default="configs/demo.json")
    ap.add_argument("--steps", type=int, default=40, help="timed optimizer steps per side")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per side first")
    common.add_threads(ap)
    ap.add_argument("--breakdown", action="store_true", help="also time forward / backward / optimizer step apart "
                    "(needs train.grad_accum_steps=1)")
    ap.add_argument("--compile", action="store_true", help="also time a DeepSpeed engine with train.compile=true "
                    "(per-layer torch.compile; its first steps include the compilation, so use --warmup >= 2)")
    common.add_out(ap, "train_throughput")
    ap.add_argument("overrides", nargs="*")
    return ap.parse_args(argv)


def read_batches(cfg) -> list:
    """Eight optimizer steps' micro-batches of the training split, read once and replayed to every side."""
    from hgscale.data import open_dataset

    t, d = cfg.train, cfg.data
    ds = open_dataset(d)
    stream = ds.stream(d.train_split, t.micro_batch_size, d.seq_len, 0, 1, seed=d.seed, num_workers=0)
    batches = list(itertools.islice(iter(stream), t.grad_accum_steps * 8))
    if hasattr(stream, "close"):
        stream.close()
    return batches


def time_sides(sides: dict, batches: list, warmup: int, steps: int) -> tuple[dict, dict]:
    """({side: seconds of each timed step}, {side: its first three losses})."""
    its = {k: itertools.cycle(batches) for k in sides}
    for name, fn in sides.items():
        timed_round(fn, its[name], warmup)
    times = {k: [] for k in sides}
    first_losses = {k: [] for k in sides}
    order = list(sides)
    for i in range(steps):  # one step each, taking turns (and swapping who goes first) so load bursts hit both
        for name in (order if i % 2 == 0 else order[::-1]):
            dt, losses = timed_round(sides[name], its[name], 1)
            times[name].append(dt)
            if len(first_losses[name]) < 3:
                first_losses[name] += losses
    return times, first_losses


def side_rows(times: dict, tokens: int, fpt: float, peak: float | None) -> dict:
    """Per side: tokens/s at the median step time, the mean, model TFLOP/s and MFU (None without a peak)."""
    rows = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        tps = tokens / med
        rows[name] = {"tokens_per_s": tps, "step_s": med, "step_s_mean": statistics.fmean(ts),
                      "tflops": fpt * tps / 1e12, "mfu": fpt * tps / peak if peak else None}
    return rows


def print_table(cfg, rows: dict, peak: float | None, ratio: float) -> None:
    t, d = cfg.train, cfg.data
    print(f"model {cfg.model.hierarchy!r} d={cfg.model.d_model}, batch {t.micro_batch_size} x accum "
          f"{t.grad_accum_steps} x {d.seq_len} tokens, {t.precision}, ZeRO-{cfg.parallel.zero_stage}, "
          f"{torch.get_num_threads()} threads, peak {peak / 1e9 if peak else float('nan'):.0f} GFLOP/s")
    print(f"{'loop':16s}{'tokens/s':>12s}{'step ms':>10s}{'GFLOP/s':>10s}{'MFU':>8s}")
    for name, r in rows.items():
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
        print(f"{name:16s}{r['tokens_per_s']:>12,.0f}{r['step_s'] * 1e3:>10.1f}{r['tflops'] * 1e3:>10.1f}{mfu:>8s}")
    print(f"deepspeed / plain = {ratio:.3f} (goal >= 0.9)")


def main(argv=None) -> int:
    args = parse_args(argv)
    common.apply_threads(args.threads)

    from hgscale.tracking import peak_flops
    from hgscale.training.engine import TrainEngine, init_distributed

    cfg = load_config(args.config, args.overrides + ["parallel.pipeline_stages=1"])
    ds_json = deepspeed_config(cfg, 1)
    t, d = cfg.train, cfg.data
    batches = read_batches(cfg)
    rt = init_distributed(cfg)
    engine = TrainEngine(cfg, ds_json, rt)
    plain = PlainLoop(cfg)
    sides = {"deepspeed": engine.train_step, "plain_pytorch": plain.train_step}
    if args.compile:
        import copy
        cfg_c = copy.deepcopy(cfg)
        cfg_c.train.compile = True
        sides["deepspeed_compiled"] = TrainEngine(cfg_c, ds_json, rt).train_step
    times, first_losses = time_sides(sides, batches, args.warmup, args.steps)

    fpt = flops_per_token(cfg.model, d.seq_len)
    peak = peak_flops(rt.device, cfg.tracking.peak_tflops, t.precision)
    rows = side_rows(times, t.grad_accum_steps * t.micro_batch_size * d.seq_len, fpt, peak)  # tokens per step
    ratio = rows["deepspeed"]["tokens_per_s"] / rows["plain_pytorch"]["tokens_per_s"]
    print_table(cfg, rows, peak, ratio)
    compiled = None
    if "deepspeed_compiled" in rows:
        compiled = rows["deepspeed_compiled"]["tokens_per_s"] / rows["deepspeed"]["tokens_per_s"]
        print(f"compiled / eager deepspeed = {compiled:.3f}; first losses eager {first_losses['deepspeed']}, "
              f"compiled {first_losses['deepspeed_compiled']}")
    parts = None
    if args.breakdown and t.grad_accum_steps == 1:
        parts = breakdown(engine, plain, batches[0], args.steps)
        for name, p in parts.items():
            print(f"{name:16s} forward {p['fwd_ms']:.1f} ms, backward {p['bwd_ms']:.1f} ms, step {p['step_ms']:.1f} ms")
    common.write_result(args.out, {
        "config": args.config, "overrides": args.overrides, "hierarchy": cfg.model.hierarchy,
        "d_model": cfg.model.d_model, "micro_batch_size": t.micro_batch_size, "grad_accum_steps": t.grad_accum_steps,
        "seq_len": d.seq_len, "precision": t.precision, "zero_stage": cfg.parallel.zero_stage,
        "threads": torch.get_num_threads(), "timed_steps": args.steps, "statistic": "median step time",
        "flops_per_token": fpt, "peak_flops": peak, "results": rows, "ratio_deepspeed_over_plain": ratio,
        "first_losses": first_losses, "breakdown_ms": parts, "ratio_compiled_over_eager": compiled,
        "machine": platform.platform(),
        "torch": torch.__version__}, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
