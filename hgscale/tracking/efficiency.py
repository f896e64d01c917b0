"""Compute efficiency: peak FLOP/s per device, achieved TFLOP/s, model FLOPs utilisation (MFU).

MFU = model FLOPs actually computed per second per device / the device's peak FLOP/s
(PaLM, Chowdhery et al. 2022, appendix B). Model FLOPs count the training step (forward + backward,
no recomputation) from ``hgscale.models.flops.flops_per_token``; the peak comes from

- ``tracking.peak_tflops`` in the config when set (a device missing from the table, a clock-capped card);
- the table below for common GPUs (dense tensor-core figures from the vendors' datasheets, no sparsity);
- on CPU, a square matrix multiply timed at start-up: the best this machine does in the training dtype,
  so a CPU MFU answers "how close are we to the GEMM roofline here".

All rates are FLOP/s (not TFLOP/s) unless a name says otherwise.
"""
from __future__ import annotations

import json
import logging
import os
import platform
import re
import time
from pathlib import Path

log = logging.getLogger(__name__)

# (pattern on torch.cuda.get_device_name(), {dtype: dense peak TFLOP/s}). First match wins, so the more
# specific names (H100 PCIe before H100, A100 before A10, L40S before L40) come first.
# "tf32" is what fp32 matmuls reach when torch.backends.cuda.matmul.allow_tf32 is on.
GPU_PEAK_TFLOPS: list[tuple[str, dict[str, float]]] = [
    (r"GB200|B200", {"fp32": 80.0, "tf32": 1100.0, "bf16": 2250.0, "fp16": 2250.0, "fp8": 4500.0}),
    (r"H100.*PCIe|H800.*PCIe", {"fp32": 51.2, "tf32": 378.0, "bf16": 756.0, "fp16": 756.0, "fp8": 1513.0}),
    (r"H100.*NVL|H200.*NVL", {"fp32": 60.0, "tf32": 418.0, "bf16": 835.0, "fp16": 835.0, "fp8": 1671.0}),
    (r"H100|H800|H200|GH200", {"fp32": 66.9, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4, "fp8": 1978.9}),
    (r"H20\b", {"fp32": 44.0, "tf32": 74.0, "bf16": 148.0, "fp16": 148.0, "fp8": 296.0}),
    (r"A100|A800", {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0, "fp16": 312.0}),
    (r"L40S", {"fp32": 91.6, "tf32": 183.0, "bf16": 362.1, "fp16": 362.1, "fp8": 733.0}),
    (r"L40\b", {"fp32": 90.5, "tf32": 90.5, "bf16": 181.0, "fp16": 181.0, "fp8": 362.0}),
    (r"\bL4\b", {"fp32": 30.3, "tf32": 60.0, "bf16": 121.0, "fp16": 121.0, "fp8": 242.0}),
    (r"A10G", {"fp32": 31.2, "tf32": 35.0, "bf16": 70.0, "fp16": 70.0}),
    (r"A10\b", {"fp32": 31.2, "tf32": 62.5, "bf16": 125.0, "fp16": 125.0}),
    (r"A40\b", {"fp32": 37.4, "tf32": 74.8, "bf16": 149.7, "fp16": 149.7}),
    (r"RTX A6000", {"fp32": 38.7, "tf32": 77.4, "bf16": 154.8, "fp16": 154.8}),
    (r"V100.*PCIe", {"fp32": 14.0, "fp16": 112.0}),
    (r"V100", {"fp32": 15.7, "fp16": 125.0}),
    (r"T4\b", {"fp32": 8.1, "fp16": 65.0}),
    (r"RTX 4090", {"fp32": 82.6, "tf32": 82.6, "bf16": 165.2, "fp16": 165.2}),
    (r"RTX 3090", {"fp32": 35.6, "tf32": 35.6, "bf16": 71.0, "fp16": 71.0}),
    (r"MI300X|MI325X", {"fp32": 163.4, "tf32": 653.7, "bf16": 1307.4, "fp16": 1307.4, "fp8": 2614.9}),
    (r"MI250X?", {"fp32": 95.7, "bf16": 383.0, "fp16": 383.0}),
]

