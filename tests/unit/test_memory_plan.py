"""The memory planner (hgscale/training/memory.py) and ``hgscale plan --memory``: the breakdown, how ZeRO,
sequence parallelism, checkpointing policies and pipeline stages move it, the layouts that fit, bad input, and
the per-layer activations against the tensors the model really saves for backward."""
import json
from pathlib import Path

import pytest
import torch

from hgscale.commands.plan import main as plan_main
from hgscale.commands.plan import parse_size
from hgscale.config import config_from_dict
from hgscale.models import HourglassLM, lm_loss
from hgscale.models import attention as attention_module
from hgscale.training.layout import ParallelLayout
from hgscale.training.memory import fitting_layouts, layer_activation_bytes, layer_memory, predict_layout
from hgscale.training.pipeline import stage_parts

ROOT = Path(__file__).resolve().parents[2]
PARTS = ("parameters", "gradients", "optimizer", "activations", "buffers", "transient")


def config(**over):
    """A d 128 Hourglass at T 1024, DeepSpeed's gradient bucket as hgscale's DeepSpeed JSON sizes it."""
    data = {"model": {"d_model": 128, "n_heads": 4, "d_ff": 512, "hierarchy": "2@1 2@4 2@1", "dropout": 0.0,
                      "max_seq_len": 4096},
            "data": {"url": "unused", "seq_len": 1024},
            "train": {"micro_batch_size": 2, "grad_accum_steps": 1, "precision": "fp32"},
            "parallel": {"pipeline_stages": 1, "zero_stage": 1},
            "tracking": {"enabled": False}}
    return config_from_dict(data, [f"{k}={v}" for k, v in over.items()])


def layout(world=1, stages=1, micro=2, accum=1, zero=1, sp=1):
    return ParallelLayout(world, stages, micro, accum, zero, sp)


@pytest.mark.parametrize("device", ["cuda", "cpu"])
@pytest.mark.parametrize("policy", ["none", "full_resolution", "all"])
def test_the_breakdown_sums_to_the_total(device, policy):
    pred = predict_layout(config(), layout(world=2), policy, device)
    assert all(pred[k] >= 0 for k in PARTS)
    assert sum(pred[k] for k in PARTS) == pytest.approx(pred["total"], rel=1e-12)
    assert pred["parameters"] == 4 * sum(p.numel() for p in HourglassLM(config().model).parameters())


def test_zero_stages_order_the_peak():
    cfg = config()
    peaks = [predict_layout(cfg, layout(world=4, zero=z), "all", "cuda") for z in (0, 1, 2)]
    assert peaks[2]["total"] < peaks[1]["total"] < peaks[0]["total"]
    assert peaks[1]["optimizer"] == pytest.approx(peaks[0]["optimizer"] * 3 / 8)  # fp32 master + Adam, / 4 ranks
    assert peaks[2]["gradients"] < peaks[1]["gradients"]
    # the gradient bucket: the DeepSpeed JSON's reduce_bucket_size (the model's parameter count) fp32 elements
    from hgscale.training.ds_config import deepspeed_config

    size = deepspeed_config(config(**{"parallel.zero_stage": 2}), 4)["zero_optimization"]["reduce_bucket_size"]
    assert peaks[0]["buffers"] + 4 * size == pytest.approx(peaks[2]["buffers"])


@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_sequence_parallel_halves_the_activations_of_every_level(device):
    cfg = config()
    one = predict_layout(cfg, layout(world=1), "none", device)["activations_by_level"]
    two = predict_layout(cfg, layout(world=2, sp=2), "none", device)["activations_by_level"]
    assert set(one) == set(two) == {"0", "1", "2", "embed/head"}
    for level in ("0", "1", "2"):
        assert two[level] == pytest.approx(one[level] / 2, rel=1e-9), level


