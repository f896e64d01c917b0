"""The runs of a sweep, each an ordinary training run given by its config overrides, and ``plan.json``.

    plan = build_plan(opts, sweep_id, out)      # every problem raised (SweepError, ConfigError) before anything runs
    save_plan(plan)                             # <out>/plan.json

For each grid cell (the cartesian product of ``--grid`` values) the models are the hierarchies of ``--models`` (the
config's own by default) and, for each Hourglass among them, its matched baselines (``--match``). Each model trains at
each budget for ``steps = budget / (FLOPs per token x tokens per step)``, rounded. Seed i sets ``train.seed`` and
``data.seed`` to the config's plus i, so run i of every model sees the same data order (the pairing of the report).

With ``--tune``, each (model, budget, cell) group first trains every tuning value at seeds 0 .. tune_seeds - 1;
its final runs are *pending* until those are done, then take the value with the lowest mean final validation
metric (:func:`hgscale.sweep.runs.resolve_finals`). A final run whose value and seed equal a tuning run's is
that run: the same config, trained once.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import os
import re
import time
from pathlib import Path

from hgscale.config import ConfigError, load_config
from hgscale.core.notation import parse_hierarchy
from hgscale.core.secrets import mask_value
from hgscale.models.flops import flops_per_token
from hgscale.sweep.match import eval_interval, match_baseline, step_cost, steps_for
from hgscale.sweep.options import Options, SweepError, check_counts
from hgscale.training.layout import ParallelLayout

PLAN = "plan.json"
VERSION = 1
_UNSAFE = re.compile(r"[^A-Za-z0-9@.=+_-]")


def budget_label(b: float) -> str:
    """3e14 -> '3e14', 1.5e15 -> '1.5e15'."""
    mant, exp = f"{b:.3e}".split("e")
    return f"{mant.rstrip('0').rstrip('.')}e{int(exp)}"


def kv_label(pairs: dict) -> str:
    return "+".join(f"{k}={v}" for k, v in pairs.items())


def run_name(model: str, budget: float, cell: dict, tune: dict, seed: int) -> str:
    parts = [model.replace(" ", "-"), budget_label(budget), kv_label(cell), kv_label(tune), f"s{seed}"]
    return _UNSAFE.sub("-", "_".join(p for p in parts if p))


def _load(opts: Options, extra: list[str], what: str):
    """The config with the sweep's overrides and ``extra``; a SweepError naming ``what`` for a bad key or value."""
    try:
        return load_config(opts.config, [*opts.overrides, *extra])
    except ConfigError as e:
        raise SweepError(f"{what}: {'; '.join(e.problems)} (hgscale config --help-keys lists every key)") from None


def _product(options) -> list[dict]:
    """Every combination of the options' values: [{key: value, ...}, ...] ([{}] without options)."""
    keys = [k for k, _ in options]
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*(v for _, v in options))]


def _models(opts: Options, cfg) -> dict[str, dict]:
    """{hierarchy: {"role", "matches": [...]}}: the models to train in one cell, Hourglasses first, then baselines."""
    out = {}
    for h in opts.models or (" ".join(cfg.model.hierarchy.split()),):
        out[h] = {"role": "hourglass" if len(parse_hierarchy(h)) > 1 else "model", "matches": []}
    for h, entry in list(out.items()):
        if entry["role"] != "hourglass":
            continue
        model = dataclasses.replace(cfg.model, hierarchy=h)
        for by in opts.match:
            n, gap = match_baseline(model, cfg.data.seq_len, by, opts.tolerance)
            base = out.setdefault(f"{n}@1", {"role": "baseline", "matches": []})
            base["role"] = "baseline"  # a vanilla model listed in --models that matches is a baseline too
            base["matches"].append({"hourglass": h, "by": by, "gap": round(gap, 6)})
    return out


def _cost(opts: Options, cfg, hierarchy: str) -> tuple[float, int]:
    c = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, hierarchy=hierarchy))
    world = opts.world_size or ParallelLayout.implied_world(cfg)
    try:
        return step_cost(c, world)
    except ConfigError as e:
        raise SweepError(f"--world-size {world}: {'; '.join(e.problems)}") from None


def _check_tuning_keeps_cost(opts: Options, cell: dict, tunes: list[dict], base_cfg) -> None:
    """A tuning value may not change what a step costs: the budgets would buy different steps per value."""
    want = _cost(opts, base_cfg, base_cfg.model.hierarchy)
    for t in tunes:
        cfg = _load(opts, [f"{k}={v}" for k, v in {**cell, **t}.items()], f"--tune {kv_label(t)}")
        if _cost(opts, cfg, cfg.model.hierarchy) != want:
            raise SweepError(f"--tune {kv_label(t)} changes the FLOPs of a step (tune keys that leave it "
                             f"alone (train.lr, train.warmup_steps, model.dropout, ...) and put the others in --grid)")


def _groups(opts: Options, cell: dict, cfg, problems: list[str]) -> list[dict]:
    """One group per (model, budget) of a cell: its steps, FLOPs and validation interval."""
    groups, short = [], []
    for h, entry in _models(opts, cfg).items():
        fpt, tps = _cost(opts, cfg, h)
        causal = flops_per_token(dataclasses.replace(cfg.model, hierarchy=h), cfg.data.seq_len, causal=True)
        for budget in opts.budgets:
            steps = steps_for(budget, fpt, tps)
            if steps < 1:
                short.append((fpt * tps, h, fpt, tps, budget))
                continue
            groups.append({"model": h, "role": entry["role"], "matches": entry["matches"], "budget": budget,
                           "cell": cell, "steps": steps, "flops": steps * fpt * tps, "flops_per_token": fpt,
                           "causal_flops_per_token": causal, "tokens_per_step": tps,
                           "eval_interval": eval_interval(steps, opts.evals)})
    if short:
        cost, h, fpt, tps, _ = max(short)
        small = ",".join(budget_label(b) for b in sorted({s[-1] for s in short}))
        problems.append(f"--budgets {small} is too small for one optimizer step of '{h}' ({cost:.3g} FLOPs = "
                        f"{fpt:.4g} FLOPs/token x {tps} tokens per step); give budgets of at least {cost:.3g}")
    return groups


