"""Generation throughput: the Hourglass with its decoding cache, against recomputation and vanilla Transformers.

    python benchmarks/generate_throughput.py --threads 1                  # enwik8 sizes, ~20-40 min on 2 busy cores
    python benchmarks/generate_throughput.py --threads 1 --layers-scale 0.25 --gen 512   # quick look
    python benchmarks/generate_throughput.py --threads 1 --speed --against HEAD   # the decoder itself, ~3 min

--speed: this decoder against that of git revision (or directory) --against, recomputation, batch 8 against 1,
side by side (d_model 256, "2@1 8@4 2@1", 128 tokens after 256; speed_main); writes generate_decoding.json.
Without it:

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
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402

from hgscale.config import MODEL_SIZES, ModelConfig, parse_hierarchy  # noqa: E402
from hgscale.models import HourglassLM, flops_per_token  # noqa: E402
from hgscale.models.decode import rows_needed  # noqa: E402
from hgscale.models.generation import GraphStep  # noqa: E402


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
    ap.add_argument("--prompt", type=int, default=None, help="prompt tokens (default 512; --speed 256)")
    ap.add_argument("--gen", type=int, nargs="+", default=None,
                    help="report tokens/s after these many (default 512 2048; --speed 128)")
    ap.add_argument("--layers-scale", type=float, default=1.0, help="multiply every level's layer count")
    ap.add_argument("--recompute-points", type=int, default=6, help="context lengths at which (b) is timed")
    ap.add_argument("--chunk", type=int, default=32, help="tokens each model generates per turn")
    common.add_threads(ap)
    common.add_out(ap, "generate_throughput")
    ap.add_argument("--speed", action="store_true", help="the decoder itself (see the docstring)")
    ap.add_argument("--against", default="", help="--speed: git revision (or directory) of the decoder to compare")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="--speed: batch sizes")
    ap.add_argument("--rounds", type=int, default=3, help="--speed: rounds (best of; order alternates)")
    ap.add_argument("--device", default="cpu", help="--speed: cpu, or cuda (adds the CUDA-graph step)")
    args = ap.parse_args(argv)
    args.prompt = args.prompt or (256 if args.speed else 512)
    args.gen = args.gen or ([128] if args.speed else [512, 2048])
    if args.speed and args.out == str(common.RESULTS / "generate_throughput.json"):
        args.out = str(common.RESULTS / "generate_decoding.json")
    return args


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


# ------------------------------------------------------------------------------------------------ --speed

SPEED_MODEL = {"d_model": 256, "n_heads": 4, "d_ff": 1024, "hierarchy": "2@1 8@4 2@1", "dropout": 0.0}
ROOT = Path(__file__).resolve().parents[1]
NEW = (lambda m, B, L: m.init_cache(B, max_len=L), lambda m, x, c: m.decode(x, c))  # this tree's decoder


def decoder_at(against: str) -> types.ModuleType:
    """hgscale/models/decode.py of git revision ``against`` (or of the directory ``against``) with that
    revision's cached_attention.py, as modules of their own: the old decoder runs beside the new one."""
    def source(name: str) -> str:
        if Path(against).is_dir():
            return (Path(against) / name).read_text()
        return subprocess.run(["git", "show", f"{against}:hgscale/models/{name}"], cwd=ROOT, check=True,
                              capture_output=True, text=True).stdout
    mods, key = {}, "hgscale.models.cached_attention"
    saved = sys.modules[key]
    try:
        for name in ("cached_attention", "decode"):  # decode's import finds the old cached_attention
            mods[name] = types.ModuleType(f"{name}_{Path(against).name}")
            exec(compile(source(f"{name}.py"), f"{against}:{name}.py", "exec"), mods[name].__dict__)
            sys.modules[key] = mods["cached_attention"]
    finally:
        sys.modules[key] = saved
    return mods["decode"]


