"""``hgscale report``: compare the runs of an MLflow experiment by compute (hgscale.tracking.report)."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from hgscale.core.secrets import mask_value
from hgscale.core.status import USER_ERROR
from hgscale.tracking.links import link_lines
from hgscale.tracking.report import ReportError, build_report

DESCRIPTION = "Compare runs by compute: validation against training FLOPs and wall-clock, a table, a summary run."


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="hgscale report", description=DESCRIPTION)
    p.add_argument("--experiment", required=True, help="MLflow experiment name")
    p.add_argument("--runs", nargs="*", help="run ids or run names to compare (default: every run)")
    p.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI", ""),
                   help="tracking server or store (default: MLFLOW_TRACKING_URI)")
    p.add_argument("--config", default="", help="a training config: use the tracking store it trains into")
    p.add_argument("--out", default="", help="output directory (default: reports/<experiment>)")
    p.add_argument("--no-summary-run", action="store_true", help="do not log the report to MLflow")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
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
    except Exception as e:  # noqa: BLE001 - a store that does not answer is the user's to fix, not a bug
        from hgscale.tracking.mlflow_sink import is_transient_tracking_error
        if not is_transient_tracking_error(e):
            raise
        print(f"error: the tracking store at {mask_value(args.tracking_uri)} does not answer; start it or fix "
              f"--tracking-uri / MLFLOW_TRACKING_URI", file=sys.stderr)
        return USER_ERROR
    print(res["markdown"].read_text())
    print(f"wrote {res['markdown']}, {', '.join(str(p) for p in res['pngs'])}"
          + (f"; summary run {res['summary_run_id']}" if res["summary_run_id"] else ""))
    for line in link_lines(args.tracking_uri, res["experiment_id"], res["summary_run_id"]):
        print(line)
    return 0