def _run(plan: dict, group: dict, tune: dict | None, seed: int, phase: str) -> dict:
    run = {**group, "seed": seed, "tune": tune, "phases": [phase], "name": None, "overrides": None}
    return with_overrides(plan, run) if tune is not None else run


def with_overrides(plan: dict, run: dict) -> dict:
    """``run`` with its name, directories and the overrides that make it (its tuning value now known)."""
    name = run_name(run["model"], run["budget"], run["cell"], run["tune"], run["seed"])
    rd = Path(plan["out"]) / "runs" / name
    ovr = [*plan["overrides"], *(f"{k}={v}" for k, v in {**run["cell"], **run["tune"]}.items()),
           f"model.hierarchy={run['model']}", f"train.steps={run['steps']}",
           f"train.seed={plan['seeds']['train'] + run['seed']}", f"data.seed={plan['seeds']['data'] + run['seed']}",
           f"train.eval_interval={run['eval_interval']}", f"run_dir={rd}", f"checkpoint.dir={rd / 'checkpoints'}",
           "checkpoint.resume=auto", f"tracking.run_name={plan['sweep']}/{name}"]
    return {**run, "name": name, "run_dir": str(rd), "checkpoint_dir": str(rd / "checkpoints"), "overrides": ovr}


def _tracking(cfg, out: Path) -> tuple[dict, list[str]]:
    """The store every run of the sweep logs to, and the override that puts it in the sweep directory when neither
    tracking.uri nor MLFLOW_TRACKING_URI names one (each run would otherwise have its own)."""
    from hgscale.tracking import resolve_uri

    if not cfg.tracking.enabled:
        return {"enabled": False}, []
    extra = [] if cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") else \
        [f"tracking.uri=sqlite:///{out / 'mlflow.db'}"]
    uri = f"sqlite:///{out / 'mlflow.db'}" if extra else resolve_uri(cfg)
    return {"enabled": True, "uri": mask_value(uri), "experiment": cfg.tracking.experiment}, extra


def build_plan(opts: Options, sweep_id: str, out: Path, config_copy: Path) -> dict:
    """Every run of the sweep (final runs of a tuned group pending), each problem raised before anything runs."""
    check_counts(opts)
    out = Path(out).resolve()
    base = _load(opts, [], "the config and its overrides")
    tracking, extra = _tracking(base, out)
    plan = {"version": VERSION, "sweep": sweep_id, "out": str(out), "config": str(Path(config_copy).resolve()),
            "options": opts.to_dict(), "overrides": [*opts.overrides, *extra], "tracking": tracking,
            "world_size": opts.world_size or ParallelLayout.implied_world(base),
            "seeds": {"train": base.train.seed, "data": base.data.seed}, "created": time.strftime(
                "%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "runs": [], "pending": [], "parent_run_id": None}
    problems, tunes = [], _product(opts.tune) if opts.tune else []
    for cell in _product(opts.grid):
        cfg = _load(opts, [f"{k}={v}" for k, v in cell.items()], f"--grid {kv_label(cell)}")
        _check_tuning_keeps_cost(opts, cell, tunes, cfg)
        for group in _groups(opts, cell, cfg, problems):
            plan["runs"] += [_run(plan, group, t, s, "tune") for t in tunes for s in range(opts.tune_seeds)]
            plan["pending" if tunes else "runs"] += [_run(plan, group, None if tunes else {}, s, "final")
                                                     for s in range(opts.seeds)]
    if problems:
        raise SweepError(problems[0])
    for run in plan["runs"]:  # every run's config, checked as the trainer will load it
        _load(Options(config=opts.config), run["overrides"], f"run {run['name']}")
    return plan


def final_runs(plan: dict) -> list[dict]:
    return [r for r in plan["runs"] if "final" in r["phases"]]


def comparisons(plan: dict) -> list[dict]:
    """(cell, Hourglass, baseline, match) of every comparison the sweep makes."""
    seen, out = set(), []
    for r in plan["runs"] + plan["pending"]:
        for m in r["matches"]:
            key = (kv_label(r["cell"]), m["hourglass"], r["model"], m["by"])
            if key not in seen:
                seen.add(key)
                out.append({"cell": r["cell"], "hourglass": m["hourglass"], "baseline": r["model"], "by": m["by"],
                            "gap": m["gap"]})
    return out


def load_plan(out: str | Path) -> dict:
    path = Path(out) / PLAN
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise SweepError(f"no sweep at {path.parent}: it holds no {PLAN}; run hgscale sweep first, or pass the "
                         f"sweep's directory (runs/sweeps/ID)") from None
    except (OSError, ValueError) as e:
        raise SweepError(f"{path} cannot be read ({type(e).__name__}); rerun the sweep command to rewrite it") \
            from None


def save_plan(plan: dict) -> Path:
    """``plan.json``, written whole under a temporary name and renamed (a reader never sees half of it)."""
    path = Path(plan["out"]) / PLAN
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(PLAN + ".tmp")
    tmp.write_text(json.dumps({k: v for k, v in plan.items() if not k.startswith("_")}, indent=1))
    tmp.replace(path)
    return path