def clock(device: torch.device) -> float:
    """CPU: this process's CPU seconds (time other jobs take is not counted); CUDA: wall, synchronised."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        return time.perf_counter()
    return time.process_time()


@torch.no_grad()
def run_cached(model, prompt: torch.Tensor, n: int, init, dec, graph: bool = False) -> dict:
    """Greedy: the prompt (prefill; its last logits give new token 1), then n - 1 one-token steps."""
    t0 = clock(prompt.device)
    cache = init(model, prompt.shape[0], prompt.shape[1] + n)
    tok = dec(model, prompt, cache)[:, -1:].argmax(-1)  # (B, 1)
    t1, out = clock(prompt.device), [tok]
    step = GraphStep(model, cache) if graph else (lambda x: dec(model, x, cache))
    for _ in range(n - 1):
        tok = step(tok)[:, -1:].argmax(-1)
        out.append(tok)
    return {"prefill_s": t1 - t0, "steps_s": clock(prompt.device) - t1, "tokens": torch.cat(out, 1)}


@torch.no_grad()
def run_recompute(model, prompt: torch.Tensor, n: int) -> dict:
    """Greedy by a full forward over the whole sequence per new token (generate(use_cache=False))."""
    seq, t0 = prompt, clock(prompt.device)
    for _ in range(n):
        seq = torch.cat([seq, model(seq)[:, -1:].argmax(-1)], 1)
    return {"prefill_s": 0.0, "steps_s": clock(prompt.device) - t0, "tokens": seq[:, prompt.shape[1]:]}


def speed_variants(args, old) -> dict:
    """name -> (batch, (init, decode) of a decoder or None: recomputation, CUDA graphs or not)."""
    out = {}
    for B in args.batch:
        out[f"new|{B}"] = (B, NEW, False)
        out.update({f"old|{B}": (B, (old.DecodeCache, old.decode), False)} if old is not None else {})
        out.update({f"graph|{B}": (B, NEW, True)} if args.device == "cuda" else {})
    out[f"recompute|{min(args.batch)}"] = (min(args.batch), None, False)
    return out


def measure_speed(model, variants: dict, n: int, prompt_len: int, rounds: int, device) -> dict:
    """Every variant once per round, the order reversed every other round; the minimum of each time."""
    prompts = {B: torch.randint(0, 256, (B, prompt_len), generator=torch.Generator().manual_seed(B)).to(device)
               for B, _, _ in variants.values()}
    best: dict = {}
    for r in range(rounds):
        for name in (list(variants) if r % 2 == 0 else list(variants)[::-1]):
            B, dec, graph = variants[name]
            res = run_recompute(model, prompts[B], n) if dec is None else run_cached(model, prompts[B], n, *dec, graph)
            res["total_s"] = res["prefill_s"] + res["steps_s"]
            b = best.setdefault(name, {"batch": B, "tokens": res["tokens"]})
            for k in ("prefill_s", "steps_s", "total_s"):
                b[k] = min(b.get(k, float("inf")), res[k])
            print(f"round {r + 1}/{rounds} {name:12s} {res['total_s']:.3f} s", flush=True)
    for name, b in best.items():
        steps = n if name.startswith("recompute") else n - 1
        b.update(tokens_per_s=b["batch"] * n / b["total_s"], step_ms=1e3 * b["steps_s"] / steps,
                 step_tokens_per_s=b["batch"] * steps / b["steps_s"], tokens=b["tokens"].tolist())
    return best


def overhead_steps(old, rounds: int) -> dict:
    """ms per one-token step of the same hierarchy at d_model 16: what a step costs apart from its arithmetic."""
    torch.manual_seed(0)
    tiny = HourglassLM(ModelConfig(**{**SPEED_MODEL, "d_model": 16, "d_ff": 16, "vocab_size": 8})).eval()
    prompt = torch.randint(0, 8, (1, 256), generator=torch.Generator().manual_seed(0))
    runs = {"new": NEW, **({"old": (old.DecodeCache, old.decode)} if old is not None else {})}
    return {name: min(run_cached(tiny, prompt, 128, *dec)["steps_s"] for _ in range(rounds)) / 127 * 1e3
            for name, dec in runs.items()}


def profile_steps(model, B: int, prompt_len: int, steps: int = 32) -> dict:
    """torch.profiler over one-token steps of this decoder: ms per step of the 8 ops taking the most time."""
    cache = model.init_cache(B, max_len=prompt_len + steps + 1)
    with torch.no_grad():
        tok = model.decode(torch.zeros(B, prompt_len, dtype=torch.long), cache)[:, -1:].argmax(-1)
        with torch.profiler.profile() as prof:
            for _ in range(steps):
                tok = model.decode(tok, cache)[:, -1:].argmax(-1)
    ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    return {"total_ms": sum(e.self_cpu_time_total for e in ops) / steps / 1e3,
            **{e.key: {"ms": e.self_cpu_time_total / steps / 1e3, "calls": e.count / steps} for e in ops[:8]}}


def speed_summary(res: dict, batches: list[int]) -> dict:
    """The ratios, all from this one run; same_tokens: every decoder generated the same tokens (recomputation's)."""
    def r(a: str, b: str, k: str = "tokens_per_s") -> float:
        return res[a][k] / res[b][k]
    lo, hi = min(batches), max(batches)
    out = {"new_over_recompute": r(f"new|{lo}", f"recompute|{lo}")}
    for who in ("new", "old", "graph"):
        for B in batches:
            if who != "new" and f"{who}|{B}" in res:
                out[f"new_over_{who}_batch{B}"] = r(f"new|{B}", f"{who}|{B}")
                out[f"new_over_{who}_batch{B}_steps"] = r(f"new|{B}", f"{who}|{B}", "step_tokens_per_s")
        if f"{who}|{hi}" in res and hi != lo:
            out[f"{who}_batch{hi}_over_batch{lo}"] = r(f"{who}|{hi}", f"{who}|{lo}")
            out[f"{who}_batch{hi}_over_batch{lo}_steps"] = r(f"{who}|{hi}", f"{who}|{lo}", "step_tokens_per_s")
    out["same_tokens"] = all(v["tokens"] == res[f"new|{v['batch']}"]["tokens"] for v in res.values())
    return out


def speed_main(args, command: str) -> int:
    device = torch.device(args.device)
    old = decoder_at(args.against) if args.against else None
    torch.manual_seed(0)
    model = HourglassLM(ModelConfig(**SPEED_MODEL)).to(device).eval()
    n = max(args.gen)
    res = measure_speed(model, speed_variants(args, old), n, args.prompt, args.rounds, device)
    summary = speed_summary(res, args.batch)
    print(f"\nd_model 256, {SPEED_MODEL['hierarchy']}, prompt {args.prompt}, {n} new tokens, {args.device}, "
          f"{torch.get_num_threads()} thread(s), load average {os.getloadavg()[0]:.1f}")
    for name, b in res.items():
        print(f"{name:12s} prefill {b['prefill_s'] * 1e3:7.1f} ms  step {b['step_ms']:6.2f} ms  "
              f"{b['tokens_per_s']:8.1f} tokens/s  (steps alone {b['step_tokens_per_s']:8.1f})")
    for k, v in summary.items():
        print(f"{k}: {v:.2f}" if isinstance(v, float) else f"{k}: {v}")
    extra = {"overhead_step_ms": overhead_steps(old, args.rounds),  # CPU only: what the ops cost apart
             "profile": {B: profile_steps(model, B, args.prompt) for B in args.batch}} if args.device == "cpu" else {}
    print(f"step at d_model 16 (overhead alone), ms: {extra.get('overhead_step_ms')}")
    common.write_result(args.out, {
        "command": command, "model": SPEED_MODEL, "prompt": args.prompt, "new_tokens": n, "against": args.against,
        "device": args.device, "threads": torch.get_num_threads(), "torch": torch.__version__,
        "load_average_1m": os.getloadavg()[0], "cpu_count": os.cpu_count(), "runs": res, "summary": summary, **extra})
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_flush_denormal(True)  # denormal softmax tails slow CPU GEMMs down ~2x
    common.apply_threads(args.threads)
    if args.speed:
        return speed_main(args, common.command(__file__, argv))
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
