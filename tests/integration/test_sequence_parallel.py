"""Sequence parallelism (parallel.sequence_parallel, DeepSpeed-Ulysses) against one rank holding whole sequences:
real launches on CPU (gloo all-to-all), fp32, dropout 0.

- one step of the model alone (tests/integration/sp_worker.py): logits and summed gradients of 2 ranks sharing
  each sequence equal one rank's at rtol 1e-5, for every shortening x upsampling kind, both attention kinds,
  lengths divisible and not by the shortening factor, and each CPU relative-attention kernel;
- 10 training steps through the trainer: 2 ranks sharing each sequence (ZeRO 0, 1, 2) and 2 data-parallel x 2
  sequence-parallel ranks equal one rank, loss and gradient norm, at rtol 1e-5.

Resuming across sequence parallelism is in the exact-resume matrix (test_resume_matrix.py).
"""
import json

import pytest
import torch
from torch.testing import assert_close

from tests.integration.train_helpers import ROOT, TRAIN, demo_data, launch, metrics, tiny_config  # noqa: F401

pytestmark = pytest.mark.integration
SP_WORKER = ROOT / "tests" / "integration" / "sp_worker.py"
STEPS = 10
# seq_len 37 is not a multiple of 2 ranks x the total factor 2: the last shard holds padding
MODEL = {"downsample": "attention_linear", "upsample": "attention_repeat", "n_heads": 2}
TRAIN_KEYS = {"steps": STEPS, "lr": 3e-3, "warmup_steps": 2, "lr_schedule": "cosine", "min_lr": 1e-4}


def test_a_sharded_step_equals_the_whole_sequence(tmp_path):
    launch(2, SP_WORKER, ["--out", str(tmp_path)], timeout=300)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 70
    for mine, other in zip(*ranks, strict=True):
        for case in (mine, other):
            assert case["logit_err"] <= 1e-5 * case["logit_scale"], case
            assert case["grad_err"] <= 1e-5 * case["grad_scale"], case
        # the two shards cover each sequence once: rank 0 a full shard, rank 1 the rest of the unpadded tokens
        assert mine["local_len"] + other["local_len"] == mine["T"], (mine, other)
    kinds = {(c["downsample"], c["upsample"], c["attention"], c["T"] % 2) for c in ranks[0]}
    assert len(kinds) == 4 * 4 * 2 * 2


def _run(work, data, name: str, nprocs: int, parallel: dict, accum: int) -> dict[int, dict]:
    cfg = tiny_config(work, data, f"{name}.json", model=MODEL, data={"seq_len": 37},
                      train={**TRAIN_KEYS, "grad_accum_steps": accum}, parallel=parallel)
    launch(nprocs, TRAIN, ["--config", str(cfg)], timeout=300)
    return {m["step"]: m for m in metrics(work / f"{name}_run") if "train/loss" in m}


def _assert_equal(have: dict, want: dict) -> None:
    assert sorted(have) == sorted(want) == list(range(1, STEPS + 1))
    assert "train/grad_norm" in want[1]
    for key in ("train/loss", "train/grad_norm") if "train/grad_norm" in have[1] else ("train/loss",):  # not ZeRO-0
        assert_close(torch.tensor([have[s][key] for s in want], dtype=torch.float64),
                     torch.tensor([want[s][key] for s in want], dtype=torch.float64), rtol=1e-5, atol=0)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("sequence_parallel")


@pytest.fixture(scope="module")
def one_rank(work, demo_data):  # noqa: F811
    """One rank, whole sequences, global batch 4 = micro 2 x accumulation 2."""
    return _run(work, demo_data, "one", 1, {"zero_stage": 1}, accum=2)


@pytest.mark.parametrize("zero", [0, 1, 2])
def test_two_ranks_sharing_each_sequence_train_like_one(zero, work, demo_data, one_rank):  # noqa: F811
    have = _run(work, demo_data, f"sp2_z{zero}", 2, {"zero_stage": zero, "sequence_parallel": 2}, accum=2)
    _assert_equal(have, one_rank)


def test_data_and_sequence_parallel_together_train_like_one_rank(work, demo_data, one_rank):  # noqa: F811
    """4 processes: 2 data-parallel ranks, each a pair sharing its sequences (ZeRO-1 over all 4)."""
    have = _run(work, demo_data, "dp2_sp2", 4, {"zero_stage": 1, "sequence_parallel": 2}, accum=1)
    _assert_equal(have, one_rank)
