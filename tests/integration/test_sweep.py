"""A real micro-sweep: a tiny Hourglass against its FLOPs-matched vanilla Transformer on the demo corpus, one budget of
about four steps, one seed, tracked in a local MLflow store; the same command again trains nothing; then
`hgscale report --sweep` tabulates exactly the final validation values the runs recorded."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from hgscale.config import load_config
from hgscale.models.flops import flops_per_token
from hgscale.sweep.plan import budget_label
from tests.integration.train_helpers import demo_data, env, tiny_config  # noqa: F401 - demo_data: a fixture

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]
HOURGLASS, BASELINE = "1@1 4@4 1@1", "4@1"  # 4@1 is within 0.7 % of the Hourglass's FLOPs per token at d_model 32


def hgscale(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    e = env()
    e.pop("MLFLOW_TRACKING_URI", None)  # the sweep keeps its own store: <out>/mlflow.db
    r = subprocess.run([sys.executable, "-m", "hgscale", *args], cwd=cwd, env=e, capture_output=True, text=True,
                       timeout=240)
    assert r.returncode == 0, f"{args[0]} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def final_val(run_dir: Path, steps: int) -> float:
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return next(r["val/bpc"] for r in recs if r["step"] == steps and "val/bpc" in r)


def table(md: str, header: str) -> dict[str, list[str]]:
    """The rows of the markdown table after ``header``, by their first cell."""
    lines = md.split(header, 1)[1].split("\n\n", 2)[1].splitlines()[2:]
    return {c[0]: c[1:] for c in ([x.strip() for x in line.split("|")[1:-1]] for line in lines)}


def test_micro_sweep_skips_finished_runs_and_reports_their_values(tmp_path, demo_data):  # noqa: F811
    cfg = tiny_config(tmp_path, demo_data, "tiny.json", model={"hierarchy": HOURGLASS},
                      tracking={"enabled": True, "system_metrics": False, "experiment": "sweep-it"})
    fpt = flops_per_token(load_config(cfg).model, 32)
    budget = f"{4 * fpt * 2 * 2 * 32:.6g}"  # four steps of 2 x 2 sequences of 32 tokens
    cmd = ["sweep", "--config", str(cfg), "--budgets", budget, "--evals", "1", "--id", "micro"]
    first = hgscale(tmp_path, *cmd)
    out = tmp_path / "runs" / "sweeps" / "micro"
    plan = json.loads((out / "plan.json").read_text())
    runs = {r["model"]: r for r in plan["runs"]}
    assert set(runs) == {HOURGLASS, BASELINE} and {r["steps"] for r in runs.values()} == {4}
    assert runs[BASELINE]["matches"][0]["hourglass"] == HOURGLASS and runs[BASELINE]["matches"][0]["by"] == "flops"
    assert first.stdout.count("finished in") == 2, first.stdout
    finals = {m: final_val(Path(r["run_dir"]), 4) for m, r in runs.items()}

    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    exp = client.get_experiment_by_name("sweep-it")
    tagged = client.search_runs([exp.experiment_id], "tags.`hgscale.sweep` = 'micro'")
    parent = [r for r in tagged if r.data.tags.get("hgscale.kind") == "sweep"]
    trained = {r.data.tags["hgscale.sweep.model"]: r for r in tagged if r not in parent}
    assert len(parent) == 1 and parent[0].info.run_id == plan["parent_run_id"] and set(trained) == set(runs)
    for model, r in trained.items():
        assert r.data.tags["mlflow.parentRunId"] == plan["parent_run_id"] and r.data.tags["hgscale.sweep.seed"] == "0"
        assert r.data.tags["hgscale.sweep.budget"] == budget_label(float(budget))
        assert r.data.metrics["val/bpc"] == pytest.approx(finals[model], rel=1e-12)
    stamps = {m: (Path(r["run_dir"]) / "metrics.jsonl").stat().st_mtime_ns for m, r in runs.items()}
    n_runs = len(client.search_runs([exp.experiment_id]))

    again = hgscale(tmp_path, *cmd)  # the same command: both runs finished, nothing trains
    assert "2 run(s) finished earlier, skipped" in again.stdout and "finished in" not in again.stdout, again.stdout
    assert {m: (Path(r["run_dir"]) / "metrics.jsonl").stat().st_mtime_ns for m, r in runs.items()} == stamps
    assert len(client.search_runs([exp.experiment_id])) == n_runs

    hgscale(tmp_path, "report", "--sweep", "micro")
    md = (out / "report" / "sweep.md").read_text()
    per_run = table(md, "## Runs")  # run | model | budget | seed | final val bpc
    for model, r in runs.items():
        assert per_run[r["name"]] == [model, budget_label(float(budget)), "0", f"{finals[model]:.4f}"]
    # per model: cell | model | role | budget | steps | FLOPs | tuned | seeds | mean | sd | min | max | frontier
    per_model = {c[1]: c for c in ([x.strip() for x in line.split("|")[1:-1]] for line in md.splitlines()
                                   if line.startswith("| — | ") and line.count("|") == 14)}
    for model, role in ((HOURGLASS, "hourglass"), (BASELINE, "baseline")):
        v = f"{finals[model]:.4f}"
        assert per_model[model][2:5] == [role, budget_label(float(budget)), "4"]
        assert per_model[model][7:12] == ["1", v, "—", v, v]
    gap = finals[HOURGLASS] - finals[BASELINE]
    assert f"| {HOURGLASS} | {BASELINE} | flops | 1 | {gap:+.4f} | — (1 seed) |" in md
    assert f"gap {gap:+.4f} bpc (Hourglass - baseline) from 1 seed; no interval" in md
    assert (out / "report" / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    logged = {a.path for a in client.list_artifacts(plan["parent_run_id"], "report")}
    assert logged == {"report/sweep.md", "report/sweep.png", "report/sweep.json"}
    assert os.path.isfile(out / "config.json")