_DTYPE_ALIASES = {"float32": "fp32", "fp32": "fp32", "bfloat16": "bf16", "bf16": "bf16",
                  "float16": "fp16", "fp16": "fp16", "half": "fp16", "tf32": "tf32", "fp8": "fp8"}
_cpu_peak_cache: dict[tuple[str, int, int], float] = {}


def _peak_store() -> Path:
    """Best CPU peaks ever measured on this machine: a measurement taken while other processes load the
    cores reads low (MFU above 100 %), so the best of all runs is the peak."""
    root = os.environ.get("HGSCALE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "hgscale")
    return Path(root) / "cpu_peak.json"


def _remember_peak(key: str, flops: float) -> float:
    """Store ``flops`` under ``key`` if it beats what is stored; return the best known value."""
    path = _peak_store()
    try:
        table = json.loads(path.read_text()) if path.exists() else {}
    except (OSError, ValueError):
        table = {}
    best = max(flops, float(table.get(key, 0.0)))
    if best > table.get(key, 0.0):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps({**table, key: best}, indent=1))
            os.replace(tmp, path)
        except OSError:
            pass  # a read-only home only costs the cache
    return best


def _norm_dtype(dtype) -> str:
    name = str(dtype).replace("torch.", "")
    if name not in _DTYPE_ALIASES:
        raise ValueError(f"dtype {dtype!r} is not one of fp32, bf16, fp16, tf32, fp8")
    return _DTYPE_ALIASES[name]


def gpu_peak_tflops(device_name: str, dtype="fp32") -> float | None:
    """Dense peak TFLOP/s of a GPU named like ``torch.cuda.get_device_name()``; None if not in the table.

    A dtype the card lacks (bf16 on a V100 or T4) returns None rather than a misleading figure of another dtype.
    """
    dt = _norm_dtype(dtype)
    for pattern, peaks in GPU_PEAK_TFLOPS:
        if re.search(pattern, device_name):
            return peaks.get(dt)
    return None


def measure_cpu_peak(dtype="fp32", n: int = 1024, min_seconds: float = 0.3, threads: int | None = None) -> float:
    """Best FLOP/s of an (n x n) @ (n x n) matmul in ``dtype`` on this CPU with the current thread count.

    Cached per (dtype, n, threads): the first call costs about ``min_seconds`` plus one warm-up product.
    The best figure ever measured here is kept in ~/.cache/hgscale/cpu_peak.json (``HGSCALE_CACHE``) and
    returned when this measurement, taken on busy cores, reads lower.
    """
    import torch

    dt = _norm_dtype(dtype)
    threads = threads or torch.get_num_threads()
    key = (dt, n, threads)
    if key in _cpu_peak_cache:
        return _cpu_peak_cache[key]
    tdtype = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}.get(dt)
    if tdtype is None:
        raise ValueError(f"dtype {dtype!r} has no CPU matmul to measure; use fp32 or bf16")
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(0)
        a = torch.randn(n, n, generator=gen).to(tdtype)
        b = torch.randn(n, n, generator=gen).to(tdtype)
        torch.mm(a, b)  # warm-up: first call pays for thread-pool start and packing buffers
        best, spent = float("inf"), 0.0
        while spent < min_seconds or best == float("inf"):
            t0 = time.perf_counter()
            torch.mm(a, b)
            dt_s = time.perf_counter() - t0
            best, spent = min(best, dt_s), spent + dt_s
    finally:
        torch.set_num_threads(prev)
    measured = 2.0 * n ** 3 / best
    cpu = platform.processor() or platform.machine()
    flops = _remember_peak(f"{cpu}|{os.cpu_count()}|{dt}|{n}|{threads}", measured)
    _cpu_peak_cache[key] = flops
    log.info("measured CPU matmul peak: %.1f GFLOP/s (%s, n=%d, %d threads)", flops / 1e9, dt, n, threads)
    return flops


