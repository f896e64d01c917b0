"""Compare runs by compute (``hgscale report --experiment NAME [--runs ID_OR_NAME ...]``).

Reads the runs of an MLflow experiment and writes, under ``--out``:

- ``val_vs_flops.png``: validation bpc/bpd against cumulative training FLOPs, one curve per run;
- ``val_vs_wallclock.png``: the same against training wall-clock time;
- ``report.md``: a table of final validation (and test) metric, tokens/s, MFU and total training FLOPs.

Then it logs the three files as artifacts of a new *summary run* (tag ``hgscale.kind=report``) in the same
experiment, so the comparison sits next to the runs in the MLflow UI. The tracking store comes from
``--tracking-uri``, ``MLFLOW_TRACKING_URI`` (a server, or ``sqlite:///<run_dir>/mlflow.db``), or the store
a training config (``--config``) writes to.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from hgscale.core.secrets import mask_value
from hgscale.tracking import names
from hgscale.tracking.plots import at_steps, plot_panels, series

log = logging.getLogger("hgscale.tracking.report")
REPORT_TAG = "hgscale.kind"


class ReportError(ValueError):
    """A user-fixable problem (store, experiment, run names); printed as one sentence."""


def _history(client, run_id: str, key: str | None):
    return client.get_metric_history(run_id, key) if key else []


def _typical(client, run_id: str, key: str | None) -> float | None:
    """Median over the second half of a metric's history: steady state, past warm-up and compilation."""
    steps, values = series(_history(client, run_id, key))
    if len(values) == 0:
        return None
    return float(np.median(values[len(values) // 2:]))


def summarize_run(client, run) -> dict:
    """Curves and table figures of one run (FLOPs and wall-clock at each validation step)."""
    rid = run.info.run_id
    keys = set(run.data.metrics)
    val_key = names.find_val_key(keys)
    flops_key = names.first_present(names.FLOPS_KEYS, keys)
    elapsed_key = names.first_present(names.ELAPSED_KEYS, keys)
    val_hist = _history(client, rid, val_key)
    vs, vv = series(val_hist)
    fs, fv = series(_history(client, rid, flops_key))
    if elapsed_key:
        es, ev = series(_history(client, rid, elapsed_key))
        wall = at_steps(es, ev, vs)
    else:  # no training clock logged: time since the run started, as MLflow stamped the values
        t0 = run.info.start_time or 0
        stamp = {m.step: m.timestamp for m in val_hist}
        wall = np.array([(stamp[s] - t0) / 1000.0 for s in vs], dtype=float)
    ls, _ = series(_history(client, rid, names.first_present(names.LOSS_KEYS, keys)))
    metric = val_key.split("/", 1)[-1] if val_key else None
    test_key = f"test/{metric}" if metric and f"test/{metric}" in keys else None
    return {
        "run_id": rid, "name": run.info.run_name or rid[:8], "val_key": val_key, "metric": metric,
        "val_steps": vs, "val": vv, "flops_at_val": at_steps(fs, fv, vs) if flops_key else np.full(len(vs), np.nan),
        "wall_at_val": wall,
        "final_val": float(vv[-1]) if len(vv) else None,
        "best_val": float(vv.min()) if len(vv) else None,
        "test": run.data.metrics.get(test_key) if test_key else None,
        "tokens_per_s": _typical(client, rid, names.first_present(names.TOKENS_PER_S_KEYS, keys)),
        "mfu": _typical(client, rid, names.first_present(names.MFU_KEYS, keys)),
        "total_flops": float(fv[-1]) if len(fv) else None,
        "steps": int(ls[-1]) if len(ls) else (int(vs[-1]) if len(vs) else 0),
        "status": run.info.status,
    }


def _fmt(v, spec: str) -> str:
    return "—" if v is None or (isinstance(v, float) and not np.isfinite(v)) else format(v, spec)


def markdown(experiment: str, rows: list[dict], images: list[str]) -> str:
    metric = next((r["metric"] for r in rows if r["metric"]), "bpc")
    lines = [f"# Experiment `{experiment}`: {len(rows)} run(s)", "",
             f"| run | status | steps | final val {metric} | best val {metric} | test {metric} | tokens/s | MFU "
             f"| training FLOPs |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['name']} (`{r['run_id'][:8]}`) | {r['status']} | {r['steps']} | "
                     f"{_fmt(r['final_val'], '.4f')} | {_fmt(r['best_val'], '.4f')} | {_fmt(r['test'], '.4f')} | "
                     f"{_fmt(r['tokens_per_s'], ',.0f')} | "
                     f"{'—' if r['mfu'] is None else format(100 * r['mfu'], '.1f') + '%'} | "
                     f"{_fmt(r['total_flops'], '.3e')} |")
    lines += ["", "tokens/s and MFU: median over the second half of each run (past warm-up).", ""]
    lines += [f"![{Path(p).stem}]({Path(p).name})" for p in images]
    return "\n".join(lines) + "\n"


def select_runs(client, experiment_id: str, wanted: list[str] | None):
    runs = [r for r in client.search_runs([experiment_id], max_results=1000, order_by=["attributes.start_time ASC"])
            if r.data.tags.get(REPORT_TAG) not in ("report", "sweep")]  # summaries, not training runs
    if not wanted:
        return runs
    chosen = []
    for w in wanted:
        match = [r for r in runs if r.info.run_id == w or r.info.run_name == w]
        if not match:
            raise ReportError(f"run {w!r} is not in the experiment; pass a run id or run name from: "
                              f"{', '.join(sorted({r.info.run_name for r in runs})) or '(no runs)'}")
        chosen += [r for r in match if r not in chosen]
    return chosen


def build_report(tracking_uri: str, experiment: str, run_filter: list[str] | None, out_dir: str | Path,
                 log_summary: bool = True) -> dict:
    """Write the PNGs and markdown; log them to a summary run. Returns paths, rows and the summary run id."""
    for name in ("alembic", "mlflow.store.db.utils"):
        logging.getLogger(name).setLevel(logging.WARNING)
    from mlflow.tracking import MlflowClient

    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri[len("sqlite:///"):])
        if not db.is_file():  # opening it would create an empty store
            raise ReportError(f"no tracking store at {db}: train a run first, or point --tracking-uri at the store "
                              f"(sqlite:///<run_dir>/mlflow.db or http://host:port)")
    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        known = ", ".join(e.name for e in client.search_experiments()) or "(none)"
        raise ReportError(f"experiment {experiment!r} does not exist at {mask_value(tracking_uri)}; existing "
                          f"experiments: {known}")
    runs = select_runs(client, exp.experiment_id, run_filter)
    if not runs:
        raise ReportError(f"experiment {experiment!r} has no runs to compare; train one first")
    rows = [summarize_run(client, r) for r in runs]
    labels = [r["name"] if [x["name"] for x in rows].count(r["name"]) == 1 else f"{r['name']} ({r['run_id'][:6]})"
              for r in rows]
    metric = next((r["metric"] for r in rows if r["metric"]), "bpc")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    wall_max = max([float(np.nanmax(r["wall_at_val"])) for r in rows if len(r["wall_at_val"])] or [0.0])
    hours = wall_max > 7200
    pairs = list(zip(labels, rows, strict=True))
    flops_png = plot_panels([{"curves": [(lab, r["flops_at_val"], r["val"]) for lab, r in pairs],
                              "xlabel": "training FLOPs", "ylabel": f"validation {metric}", "logx": True}],
                            out / "val_vs_flops.png", title=f"{experiment}: validation {metric} vs training compute")
    wall_png = plot_panels([{"curves": [(lab, r["wall_at_val"] / (3600.0 if hours else 1.0), r["val"])
                                        for lab, r in pairs],
                             "xlabel": "training wall-clock (h)" if hours else "training wall-clock (s)",
                             "ylabel": f"validation {metric}"}],
                           out / "val_vs_wallclock.png", title=f"{experiment}: validation {metric} vs wall-clock")
    md = out / "report.md"
    md.write_text(markdown(experiment, rows, [str(flops_png), str(wall_png)]))
    summary_id = None
    if log_summary:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
        run = client.create_run(exp.experiment_id, run_name=f"report {stamp}",
                                tags={REPORT_TAG: "report", "hgscale.report_runs": ",".join(r["run_id"] for r in rows)})
        summary_id = run.info.run_id
        for p in (flops_png, wall_png, md):
            client.log_artifact(summary_id, str(p), "report")
        client.set_terminated(summary_id)
    return {"markdown": md, "pngs": [flops_png, wall_png], "rows": rows, "summary_run_id": summary_id,
            "experiment_id": exp.experiment_id}
