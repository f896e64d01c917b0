"""One-shot check of every CUDA path of hgscale, then enwik8 Hourglass and vanilla training throughput.

    python benchmarks/gpu_check.py                                   # one GPU, under 8 minutes
    python benchmarks/gpu_check.py --tiny --device cpu --compile-backend aot_eager --out /tmp/g.json   # CI size

Checks (each records ok / error and its figures; the exit status is 1 if any failed):
  attention   relative-attention kernels (blocked, sdpa, fused through SDPA, fused through FlexAttention
              where it compiles) against the naive kernel in fp32 and bf16, values and gradients, for
              self, pooled-query (shortening) and upsampling geometries; time and peak memory of each
  dropout     the model's dropout (fused F.dropout on GPU) drops p of the entries and keeps the mean;
              attention dropout of the blocked and fused kernels averages back to no dropout
  bf16_step   a bf16-autocast training step of a small Hourglass: finite, close to fp32, weights move
  compile     per-layer torch.compile (hgscale.training.compile) on/off: losses within 0.5 %
  oom         an out-of-memory error writes a memory snapshot (hgscale.training.profiling; CUDA only)
  train       the enwik8 Hourglass and the vanilla baseline for --steps steps on real text (the Python
              reference manual bytes): tokens/s, TFLOP/s, MFU against the device's peak table
              (hgscale.tracking.efficiency), peak memory, first and last loss
Writes benchmarks/results/gpu_check.json.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import resource
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hgscale.config import MODEL_SIZES, ModelConfig  # noqa: E402
from hgscale.models import HourglassLM, flops_per_token  # noqa: E402
from hgscale.models.attention import REL_KERNELS, Geometry, rel_attention_naive  # noqa: E402
from hgscale.models.dropout import dropout  # noqa: E402
from hgscale.models.fused_attention import flex_usable, rel_attention_fused  # noqa: E402
from hgscale.tracking import peak_flops  # noqa: E402
from hgscale.training.compile import compile_layers, still_compiled  # noqa: E402
from hgscale.training.profiling import watch_cuda_oom  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "gpu_check.json"
TOL = {torch.float32: 2e-3, torch.bfloat16: 4e-2}  # max error / max |reference|, values and gradients


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_mb(device, reset: bool = False) -> float:
    """Peak memory since the last reset: CUDA allocator on GPU, process RSS on CPU (never reset)."""
    if device.type == "cuda":
        mb = torch.cuda.max_memory_allocated(device) / 2**20
        if reset:
            torch.cuda.reset_peak_memory_stats(device)
        return mb
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def text_tokens(n: int) -> torch.Tensor:
    """n bytes of real English: the Python reference manual that ships with every Python."""
    from pydoc_data.topics import topics
    data = "\n".join(topics[k] for k in sorted(topics)).encode()
    return torch.tensor(list((data * (1 + n // len(data)))[:n]), dtype=torch.long)


def rel_error(got, want) -> float:
    return float((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-12))


# ---------------------------------------------------------------------------------------------- checks

def check_attention(device, T: int, heads: int, d_head: int) -> dict:
    D = heads * d_head
    geos = {"self": Geometry("self", T, T, 1, 1), "down": Geometry("down", T // 4, T, 4, 1),
            "up": Geometry("up", T, T // 4, 4, 1)}
    kernels = {"blocked": REL_KERNELS["blocked"], "sdpa": REL_KERNELS["sdpa"],
               "fused_sdpa": lambda *a: rel_attention_fused(*a, use_flex=False)}
    if flex_usable(device):
        kernels["fused_flex"] = lambda *a: rel_attention_fused(*a, use_flex=True)
    out, ok = {}, True
    for dtype in (torch.float32, torch.bfloat16):
        for gname, geo in geos.items():
            torch.manual_seed(0)
            leaves = [torch.randn(1, heads, n, d_head, device=device) * 0.5
                      for n in (geo.n_q, geo.n_q, geo.n_k, geo.n_k)]
            leaves.append(torch.randn(D, D, device=device) / D ** 0.5)
            grad = torch.randn(1, heads, geo.n_q, d_head, device=device)
            ref_in = [x.clone().requires_grad_() for x in leaves]  # the reference: naive in fp32
            ref = rel_attention_naive(*ref_in, geo)
            ref_grads = torch.autograd.grad(ref, ref_in, grad)
            for kname, fn in kernels.items():
                case = f"{str(dtype)[6:]}/{gname}/{kname}"
                try:  # one kernel that fails (a compiler limit, say) must not hide the others' figures
                    out[case] = attention_case(device, fn, [t.to(dtype) for t in leaves], geo, grad.to(dtype),
                                               ref, ref_grads, TOL[dtype])
                except Exception as e:  # noqa: BLE001
                    out[case] = {"ok": False, "error": f"{type(e).__name__}: {str(e)[:500]}"}
                ok &= out[case]["ok"]
    return {"ok": ok, "T": T, "cases": out}


def attention_case(device, fn, inputs, geo, grad, ref, ref_grads, tol: float) -> dict:
    """One kernel on one geometry and dtype: forward + backward against the fp32 naive reference. Timed on
    a second call (the first pays for CUDA start-up and compilation); peak memory above what was
    allocated before the call."""
    def run():
        x = [t.detach().requires_grad_() for t in inputs]
        y = fn(*x, geo)
        return y, torch.autograd.grad(y, x, grad)

    run()
    sync(device)
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0.0
    peak_mb(device, reset=True)
    t0 = time.perf_counter()
    y, grads = run()
    sync(device)
    seconds = time.perf_counter() - t0
    peak = peak_mb(device) - base / 2**20  # base 0 on CPU, where peak_mb is the process's RSS
    err = max([rel_error(y, ref)] + [rel_error(g, r) for g, r in zip(grads, ref_grads, strict=True)])
    return {"ok": err <= tol, "max_rel_error": err, "seconds": seconds, "peak_mb": peak}


def check_dropout(device, n: int) -> dict:
    torch.manual_seed(0)
    x = torch.ones(n, n, device=device)
    y = dropout(x, 0.2, True)
    dropped, mean = float((y == 0).float().mean()), float(y.mean())
    geo = Geometry("self", 16, 16, 1, 1)
    leaves = [torch.randn(1, 2, 16, 8, device=device) for _ in range(4)] + [torch.randn(16, 16, device=device) * 0.1]
    ref = rel_attention_naive(*leaves, geo)
    scale, z = {}, {}
    for kname, fn in (("blocked", REL_KERNELS["blocked"]), ("fused", REL_KERNELS["fused"])):
        runs = torch.stack([fn(*leaves, geo, 0.2, True) for _ in range(100)])  # (100, 1, 2, 16, 8)
        avg, sem = runs.mean(0), runs.std(0) / 10
        scale[kname] = float((avg * ref).sum() / (ref * ref).sum())  # 1 when unbiased; 0.8 without 1/keep
        z[kname] = float(((avg - ref).abs() / sem.clamp_min(1e-6)).max())  # no element far from unbiased
    ok = abs(dropped - 0.2) < 0.02 and abs(mean - 1.0) < 0.03 and all(abs(v - 1) < 0.05 for v in scale.values()) \
        and max(z.values()) < 7
    return {"ok": ok, "dropped_fraction": dropped, "mean_after": mean, "attention_scale": scale,
            "attention_max_z": z}


def _loss(model, tokens):
    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tokens[:, 1:].reshape(-1))


def check_bf16_step(device, cfg: ModelConfig, tokens) -> dict:
    torch.manual_seed(0)
    model = HourglassLM(cfg).to(device).train()
    with torch.no_grad():
        fp32 = float(_loss(model, tokens))
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        loss = _loss(model, tokens)
    loss.backward()
    finite = all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    opt.step()
    moved = sum(not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
    rel = abs(float(loss) - fp32) / fp32
    return {"ok": bool(finite and rel < 0.02 and moved > 0), "loss_fp32": fp32, "loss_bf16": float(loss),
            "rel_diff": rel, "grads_finite": bool(finite), "params_moved": moved}


def check_compile(device, cfg: ModelConfig, tokens, backend: str) -> dict:
    torch.manual_seed(0)
    eager = HourglassLM(cfg).to(device).train()
    compiled = copy.deepcopy(eager)
    n = compile_layers(compiled.layers, backend=backend, device=device)
    losses = {"eager": [], "compiled": []}
    times = {}
    for name, m in (("eager", eager), ("compiled", compiled)):
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
        sync(device)
        t0 = time.perf_counter()
        for _ in range(3):
            loss = _loss(m, tokens)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses[name].append(float(loss))
        sync(device)
        times[name] = time.perf_counter() - t0
    rel = max(abs(a - b) / abs(a) for a, b in zip(losses["eager"], losses["compiled"], strict=True))
    still = still_compiled(compiled.layers)
    return {"ok": n == still == len(compiled.layers) and rel <= 0.005, "backend": backend, "layers_compiled": n,
            "layers_compiled_after_steps": still,
            "losses": losses, "max_rel_diff": rel, "seconds_3_steps_incl_compile": times}


def check_oom(device, out_dir: Path) -> dict:
    snap = out_dir / "oom_check.pickle"
    if not watch_cuda_oom(snap):
        return {"ok": True, "skipped": f"no CUDA on {device}: nothing to check"}
    try:
        torch.empty(1 << 50, dtype=torch.uint8, device=device)  # a petabyte: the allocator refuses
    except torch.cuda.OutOfMemoryError:
        pass
    torch.cuda.memory._record_memory_history(enabled=None)
    return {"ok": snap.is_file() and snap.stat().st_size > 0, "snapshot": str(snap)}


def train(device, cfg: ModelConfig, tokens_all, batch: int, T: int, steps: int, warmup: int, dtype) -> dict:
    torch.manual_seed(0)
    model = HourglassLM(cfg).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=4e-4, betas=(0.9, 0.98))
    n = (len(tokens_all) - 1) // (T + 1)
    rows = tokens_all[: n * (T + 1)].view(n, T + 1).to(device)
    losses, t0 = [], None
    peak_mb(device, reset=True)
    for s in range(warmup + steps):
        if s == warmup:
            sync(device)
            t0 = time.perf_counter()
        idx = torch.arange(s * batch, (s + 1) * batch) % n
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = _loss(model, rows[idx])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())  # read after the timer: float() each step would stall the queue
    sync(device)
    seconds = time.perf_counter() - t0
    losses = [float(x) for x in losses]
    tps = batch * T * steps / seconds
    fpt = flops_per_token(cfg, T, batch)
    peak = peak_flops(device, 0.0, "bf16" if dtype == torch.bfloat16 else "fp32")
    return {"ok": losses[-1] < losses[0], "hierarchy": cfg.hierarchy, "params": model.num_params(),
            "tokens_per_s": tps, "tflops": fpt * tps / 1e12, "peak_tflops": peak / 1e12 if peak else None,
            "mfu": fpt * tps / peak if peak else None, "peak_memory_mb": peak_mb(device),
            "first_loss": losses[0], "last_loss": losses[-1], "steps": steps, "batch": batch, "seq_len": T}


# ---------------------------------------------------------------------------------------------- main

def sizes(tiny: bool) -> dict:
    if tiny:
        debug = {**MODEL_SIZES["debug"], "max_seq_len": 256}
        return {"attn_T": 48, "heads": 2, "d_head": 8, "dropout_n": 256,
                "small": ModelConfig(**{**debug, "hierarchy": "1@1 1@2 1@1", "downsample": "avg",
                                        "upsample": "repeat"}),
                "hourglass": ModelConfig(**debug), "vanilla": ModelConfig(**{**debug, "hierarchy": "4@1"}),
                "T": 64, "batch": 2}
    small = ModelConfig(**{**MODEL_SIZES["enwik8"], "hierarchy": "1@1 2@3 1@1", "dropout": 0.0, "attn_dropout": 0.0})
    return {"attn_T": 2048, "heads": 8, "d_head": 64, "dropout_n": 4096, "small": small,
            "hourglass": ModelConfig(**MODEL_SIZES["enwik8"]), "vanilla": ModelConfig(**MODEL_SIZES["enwik8_baseline"]),
            "T": 2048, "batch": 8}


def run_check(name: str, fn, results: dict) -> None:
    t0 = time.perf_counter()
    try:
        results[name] = fn()
    except Exception as e:  # noqa: BLE001 - one failing path must not hide the others
        results[name] = {"ok": False, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-3000:]}
    results[name]["check_seconds"] = time.perf_counter() - t0
    print(f"{name:10s} {'ok' if results[name]['ok'] else 'FAILED'}  ({results[name]['check_seconds']:.1f} s)"
          + (f"  {results[name]['error']}" if "error" in results[name] else ""), flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="CI size (debug model, short sequences)")
    ap.add_argument("--steps", type=int, default=20, help="timed training steps per model")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--compile-backend", default="inductor")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":  # set_device wants an index: "cuda" alone means the current one
        device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
        torch.cuda.set_device(device)
    z = sizes(args.tiny)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    small_tokens = text_tokens(2 * (z["T"] + 1)).view(2, -1).to(device)
    text = text_tokens((args.warmup + args.steps) * z["batch"] * (z["T"] + 1) + 1)
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        checks = {
            "attention": lambda: check_attention(device, z["attn_T"], z["heads"], z["d_head"]),
            "dropout": lambda: check_dropout(device, z["dropout_n"]),
            "bf16_step": lambda: check_bf16_step(device, z["small"], small_tokens),
            "compile": lambda: check_compile(device, z["small"], small_tokens, args.compile_backend),
            "oom": lambda: check_oom(device, Path(tmp)),
            "train_hourglass": lambda: train(device, z["hourglass"], text, z["batch"], z["T"], args.steps,
                                             args.warmup, dtype),
            "train_vanilla": lambda: train(device, z["vanilla"], text, z["batch"], z["T"], args.steps,
                                           args.warmup, dtype),
        }
        for name, fn in checks.items():
            run_check(name, fn, results)
    for name in ("train_hourglass", "train_vanilla"):
        r = results[name]
        if "tokens_per_s" in r:
            mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
            print(f"{name:16s} {r['hierarchy']:14s} {r['tokens_per_s']:>12,.0f} tok/s {r['tflops']:8.2f} TFLOP/s "
                  f"MFU {mfu}  peak {r['peak_memory_mb']:,.0f} MB  loss {r['first_loss']:.3f} -> {r['last_loss']:.3f}")
    ok = all(r["ok"] for r in results.values())
    report = {"ok": ok, "device": str(device), "device_name": torch.cuda.get_device_name(device)
              if device.type == "cuda" else platform.processor() or platform.machine(),
              "torch": torch.__version__, "tiny": args.tiny, "dtype": str(dtype), "checks": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1, default=str))
    print(f"{'all checks passed' if ok else 'SOME CHECKS FAILED'}; wrote {args.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
