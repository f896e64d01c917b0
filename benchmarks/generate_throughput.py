"""Generation throughput: the Hourglass with its decoding cache, against recomputation and vanilla Transformers.

    python benchmarks/generate_throughput.py --threads 1                  # enwik8 sizes, ~20-40 min on 2 busy cores
    python benchmarks/generate_throughput.py --threads 1 --layers-scale 0.25 --gen 512   # quick look

One run, the same prompt of --prompt tokens (batch 1, fp32, random weights of the enwik8 sizes; speed does not
depend on the weights), greedy decoding. Models:
    (a) Hourglass "5@1 24@3 5@1" with the cache (model.decode one token per step, as hgscale.models.generation.generate)
    (b) the same Hourglass recomputing a full forward per token (generate(use_cache=False), the old sampler)
    (c) the vanilla Transformer of the same depth ("34@1") with its K/V cache
    (d) the vanilla Transformer of the same training FLOPs per token, with its K/V cache
One generation of max(--gen) tokens per cached model, the models taking turns by --chunk tokens: tokens/s
after N tokens = N / (seconds of its own work from the prompt to the N-th new token, prefill included).
(b) is timed at --recompute-points context lengths spread over the generation (one forward + argmax each,
between the chunks of the others); the per-step times are interpolated and summed over every step: timing
all 2,048 full forwards would take hours. Cache memory: DecodeCache.nbytes() after the last token
(K/V buffers, projected relative-distance tables, pending resampling rows), and its K/V part alone.
Analytic ratios: training FLOPs per token counting only visible attention pairs (hgscale.models.flops,
causal=True) at T = prompt + max(gen), which is what a cached decoder computes per token; K/V rows the
caches hold at that length (each attention site at cumulative factor P holds ~T/P rows).
Prints a table; writes benchmarks/results/generate_throughput.json.
"""
from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402

from hgscale.config import MODEL_SIZES, ModelConfig, parse_hierarchy  # noqa: E402
from hgscale.models import HourglassLM, flops_per_token  # noqa: E402
from hgscale.models.decode import rows_needed  # noqa: E402


def scaled(hierarchy: str, scale: float) -> str:
    return " ".join(f"{max(1, round(n * scale))}@{k}" for n, k in parse_hierarchy(hierarchy))


def model_configs(scale: float, T: int) -> dict[str, ModelConfig]:
    """(a)/(b) Hourglass, (c) vanilla of equal depth, (d) vanilla of equal causal FLOPs per token at T."""
    common = {"dropout": 0.0, "attn_dropout": 0.0, "max_seq_len": max(T, 8192)}
    hg = ModelConfig(**{**MODEL_SIZES["enwik8"], **common})
    hg.hierarchy = scaled(hg.hierarchy, scale)
    depth = sum(n for n, _ in parse_hierarchy(hg.hierarchy))

    def van(layers: int) -> ModelConfig:
        return ModelConfig(**{**MODEL_SIZES["enwik8_baseline"], **common, "hierarchy": f"{layers}@1"})

    f1, f2 = (flops_per_token(van(n), T, causal=True) for n in (1, 2))
    per_layer, fixed = f2 - f1, 2 * f1 - f2  # vanilla FLOPs are affine in the depth
    same_flops = max(1, round((flops_per_token(hg, T, causal=True) - fixed) / per_layer))
    return {"hourglass": hg, "vanilla_same_depth": van(depth), "vanilla_same_flops": van(same_flops)}


def kv_rows(model, T: int) -> int:
    """Analytic K/V rows of every attention site after T tokens (the cache's own arithmetic is tested apart)."""
    total = 0
    for layer in model.layers:
        kind = layer.kind
        method = {"down": getattr(getattr(layer, "shorten", None), "method", ""),
                  "up": getattr(getattr(layer, "upsample", None), "method", "")}.get(kind, "")
        if kind == "block" or method.startswith("attention_"):
            total += rows_needed(layer, T)[0]
    return total


