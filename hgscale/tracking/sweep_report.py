"""The report of a sweep (``hgscale report --sweep ID``): Hourglass against its matched baselines at equal compute.

Reads the final runs of a sweep's ``plan.json`` (hgscale.sweep) and their validation metric (``val/bpc``, ``val/bpd``)
along training: from MLflow (the runs tagged ``hgscale.sweep = ID``) when the sweep tracked, else from each run's
``metrics.jsonl``. A run's *final* value is the one at its last planned step. Writes, under ``--out``
(default ``<sweep>/report``):

- ``sweep.md``: per model and budget the mean, standard deviation, min and max over seeds and whether the point is
  on the compute frontier (no model reaches a lower mean with as few FLOPs, within the matching tolerance); per
  comparison and budget the gap Hourglass - baseline, paired by seed, with a 95 % t-interval over the per-seed
  differences (with one seed no interval is given, and the report says so); one verdict line per budget; every
  run's final value;
- ``sweep.png``: validation against training FLOPs (each run's curve, the means with their spread, the frontier)
  and the gaps with their intervals;
- ``sweep.json``: the same numbers.

With tracking, the files go to the sweep's parent MLflow run as artifacts under ``report/``.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from hgscale.tracking import names
from hgscale.tracking.plots import at_steps, series


class SweepReportError(ValueError):
    """A user-fixable problem (no finished runs, a store without the sweep's runs); one sentence."""


def paired_interval(diffs, level: float = 0.95) -> dict:
    """Mean of paired differences and its two-sided t-interval: mean -+ t_{(1+level)/2, n-1} x sd / sqrt(n), sd with
    n - 1 degrees of freedom. With fewer than two differences ``lo``/``hi`` (and ``sd``) are None."""
    d = np.asarray(list(diffs), dtype=float)
    n = len(d)
    if n == 0:
        return {"n": 0, "mean": None, "sd": None, "lo": None, "hi": None}
    mean = float(d.mean())
    if n < 2:
        return {"n": 1, "mean": mean, "sd": None, "lo": None, "hi": None}
    from scipy.stats import t

    sd = float(d.std(ddof=1))
    half = float(t.ppf((1 + level) / 2, n - 1)) * sd / math.sqrt(n)
    return {"n": n, "mean": mean, "sd": sd, "lo": mean - half, "hi": mean + half}


def budget_label(b: float) -> str:
    mant, exp = f"{b:.3e}".split("e")
    return f"{mant.rstrip('0').rstrip('.')}e{int(exp)}"


def cell_label(cell: dict) -> str:
    return "+".join(f"{k}={v}" for k, v in cell.items())


def _from_records(run: dict) -> dict:
    """Curve and final value of a run from its metrics.jsonl."""
    recs = []
    path = Path(run["run_dir"]) / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            recs.append(json.loads(line))
        except ValueError:
            continue
    keys = {k for r in recs for k in r}
    val_key, flops_key = names.find_val_key(keys), names.first_present(names.FLOPS_KEYS, keys)
    vals = [(r["step"], r[val_key]) for r in recs if val_key in r]
    flops = [(r["step"], r[flops_key]) for r in recs if flops_key and flops_key in r]
    return _curve(run, val_key, series(vals), series(flops))


def _from_mlflow(client, run: dict, mlflow_run) -> dict:
    keys = set(mlflow_run.data.metrics)
    val_key, flops_key = names.find_val_key(keys), names.first_present(names.FLOPS_KEYS, keys)
    rid = mlflow_run.info.run_id

    def hist(key):
        return client.get_metric_history(rid, key) if key else []
    return {**_curve(run, val_key, series(hist(val_key)), series(hist(flops_key))), "run_id": rid}


def _curve(run: dict, val_key, val, flops) -> dict:
    (vs, vv), (fs, fv) = val, flops
    final = float(vv[vs == run["steps"]][-1]) if len(vs) and (vs == run["steps"]).any() else None
    x = at_steps(fs, fv, vs) if len(fs) else vs * run["flops"] / max(run["steps"], 1)
    return {"val_key": val_key, "final": final, "flops_at_val": x, "val": vv}


def collect(plan: dict, tracking_uri: str | None) -> tuple[list[dict], str]:
    """One result per final run of the plan ({run fields..., final, curve}); the source read ("MLflow" or
    "metrics.jsonl"). Runs not yet finished have ``final`` None."""
    finals = {r["name"]: r for r in plan["runs"] if "final" in r["phases"]}
    found = {}
    if tracking_uri:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=tracking_uri)
        exp = client.get_experiment_by_name(plan["tracking"]["experiment"])
        if exp is None:
            raise SweepReportError(f"the tracking store holds no experiment {plan['tracking']['experiment']!r}: the "
                                   f"sweep's runs have not started, or --tracking-uri names another store")
        for r in client.search_runs([exp.experiment_id], f"tags.`hgscale.sweep` = '{plan['sweep']}'",
                                    max_results=50000, order_by=["attributes.start_time ASC"]):
            name = r.data.tags.get("hgscale.sweep.run")
            if name in finals:
                found[name] = _from_mlflow(client, finals[name], r)  # the latest-started run of a name wins
    results = []
    for name, run in finals.items():
        res = found.get(name) or _from_records(run)
        results.append({**{k: run[k] for k in ("name", "model", "role", "budget", "cell", "seed", "steps", "flops",
                                                "tune", "matches")}, **res})
    return results, ("MLflow" if tracking_uri else "metrics.jsonl")


