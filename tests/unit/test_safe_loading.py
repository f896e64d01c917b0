"""Checkpoints someone else may have written are loaded without running their code: a pickle payload planted in
a checkpoint's DeepSpeed file does not run under `hgscale sample`, `evaluate` or `export`, and the error names the
file. The staging directory of object-storage checkpoints is private to its user."""
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hgscale.checkpoint.export import safe_load
from hgscale.checkpoint.layout import CheckpointError
from hgscale.config import config_from_dict

ROOT = Path(__file__).resolve().parents[2]


class Payload:
    """Unpickling this runs ``touch <marker>``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def crafted_checkpoint(tmp: Path) -> tuple[Path, Path]:
    """A complete-looking ZeRO-0 checkpoint whose model-states file carries a payload; (step dir, marker)."""
    step = tmp / "ckpt" / "step00000004"
    step.mkdir(parents=True)
    cfg = config_from_dict({"model": {"size": "debug"}, "data": {"url": str(tmp / "data"), "seq_len": 32}})
    meta = {"step": 4, "run_id": None, "config": cfg.to_dict(), "deepspeed": {},
            "topology": {"world_size": 1, "pipeline_stages": 1, "data_parallel_size": 1, "zero_stage": 0}}
    (step / "hgscale.json").write_text(json.dumps(meta))
    marker = tmp / "payload-ran"
    with open(step / "mp_rank_00_model_states.pt", "wb") as f:
        pickle.dump({"module": Payload(marker)}, f)
    (step / "COMPLETE").write_text("")
    (tmp / "ckpt" / "latest").write_text("step00000004")
    return step, marker


@pytest.mark.parametrize("command", [["sample", "--tokens", "2"], ["evaluate"], ["export", "--out", "OUT"]])
def test_a_planted_pickle_payload_does_not_run(tmp_path, command):
    step, marker = crafted_checkpoint(tmp_path)
    args = [a.replace("OUT", str(tmp_path / "out")) for a in command]
    r = subprocess.run([sys.executable, "-m", "hgscale", args[0], "--checkpoint", str(tmp_path / "ckpt"), *args[1:]],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert not marker.exists(), "the payload ran"
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert str(step / "mp_rank_00_model_states.pt") in r.stderr and "cannot be loaded safely" in r.stderr


def test_safe_load_takes_tensors_and_refuses_objects(tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"module": {"w": torch.ones(2)}, "shapes": torch.Size([2])}, good)
    assert torch.equal(safe_load(good)["module"]["w"], torch.ones(2))
    bad = tmp_path / "bad.pt"
    torch.save({"module": Payload(tmp_path / "ran")}, bad)
    with pytest.raises(CheckpointError, match="bad.pt"):
        safe_load(bad)
    assert not (tmp_path / "ran").exists()
    with pytest.raises(CheckpointError, match="is missing"):
        safe_load(tmp_path / "none.pt")


def test_vet_names_a_foreign_class_and_passes_deepspeed_records(tmp_path):
    from argparse import Namespace

    from hgscale.checkpoint.export import vet

    ok = tmp_path / "ok_optim_states.pt"
    torch.save({"optimizer_state_dict": {"x": torch.zeros(1)}, "ds_config": Namespace(a=1)}, ok)
    vet(ok)
    bad = tmp_path / "bad_optim_states.pt"
    torch.save({"optimizer_state_dict": Payload(tmp_path / "ran")}, bad)
    with pytest.raises(CheckpointError, match="it names posix.system"):
        vet(bad)
    assert not (tmp_path / "ran").exists()


def test_staging_directory_is_private_and_checked(tmp_path, monkeypatch):
    from hgscale.checkpoint.staging import default_staging_base, private_dir
    from hgscale.core.storage import StorageError

    monkeypatch.setenv("SLURM_TMPDIR", str(tmp_path / "node"))
    base = default_staging_base()
    assert base == tmp_path / "node" / f"hgscale-staging-{os.getuid()}"
    private_dir(base)
    assert base.stat().st_mode & 0o777 == 0o700
    planted = tmp_path / "shared"
    planted.mkdir(mode=0o777)
    planted.chmod(0o777)  # as another user would leave it for us: world-writable
    with pytest.raises(StorageError, match="not a private directory"):
        private_dir(planted)


def test_every_file_and_directory_of_a_checkpoint_is_fsynced(tmp_path, monkeypatch):
    """What CheckpointManager.save calls before COMPLETE (fsync_tree) and for COMPLETE and latest (atomic_write)."""
    from hgscale.checkpoint import layout

    synced = []
    real = os.fsync
    monkeypatch.setattr(layout.os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real(fd)))
    tag = tmp_path / "step00000002"
    (tag / "sub").mkdir(parents=True)
    for name in ("mp_rank_00_model_states.pt", "sub/zero_pp_rank_0_mp_rank_00_optim_states.pt", "rank00000.pt"):
        (tag / name).write_bytes(b"x")
    layout.fsync_tree(tag)
    assert {str(tag / n) for n in ("mp_rank_00_model_states.pt", "sub/zero_pp_rank_0_mp_rank_00_optim_states.pt",
                                   "rank00000.pt")} <= set(synced)
    assert {str(tag), str(tag / "sub")} <= set(synced)
    synced.clear()
    layout.atomic_write(tmp_path / "latest", "step00000002")
    assert (tmp_path / "latest").read_text() == "step00000002"
    assert str(tmp_path) in synced and any(".latest.tmp" in s for s in synced)  # the file, then its directory
    assert not list(tmp_path.glob(".latest.tmp*"))