class CachedRun:
    """Greedy generation with the cache, advanced a chunk of steps at a time; seconds of its own work only."""

    def __init__(self, model, prompt: torch.Tensor, n: int):
        self.model, self.prompt, self.n = model, prompt, n
        self.cache, self.tok, self.elapsed, self.stamps = None, None, 0.0, []

    @torch.no_grad()
    def advance(self, steps: int) -> None:
        t0 = time.perf_counter()
        if self.cache is None:
            self.cache = self.model.init_cache(self.prompt.shape[0], max_len=self.prompt.shape[1] + self.n)
            self.tok = self.model.decode(self.prompt, self.cache)[:, -1:].argmax(-1)  # (B, 1)
            self.stamps.append(self.elapsed + time.perf_counter() - t0)
            steps -= 1
        for _ in range(min(steps, self.n - len(self.stamps))):
            self.tok = self.model.decode(self.tok, self.cache)[:, -1:].argmax(-1)
            self.stamps.append(self.elapsed + time.perf_counter() - t0)
        self.elapsed = self.stamps[-1]

    def result(self) -> dict:
        return {"prefill_s": self.stamps[0], "stamps": self.stamps, "cache_bytes": self.cache.nbytes(),
                "kv_bytes": self.cache.kv_nbytes()}


@torch.no_grad()
def recompute_step(model, seq: torch.Tensor, L: int) -> float:
    """Seconds of one full forward over the first L tokens + argmax (one step of the recomputing sampler)."""
    t = time.perf_counter()
    model(seq[:, :L])[:, -1].argmax(-1)
    return time.perf_counter() - t


def recompute_result(P: int, n: int, lengths: list[int], times: list[float]) -> dict:
    per_step = np.interp(np.arange(P, P + n), lengths, times)  # (n,) seconds of each step, interpolated
    return {"lengths": lengths, "step_s": times, "stamps": np.cumsum(per_step).tolist(), "prefill_s": 0.0,
            "cache_bytes": 0, "kv_bytes": 0}


def parse_args(argv):
    ap = common.parser(__doc__)
    ap.add_argument("--prompt", type=int, default=512, help="prompt tokens")
    ap.add_argument("--gen", type=int, nargs="+", default=[512, 2048], help="report tokens/s after these many")
    ap.add_argument("--layers-scale", type=float, default=1.0, help="multiply every level's layer count")
    ap.add_argument("--recompute-points", type=int, default=6, help="context lengths at which (b) is timed")
    ap.add_argument("--chunk", type=int, default=32, help="tokens each model generates per turn")
    common.add_threads(ap)
    common.add_out(ap, "generate_throughput")
    return ap.parse_args(argv)


