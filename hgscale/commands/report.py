"""``hgscale report``: compare the runs of an MLflow experiment by compute (hgscale.tracking.report), or the runs of a
sweep at equal compute (``--sweep ID``: hgscale.tracking.sweep_report)."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from hgscale.core.secrets import mask_value
from hgscale.core.status import USER_ERROR, UserError
from hgscale.tracking.links import link_lines
from hgscale.tracking.report import ReportError, build_report

DESCRIPTION = ("Compare runs by compute: validation against training FLOPs and wall-clock, a table, a summary run; "
               "or a sweep's models at equal compute (--sweep).")


def _unreachable(e: Exception, uri: str) -> int:
    """A store that does not answer is the user's to fix (one line, credentials masked); anything else is a bug."""
    from hgscale.tracking.mlflow_sink import is_transient_tracking_error
    if not is_transient_tracking_error(e):
        raise e
    print(f"error: the tracking store at {mask_value(uri)} does not answer; start it or fix "
          f"--tracking-uri / MLFLOW_TRACKING_URI", file=sys.stderr)
    return USER_ERROR


def sweep_report(args: argparse.Namespace) -> int:
    """``--sweep ID``: the sweep in runs/sweeps/ID (or the directory given), its runs tagged, the report written."""
    from hgscale.sweep import mlflow_runs
    from hgscale.sweep.plan import PLAN, load_plan
    from hgscale.tracking.sweep_report import SweepReportError, build_sweep_report

    where = Path(args.sweep) if (Path(args.sweep) / PLAN).is_file() else Path("runs") / "sweeps" / args.sweep
    uri = ""
    try:
        plan = load_plan(where)
        if plan["tracking"]["enabled"]:
            uri = args.tracking_uri or mlflow_runs.store_uri(plan)
            if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
                raise SweepReportError(f"no tracking store at {uri[len('sqlite:///'):]}: the sweep has not run yet")
            mlflow_runs.sync_tags(plan)  # runs trained by Slurm array tasks get their tags here at the latest
        res = build_sweep_report(plan, args.out or Path(plan["out"]) / "report", uri or None,
                                 not args.no_summary_run)
    except (UserError, SweepReportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return USER_ERROR
    except Exception as e:  # noqa: BLE001 - see _unreachable
        return _unreachable(e, uri)
    print(res["markdown"].read_text())
    print(f"wrote {res['markdown']}, {res['png']}, {res['json']}"
          + (f"; logged to the sweep's parent run {res['logged_to']}" if res["logged_to"] else ""))
    if res["logged_to"]:
        from mlflow.tracking import MlflowClient
        exp = MlflowClient(tracking_uri=uri).get_run(res["logged_to"]).info.experiment_id
        for line in link_lines(uri, exp, res["logged_to"]):
            print(line)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="hgscale report", description=DESCRIPTION)
    p.add_argument("--experiment", default="", help="MLflow experiment name")
    p.add_argument("--sweep", default="", metavar="ID",
                   help="report a sweep (hgscale sweep): its id (runs/sweeps/ID) or its directory; per model, "
                        "validation against training FLOPs over seeds, and the Hourglass - baseline gap per budget "
                        "with a 95 %% interval paired by seed")
    p.add_argument("--runs", nargs="*", help="run ids or run names to compare (default: every run)")
    p.add_argument("--tracking-uri", default="",
                   help="tracking server or store (default: MLFLOW_TRACKING_URI; for --sweep, the sweep's own)")
    p.add_argument("--config", default="", help="a training config: use the tracking store it trains into")
    p.add_argument("--out", default="", help="output directory (default: reports/<experiment>, <sweep>/report)")
    p.add_argument("--no-summary-run", action="store_true", help="do not log the report to MLflow")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if args.sweep:
        return sweep_report(args)
    if not args.experiment:
        print("error: name what to report: --experiment NAME (an MLflow experiment) or --sweep ID (a sweep)",
              file=sys.stderr)
        return USER_ERROR
    args.tracking_uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if args.config and not args.tracking_uri:
        from hgscale.config import ConfigError, load_config
        from hgscale.tracking import resolve_uri
        try:
            args.tracking_uri = resolve_uri(load_config(args.config, validate=False))
        except (ConfigError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return USER_ERROR
    if not args.tracking_uri:
        print("error: no tracking store given: pass --tracking-uri (http://host:5000 or "
              "sqlite:///runs/NAME/mlflow.db), --config CONFIG, or set MLFLOW_TRACKING_URI", file=sys.stderr)
        return USER_ERROR
    out = args.out or str(Path("reports") / args.experiment.replace("/", "_"))
    try:
        res = build_report(args.tracking_uri, args.experiment, args.runs, out, not args.no_summary_run)
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return USER_ERROR
    except Exception as e:  # noqa: BLE001 - see _unreachable
        return _unreachable(e, args.tracking_uri)
    print(res["markdown"].read_text())
    print(f"wrote {res['markdown']}, {', '.join(str(p) for p in res['pngs'])}"
          + (f"; summary run {res['summary_run_id']}" if res["summary_run_id"] else ""))
    for line in link_lines(args.tracking_uri, res["experiment_id"], res["summary_run_id"]):
        print(line)
    return 0
