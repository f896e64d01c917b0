"""Preemption, automatic resume and the NaN stop of `hgscale/train.py`, with real launches on CPU.

- A 2-stage pipeline job (`deepspeed --num_gpus 2`) gets SIGUSR1 on ONE rank mid-run: every rank agrees,
  saves, prints "preempted at step N; checkpoint saved" and exits 0; the same command then resumes and the
  per-step losses of the two halves equal an uninterrupted run's (rtol 1e-6: CPU runs are deterministic).
  keep_last and `latest` are checked on the way.
- A single `python` process with an absurd learning rate stops at the first NaN loss, naming the step,
  with the last good checkpoint kept and exit status 3.
"""
import re
import subprocess
import time

import psutil
import pytest
import torch
from torch.testing import assert_close

from tests.integration.train_helpers import (  # noqa: F401
    ROOT,
    TRAIN,
    Watched,
    command,
    demo_data,
    env,
    launch,
    metrics,
    tiny_config,
)

pytestmark = pytest.mark.integration
STEPS = 30


def pipeline_config(tmp, data, name):
    return tiny_config(tmp, data, name, train={"steps": STEPS, "log_interval": 1},
                       parallel={"pipeline_stages": 2}, checkpoint={"interval": 4, "keep_last": 2})


def _rank_process(launcher: subprocess.Popen, local_rank: int, timeout: float = 60) -> psutil.Process:
    deadline = time.time() + timeout
    while time.time() < deadline:
        for p in psutil.Process(launcher.pid).children(recursive=True):
            try:
                if f"--local_rank={local_rank}" in " ".join(p.cmdline()):
                    return p
            except psutil.NoSuchProcess:
                continue
        time.sleep(0.2)
    raise AssertionError(f"rank {local_rank} process not found")


def test_preempt_one_rank_then_resume_reproduces_losses(tmp_path, demo_data):  # noqa: F811
    straight = pipeline_config(tmp_path, demo_data, "straight.json")
    launch(2, TRAIN, ["--config", str(straight)])
    want = {m["step"]: m["train/loss"] for m in metrics(tmp_path / "straight_run")}
    assert sorted(want) == list(range(1, STEPS + 1))

    cfg = pipeline_config(tmp_path, demo_data, "stopped.json")
    run = Watched(command(2, TRAIN, ["--config", str(cfg)]))
    rank1 = _rank_process(run.proc, 1)
    run.wait_for_step(5, of=STEPS)
    rank1.send_signal(psutil.signal.SIGUSR1)  # only one rank is told; all must stop together
    assert run.wait(120) == 0, run.tail()
    out = run.text
    m = re.search(r"preempted at step (\d+); checkpoint saved", out)
    assert m, out[-3000:]
    stopped_at = int(m.group(1))
    assert 5 <= stopped_at < STEPS
    ckpt = tmp_path / "stopped_ckpt"
    assert (ckpt / "latest").read_text() == f"step{stopped_at:08d}"

    again = launch(2, TRAIN, ["--config", str(cfg)])
    assert f"resumed from {ckpt / f'step{stopped_at:08d}'} at step {stopped_at}" in again.stdout
    got = {}
    for rec in metrics(tmp_path / "stopped_run"):
        if "train/loss" in rec:
            got[rec["step"]] = rec["train/loss"]
    assert sorted(got) == list(range(1, STEPS + 1))
    assert_close(torch.tensor([got[s] for s in range(1, STEPS + 1)], dtype=torch.float64),
                 torch.tensor([want[s] for s in range(1, STEPS + 1)], dtype=torch.float64), rtol=1e-6, atol=0)
    # keep_last = 2, and latest names the final step
    kept = sorted(p.name for p in ckpt.iterdir() if p.name.startswith("step"))
    assert kept == [f"step{STEPS - 2:08d}", f"step{STEPS:08d}"] and (ckpt / "latest").read_text() == kept[-1]


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, demo_data):  # noqa: F811
    cfg = tiny_config(tmp_path, demo_data, "nan.json", train={"lr": 1e30, "steps": 6},
                      checkpoint={"interval": 1})
    r = subprocess.run(command(1, TRAIN, ["--config", str(cfg)]), cwd=ROOT, env=env(), capture_output=True,
                       text=True, timeout=180)
    assert r.returncode == 3, r.stdout[-2000:] + r.stderr[-2000:]
    m = re.search(r"the training loss is nan at step (\d+); stopping without saving\. The last good checkpoint "
                  r"is step (\d+)", r.stderr)
    assert m, r.stderr[-2000:]
    bad, good = int(m.group(1)), int(m.group(2))
    assert good == bad - 1
    ckpt = tmp_path / "nan_ckpt"
    assert (ckpt / "latest").read_text() == f"step{good:08d}"
    assert not (ckpt / f"step{bad:08d}").exists()


def test_interrupted_save_is_ignored_and_cleaned(tmp_path, demo_data):  # noqa: F811
    """A save that died half-way (no COMPLETE marker, a truncated file) is never resumed from, `latest`
    keeps naming the last complete checkpoint, and the next save replaces the debris."""
    import shutil
    # tracking stays disabled; the password in its URI must still never reach a checkpoint
    cfg = tiny_config(tmp_path, demo_data, "crash.json", train={"steps": 2}, checkpoint={"interval": 1},
                      tracking={"uri": "http://alice:pw-in-uri-42@127.0.0.1:9"})
    launch(1, TRAIN, ["--config", str(cfg)])
    ckpt = tmp_path / "crash_ckpt"
    assert (ckpt / "latest").read_text() == "step00000002"
    meta = (ckpt / "step00000002" / "hgscale.json").read_text()
    assert "pw-in-uri-42" not in meta and "http://alice:***@127.0.0.1:9" in meta
    debris = ckpt / "step00000003"
    shutil.copytree(ckpt / "step00000002", debris)
    (debris / "COMPLETE").unlink()
    (debris / "mp_rank_00_model_states.pt").write_bytes(b"truncated")

    from hgscale.checkpoint.layout import latest_tag
    assert latest_tag(ckpt) == "step00000002"
    (ckpt / "latest").unlink()  # even without the pointer, only complete checkpoints count
    assert latest_tag(ckpt) == "step00000002"

    again = launch(1, TRAIN, ["--config", str(cfg), "train.steps=4"])
    assert f"resumed from {ckpt / 'step00000002'} at step 2" in again.stdout
    kept = sorted(p.name for p in ckpt.iterdir() if p.name.startswith("step"))
    assert kept == ["step00000003", "step00000004"] and (ckpt / "latest").read_text() == "step00000004"
    assert (ckpt / "step00000003" / "COMPLETE").exists()
    assert (ckpt / "step00000003" / "mp_rank_00_model_states.pt").stat().st_size > 1000

    # another model cannot resume: refused before any process group starts, naming the checkpoint and the key
    r = subprocess.run(command(1, TRAIN, ["--config", str(cfg), "train.steps=6", "model.vocab_size=300"]), cwd=ROOT,
                       env=env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert (f"checkpoint {str(ckpt / 'step00000004')!r} holds another model (model.vocab_size 256 -> 300)"
            in r.stderr), r.stderr[-2000:]
    assert (ckpt / "latest").read_text() == "step00000004"
