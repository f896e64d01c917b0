"""Sequence-length sweep and peak memory for benchmarks/model_throughput.py (``--sweep``, ``--memory``).

Each measurement runs in a fresh Python process (``python benchmarks/seq_sweep.py JSON``), so peak resident
memory (ru_maxrss) belongs to that measurement alone, and one T's allocations never warm the next.

    speed:  one process per T, the models' training steps interleaved in alternating order (best step of
            each, and the median over rounds of each round's paired speed ratio, which shrugs off a slow
            stretch of this noisy machine better than a ratio of two best steps), and the
            multiply FLOPs each model's training step really executes (FlopCounterMode; the blocked kernel
            skips masked blocks, which the analytic count in hgscale.models.flops does not)
    memory: one process per (model, T, kernel mode), one forward+backward

Kernel modes of the blocked relative-attention kernel (hgscale/models/blocked_attention.py):
    keep_all   every block's probabilities kept for the backward (the kernel before recomputation)
    default    kept up to blocked_attention.KEEP_BYTES per layer, the rest recomputed
    recompute  nothing kept: O(T * block) memory
"""
from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODES = {"keep_all": 1 << 62, "default": None, "recompute": 0}
_DEFAULT_KEEP = None  # blocked_attention.KEEP_BYTES as imported, set in the child


def small_config(hierarchy: str, T: int, d: int, attn_dropout: float | None):
    from hgscale.config import ModelConfig

    extra = {} if attn_dropout is None else {"attn_dropout": attn_dropout}
    return ModelConfig(d_model=d, n_heads=d // 64, d_ff=4 * d, hierarchy=hierarchy, vocab_size=256,
                       max_seq_len=T, **extra)


def equal_flops_depth(hierarchy: str, T: int, d: int) -> int:
    """Layers of the vanilla Transformer whose training FLOPs per token are closest to the Hourglass's."""
    from hgscale.models import flops_per_token

    hg = flops_per_token(small_config(hierarchy, T, d, None), T)
    per = {n: flops_per_token(small_config(f"{n}@1", T, d, None), T) for n in range(1, 65)}
    return min(per, key=lambda n: abs(per[n] - hg))


def _set_mode(mode: str) -> None:
    import hgscale.models.blocked_attention as ba

    ba.KEEP_BYTES = MODES[mode] if MODES[mode] is not None else _DEFAULT_KEEP


