"""Parallel training equals one process: a 2-stage pipeline, ZeRO 1/2/3 with 2 data-parallel ranks, and
2 stages x 2 data-parallel ranks; plus activation checkpointing and export -> load -> the engine's logits.

Real `deepspeed --num_gpus 2` launches on CPU (gloo) of the trainer's engine (tests/integration/ds_worker.py),
debug-size Hourglass "1@1 2@2 1@1" with relative attention (u/v biases travel between stages), seq_len 32,
two Adam steps. Tolerance: losses rtol 1e-5; parameters after the steps atol 2e-5 (float32 sums in another
order; Adam's first steps move every weight by about lr = 1e-3, so a wrong gradient shows as ~1e-3).
"""
import subprocess
import sys

import pytest
import torch
from torch.testing import assert_close

from tests.integration.train_helpers import ROOT, demo_data, run_worker, tiny_config  # noqa: F401

pytestmark = pytest.mark.integration
STEPS = 2
# every launch here: debug model, 2 processes at most, about 20-45 s on 2 shared cores
# 31 tokens: not a multiple of the total factor 2, so the embedding pads and the stages carry padded shapes
PADDED = {"seq_len": 31}


def assert_params_close(got: dict, want: dict, what: str = "") -> None:
    """Parameters after the Adam steps, atol 2e-5. The tiny config draws weights from N(0, 0.02) (model.init =
    "normal"). Under trax's larger Glorot init a few coordinates of the relative-position projection came out
    up to 1.5e-4 apart with equal losses: Adam's first step divides each gradient by its own size, so where a
    gradient is tiny the float32 round-off of another summation order moves the weight by a visible fraction
    of lr, and a comparison of parameters no longer separates a wrong gradient from round-off."""
    assert sorted(got) == sorted(want)
    for name, value in want.items():
        assert_close(got[name], value, rtol=1e-4, atol=2e-5, msg=lambda m, name=name: f"{what}{name}: {m}")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("parallel")


@pytest.fixture(scope="module")
def reference_stream(work, demo_data):  # noqa: F811
    cfg = tiny_config(work, demo_data, "ref_stream.json", data=PADDED)
    return run_worker(1, work / "ref_stream", cfg, "--steps", str(STEPS), "--data", "stream")


@pytest.fixture(scope="module")
def pipeline(work, demo_data):  # noqa: F811
    # split by FLOPs: the residual skip (down at layer 2, up at layer 5) and u/v both cross the boundary
    cfg = tiny_config(work, demo_data, "pp.json", data=PADDED, parallel={"pipeline_stages": 2, "partition": "flops"})
    return run_worker(2, work / "pp", cfg, "--steps", str(STEPS), "--data", "stream", "--checkpoint")


@pytest.fixture(scope="module")
def reference_synthetic(work, demo_data):  # noqa: F811
    cfg = tiny_config(work, demo_data, "ref_syn.json")  # micro 2 x accum 2 = the DP jobs' global batch
    return run_worker(1, work / "ref_syn", cfg, "--steps", str(STEPS), "--data", "synthetic")


def zero_job(work, demo_data, stage):  # noqa: F811
    cfg = tiny_config(work, demo_data, f"zero{stage}.json", train={"grad_accum_steps": 1},
                      parallel={"zero_stage": stage})
    extra = ["--checkpoint"] if stage == 3 else []
    return run_worker(2, work / f"zero{stage}", cfg, "--steps", str(STEPS), "--data", "synthetic", *extra)


@pytest.fixture(scope="module")
def zero3(work, demo_data):  # noqa: F811
    return zero_job(work, demo_data, 3)


def test_pipeline_matches_single_process(pipeline, reference_stream):
    ref, pp = reference_stream, pipeline
    for r in pp["ranks"]:  # every stage reports the pipeline's loss
        assert_close(torch.tensor(r["losses"]), torch.tensor(ref["ranks"][0]["losses"]), rtol=1e-5, atol=1e-6)
    assert_params_close(pp["params"], ref["params"])
    # the shared u/v biases live on stage 0 only and were trained by the blocks of both stages
    assert "layers.0.uv" in torch.load(pp["out"] / "params_rank0.pt")
    assert "layers.0.uv" not in torch.load(pp["out"] / "params_rank1.pt")
    stage1 = torch.load(pp["out"] / "params_rank1.pt")
    assert any(k.startswith("layers.5.") for k in stage1), "the upsampling layer should sit on stage 1"
    assert any(k.startswith("layers.2.") for k in torch.load(pp["out"] / "params_rank0.pt")), \
        "the shortening layer should sit on stage 0, so the skip tensor crosses stages"


