"""The learning-rate schedule: its names, its checks and its one formula.

    lr = lr_at(cfg, step)              # optimizer step ``step`` (0-based)
    LambdaLR(opt, lr_multiplier(cfg))  # DeepSpeed's client scheduler: lr_at / train.lr

Not a DeepSpeed scheduler block: DeepSpeed has no rsqrt schedule, none of trax's multifactor ones, and its
WarmupCosineLR cannot express a zero-step warm-up. Imports neither torch nor deepspeed: the checks run before
any process group starts.
"""
from __future__ import annotations

import math
from typing import Callable

# trax lr_schedules.multifactor factors: those hgscale implements, and the others trax knows (named in errors).
LR_FACTORS = ("constant", "linear_warmup", "rsqrt_decay", "cosine_decay")
_TRAX_ONLY_FACTORS = ("rsqrt_normalized_decay", "decay_every", "two_constants")
LR_SCHEDULES = ("cosine", "rsqrt", "constant")


def lr_factors(schedule: str) -> list[str]:
    """The trax factors of a multifactor schedule string ("constant * linear_warmup * rsqrt_decay"), or []
    for hgscale's own schedule names. A string with '*' is a trax multifactor string."""
    return [f.strip() for f in schedule.split("*")] if "*" in schedule else []


def lr_schedule_problems(t) -> list[str]:
    """Problems of train.lr_schedule: a trax factor we do not implement is an error, never a silent default."""
    factors = lr_factors(t.lr_schedule)
    if not factors:
        if t.lr_schedule not in LR_SCHEDULES:
            return [f"train.lr_schedule = {t.lr_schedule!r} is not one of {', '.join(LR_SCHEDULES)}, or a trax "
                    f"multifactor string of {', '.join(LR_FACTORS)} such as 'constant * linear_warmup * rsqrt_decay'"]
        return []
    out = []
    for f in factors:
        if f in _TRAX_ONLY_FACTORS:
            out.append(f"train.lr_schedule = {t.lr_schedule!r}: the trax factor {f!r} is not implemented by hgscale "
                       f"(implemented: {', '.join(LR_FACTORS)})")
        elif f not in LR_FACTORS:
            out.append(f"train.lr_schedule = {t.lr_schedule!r}: {f!r} is not a trax multifactor factor "
                       f"(implemented: {', '.join(LR_FACTORS)})")
    if "constant" not in factors:
        out.append(f"train.lr_schedule = {t.lr_schedule!r} has no 'constant' factor, so train.lr would be ignored: "
                   f"add 'constant *'")
    if "linear_warmup" in factors and t.warmup_steps < 1:
        out.append(f"train.lr_schedule = {t.lr_schedule!r} has 'linear_warmup', which divides by "
                   f"train.warmup_steps = {t.warmup_steps}: set it >= 1")
    return out


def _multifactor(t, factors: list[str], step: int) -> float:
    """trax ``lr_schedules.multifactor`` at trax's 1-based ``step``: the product of the named factors,
    floored at train.min_lr (trax's ``minimum``). cosine_decay counts its cycle (train.decay_steps or
    train.steps) from the end of warm-up and restarts after it, as trax's ``progress % 1``."""
    lr, warm = 1.0, t.warmup_steps
    for name in factors:
        if name == "constant":
            lr *= t.lr
        elif name == "linear_warmup":
            lr *= min(1.0, step / warm)
        elif name == "rsqrt_decay":
            lr /= math.sqrt(max(step, warm))
        elif name == "cosine_decay":
            progress = max(0.0, (step - warm) / float(t.decay_steps or t.steps))
            lr *= 0.5 * (1.0 + math.cos(math.pi * (progress % 1.0)))
        else:  # validation names every factor we do not implement before any process starts
            raise ValueError(f"trax lr factor {name!r} is not implemented")
    return max(lr, t.min_lr)


def lr_at(cfg, step: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warm-up to train.lr, then
    cosine to train.min_lr over train.decay_steps (default train.steps), rsqrt decay, or constant.
    A trax multifactor string (``"constant * linear_warmup * rsqrt_decay"``) is trax's formula at
    trax's step number, which starts at 1 for the first optimizer step."""
    t = cfg.train
    factors = lr_factors(t.lr_schedule)
    if factors:
        return _multifactor(t, factors, step + 1)
    peak, warm = t.lr, t.warmup_steps
    if warm and step < warm:
        return peak * (step + 1) / warm
    if t.lr_schedule == "constant":
        return peak
    if t.lr_schedule == "rsqrt":
        return peak * math.sqrt(max(warm, 1) / (step + 1))
    decay = (t.decay_steps or t.steps) - warm
    progress = min(1.0, (step - warm) / max(decay, 1))
    return t.min_lr + (peak - t.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_multiplier(cfg) -> Callable[[int], float]:
    """``step -> lr/peak`` for torch's LambdaLR (DeepSpeed's client scheduler)."""
    peak = cfg.train.lr
    return lambda step: lr_at(cfg, step) / peak if peak else 0.0
