"""The matched-FLOPs study of BENCHMARKS.md: what crosses the --grid cells of finished hgscale sweeps.

    python benchmarks/sweep_study.py --sweep demo=runs/sweeps/study-demo --sweep debian=runs/sweeps/study-debian \\
        [--ablation demo=runs/sweeps/ablate-demo ...] [--recipe demo=runs/sweeps/recipe-demo ...] [--md study.md]

``hgscale report --sweep`` compares an Hourglass with its baselines inside one grid cell (one model.init). This adds,
per corpus (the label before '='), with every gap paired by seed and a 95 % t-interval over the per-seed differences:

- best against best: per model and budget the cell with the lowest mean final validation bpc, then Hourglass - its
  baseline (each at its own best init and, in a tuned sweep, its own tuned lr);
- the init effect: per model and budget, model.init=trax - model.init=normal;
- ablation sweeps (one ``--grid`` key, e.g. ``model.init_layers='"",down=normal,...'`` with ``--match none``, or
  ``train.warmup_steps=10,0,40``): per model and budget, each cell - the cell of the key's first value (the control);
- a recipe sweep (one setting for every model, e.g. ``model.init_layers=full=normal``): each of its models and budgets
  - the same model and budget in each cell of the corpus's ``--sweep`` (same seeds, so paired).

Reads each run's metrics.jsonl (no tracking store needed) and writes the tables as markdown and
benchmarks/results/sweep_study.json.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import common

from hgscale.sweep.plan import comparisons, load_plan
from hgscale.tracking.sweep_report import budget_label, cell_label, collect, paired_interval, summarize


def rows_of(sweep_dir: str) -> tuple[dict, list[dict]]:
    plan = load_plan(sweep_dir)
    results, _ = collect(plan, None)
    return plan, [r for r in summarize(results, plan["options"].get("tolerance", 0.02)) if r["n"]]


def gap(a: dict, b: dict, prefix: str = "") -> dict:
    """a - b paired by seed: seeds, mean, sd and the 95 % interval, each key led by ``prefix``."""
    seeds = sorted(set(a["by_seed"]) & set(b["by_seed"]))
    g = {"seeds": len(seeds), **paired_interval([a["by_seed"][s] - b["by_seed"][s] for s in seeds])}
    return {prefix + k: x for k, x in g.items()}


def _best(rows: list[dict], model: str, budget: float) -> dict | None:
    cands = [r for r in rows if r["model"] == model and r["budget"] == budget]
    return min(cands, key=lambda r: r["mean"]) if cands else None


def best_vs_best(plan: dict, rows: list[dict]) -> list[dict]:
    out = []
    pairs = dict.fromkeys((c["hourglass"], c["baseline"]) for c in comparisons(plan))
    for hg, base in pairs:
        for budget in sorted({r["budget"] for r in rows}):
            a, b = _best(rows, hg, budget), _best(rows, base, budget)
            if a and b:
                out.append({"budget": budget, "hourglass": hg, "hg_cell": cell_label(a["cell"]), "hg_mean": a["mean"],
                            "hg_tune": a["tune"], "baseline": base, "base_cell": cell_label(b["cell"]),
                            "base_mean": b["mean"], "base_tune": b["tune"], **gap(a, b)})
    return out


def cell_effect(rows: list[dict], key: str, value: str, control: str) -> list[dict]:
    """Per model and budget: (cell with ``key`` = value) - (cell with ``key`` = control), other keys alike."""
    index = {(json.dumps({k: v for k, v in r["cell"].items() if k != key}, sort_keys=True), r["model"], r["budget"],
              r["cell"].get(key)): r for r in rows}
    out = []
    for (rest, model, budget, v), r in index.items():
        ctl = index.get((rest, model, budget, control))
        if v == value and ctl is not None:
            out.append({"model": model, "budget": budget, "cell": rest, "key": key, "value": value, "control": control,
                        "mean": r["mean"], "control_mean": ctl["mean"], **gap(r, ctl, "d_")})
    return out


def against_cells(recipe_rows: list[dict], rows: list[dict]) -> list[dict]:
    """Each recipe row - the same model and budget in every cell of the main sweep, paired by seed."""
    out = []
    for r in recipe_rows:
        for o in rows:
            if (o["model"], o["budget"]) == (r["model"], r["budget"]):
                out.append({"model": r["model"], "budget": r["budget"], "cell": cell_label(o["cell"]),
                            "control_tune": o["tune"], "mean": r["mean"], "control_mean": o["mean"],
                            **gap(r, o, "d_")})
    return out


def _ci(g: dict, pre: str = "") -> str:
    if g[pre + "lo"] is None:
        return f"{g[pre + 'mean']:+.4f} ({g[pre + 'seeds']} seed)"
    return f"{g[pre + 'mean']:+.4f} [{g[pre + 'lo']:+.4f}, {g[pre + 'hi']:+.4f}]"


def _tuned(t: dict | None) -> str:
    return ", ".join(f"{v}" for v in (t or {}).values()) or "—"


def markdown(study: dict) -> str:
    lines = ["| corpus | budget | Hourglass (init, lr) | bpc | baseline (init, lr) | bpc | gap, 95 % CI |",
             "|---|---|---|---|---|---|---|"]
    for corpus, s in study["sweeps"].items():
        for g in s["best_vs_best"]:
            hg = f"{g['hourglass']} ({g['hg_cell'].split('=')[-1]}, {_tuned(g['hg_tune'])})"
            base = f"{g['baseline']} ({g['base_cell'].split('=')[-1]}, {_tuned(g['base_tune'])})"
            lines.append(f"| {corpus} | {budget_label(g['budget'])} | {hg} | {g['hg_mean']:.4f} | {base} | "
                         f"{g['base_mean']:.4f} | {_ci(g)} |")
    lines += ["", "| corpus | model | budget | trax | normal | trax - normal, 95 % CI |", "|---|---|---|---|---|---|"]
    for corpus, s in study["sweeps"].items():
        for e in sorted(s["init_effect"], key=lambda e: (e["model"], e["budget"])):
            lines.append(f"| {corpus} | {e['model']} | {budget_label(e['budget'])} | {e['mean']:.4f} | "
                         f"{e['control_mean']:.4f} | {_ci(e, 'd_')} |")
    key = None
    for corpus, effects in study["ablations"].items():
        for e in effects:
            if e["key"] != key:  # a table per ablated key
                key = e["key"]
                lines += ["", f"| corpus | model | budget | {key} | bpc | control ({e['control']}) bpc "
                              f"| gap, 95 % CI |", "|---|---|---|---|---|---|---|"]
            lines.append(f"| {corpus} | {e['model']} | {budget_label(e['budget'])} | {e['value']} | "
                         f"{e['mean']:.4f} | {e['control_mean']:.4f} | {_ci(e, 'd_')} |")
    if study["recipes"]:
        lines += ["", "| corpus | model | budget | recipe bpc | against | its bpc | recipe - it, 95 % CI |",
                  "|---|---|---|---|---|---|---|"]
    for corpus, effects in study["recipes"].items():
        for e in effects:
            lines.append(f"| {corpus} | {e['model']} | {budget_label(e['budget'])} | {e['mean']:.4f} | {e['cell']} "
                         f"({_tuned(e['control_tune'])}) | {e['control_mean']:.4f} | {_ci(e, 'd_')} |")
    return "\n".join(lines) + "\n"


def _labelled(items: list[str]) -> dict[str, str]:
    return dict(item.split("=", 1) for item in items)


def main(argv=None) -> int:
    ap = common.parser(__doc__)
    ap.add_argument("--sweep", action="append", default=[], metavar="LABEL=DIR", help="a sweep with --grid model.init")
    ap.add_argument("--ablation", action="append", default=[], metavar="LABEL=DIR",
                    help="a sweep with one --grid key, whose first value is the control")
    ap.add_argument("--recipe", action="append", default=[], metavar="LABEL=DIR",
                    help="a sweep of one setting for every model, compared with the --sweep of the same LABEL")
    ap.add_argument("--md", default="", help="also write the tables here")
    common.add_out(ap, "sweep_study")
    args = ap.parse_args(argv)
    study = {"command": common.command(__file__, argv), "sweeps": {}, "ablations": {}, "recipes": {}}
    main_rows = {}
    for label, d in _labelled(args.sweep).items():
        plan, rows = rows_of(d)
        main_rows[label] = rows
        study["sweeps"][label] = {"dir": d, "best_vs_best": best_vs_best(plan, rows),
                                  "init_effect": cell_effect(rows, "model.init", "trax", "normal")}
    for label, d in _labelled(args.ablation).items():
        plan, rows = rows_of(d)
        if len(plan["options"]["grid"]) != 1:
            ap.error(f"--ablation {label}={d}: the sweep needs exactly one --grid key (its first value the control)")
        (key, (control, *values)), = plan["options"]["grid"]
        study["ablations"][label] = [e for v in sorted(values) for e in cell_effect(rows, key, v, control)]
    for label, d in _labelled(args.recipe).items():
        if label not in main_rows:
            ap.error(f"--recipe {label}={d}: give the main sweep of {label!r} too (--sweep {label}=DIR)")
        study["recipes"][label] = against_cells(rows_of(d)[1], main_rows[label])
    md = markdown(study)
    print(md)
    if args.md:
        Path(args.md).write_text(md)
    common.write_result(args.out, study)
    return 0


if __name__ == "__main__":
    sys.exit(main())