def _stats(values: list[float]) -> dict:
    v = np.asarray(values, dtype=float)
    return {"n": len(v), "mean": float(v.mean()), "sd": float(v.std(ddof=1)) if len(v) > 1 else None,
            "min": float(v.min()), "max": float(v.max())}


def summarize(results: list[dict], tolerance: float = 0.02) -> list[dict]:
    """Per (cell, model, budget): steps, FLOPs, the final values by seed and their statistics, and whether the point is
    on the frontier of its cell: no other point reaches a lower mean with at most (1 + tolerance) x its FLOPs (matched
    models differ by up to the matching tolerance, and count as equal compute)."""
    groups: dict[tuple, dict] = {}
    for r in results:
        key = (cell_label(r["cell"]), r["model"], r["budget"])
        g = groups.setdefault(key, {"cell": r["cell"], "model": r["model"], "role": r["role"], "budget": r["budget"],
                                    "steps": r["steps"], "flops": r["flops"], "tune": r["tune"], "by_seed": {}})
        if r["final"] is not None:
            g["by_seed"][r["seed"]] = r["final"]
    rows = [{**g, **(_stats(list(g["by_seed"].values())) if g["by_seed"] else {"n": 0, "mean": None})}
            for g in groups.values()]
    done = [r for r in rows if r["n"]]
    for r in done:
        r["frontier"] = not any(o is not r and cell_label(o["cell"]) == cell_label(r["cell"]) and o["mean"] < r["mean"]
                                and o["flops"] <= r["flops"] * (1 + tolerance) for o in done)
    return rows


def gaps(plan: dict, rows: list[dict], level: float = 0.95) -> list[dict]:
    """Per comparison (cell, Hourglass, baseline, match) and budget: the paired interval of Hourglass - baseline."""
    index = {(cell_label(r["cell"]), r["model"], r["budget"]): r for r in rows}
    out, seen = [], set()
    for run in plan["runs"] + plan.get("pending", []):
        for m in run["matches"]:
            key = (cell_label(run["cell"]), m["hourglass"], run["model"], m["by"], run["budget"])
            if key in seen:
                continue
            seen.add(key)
            hg, base = index.get((key[0], key[1], key[4])), index.get((key[0], key[2], key[4]))
            seeds = sorted(set(hg["by_seed"]) & set(base["by_seed"])) if hg and base else []
            diffs = [hg["by_seed"][s] - base["by_seed"][s] for s in seeds]
            out.append({"cell": run["cell"], "hourglass": key[1], "baseline": key[2], "by": key[3],
                        "budget": key[4], "seeds": seeds, **paired_interval(diffs, level)})
    return out