def peak_flops(device=None, override_tflops: float = 0.0, dtype="fp32") -> float | None:
    """Peak FLOP/s of one device for MFU, or None when it cannot be known (unknown GPU, no override).

    ``device``: a torch.device, "cuda", "cuda:1", "cpu" or None (cuda if available, else cpu).
    ``override_tflops`` > 0 wins (config ``tracking.peak_tflops``). For fp32 on a GPU with TF32 matmuls
    enabled the TF32 peak is used, since that is what the tensor cores then deliver.
    """
    import torch

    if override_tflops and override_tflops > 0:
        return float(override_tflops) * 1e12
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dt = _norm_dtype(dtype)
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
        if dt == "fp32" and torch.backends.cuda.matmul.allow_tf32:
            dt = "tf32"
        tf = gpu_peak_tflops(name, dt)
        if tf is None:
            log.warning("no peak FLOP/s known for GPU %r in %s: MFU is not reported; set tracking.peak_tflops "
                        "to the card's dense peak TFLOP/s", name, dt)
            return None
        return tf * 1e12
    if dev.type == "cpu":
        return measure_cpu_peak(dt if dt in ("fp32", "bf16", "fp16") else "fp32")
    log.warning("no peak FLOP/s known for device %s: set tracking.peak_tflops", dev)
    return None


def achieved_flops(flops_per_token: float, tokens_per_s: float, n_devices: int = 1) -> float:
    """Model FLOP/s per device: training FLOPs/token x tokens/s spread over ``n_devices``."""
    return flops_per_token * tokens_per_s / max(int(n_devices), 1)


def mfu(flops_per_token: float, tokens_per_s: float, n_devices: int,
        peak_flops_per_device: float | None) -> float | None:
    """Model FLOPs utilisation in [0, 1+): achieved per-device FLOP/s over the per-device peak; None without a peak."""
    if not peak_flops_per_device:
        return None
    return achieved_flops(flops_per_token, tokens_per_s, n_devices) / peak_flops_per_device


def pipeline_bubble_fraction(stages: int, micro_batches: int) -> float:
    """Idle share of a 1F1B / GPipe schedule: (S - 1) / (M + S - 1) (Huang et al. 2019; Narayanan et al. 2021)."""
    if stages <= 1:
        return 0.0
    return (stages - 1) / (micro_batches + stages - 1)


class EfficiencyMeter:
    """Running throughput and efficiency figures for the training loop; its state goes into checkpoints.

        meter = EfficiencyMeter(flops_per_token, n_devices=world_size, peak_flops_per_device=peak_flops(...))
        metrics = meter.update(tokens=global_tokens_this_interval, samples=..., seconds=interval_wall_s)
        tracker.log_metrics(metrics, step)

    Cumulative tokens, FLOPs and training wall-clock survive a resume through state_dict/load_state_dict,
    so curves against FLOPs and time continue where they stopped.
    """

    def __init__(self, flops_per_token: float, n_devices: int = 1, peak_flops_per_device: float | None = None):
        self.flops_per_token = float(flops_per_token)
        self.n_devices = max(int(n_devices), 1)
        self.peak = peak_flops_per_device
        self.tokens = 0
        self.samples = 0
        self.flops = 0.0
        self.elapsed_s = 0.0

    def update(self, tokens: int, seconds: float, samples: int = 0) -> dict[str, float]:
        """Account one interval (global tokens/samples over all data-parallel ranks) and return its metrics."""
        from .names import ELAPSED_S, FLOPS, MFU, SAMPLES_PER_S, TFLOPS_PER_DEVICE, TOKENS, TOKENS_PER_S

        seconds = max(float(seconds), 1e-9)
        self.tokens += int(tokens)
        self.samples += int(samples)
        self.flops += self.flops_per_token * tokens
        self.elapsed_s += seconds
        tps = tokens / seconds
        out = {TOKENS_PER_S: tps, TOKENS: float(self.tokens), FLOPS: self.flops, ELAPSED_S: self.elapsed_s,
               TFLOPS_PER_DEVICE: achieved_flops(self.flops_per_token, tps, self.n_devices) / 1e12}
        if samples:
            out[SAMPLES_PER_S] = samples / seconds
        m = mfu(self.flops_per_token, tps, self.n_devices, self.peak)
        if m is not None:
            out[MFU] = m
        return out

    def state_dict(self) -> dict:
        return {"tokens": self.tokens, "samples": self.samples, "flops": self.flops, "elapsed_s": self.elapsed_s}

    def load_state_dict(self, state: dict) -> None:
        self.tokens = int(state.get("tokens", 0))
        self.samples = int(state.get("samples", 0))
        self.flops = float(state.get("flops", 0.0))
        self.elapsed_s = float(state.get("elapsed_s", 0.0))