def generate_all(models: dict, prompt: torch.Tensor, n: int, args) -> dict:
    """Every model's run of ``n`` new tokens after ``prompt``: the cached ones as CachedRun results, the
    recomputing one (``hourglass_recompute``) from its timed forwards."""
    # Interleaved: every model advances --chunk tokens in turn and (b)'s timed forwards fall between chunks,
    # so a change of machine load hits all of them alike.
    cached = {name: CachedRun(m, prompt, n) for name, m in models.items()}
    T = args.prompt + n
    seq = torch.cat([prompt, torch.randint(0, 256, (1, n), generator=torch.Generator().manual_seed(1))], dim=1)
    lengths = sorted({int(v) for v in np.linspace(args.prompt, T - 1, args.recompute_points).round()})
    rounds = -(-n // args.chunk)
    at_round: dict[int, list[int]] = {}
    for i, L in enumerate(lengths):
        at_round.setdefault(round(i * (rounds - 1) / max(1, len(lengths) - 1)), []).append(L)
    times = []
    for r in range(rounds):
        for run in cached.values():
            run.advance(args.chunk)
        for L in at_round.get(r, []):
            times.append(recompute_step(models["hourglass"], seq, L))
            print(f"round {r + 1}/{rounds}: " + ", ".join(f"{k} {v.elapsed:.1f} s" for k, v in cached.items())
                  + f"; recompute at {L} tokens {times[-1]:.1f} s", flush=True)
    runs = {name: run.result() for name, run in cached.items()}
    runs["hourglass_recompute"] = recompute_result(args.prompt, n, lengths, times)
    return runs


def table_rows(runs: dict, cfgs: dict, models: dict, T: int, gen: list[int]) -> dict:
    """One row per model (a)..(d): sizes, analytic FLOPs and K/V rows at T, prefill, cache bytes, tokens/s."""
    rows = {}
    order = [("a", "hourglass", "hourglass"), ("b", "hourglass_recompute", "hourglass"),
             ("c", "vanilla_same_depth", "vanilla_same_depth"), ("d", "vanilla_same_flops", "vanilla_same_flops")]
    for key, run_name, cfg_name in order:
        r, cfg = runs[run_name], cfgs[cfg_name]
        rows[key] = {"name": run_name, "hierarchy": cfg.hierarchy, "params": models[cfg_name].num_params(),
                     "causal_train_flops_per_token": flops_per_token(cfg, T, causal=True),
                     "kv_rows_analytic": kv_rows(models[cfg_name], T) if key != "b" else 0,
                     "prefill_s": r["prefill_s"], "cache_bytes": r["cache_bytes"], "kv_bytes": r["kv_bytes"],
                     "tokens_per_s": {g: g / r["stamps"][g - 1] for g in gen},
                     **({"recompute_lengths": r["lengths"], "recompute_step_s": r["step_s"]} if key == "b" else {})}
    return rows


def summarize(rows: dict, gen: list[int]) -> dict:
    """Measured speed ratios of (a) against the others, and the analytic ratios they are held to."""
    a, b, c, d = (rows[k] for k in "abcd")
    return {"a_over_b": {g: a["tokens_per_s"][g] / b["tokens_per_s"][g] for g in gen},
            "a_over_c": {g: a["tokens_per_s"][g] / c["tokens_per_s"][g] for g in gen},
            "a_over_d": {g: a["tokens_per_s"][g] / d["tokens_per_s"][g] for g in gen},
            "analytic_flops_ratio_c_over_a": c["causal_train_flops_per_token"] / a["causal_train_flops_per_token"],
            "analytic_kv_rows_ratio_a_over_c": a["kv_rows_analytic"] / c["kv_rows_analytic"],
            "cache_bytes_ratio_a_over_c": a["cache_bytes"] / c["cache_bytes"],
            "kv_bytes_ratio_a_over_c": a["kv_bytes"] / c["kv_bytes"]}


def print_report(args, rows: dict, summary: dict) -> None:
    flops_ratio, kv_ratio = summary["analytic_flops_ratio_c_over_a"], summary["analytic_kv_rows_ratio_a_over_c"]
    print(f"\nprompt {args.prompt}, batch 1, fp32, greedy, {torch.get_num_threads()} thread(s), "
          f"load average {os.getloadavg()[0]:.1f}")
    head = " ".join(f"{'tok/s @' + str(g):>12s}" for g in args.gen)
    print(f"{'':3s} {'model':22s} {'hierarchy':14s} {'GFLOP/tok':>9s} {'prefill s':>9s} {head} "
          f"{'cache MiB':>9s} {'K/V MiB':>8s}")
    for key, r in rows.items():
        tps = " ".join(f"{r['tokens_per_s'][g]:12.2f}" for g in args.gen)
        print(f"({key}) {r['name']:22s} {r['hierarchy']:14s} {r['causal_train_flops_per_token'] / 1e9:9.3f} "
              f"{r['prefill_s']:9.2f} {tps} {r['cache_bytes'] / 2**20:9.1f} {r['kv_bytes'] / 2**20:8.1f}")
    for g in args.gen:
        print(f"@{g}: (a)/(b) {summary['a_over_b'][g]:.1f}x (goal >= 20x at 2048), "
              f"(a)/(c) {summary['a_over_c'][g]:.2f}x = {summary['a_over_c'][g] / flops_ratio:.2f} of the analytic "
              f"FLOPs ratio {flops_ratio:.2f}x "
              f"(goal >= 0.8), (a)/(d) {summary['a_over_d'][g]:.2f}x")
    print(f"cache memory (a)/(c): {summary['cache_bytes_ratio_a_over_c']:.3f} (K/V alone "
          f"{summary['kv_bytes_ratio_a_over_c']:.3f}); analytic K/V rows ratio {kv_ratio:.3f} (goal: <= it)")


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_flush_denormal(True)  # denormal softmax tails slow CPU GEMMs down ~2x
    common.apply_threads(args.threads)
    n, T = max(args.gen), args.prompt + max(args.gen)
    cfgs = model_configs(args.layers_scale, T)
    prompt = torch.randint(0, 256, (1, args.prompt), generator=torch.Generator().manual_seed(0))
    models = {}
    for name, cfg in cfgs.items():
        torch.manual_seed(0)
        models[name] = HourglassLM(cfg).eval()
    runs = generate_all(models, prompt, n, args)
    rows = table_rows(runs, cfgs, models, T, args.gen)
    summary = summarize(rows, args.gen)
    print_report(args, rows, summary)
    common.write_result(args.out, {
        "command": common.command(__file__, argv), "prompt": args.prompt, "gen": args.gen,
        "layers_scale": args.layers_scale, "threads": torch.get_num_threads(), "torch": torch.__version__,
        "machine": platform.machine(), "cpu_count": os.cpu_count(), "load_average_1m": os.getloadavg()[0],
        "rows": rows, "summary": summary})
    return 0


if __name__ == "__main__":
    sys.exit(main())