def child(spec: dict) -> dict:
    """Runs in the fresh process: step times of spec['models'] x spec['modes'] at spec['T'], interleaved."""
    import torch
    import torch.nn.functional as F

    global _DEFAULT_KEEP
    import hgscale.models.blocked_attention as ba
    from hgscale.models import HourglassLM

    _DEFAULT_KEEP = ba.KEEP_BYTES
    torch.set_flush_denormal(True)
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    T, d = spec["T"], spec["d"]
    torch.manual_seed(0)
    models = {h: HourglassLM(small_config(h, T, d, spec.get("attn_dropout"))).train() for h in spec["models"]}
    tokens = torch.randint(0, 256, (1, T + 1))

    def train_step(m) -> None:
        logits = m(tokens[:, :-1])
        F.cross_entropy(logits.reshape(-1, 256), tokens[:, 1:].reshape(-1)).backward()
        m.zero_grad(set_to_none=True)

    executed = {h: executed_flops(train_step, m) for h, m in models.items()} if spec.get("count_flops") else {}
    if spec.get("compile"):  # train.compile's regional compilation; the warm-up step compiles
        from hgscale.training.compile import compile_layers
        for m in models.values():
            compile_layers(m.layers, say=lambda *_: None)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    times: dict = {}
    for i in range(spec["warmup"] + spec["iters"]):
        for h, m in (list(models.items()) if i % 2 == 0 else list(models.items())[::-1]):  # alternate the order
            for mode in spec["modes"]:
                _set_mode(mode)
                t0 = time.perf_counter()
                train_step(m)
                if i >= spec["warmup"]:
                    times.setdefault(f"{h}|{mode}", []).append(time.perf_counter() - t0)
    return {"step_s": {k: min(v) for k, v in times.items()}, "step_s_all": times, "executed_flops": executed,
            "model_rss_mb": base_rss, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def executed_flops(train_step, model) -> int:
    """Multiply FLOPs of one eager training step of ``model`` as executed (forward and backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        train_step(model)
    return counter.get_total_flops()


def run_child(spec: dict, timeout: float = 3600) -> dict:
    r = subprocess.run([sys.executable, __file__, json.dumps(spec)], capture_output=True, text=True, timeout=timeout,
                       cwd=ROOT)
    if r.returncode != 0:
        raise RuntimeError(f"measurement {spec} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def sweep(lengths, hierarchy: str, d: int, iters: int, threads: int, attn_dropout, memory: bool,
          compile: bool = False) -> list[dict]:
    """Hourglass vs vanilla of equal depth and of equal FLOPs at each T: speed (one process per T) and,
    with ``memory``, peak RSS of one step per model (one process each); ``compile``: every model with
    per-layer torch.compile (hgscale.training.compile), as train.compile=true trains."""
    from hgscale.config import parse_hierarchy
    from hgscale.models import flops_per_token

    depth = sum(n for n, _ in parse_hierarchy(hierarchy))
    rows = []
    for T in lengths:
        models = {"hourglass": hierarchy, "vanilla_equal_depth": f"{depth}@1",
                  "vanilla_equal_flops": f"{equal_flops_depth(hierarchy, T, d)}@1"}
        spec = {"T": T, "d": d, "models": sorted(set(models.values())), "modes": ["default"], "warmup": 1,
                "iters": iters, "threads": threads, "attn_dropout": attn_dropout, "compile": compile,
                "count_flops": True}
        res = run_child(spec)
        fl = {h: flops_per_token(small_config(h, T, d, attn_dropout), T) for h in spec["models"]}
        hg_s, hg_all = res["step_s"][f"{hierarchy}|default"], res["step_s_all"][f"{hierarchy}|default"]
        for name, h in models.items():
            s = res["step_s"][f"{h}|default"]
            paired = statistics.median(a / b for a, b in zip(hg_all, res["step_s_all"][f"{h}|default"], strict=True))
            row = {"T": T, "model": name, "hierarchy": h, "compiled": compile, "step_s": s, "tokens_per_s": T / s,
                   "speed_vs_hourglass": hg_s / s, "flops_per_token": fl[h],
                   "analytic_speed_vs_hourglass": fl[hierarchy] / fl[h]}
            row["measured_over_analytic"] = row["speed_vs_hourglass"] / row["analytic_speed_vs_hourglass"]
            row["speed_vs_hourglass_paired_median"] = paired
            row["paired_median_over_analytic"] = paired / row["analytic_speed_vs_hourglass"]
            ex = res["executed_flops"]
            row["executed_flops_per_token"] = ex[h] / T
            row["executed_speed_vs_hourglass"] = ex[hierarchy] / ex[h]
            row["measured_over_executed"] = row["speed_vs_hourglass"] / row["executed_speed_vs_hourglass"]
            if memory:
                m = run_child({**spec, "models": [h], "warmup": 0, "iters": 1, "count_flops": False})
                row["peak_rss_mb"], row["model_rss_mb"] = m["peak_rss_mb"], m["model_rss_mb"]
            rows.append(row)
    return rows


def kernel_modes(hierarchy: str, lengths, d: int, iters: int, threads: int, attn_dropout) -> list[dict]:
    """The blocked kernel's memory modes on one model: step time side by side (one process per T) and
    peak RSS of one step (one process per mode)."""
    rows = []
    for T in lengths:
        spec = {"T": T, "d": d, "models": [hierarchy], "modes": list(MODES), "warmup": 1, "iters": iters,
                "threads": threads, "attn_dropout": attn_dropout}
        speed = run_child(spec) if iters else {"step_s": {}}
        for mode in MODES:
            m = run_child({**spec, "modes": [mode], "warmup": 0, "iters": 1})
            rows.append({"T": T, "hierarchy": hierarchy, "mode": mode, "peak_rss_mb": m["peak_rss_mb"],
                         "model_rss_mb": m["model_rss_mb"], "step_s": speed["step_s"].get(f"{hierarchy}|{mode}")})
    return rows


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    print(json.dumps(child(json.loads(sys.argv[1]))))
