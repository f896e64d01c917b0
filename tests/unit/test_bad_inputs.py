"""Bad input gets one line and the user-error status, never a traceback.

One table: each case builds its bad input under tmp_path, runs the real command in a subprocess and expects exit
status USER_ERROR (hgscale.core.status) with stderr exactly one ``error: ...`` line naming the thing that is wrong.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from hgscale.core.status import USER_ERROR

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    """The demo corpus, prepared once; each case that damages it works on its own copy."""
    from data_pipelines.demo_corpus import write_demo_corpus
    out = tmp_path_factory.mktemp("bad_inputs") / "demo"
    write_demo_corpus(str(out))
    return out


# --------------------------------------------------------------------------------------------- builders

def _damaged(tmp: Path, demo: Path, damage: Callable[[dict], None]) -> Path:
    """A copy of the demo dataset whose manifest.json ``damage`` edited."""
    root = tmp / "data"
    shutil.copytree(demo, root)
    m = json.loads((root / "manifest.json").read_text())
    damage(m)
    (root / "manifest.json").write_text(json.dumps(m))
    return root


def _tiny_config(tmp: Path, data: Path | str) -> Path:
    """configs/test/tiny.json (the debug model size) on ``data``, everything it writes under ``tmp``."""
    cfg = json.loads((ROOT / "configs" / "test" / "tiny.json").read_text())
    cfg["data"]["url"] = str(data)
    cfg["checkpoint"]["dir"] = str(tmp / "ckpt")
    cfg["run_dir"] = str(tmp / "run")
    path = tmp / "tiny.json"
    path.write_text(json.dumps(cfg))
    return path


def splits_as_list(m):
    m["splits"] = list(m["splits"].values())


def shard_as_string(m):
    m["splits"]["train"]["shards"][1] = m["splits"]["train"]["shards"][1]["path"]


def count_as_string(m):
    shard = m["splits"]["valid"]["shards"][0]
    shard["num_tokens"] = str(shard["num_tokens"])


def verify(damage):
    return lambda tmp, demo: ["hgscale", "verify", "--quiet", str(_damaged(tmp, demo, damage))]


def train(damage):
    return lambda tmp, demo: ["hgscale", "train", "--config", str(_tiny_config(tmp, _damaged(tmp, demo, damage)))]


def config_override(override: str):
    return lambda tmp, demo: ["hgscale", "config", str(_tiny_config(tmp, demo)), override]


def binary_config(tmp, demo):
    path = tmp / "model.json"
    path.write_bytes(bytes(range(256)) * 4)  # e.g. a checkpoint passed by mistake
    return ["hgscale", "train", "--config", str(path)]


def text_out_under_a_file(tmp, demo):
    (tmp / "corpus.txt").write_text("one document\n\nanother one\n")
    (tmp / "taken").write_text("a regular file where a directory would go")
    return ["data_pipelines.text", "--input", str(tmp / "corpus.txt"), "--out", str(tmp / "taken" / "ds")]


def truncated_task_record(tmp, demo):
    (tmp / "ds" / "tasks").mkdir(parents=True)
    (tmp / "ds" / "tasks" / "task-00000-of-00002.json").write_text('{"task": 0, "num_tasks": 2, "fingerp')
    return ["data_pipelines.merge", str(tmp / "ds")]


def task_record_without_keys(tmp, demo):
    (tmp / "ds" / "tasks").mkdir(parents=True)
    (tmp / "ds" / "tasks" / "task-00001-of-00002.json").write_text('{"task": 1}')
    return ["data_pipelines.merge", str(tmp / "ds")]


def plan_zero_stages(tmp, demo):
    return ["hgscale", "plan", "--config", str(_tiny_config(tmp, demo)), "--stages", "0"]


def corrupt_checkpoint(command: str, *extra: str):
    """``hgscale <command>`` on a checkpoint whose only complete step has a truncated hgscale.json."""
    def build(tmp, demo):
        step = tmp / "ckpt" / "step00000002"
        step.mkdir(parents=True)
        (step / "hgscale.json").write_text('{"step": 2, "topology": {"world_si')
        (step / "COMPLETE").write_text("")
        (tmp / "ckpt" / "latest").write_text("step00000002")
        return ["hgscale", command, "--checkpoint", str(tmp / "ckpt"), *extra]
    return build


# ------------------------------------------------------------------------------------------------ table

def export_hf_of(*overrides: str):
    """``hgscale export --format hf`` of an hgscale export of the tiny model with ``overrides``, whose training data
    is gone."""
    def build(tmp: Path, demo: Path) -> list[str]:
        from safetensors.torch import save_file

        from hgscale.config import load_config
        from hgscale.models import HourglassLM
        cfg = load_config(ROOT / "configs" / "test" / "tiny.json", ["data.url=/gone", *overrides])
        (tmp / "m").mkdir()
        save_file(HourglassLM(cfg.model).state_dict(), str(tmp / "m" / "model.safetensors"))
        (tmp / "m" / "config.json").write_text(json.dumps(cfg.to_dict()))
        return ["hgscale", "export", "--checkpoint", str(tmp / "m"), "--format", "hf", "--out", str(tmp / "hf")]
    return build


@dataclass
class Case:
    build: Callable[[Path, Path], list[str]]  # (tmp_path, demo dataset) -> argv after `python -m`
    needles: tuple[str, ...]                  # what the one error line must name


MANIFEST = "/data/manifest.json: "
CASES = {
    "verify: splits is a list": Case(verify(splits_as_list), (MANIFEST, "splits must be an object", "got a list")),
    "verify: a shard entry is a string": Case(verify(shard_as_string), (MANIFEST, "splits.train.shards[1]",
                                                                        'got a string "train/')),
    "verify: a count is a string": Case(verify(count_as_string), (MANIFEST, "splits.valid.shards[0].num_tokens",
                                                                  "an integer >= 0, got a string")),
    "train: splits is a list": Case(train(splits_as_list), (MANIFEST, "splits must be an object")),
    "train: a shard entry is a string": Case(train(shard_as_string), (MANIFEST, "splits.train.shards[1]")),
    "train: a count is a string": Case(train(count_as_string), (MANIFEST, "splits.valid.shards[0].num_tokens")),
    "train: train.lr=NaN": Case(lambda tmp, demo: [*train(lambda m: None)(tmp, demo), "train.lr=NaN"],
                                ("tiny.json: ", "train.lr = nan must be a finite number > 0")),
    "config: train.lr=1e400": Case(config_override("train.lr=1e400"), ("train.lr = inf must be a finite number",)),
    "config: train.lr=-1": Case(config_override("train.lr=-1"), ("train.lr = -1.0 must be > 0",)),
    "config: checkpoint.interval=-3": Case(config_override("checkpoint.interval=-3"),
                                           ("checkpoint.interval = -3 must be >= 0",)),
    "config: data.request_timeout_s=0": Case(config_override("data.request_timeout_s=0"),
                                             ("data.request_timeout_s = 0.0 must be > 0 seconds",)),
    "train: a binary config file": Case(binary_config, ("model.json: ", "is not a text file (not UTF-8)")),
    "text: --out under a regular file": Case(text_out_under_a_file, ("/taken exists and is not a directory",
                                                                     "--out ")),
    "merge: a truncated task record": Case(truncated_task_record, ("task-00000-of-00002.json is not valid JSON",
                                                                   "re-run task 0")),
    "merge: a task record without its keys": Case(task_record_without_keys, ("task-00001-of-00002.json lacks "
                                                                             "num_tasks", "re-run task 1")),
    "plan: --stages 0": Case(plan_zero_stages, ("--stages 0 must be >= 1",)),
    "train: parallel.sequence_parallel=2 on one process": Case(
        lambda tmp, demo: [*train(lambda m: None)(tmp, demo), "parallel.sequence_parallel=2"],
        ("world size 1 is not divisible by parallel.sequence_parallel = 2 x pipeline_stages = 1: launch a multiple "
         "of 2 processes",)),
    "config: parallel.activation_checkpointing=some": Case(
        config_override("parallel.activation_checkpointing=some"),
        ("parallel.activation_checkpointing = 'some' is not one of true, false, 'none', 'all', 'full_resolution' "
         "or a list of level indices 0..2 of model.hierarchy (e.g. [0, 2])",)),
    "config: parallel.activation_checkpointing=[0, 5]": Case(
        config_override("parallel.activation_checkpointing=[0, 5]"), ("= [0, 5] is not one of true",)),
    **{f"{cmd}: a corrupt hgscale.json": Case(corrupt_checkpoint(cmd, *extra), (
        "/ckpt/step00000002/hgscale.json' is corrupt (JSONDecodeError",))
       for cmd, extra in (("export", ("--out", "out")), ("sample", ("--tokens", "4")), ("evaluate", ()))},
    "export --format hf: a corrupt hgscale.json": Case(corrupt_checkpoint("export", "--format", "hf", "--out", "o"),
                                                       ("/ckpt/step00000002/hgscale.json' is corrupt",)),
    "export --format hf: LSH attention": Case(export_hf_of("model.vanilla_attention=lsh"), (
        "--format hf cannot express model.vanilla_attention = 'lsh'", "use --format hgscale")),
    "export --format hf: a non-byte vocabulary": Case(export_hf_of("model.vocab_size=300"), (
        "--format hf has no tokenizer for a non-byte model of vocabulary 300", "use --format hgscale")),
    "train: model.init_from names no export": Case(
        lambda tmp, demo: [*train(lambda m: None)(tmp, demo), f"model.init_from={tmp / 'none'}"],
        ("model.init_from = ", "/none' holds no model.safetensors: export a checkpoint there")),
}


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_bad_input_is_one_error_line_and_the_user_error_status(case, tmp_path, demo):
    argv = case.build(tmp_path, demo)
    r = subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True, timeout=180, cwd=tmp_path,
                       env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert "Traceback" not in r.stderr, r.stderr
    assert r.returncode == USER_ERROR, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for needle in case.needles:
        assert needle in lines[0], (needle, lines[0])