def test_full_resolution_sits_between_none_and_all():
    cfg = config()
    kept = {p: sum(layer_activation_bytes(cfg, policy=p)) for p in ("none", "full_resolution", "all")}
    assert kept["all"] < kept["full_resolution"] < kept["none"]
    peak = {p: predict_layout(cfg, layout(), p)["total"] for p in kept}
    assert peak["all"] < peak["full_resolution"] < peak["none"]
    # a checkpointed layer keeps its input, (B, T/P, D) fp32 of its level; the first of the valley also the skip
    rows = layer_memory(cfg, policy="all")
    assert rows[1]["kept"] == 2 * 1024 * 128 * 4 and rows[5]["kept"] == 2 * 256 * 128 * 4
    assert rows[4]["kept"] == 2 * 256 * 128 * 4 + 2 * 1024 * 128 * 4


def test_the_first_pipeline_stage_keeps_stages_micro_batches():
    cfg = config(**{"parallel.pipeline_stages": 4, "train.grad_accum_steps": 8})
    pred = predict_layout(cfg, layout(world=4, stages=4, accum=8), "none", "cuda")
    assert [st["in_flight"] for st in pred["stages"]] == [4, 3, 2, 1]  # 1F1B: stage s holds stages - s
    parts, acts = stage_parts(cfg, 4), layer_activation_bytes(cfg, policy="none")
    for st, a, b in zip(pred["stages"], parts, parts[1:], strict=False):  # its layers' and (but the last) its output
        assert st["kept_per_micro_batch"] >= sum(acts[a:b]) and (st["stage"] < 3) == (st["kept_per_micro_batch"]
                                                                                          > sum(acts[a:b]))
    s, (a, b) = pred["stage"], pred["layers"]  # the worst stage: its in-flight micro-batches' activations
    assert sum(pred["activations_by_level"].values()) == pytest.approx((4 - s) * sum(acts[a:b]))
    assert pred["activations"] >= (3 - s) * sum(acts[a:b])  # those behind the one in its backward
    short = predict_layout(cfg, layout(world=4, stages=4, accum=2), "none", "cuda")
    assert [st["in_flight"] for st in short["stages"]] == [2, 2, 2, 1]  # at most the micro-batches of a step