def verdict(g: dict, metric: str) -> str:
    """One line: better / worse / no difference resolved, or why there is no interval."""
    where = f"at {budget_label(g['budget'])} FLOPs{' (' + cell_label(g['cell']) + ')' if g['cell'] else ''}: "
    who = f"Hourglass {g['hourglass']} vs {g['baseline']} ({g['by']}-matched)"
    if g["n"] == 0:
        return f"{where}{who}: no seed has finished for both yet"
    if g["n"] == 1:
        return (f"{where}{who}: gap {g['mean']:+.4f} {metric} (Hourglass - baseline) from 1 seed; no interval from "
                f"one seed: run --seeds 2 or more to resolve it")
    ci, n = f"95 % CI [{{:.4f}}, {{:.4f}}], {g['n']} seeds", g["n"]
    if g["hi"] < 0:
        return f"{where}Hourglass {g['hourglass']} better than {g['baseline']} ({g['by']}-matched) by " \
               f"{-g['mean']:.4f} {metric} ({ci.format(-g['hi'], -g['lo'])})"
    if g["lo"] > 0:
        return f"{where}Hourglass {g['hourglass']} worse than {g['baseline']} ({g['by']}-matched) by " \
               f"{g['mean']:.4f} {metric} ({ci.format(g['lo'], g['hi'])})"
    return (f"{where}{who}: no difference resolved: gap {g['mean']:+.4f} {metric} (95 % CI [{g['lo']:+.4f}, "
            f"{g['hi']:+.4f}], {n} seeds)")


def _f(v, spec: str = ".4f") -> str:
    return "—" if v is None else format(v, spec)


def markdown(plan: dict, rows: list[dict], gap_rows: list[dict], results: list[dict], metric: str, source: str,
             image: str) -> str:
    done = sum(r["final"] is not None for r in results)
    lines = [f"# Sweep `{plan['sweep']}`: validation {metric} at equal training compute", "",
             f"{done} of {len(results)} final run(s) finished"
             + (f", {len(plan['pending'])} waiting for tuning" if plan.get("pending") else "")
             + f"; final values read from {source}.", "",
             f"| cell | model | role | budget | steps | training FLOPs | tuned | seeds | mean val {metric} | sd | min "
             f"| max | frontier |", "|---|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {cell_label(r['cell']) or '—'} | {r['model']} | {r['role']} | {budget_label(r['budget'])} | "
                     f"{r['steps']} | {r['flops']:.4g} | {cell_label(r['tune'] or {}) or '—'} | {r['n']} | "
                     f"{_f(r['mean'])} | {_f(r.get('sd'))} | {_f(r.get('min'))} | {_f(r.get('max'))} | "
                     f"{'yes' if r.get('frontier') else ''} |")
    lines += ["", f"## Hourglass - baseline, paired by seed ({metric}; negative: the Hourglass is better)", "",
              "| cell | budget | Hourglass | baseline | match | seeds | gap | 95 % CI |",
              "|---|---:|---|---|---|---:|---:|---|"]
    for g in gap_rows:
        ci = f"[{g['lo']:+.4f}, {g['hi']:+.4f}]" if g["lo"] is not None else "— (1 seed)" if g["n"] == 1 else "—"
        lines.append(f"| {cell_label(g['cell']) or '—'} | {budget_label(g['budget'])} | {g['hourglass']} | "
                     f"{g['baseline']} | {g['by']} | {g['n']} | {_f(g['mean'], '+.4f')} | {ci} |")
    lines += ["", "## Verdicts", ""] + [f"- {verdict(g, metric)}" for g in gap_rows]
    lines += ["", "## Runs", "", f"| run | model | budget | seed | final val {metric} |", "|---|---|---:|---:|---:|"]
    lines += [f"| {r['name']} | {r['model']} | {budget_label(r['budget'])} | {r['seed']} | {_f(r['final'])} |"
              for r in results]
    return "\n".join(lines + ["", f"![{Path(image).stem}]({Path(image).name})", ""])


