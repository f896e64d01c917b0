"""Vanilla Transformers matched to an Hourglass, and the cost of one optimizer step.

    n, gap = match_baseline(cfg.model, cfg.data.seq_len, "flops")    # N of the N@1 baseline, its relative gap

A baseline keeps every model key of the Hourglass (width, heads, d_ff, attention, dropout, init) and changes only
``model.hierarchy`` to ``N@1``:

- ``flops``: the N whose analytic training FLOPs per token (:func:`hgscale.models.flops.flops_per_token`, the count
  the trainer logs as ``train/flops``) is closest; refused when none is within the tolerance (2 %), since a
  comparison at equal budget would then run the two models for different numbers of tokens;
- ``causal``: the same on the FLOPs attention executes when its kernel skips the masked half (``causal=True``: only
  the (query, key) pairs a query sees; the blocked CPU kernel and the fused GPU kernel skip masked blocks), refused
  likewise: the Hourglass shortens attention, so the two counts can pick different baselines;
- ``params``: the N whose parameter count is closest;
- ``depth``: N = every layer of the Hourglass (the sum of its levels' layer counts; resampling not counted).

Both FLOPs per token and parameters grow by the same amount with each vanilla layer, so the closest N is found
from N = 1 and N = 2 alone.
"""
from __future__ import annotations

import dataclasses
import math

from hgscale.config import Config, ConfigError, ModelConfig
from hgscale.models.flops import flops_per_token, layer_params
from hgscale.sweep.options import SweepError
from hgscale.training.layout import ParallelLayout


def vanilla(model: ModelConfig, n: int) -> ModelConfig:
    return dataclasses.replace(model, hierarchy=f"{n}@1")


def measure(by: str, model: ModelConfig, seq_len: int) -> float:
    """The quantity ``by`` matches: training FLOPs per token (causal: over visible pairs only), parameters, or
    layers."""
    if by in ("flops", "causal"):
        return flops_per_token(model, seq_len, causal=by == "causal")
    if by == "params":
        return float(sum(layer_params(model)))
    return float(model.n_layers())


def closest(model: ModelConfig, seq_len: int, by: str) -> list[tuple[float, int]]:
    """(relative gap, N) of the two N@1 nearest the Hourglass in ``by``, nearest first. Raises ConfigError when the
    vanilla model cannot be built from this config (LSH attention with relative positions, ...)."""
    if by == "depth":
        return [(0.0, model.n_layers())]
    target = measure(by, model, seq_len)
    one, two = (measure(by, vanilla(model, n), seq_len) for n in (1, 2))
    est = 1 + (target - one) / (two - one)
    cands = sorted({max(1, math.floor(est)), max(1, math.ceil(est)), max(1, math.floor(est)) + 1})
    gaps = [(measure(by, vanilla(model, n), seq_len) / target - 1, n) for n in cands]
    return sorted(gaps, key=lambda g: (abs(g[0]), g[1]))[:2]


def _suggestion(model: ModelConfig, seq_len: int, tolerance: float, by: str) -> str:
    """A nearby Hourglass (its innermost level's layer count changed) that some N@1 meets within the tolerance."""
    levels = model.levels()
    mid = len(levels) // 2
    n0, k = levels[mid]
    for n in sorted(range(1, 2 * n0 + 4), key=lambda n: (abs(n - n0), n)):
        if n == n0:
            continue
        h = " ".join(f"{a}@{f}" for a, f in levels[:mid] + [(n, k)] + levels[mid + 1:])
        gap, base = closest(dataclasses.replace(model, hierarchy=h), seq_len, by)[0]
        if abs(gap) <= tolerance:
            return f", or change the Hourglass (e.g. '{h}' meets {base}@1 within {abs(gap):.2%})"
    return ""


def match_baseline(model: ModelConfig, seq_len: int, by: str, tolerance: float = 0.02) -> tuple[int, float]:
    """(N, relative gap of N@1 against the Hourglass in ``by``); a SweepError when no vanilla model can be built or,
    for ``flops`` and ``causal``, none is within ``tolerance``."""
    try:
        found = closest(model, seq_len, by)
    except ConfigError as e:
        raise SweepError(f"no vanilla baseline of '{model.hierarchy}' can be built from this config: "
                         f"{e.problems[0]}") from None
    gap, n = found[0]
    if by in ("flops", "causal") and abs(gap) > tolerance:
        near = " and ".join(f"{b}@1 {g:+.1%}" for g, b in found)
        fpt = measure(by, model, seq_len)
        what = "training FLOPs" if by == "flops" else "causal training FLOPs"
        raise SweepError(f"--match {by}: no vanilla Transformer of the same width is within {tolerance:.0%} of the "
                         f"{what} of Hourglass '{model.hierarchy}' ({fpt:.4g} FLOPs/token at data.seq_len "
                         f"{seq_len}): the nearest are {near}; match by --match params or depth, allow more with "
                         f"--tolerance{_suggestion(model, seq_len, tolerance, by)}")
    return n, gap


def step_cost(cfg: Config, world_size: int) -> tuple[float, int]:
    """(training FLOPs per token, tokens per optimizer step) of ``cfg`` on ``world_size`` processes; a ConfigError
    when the layout does not fit (the parallel layout's own message)."""
    lay = ParallelLayout.of(cfg, world_size)
    return flops_per_token(cfg.model, cfg.data.seq_len), lay.global_batch * cfg.data.seq_len


def steps_for(budget: float, fpt: float, tokens_per_step: int) -> int:
    """Optimizer steps that spend ``budget`` training FLOPs, rounded half up."""
    return int(math.floor(budget / (fpt * tokens_per_step) + 0.5))


def eval_interval(steps: int, evals: int) -> int:
    """The divisor of ``steps`` giving the number of validations closest to ``evals``: validation then always runs
    at the final step (the trainer validates every ``train.eval_interval`` steps, not at the end)."""
    divisors = set()
    for d in range(1, math.isqrt(steps) + 1):
        if steps % d == 0:
            divisors |= {d, steps // d}
    return min(divisors, key=lambda d: (abs(steps / d - evals), -d))
