"""Cost of attention dropout in the blocked relative-attention kernel, and this kernel against an earlier one.

    python benchmarks/attention_dropout.py --threads 1                      # p = 0.2 vs 0, this kernel
    python benchmarks/attention_dropout.py --threads 1 --against a2ab836    # + the kernel as of that commit

One self-attention core (T = 2,048, 8 heads x 64, the enwik8 layer's shape), forward + backward, fp32.
Each (kernel, p) pair runs once per round, rounds alternate their order, CPU time per call
(time.process_time: time the hypervisor gives other guests is not counted); min and median over the
rounds after two warm-up rounds. ``--against REV`` loads hgscale/models/blocked_attention.py as of git
revision REV (``git show``) into a module of its own, so both kernels run side by side in one process.
Writes benchmarks/results/attention_dropout.json.
"""
from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402

import hgscale.models.blocked_attention as current  # noqa: E402

KERNEL = "hgscale/models/blocked_attention.py"


def kernel_at(rev: str):
    """The blocked_attention module as of git revision ``rev``, as a module of its own."""
    src = subprocess.run(["git", "show", f"{rev}:{KERNEL}"], cwd=ROOT, check=True, capture_output=True,
                         text=True).stdout
    module = types.ModuleType(f"blocked_attention_{rev}")
    exec(compile(src, f"{rev}:{KERNEL}", "exec"), module.__dict__)
    return module


def measure(kernels: dict, ps: list[float], T: int, heads: int, rounds: int, block: int = 128) -> dict:
    torch.manual_seed(0)
    leaves = [(torch.randn(1, heads, T, 64) * 0.3).requires_grad_() for _ in range(4)]
    R = (torch.randn(heads, T + block - 1, 64) * 0.3).requires_grad_()
    runs = [(name, p) for name in kernels for p in ps]
    times: dict = {run: [] for run in runs}
    for i in range(rounds + 2):
        for name, p in runs if i % 2 == 0 else runs[::-1]:
            t = time.process_time()
            kernels[name].blocked_rel_attention(*leaves, R, block, p_drop=p, seed=5).sum().backward()
            if i >= 2:
                times[(name, p)].append(time.process_time() - t)
    return {f"{name}|p={p}": {"min_s": min(v), "median_s": statistics.median(v), "all_s": v}
            for (name, p), v in times.items()}


def main(argv=None) -> int:
    ap = common.parser(__doc__)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=20)
    common.add_threads(ap)
    ap.add_argument("--against", default="", help="git revision whose kernel runs side by side")
    common.add_out(ap, "attention_dropout")
    args = ap.parse_args(argv)
    torch.set_flush_denormal(True)
    common.apply_threads(args.threads)
    kernels = {"current": current, **({args.against: kernel_at(args.against)} if args.against else {})}
    res = measure(kernels, [0.2, 0.0], args.seq_len, args.heads, args.rounds)
    print(f"T={args.seq_len}, {args.heads} heads x 64, fwd+bwd, {torch.get_num_threads()} threads, "
          f"{args.rounds} rounds, load average {os.getloadavg()[0]:.1f}")
    summary = {}
    for name in kernels:
        drop, plain = res[f"{name}|p=0.2"], res[f"{name}|p=0.0"]
        summary[name] = {stat: drop[f"{stat}_s"] / plain[f"{stat}_s"] - 1 for stat in ("min", "median")}
        print(f"{name:10s} p=0.2 min {drop['min_s'] * 1e3:6.0f} ms median {drop['median_s'] * 1e3:6.0f} ms | "
              f"p=0 min {plain['min_s'] * 1e3:6.0f} ms median {plain['median_s'] * 1e3:6.0f} ms | "
              f"dropout adds {summary[name]['min']:+.1%} (min) {summary[name]['median']:+.1%} (median)")
    if args.against:
        for p in ("0.2", "0.0"):
            a, b = res[f"current|p={p}"], res[f"{args.against}|p={p}"]
            print(f"p={p}: current / {args.against}: min {a['min_s'] / b['min_s']:.3f}, "
                  f"median {a['median_s'] / b['median_s']:.3f}")
    common.write_result(args.out, {
        "command": common.command(__file__, argv), "seq_len": args.seq_len, "heads": args.heads,
        "threads": torch.get_num_threads(), "load_average_1m": os.getloadavg()[0], "torch": torch.__version__,
        "times": res, "dropout_overhead": summary})
    return 0


if __name__ == "__main__":
    sys.exit(main())