def test_pipeline_first_and_last_stage_read_the_same_samples(pipeline, reference_stream):
    first, last = pipeline["ranks"]
    assert first["is_first"] and last["is_last"] and first["dp_rank"] == last["dp_rank"] == 0
    assert first["hashes"] == last["hashes"]  # identical (inputs, labels) micro-batches, in the same order
    assert first["hashes"] == reference_stream["ranks"][0]["hashes"]
    flat = [h for step in first["hashes"] for h in step]
    assert len(flat) == STEPS * 2 and len(set(flat)) == len(flat)  # and they are distinct batches


def test_pipeline_stages_time_their_wait_on_each_other(pipeline):
    """Each stage's step splits into data, waiting on the other stage (sends/receives) and compute; the last
    stage cannot start a micro-batch before the first has sent it, so it waits a real share of its step."""
    for r in pipeline["ranks"]:
        for t in r["timings"]:
            assert t["data_s"] + t["wait_s"] + t["compute_s"] == pytest.approx(t["step_s"], rel=1e-6)
            assert 0.0 < t["wait_s"] < t["step_s"] and t["compute_s"] > 0.0
    last = pipeline["ranks"][1]
    assert sum(t["wait_s"] for t in last["timings"]) > 0.05 * sum(t["step_s"] for t in last["timings"])


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_data_parallel_matches_single_process(stage, work, demo_data, reference_synthetic, zero3):  # noqa: F811
    job = zero3 if stage == 3 else zero_job(work, demo_data, stage)
    ref = reference_synthetic
    for r in job["ranks"]:
        assert_close(torch.tensor(r["losses"]), torch.tensor(ref["ranks"][0]["losses"]), rtol=1e-5, atol=1e-6)
    assert job["ranks"][0]["hashes"] != job["ranks"][1]["hashes"]  # the two ranks read different rows
    assert_params_close(job["params"], ref["params"], f"ZeRO-{stage} ")


@pytest.mark.parametrize("job", ["pipeline", "zero3"])
def test_export_then_load_gives_the_engine_logits(job, request, tmp_path):
    res = request.getfixturevalue(job)
    out = tmp_path / "export"
    r = subprocess.run([sys.executable, "-m", "hgscale", "export", "--checkpoint",
                        str(res["ckpt"]), "--out", str(out)], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    from hgscale.checkpoint.export import load_exported
    model, cfg = load_exported(out)
    saved = torch.load(res["out"] / "logits.pt")
    with torch.no_grad():
        logits = model(saved["inputs"])
    assert logits.shape == saved["logits"].shape == (cfg.train.micro_batch_size, cfg.data.seq_len, 256)
    assert cfg.data.seq_len == (31 if job == "pipeline" else 32)
    assert_close(logits, saved["logits"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("nprocs, policy", [(1, True), (2, True), (1, "full_resolution"), (2, [1])])
def test_activation_checkpointing_changes_nothing(nprocs, policy, work, demo_data, reference_stream):  # noqa: F811
    """Recomputing activations in backward (every level, the full-resolution ones, or the middle one: torch
    checkpoint per layer, in one process or a 2-stage pipeline) gives the same losses and parameters as keeping
    them."""
    par = {"activation_checkpointing": policy, **({"pipeline_stages": 2} if nprocs == 2 else {})}
    name = f"ac{nprocs}_{str(policy).strip('[]')}"
    cfg = tiny_config(work, demo_data, f"{name}.json", data=PADDED, parallel=par)
    job = run_worker(nprocs, work / name, cfg, "--steps", str(STEPS), "--data", "stream")
    ref = reference_stream
    assert_close(torch.tensor(job["ranks"][-1]["losses"]), torch.tensor(ref["ranks"][0]["losses"]),
                 rtol=1e-5, atol=1e-6)
    assert_params_close(job["params"], ref["params"])


def test_pipeline_times_data_parallel_matches_single_process(work, demo_data, reference_synthetic):  # noqa: F811
    """2 stages x 2 data-parallel ranks (4 processes, ZeRO-1: the enwik8_xl layout in miniature)."""
    cfg = tiny_config(work, demo_data, "pp2dp2.json", train={"grad_accum_steps": 1}, parallel={"pipeline_stages": 2})
    job = run_worker(4, work / "pp2dp2", cfg, "--steps", str(STEPS), "--data", "synthetic")
    ref = reference_synthetic
    by_coord = {(r["stage"], r["dp_rank"]): r for r in job["ranks"]}
    assert sorted(by_coord) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for dp in (0, 1):  # each pipeline's first and last stage read the same rows; the two pipelines different ones
        assert by_coord[(0, dp)]["hashes"] == by_coord[(1, dp)]["hashes"]
    assert by_coord[(0, 0)]["hashes"] != by_coord[(0, 1)]["hashes"]
    for r in job["ranks"]:
        assert_close(torch.tensor(r["losses"]), torch.tensor(ref["ranks"][0]["losses"]), rtol=1e-5, atol=1e-6)
    assert_params_close(job["params"], ref["params"])
