"""Shared pieces of the trainer's integration tests: the demo corpus, tiny configs, real launches."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hgscale.core.net import free_port

ROOT = Path(__file__).resolve().parents[2]
WORKER = ROOT / "tests" / "integration" / "ds_worker.py"
TRAIN = ROOT / "hgscale" / "train.py"
DEEPSPEED = Path(sys.executable).parent / "deepspeed"


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    """The offline demo corpus (Python reference manual bytes) as shards + manifest."""
    out = tmp_path_factory.mktemp("demo_corpus") / "data"
    subprocess.run([sys.executable, "-m", "data_pipelines.demo_corpus", "--out", str(out)], cwd=ROOT, check=True,
                   capture_output=True, timeout=120)
    return out


@pytest.fixture(scope="session")
def trained_checkpoint(tmp_path_factory, demo_data) -> Path:
    """One tiny model trained for 8 steps on the demo corpus (1 rank, ZeRO-1), shared by every test that only
    reads a checkpoint (export, sampling, evaluation): its directory, with ``config.json`` beside it."""
    tmp = tmp_path_factory.mktemp("trained")
    cfg = tiny_config(tmp, demo_data, "config.json", train={"steps": 8})
    launch(1, TRAIN, ["--config", str(cfg)])
    return tmp / "config_ckpt"


def tiny_config(tmp: Path, data_url: Path, name: str = "c.json", **sections) -> Path:
    """configs/test/tiny.json with data, checkpoint and run directories under ``tmp``; sections update it."""
    cfg = json.loads((ROOT / "configs" / "test" / "tiny.json").read_text())
    cfg["data"]["url"] = str(data_url)
    stem = Path(name).stem
    cfg["checkpoint"]["dir"] = str(tmp / f"{stem}_ckpt")
    cfg["run_dir"] = str(tmp / f"{stem}_run")
    for sec, vals in sections.items():
        cfg.setdefault(sec, {}).update(vals)
    path = tmp / name
    path.write_text(json.dumps(cfg))
    return path


def env() -> dict:
    e = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                          "MASTER_PORT")}
    e.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    return e


def command(nprocs: int, script: Path, args: list[str]) -> list[str]:
    """`python script ...` for one process, `deepspeed --num_gpus N script ...` otherwise (CPU: gloo)."""
    if nprocs == 1:
        return [sys.executable, str(script), *args]
    return [str(DEEPSPEED), "--num_gpus", str(nprocs), "--master_port", str(free_port()), str(script), *args]


def shm_segments() -> set[str]:
    """DeepSpeed's shared-memory allreduce segments in /dev/shm (hgscale.training.engine.SHM_SEGMENT)."""
    return {p.name for p in Path("/dev/shm").glob("deepspeed_allreduce_buffer_*")}


def launch(nprocs: int, script: Path, args: list[str], timeout: int = 240) -> subprocess.CompletedProcess:
    """Run to completion; fails if the run failed or left DeepSpeed shared-memory segments behind."""
    before = shm_segments()
    r = subprocess.run(command(nprocs, script, args), cwd=ROOT, env=env(), capture_output=True, text=True,
                       timeout=timeout)
    if r.returncode != 0:
        raise AssertionError(f"launch failed ({r.returncode}):\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}")
    assert shm_segments() <= before, f"the run left /dev/shm segments: {sorted(shm_segments() - before)}"
    return r


def run_worker(nprocs: int, out: Path, config: Path, *args: str) -> dict:
    """Run ds_worker.py; returns {"ranks": [rank json...], "params": {name: tensor} merged over ranks}."""
    import torch
    launch(nprocs, WORKER, ["--config", str(config), "--out", str(out), *args])
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(nprocs)]
    params = {}
    for r in range(nprocs):
        params.update(torch.load(out / f"params_rank{r}.pt"))
    ckpt = Path(json.loads(Path(config).read_text())["checkpoint"]["dir"])
    return {"ranks": ranks, "params": params, "out": out, "ckpt": ckpt}


def metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class Watched:
    """A run started in the background whose output (stdout and stderr together) is read as it comes, so a test can
    wait for a progress line, inject a fault, then wait for the exit.

        run = Watched(command(2, TRAIN, ["--config", str(cfg)]))
        run.wait_for_step(5, of=30)        # "step  5/30 | ..." was printed
        ...                                # signal a rank, kill the launcher, stop a process
        assert run.wait(120) == 0, run.tail()
    """

    def __init__(self, cmd: list[str], **popen):
        import threading

        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=popen.pop("env", None) or env(), stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, **popen)
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line)
                self._cond.notify_all()

    def wait_for(self, pattern: str, timeout: float = 180) -> None:
        """Until a line holds a match of ``pattern`` (re.search: ranks share one stdout, and another rank's unfinished
        line may stand before it); fails the test, showing the last lines, after ``timeout``."""
        import re

        seen = lambda: any(re.search(pattern, ln) for ln in self.lines)  # noqa: E731
        with self._cond:
            assert self._cond.wait_for(seen, timeout), f"no line matching {pattern!r}:\n{self.tail()}"

    def wait_for_step(self, step: int, of: int, timeout: float = 180) -> None:
        self.wait_for(rf"step\s+{step}/{of}\b", timeout)

    def wait(self, timeout: float) -> int:
        rc = self.proc.wait(timeout)
        self._reader.join(10)
        return rc

    @property
    def text(self) -> str:
        return "".join(self.lines)

    def tail(self, n: int = 40) -> str:
        return "".join(self.lines[-n:])
