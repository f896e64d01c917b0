"""The values of ``hgscale sweep``'s command line, parsed and checked before anything is planned or run.

    opts = Options(config="configs/demo.json", budgets=parse_budgets("3e14,1e15"),
                   grid=(parse_values("model.init=trax,normal", "--grid"),), tune=(parse_values("train.lr=1e-3,2e-3",
                   "--tune"),))

Each problem is a :class:`SweepError`: one sentence naming the option and what would work.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass

from hgscale.core.notation import parse_hierarchy
from hgscale.core.status import UserError

# none: the listed models alone (e.g. variants of one model in --grid cells)
MATCHES = ("flops", "causal", "params", "depth", "none")
# keys the sweep sets itself for every run, and the option that sets them
SWEEP_KEYS = {"train.steps": "--budgets", "train.seed": "--seeds", "data.seed": "--seeds",
              "train.eval_interval": "--evals", "run_dir": "--out", "checkpoint.dir": "--out",
              "checkpoint.resume": "(each run resumes from its own checkpoints)",
              "tracking.run_name": "(the sweep names its runs)"}


class SweepError(UserError):
    """A sweep that cannot be planned or run: one sentence naming the option and the fix."""


@dataclass(frozen=True)
class Options:
    """What the command line asks for; ``grid`` and ``tune`` hold (key, (value, ...)) per option given."""

    config: str
    overrides: tuple[str, ...] = ()
    models: tuple[str, ...] = ()
    match: tuple[str, ...] = ("flops",)
    budgets: tuple[float, ...] = ()
    seeds: int = 1
    grid: tuple[tuple[str, tuple[str, ...]], ...] = ()
    tune: tuple[tuple[str, tuple[str, ...]], ...] = ()
    tune_seeds: int = 1
    world_size: int = 0  # 0: the processes the config's own numbers imply
    evals: int = 4
    tolerance: float = 0.02

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self)))

    def digest(self, config_text: str) -> str:
        """8 hex digits naming this sweep: the options and the config file's text (an edited config is another
        sweep)."""
        blob = json.dumps({"options": self.to_dict(), "config": config_text}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:8]


def split_top(text: str) -> list[str]:
    """``text`` split at commas outside brackets and quotes: 'a,[1,2],"x,y"' -> ['a', '[1,2]', '"x,y"']."""
    out, cur, depth, quote = [], "", 0, ""
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
            continue
        cur += ch
    out.append(cur.strip())
    return out


def parse_values(item: str, flag: str) -> tuple[str, tuple[str, ...]]:
    """'train.lr=5e-4,1e-3' -> ('train.lr', ('5e-4', '1e-3')); a SweepError names ``flag`` when it is not that."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    values = tuple(split_top(raw)) if sep else ()
    if not key or not values or any(v == "" for v in values):
        raise SweepError(f"{flag} {item!r} is not of the form section.key=value1,value2 (e.g. {flag} "
                         f"{'train.lr=5e-4,1e-3' if flag == '--tune' else 'model.init=trax,normal'})")
    if key in SWEEP_KEYS:
        raise SweepError(f"{flag} {key}: the sweep sets {key} itself for every run; use {SWEEP_KEYS[key]}")
    if key == "model.hierarchy":
        raise SweepError(f"{flag} model.hierarchy: list the hierarchies with --models \"2@1 8@4 2@1,3@1 6@3 3@1\"")
    if len(set(values)) != len(values):
        raise SweepError(f"{flag} {item!r} names a value twice; list each value once")
    return key, values


def parse_budgets(text: str) -> tuple[float, ...]:
    """'3e14,1e15' -> (3e14, 1e15): positive, finite, each once."""
    out = []
    for part in split_top(text or ""):
        try:
            b = float(part)
        except ValueError:
            b = float("nan")
        if not math.isfinite(b) or b <= 0:
            raise SweepError(f"--budgets {text!r}: {part!r} is not a positive number of training FLOPs; write them "
                             f"comma-separated, e.g. --budgets 3e14,1e15")
        out.append(b)
    if len(set(out)) != len(out):
        raise SweepError(f"--budgets {text!r} names a budget twice; list each once")
    return tuple(sorted(out))


def parse_models(text: str) -> tuple[str, ...]:
    """'2@1 8@4 2@1, 3@1 6@3 3@1' -> ('2@1 8@4 2@1', '3@1 6@3 3@1'), each a valid hierarchy."""
    out = []
    for part in (text or "").split(","):
        spec = " ".join(part.split())
        try:
            parse_hierarchy(spec)
        except ValueError as e:
            raise SweepError(f"--models {text!r}: {e}") from None
        if spec not in out:
            out.append(spec)
    return tuple(out)


def parse_match(text: str) -> tuple[str, ...]:
    """'flops' or 'flops,depth' -> ('flops', 'depth'); 'none' -> () (no baselines)."""
    out = tuple(dict.fromkeys(p.strip() for p in (text or "").split(",")))
    bad = [m for m in out if m not in MATCHES]
    if not out or bad:
        raise SweepError(f"--match {text!r}: {', '.join(map(repr, bad)) or 'nothing'} is not one of "
                         f"{', '.join(MATCHES)} (comma-separated for several)")
    if "none" in out and len(out) > 1:
        raise SweepError(f"--match {text!r}: none (no baselines) cannot be combined with a match")
    return () if out == ("none",) else out


def check_counts(opts: Options) -> None:
    """The counts and the tolerance are in range."""
    if opts.world_size < 0:
        raise SweepError(f"--world-size {opts.world_size}: give a whole number >= 1 (0: the config's own)")
    for flag, value in (("--seeds", opts.seeds), ("--tune-seeds", opts.tune_seeds), ("--evals", opts.evals)):
        if value < 1:
            raise SweepError(f"{flag} {value}: give a whole number >= 1")
    if not 0 < opts.tolerance < 1:
        raise SweepError(f"--tolerance {opts.tolerance}: give a fraction between 0 and 1 (0.02 is 2 %)")
    if not opts.budgets:
        raise SweepError("no budgets: give the training FLOPs of each comparison, e.g. --budgets 3e14,1e15")