def test_fitting_layouts_fit_and_are_ranked_by_step_time():
    cfg = config(**{"train.global_batch_size": 8, "train.grad_accum_steps": 0})
    everything = fitting_layouts(cfg, 4, float("inf"))
    mem = sorted(r["total"] for r in everything)[len(everything) // 2]
    rows = fitting_layouts(cfg, 4, mem)
    assert 0 < len(rows) < len(everything)
    assert all(r["total"] <= mem for r in rows)
    assert len(rows) == sum(r["total"] <= mem for r in everything)
    assert [r["step_s"] for r in rows] == sorted(r["step_s"] for r in rows)
    for r in rows[:5]:  # the listed prediction is predict_layout's for that layout
        assert r["dp"] * r["pp"] * r["sp"] == 4 and r["micro"] * r["accum"] * r["dp"] == 8
        lay = ParallelLayout(4, r["pp"], r["micro"], r["accum"], r["zero"], r["sp"])
        assert predict_layout(cfg, lay, r["policy"])["total"] == pytest.approx(r["total"])
    assert {r["policy"] for r in everything} == {"none", "full_resolution", "all"}
    assert {r["sp"] for r in everything} == {1, 2, 4} and {r["zero"] for r in everything if r["pp"] > 1} <= {0, 1}


def test_sizes_parse():
    assert parse_size("80GB") == 80e9 and parse_size("80GiB") == 80 * 2**30 and parse_size("512MB") == 512e6
    assert parse_size("1.5 tb") == 1.5e12
    for bad in ("80", "80 gigs", "-1GB", "GB", "0GB"):
        with pytest.raises(ValueError, match="--gpu-mem"):
            parse_size(bad)


@pytest.fixture()
def cfg_file(tmp_path):
    data = {"model": {"size": "debug", "max_seq_len": 256}, "data": {"url": "unused", "seq_len": 128},
            "train": {"micro_batch_size": 2, "grad_accum_steps": 1},
            "parallel": {"pipeline_stages": 2, "zero_stage": 1}, "tracking": {"enabled": False}}
    path = tmp_path / "c.json"
    path.write_text(json.dumps(data))
    return str(path)


@pytest.mark.parametrize("args, words", [
    (["--gpus", "4", "--gpu-mem", "80gigs"], ["--gpu-mem '80gigs' is not a memory size", "80GB"]),
    (["--gpus", "0", "--gpu-mem", "80GB"], ["--gpus 0 must be >= 1"]),
    (["--gpus", "4"], ["--gpus and --gpu-mem go together"]),
    (["--gpus", "2", "--gpu-mem", "1MB"], ["no layout of --gpus 2 fits --gpu-mem 1MB"]),
    (["--memory", "--world", "3"], ["--world 3", "not divisible by parallel.pipeline_stages = 2"]),
    (["--memory", "--world", "0"], ["--world 0 must be >= 1"]),
])
def test_cli_bad_input_is_one_line_and_status_2(cfg_file, capsys, args, words):
    assert plan_main(["--config", cfg_file, *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for w in words:
        assert w in err, err


def test_cli_memory_and_layouts(cfg_file, capsys):
    assert plan_main(["--config", cfg_file, "--memory", "--json"]) == 0
    pred = json.loads(capsys.readouterr().out)
    assert pred["layout"]["world_size"] == 2 and pred["total"] == pytest.approx(sum(pred[k] for k in PARTS))
    assert plan_main(["--config", cfg_file, "--memory"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("per-rank peak") and "level 0 1@1" in text and "per stage:" in text
    assert plan_main(["--config", cfg_file, "--gpus", "4", "--gpu-mem", "16GiB", "--top", "3", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 3 and all(r["total"] <= 16 * 2**30 for r in rows)
    assert plan_main(["--config", cfg_file, "--stages", "2"]) == 0  # the stage plan, as before
    assert "imbalance (max/mean stage FLOPs)" in capsys.readouterr().out


@pytest.mark.parametrize("over", [{}, {"train.micro_batch_size": 1, "model.dropout": 0.1, "model.attn_dropout": 0.1},
                                  {"model.downsample": "linear", "model.upsample": "linear"},
                                  {"data.seq_len": 1000}])
def test_layer_activations_match_the_tensors_saved_for_backward(over):
    """Every tensor the CPU model saves for backward, by layer (storages counted once; parameters and the
    attention's cached distance tables left out), against the planner's per-layer activations: within 5 %."""
    cfg = config(**{"model.attn_impl": "blocked", **over})
    torch.manual_seed(0)
    model = HourglassLM(cfg.model).train()
    B, T = cfg.train.micro_batch_size, cfg.data.seq_len
    tokens = torch.randint(0, 256, (B, T))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    tables, seen, where = set(), {}, [0]
    table_fn = attention_module._sinusoid_table

    def table(*args):
        t = table_fn(*args)
        tables.add(t.untyped_storage().data_ptr())
        return t

    def pack(t):
        seen.setdefault(t.untyped_storage().data_ptr(), (where[0], t.untyped_storage().nbytes()))
        return t

    attention_module._sinusoid_table = table
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            state = tokens
            for i, layer in enumerate(model.layers):
                where[0] = i
                state = layer(state)
            lm_loss(state, torch.randint(0, 256, (B, T)))
    finally:
        attention_module._sinusoid_table = table_fn
    measured = [0] * len(model.layers)
    for ptr, (i, n) in seen.items():
        if ptr not in params and ptr not in tables:
            measured[i] += n
    predicted = [r["act"] for r in layer_memory(cfg, policy="none", device="cpu")]
    for i, (m, p) in enumerate(zip(measured, predicted, strict=True)):
        assert p == pytest.approx(m, rel=0.05), (i, m, p)
