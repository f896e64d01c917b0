"""`hgscale sweep --slurm` on a real one-node Slurm cluster (MaxArraySize 3): four tuning runs (a tiny Hourglass and
its FLOPs-matched vanilla model, each at model.init_std 0.02 and 1e30) go out as two arrays of 3 and 1 tasks, each task
slurm/train_multinode.sh; the 1e30 runs stop on a NaN loss (exit status NAN). The follow-up job, on one CPU without the
arrays' resources, chooses 0.02 for both models, finds every final run finished (final seed 0 is the tuning run at the
chosen value) and ends the sweep without resubmitting the diverged runs."""
import json
import sys
from pathlib import Path

import pytest

from hgscale.config import load_config
from hgscale.models.flops import flops_per_token
from tests.integration.train_helpers import demo_data, env, tiny_config  # noqa: F401 - demo_data: a fixture

pytestmark = [pytest.mark.integration, pytest.mark.slurm, pytest.mark.timeout(420)]
HOURGLASS, BASELINE = "1@1 4@4 1@1", "4@1"
ARRAYS = "--gpus-per-node=0 --ntasks-per-node=1 --cpus-per-task=1 --time=10"


def test_slurm_sweep_splits_arrays_tunes_past_a_diverged_value_and_finishes(slurm_cluster, tmp_path,
                                                                           demo_data):  # noqa: F811
    cfg = tiny_config(tmp_path, demo_data, "tiny.json", model={"hierarchy": HOURGLASS, "init": "normal"},
                      tracking={"enabled": False})
    budget = f"{4 * flops_per_token(load_config(cfg).model, 32) * 2 * 2 * 32:.6g}"  # four steps of the Hourglass
    out = tmp_path / "sweep"
    e = {**env(), **slurm_cluster.env, "HGSCALE_PYTHON": sys.executable}
    r = slurm_cluster.cmd(sys.executable, "-m", "hgscale", "sweep", "--config", str(cfg), "--budgets", budget,
                          "--evals", "1", "--tune", "model.init_std=0.02,1e30", "--out", str(out), "--slurm",
                          f"--sbatch={ARRAYS}", "--sbatch-follow-up=--time=5", cwd=tmp_path, env=e, timeout=120)
    (first,) = json.loads((out / "slurm" / "rounds.json").read_text())
    assert len(first["runs"]) == 4 and len(first["jobs"]) == 2, r.stdout
    assert "#SBATCH --array=0-2" in (out / "slurm" / "round-1.1.sbatch").read_text()
    assert "#SBATCH --array=0-0" in (out / "slurm" / "round-1.2.sbatch").read_text()

    follow = slurm_cluster.wait_job(int(first["follow_up"]), timeout=360)
    log = (out / "slurm" / f"hgscale-sweep-sweep-next-{first['follow_up']}.log").read_text()
    assert follow["JobState"] == "COMPLETED" and follow["NumCPUs"] == "1" and "gpu" not in follow.get("TresPerNode",
                                                                                                     ""), log
    for model in (HOURGLASS, BASELINE):
        assert f"tuned {model!r} at " in log and ": model.init_std=0.02 (mean final validation " in log, log
    assert "all 2 final run(s) of sweep sweep finished" in log, log
    assert len(json.loads((out / "slurm" / "rounds.json").read_text())) == 1  # nothing resubmitted
    plan = json.loads((out / "plan.json").read_text())
    for run in plan["runs"]:
        records = [json.loads(x) for x in (Path(run["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
        if run["tune"]["model.init_std"] == "1e30":
            assert records == [{"step": 1, "train/diverged": 1.0}], records
        else:
            assert run["phases"] == ["final", "tune"] and records[-1]["step"] == run["steps"] == 4
            assert "val/bpc" in records[-1]
