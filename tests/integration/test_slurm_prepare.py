"""`sbatch --array=0-1 slurm/prepare.sh` on a real one-node Slurm cluster: each array task prepares its share,
the last one to finish writes the manifest, and the dataset equals a one-task preparation of the same inputs."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from data_pipelines import text
from hgscale.config import DataConfig
from hgscale.data import open_dataset
from tests.unit.test_text_pipeline import documents

pytestmark = [pytest.mark.integration, pytest.mark.slurm]
REPO = Path(__file__).resolve().parents[2]


def test_array_job_prepares_in_tasks_and_merges(slurm_cluster, tmp_path):
    docs = documents()
    raw = tmp_path / "raw"
    raw.mkdir()
    for i in range(4):
        (raw / f"part-{i}.txt").write_text("\n\n".join(docs[i::4]))
    out = tmp_path / "ds"
    job = slurm_cluster.sbatch("--array=0-1", "--cpus-per-task=1", "--time=5", f"--output={tmp_path}/%x-%A_%a.log",
                               str(REPO / "slurm" / "prepare.sh"), "--input", str(raw / "*.txt"), "--out", str(out),
                               cwd=REPO, env={"HGSCALE_PYTHON": sys.executable})
    deadline = time.time() + 180
    while slurm_cluster.cmd("squeue", "-h", "-j", str(job), check=False).stdout.strip():
        assert time.time() < deadline, [p.read_text()[-1000:] for p in tmp_path.glob("*.log")]
        time.sleep(0.5)
    logs = {p.name: p.read_text() for p in tmp_path.glob("hgscale-prepare-*.log")}
    assert len(logs) == 2, logs
    assert sum("all 2 tasks finished; manifest written" in t for t in logs.values()) >= 1, logs
    assert any("task 0 of 2" in t for t in logs.values()) and any("task 1 of 2" in t for t in logs.values())
    assert sorted(p.name for p in (out / "tasks").iterdir()) == ["task-00000-of-00002.json",
                                                                 "task-00001-of-00002.json"]
    assert text.main(["--input", str(raw / "*.txt"), "--out", str(tmp_path / "one")]) == 0
    ds = open_dataset(DataConfig(url=str(out), verify_checksums=True))
    one = open_dataset(DataConfig(url=str(tmp_path / "one")))
    for split in ("train", "valid", "test"):
        assert ds.split_tokens(split).tolist() == one.split_tokens(split).tolist()
