"""`python -m hgscale report` compares two runs read back from a real MLflow server."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from hgscale.config import Config
from hgscale.tracking import Tracker, names

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]
ROOT = Path(__file__).resolve().parents[2]


def _run(tmp_path, uri, name, flops_per_step, seconds_per_step, offset):
    cfg = Config()
    cfg.run_dir = str(tmp_path / name)
    cfg.data.url = "unused"
    cfg.tracking.uri, cfg.tracking.experiment, cfg.tracking.run_name = uri, "hourglass-vs-baseline", name
    tr = Tracker(cfg, 0, 1)
    for s in range(1, 41):
        tr.log_metrics({names.TRAIN_LOSS: 3.0 / s ** 0.3, names.FLOPS: flops_per_step * s,
                        names.ELAPSED_S: seconds_per_step * s, names.TOKENS_PER_S: 8192 / seconds_per_step,
                        names.MFU: 0.4 * 0.5 / seconds_per_step,
                        "val/bpc": 2.0 / s ** 0.1 + offset if s % 10 == 0 else None}, s)
    tr.log_metrics({"test/bpc": 1.0 + offset}, 40)
    assert tr.close()
    return tr.run_id


def test_report_from_two_runs(tmp_path, mlflow_server):
    hg = _run(tmp_path, mlflow_server.uri, "hourglass", 1e12, 0.5, 0.0)
    base = _run(tmp_path, mlflow_server.uri, "baseline", 2e12, 1.0, 0.05)
    out = tmp_path / "report"
    env = dict(os.environ, MLFLOW_TRACKING_URI=mlflow_server.uri, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "hgscale", "report", "--experiment", "hourglass-vs-baseline",
                           "--runs", "hourglass", base, "--out", str(out)],
                          capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for png in ("val_vs_flops.png", "val_vs_wallclock.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, png
    md = (out / "report.md").read_text()
    rows = {line.split("|")[1].strip().split(" ")[0]: [c.strip() for c in line.split("|")[2:-1]]
            for line in md.splitlines() if line.startswith("| hourglass") or line.startswith("| baseline")}
    # columns: status, steps, final val, best val, test, tokens/s, MFU, FLOPs
    assert rows["hourglass"] == ["FINISHED", "40", f"{2.0 / 40 ** 0.1:.4f}", f"{2.0 / 40 ** 0.1:.4f}", "1.0000",
                                 "16,384", "40.0%", "4.000e+13"]
    assert rows["baseline"] == ["FINISHED", "40", f"{2.0 / 40 ** 0.1 + 0.05:.4f}", f"{2.0 / 40 ** 0.1 + 0.05:.4f}",
                                "1.0500", "8,192", "20.0%", "8.000e+13"]
    assert "![val_vs_flops](val_vs_flops.png)" in md

    c = MlflowClient(mlflow_server.uri)
    exp = c.get_experiment_by_name("hourglass-vs-baseline")
    reports = [r for r in c.search_runs([exp.experiment_id]) if r.data.tags.get("hgscale.kind") == "report"]
    assert len(reports) == 1
    assert set(reports[0].data.tags["hgscale.report_runs"].split(",")) == {hg, base}
    assert {a.path for a in c.list_artifacts(reports[0].info.run_id, "report")} == \
        {"report/val_vs_flops.png", "report/val_vs_wallclock.png", "report/report.md"}

    # a second report ignores the summary run; a bad experiment name is one clear sentence
    bad = subprocess.run([sys.executable, "-m", "hgscale", "report", "--experiment", "no-such-exp",
                          "--no-summary-run"],
                         capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path)
    assert bad.returncode == 2
    assert "error: experiment 'no-such-exp' does not exist" in bad.stderr and "Traceback" not in bad.stderr
    bad = subprocess.run([sys.executable, "-m", "hgscale", "report", "--experiment", "hourglass-vs-baseline",
                          "--runs", "nope", "--no-summary-run"], capture_output=True, text=True, timeout=60, env=env,
                         cwd=tmp_path)
    assert bad.returncode == 2 and "run 'nope' is not in the experiment" in bad.stderr