def plot(rows: list[dict], gap_rows: list[dict], results: list[dict], metric: str, path: Path, title: str) -> Path:
    """Left: validation against training FLOPs (each run's curve, faint; the mean over seeds at each budget with its
    min-max spread; the frontier, dashed). Right: Hourglass - baseline per budget with its 95 % interval."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, (ax, gx) = plt.subplots(1, 2, figsize=(12.8, 4.6))
    cells = len({cell_label(r["cell"]) for r in rows}) > 1
    keys = list(dict.fromkeys((cell_label(r["cell"]), r["model"]) for r in rows))
    colors = {k: f"C{i % 10}" for i, k in enumerate(keys)}
    for r in results:
        ok = np.isfinite(r["flops_at_val"]) & np.isfinite(r["val"])
        if ok.any():
            ax.plot(r["flops_at_val"][ok], r["val"][ok], color=colors[(cell_label(r["cell"]), r["model"])], alpha=0.25,
                    lw=0.8)
    for key in keys:
        pts = sorted((r for r in rows if (cell_label(r["cell"]), r["model"]) == key and r["n"]),
                     key=lambda r: r["flops"])
        if pts:
            x, y = [p["flops"] for p in pts], np.array([p["mean"] for p in pts])
            err = [y - [p["min"] for p in pts], [p["max"] for p in pts] - y]
            ax.errorbar(x, y, yerr=err, color=colors[key], marker="o", capsize=3,
                        label=f"{key[1]}" + (f" ({key[0]})" if cells and key[0] else ""))
    front = sorted((r for r in rows if r.get("frontier")), key=lambda r: r["flops"])
    if front:
        ax.plot([r["flops"] for r in front], [r["mean"] for r in front], "k--", lw=1, label="frontier")
    ax.set(xscale="log", xlabel="training FLOPs", ylabel=f"validation {metric}")
    pairs: dict[tuple, list[dict]] = {}  # one line per comparison across the budgets
    for g in gap_rows:
        if g["n"]:
            pairs.setdefault((cell_label(g["cell"]), g["hourglass"], g["baseline"], g["by"]), []).append(g)
    for i, (key, gs) in enumerate(pairs.items()):
        gs = sorted(gs, key=lambda g: g["budget"])
        lo = [g["mean"] - (g["lo"] if g["lo"] is not None else g["mean"]) for g in gs]
        hi = [(g["hi"] if g["hi"] is not None else g["mean"]) - g["mean"] for g in gs]
        gx.errorbar([g["budget"] * (1 + 0.03 * i) for g in gs], [g["mean"] for g in gs], yerr=[lo, hi], marker="s",
                    capsize=3, label=f"{key[1]} - {key[2]} ({key[3]}{', ' + key[0] if cells and key[0] else ''})")
    gx.axhline(0.0, color="k", lw=0.8)
    gx.set(xscale="log", xlabel="budget (training FLOPs)", ylabel=f"gap in validation {metric} (95 % CI)")
    for a in (ax, gx):
        a.grid(True, alpha=0.3)
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def build_sweep_report(plan: dict, out_dir: str | Path, tracking_uri: str | None = None, log_to_parent: bool = True,
                       level: float = 0.95) -> dict:
    """Write sweep.md, sweep.png and sweep.json under ``out_dir``; log them to the sweep's parent run when tracking
    (``tracking_uri`` given). Returns the paths, the rows, the gaps and the verdict lines."""
    results, source = collect(plan, tracking_uri)
    if not any(r["final"] is not None for r in results):
        raise SweepReportError(f"no final run of sweep {plan['sweep']!r} has finished yet ({len(results)} planned); "
                               f"run the sweep command (it resumes) and report again")
    metric = next((r["val_key"].split("/", 1)[-1] for r in results if r["val_key"]), "bpc")
    rows = summarize(results, plan["options"].get("tolerance", 0.02))
    gap_rows = gaps(plan, rows, level)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    png = plot(rows, gap_rows, results, metric, out / "sweep.png",
               f"sweep {plan['sweep']}: validation {metric} at equal training compute")
    md = out / "sweep.md"
    md.write_text(markdown(plan, rows, gap_rows, results, metric, source, str(png)))
    verdicts = [verdict(g, metric) for g in gap_rows]
    doc = {"sweep": plan["sweep"], "metric": metric, "source": source, "verdicts": verdicts,
           "models": [{k: v for k, v in r.items()} for r in rows], "gaps": gap_rows,
           "runs": [{k: v for k, v in r.items() if k not in ("flops_at_val", "val")} for r in results]}
    js = out / "sweep.json"
    js.write_text(json.dumps(doc, indent=1, default=str))
    logged = False
    if tracking_uri and log_to_parent and plan.get("parent_run_id"):
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=tracking_uri)
        for p in (md, png, js):
            client.log_artifact(plan["parent_run_id"], str(p), "report")
        logged = True
    return {"markdown": md, "png": png, "json": js, "rows": rows, "gaps": gap_rows, "verdicts": verdicts,
            "results": results, "logged_to": plan.get("parent_run_id") if logged else None}
