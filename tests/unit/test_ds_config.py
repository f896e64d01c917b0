"""The DeepSpeed JSON generated from the typed config, its batch arithmetic and the lr schedule."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hgscale.config import ConfigError, config_from_dict, load_config
from hgscale.core.schedule import lr_at
from hgscale.training.ds_config import deepspeed_config
from hgscale.training.layout import ParallelLayout

ROOT = Path(__file__).resolve().parents[2]


def cfg_of(**sections):
    base = {"model": {"size": "debug"}, "data": {"url": "/tmp/x", "seq_len": 32}}
    for k, v in sections.items():
        if isinstance(v, dict):
            base.setdefault(k, {}).update(v)
        else:
            base[k] = v
    return config_from_dict(base)


def test_paper_optimizer_and_batch_arithmetic():
    cfg = cfg_of(train={"micro_batch_size": 4, "grad_accum_steps": 3})
    ds = deepspeed_config(cfg, world_size=8)
    assert ds["train_batch_size"] == 4 * 3 * 8
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["gradient_accumulation_steps"] == 3
    opt = ds["optimizer"]["params"]
    assert ds["optimizer"]["type"] == "Adam" and opt["betas"] == [0.9, 0.98] and opt["eps"] == 1e-9
    assert opt["lr"] == 4.1e-4 and opt["weight_decay"] == 0.0
    assert ds["gradient_clipping"] == 1.0 and ds["zero_optimization"]["stage"] == 1
    assert "bf16" not in ds and "fp16" not in ds
    json.dumps(ds)  # plain JSON


def test_pipeline_layout_divides_world():
    cfg = cfg_of(parallel={"pipeline_stages": 2}, train={"micro_batch_size": 2, "grad_accum_steps": 4})
    assert ParallelLayout.of(cfg, 8).dp == 4
    assert deepspeed_config(cfg, 8)["train_batch_size"] == 2 * 4 * 4


def test_batch_arithmetic_error_prints_numbers():
    cfg = cfg_of(train={"micro_batch_size": 4, "grad_accum_steps": 2, "global_batch_size": 64})
    with pytest.raises(ConfigError) as e:
        deepspeed_config(cfg, world_size=2)
    msg = str(e.value)
    assert "global_batch_size = 64" in msg and "micro_batch_size 4" in msg and "grad_accum_steps 2" in msg
    assert "= 16" in msg


@pytest.mark.parametrize("world, stages, accum", [(8, 1, 1), (4, 1, 2), (2, 1, 4), (1, 1, 8), (4, 2, 4)])
def test_accumulation_derived_from_the_global_batch_on_any_world(world, stages, accum):
    """train.grad_accum_steps = 0: the same config keeps global batch 16 on whatever allocation a job gets."""
    cfg = cfg_of(train={"micro_batch_size": 2, "grad_accum_steps": 0, "global_batch_size": 16},
                 parallel={"pipeline_stages": stages})
    lay = ParallelLayout.of(cfg, world)
    assert (lay.accum, lay.global_batch) == (accum, 16)
    ds = deepspeed_config(cfg, world)
    assert (ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (accum, 16)
    assert lay.resolve(cfg).train.grad_accum_steps == accum


def test_derived_accumulation_that_cannot_be_is_one_message():
    cfg = cfg_of(train={"micro_batch_size": 2, "grad_accum_steps": 0, "global_batch_size": 12})
    with pytest.raises(ConfigError, match=r"global_batch_size = 12 is not a multiple of micro_batch_size 2 x "
                                          r"data-parallel size 4 .*divisible by 8"):
        ParallelLayout.of(cfg, 4)
    with pytest.raises(ConfigError, match="derives the accumulation from train.global_batch_size, which is 0"):
        ParallelLayout.of(cfg_of(train={"grad_accum_steps": 0}), 1)


def test_precisions():
    bf = deepspeed_config(cfg_of(train={"precision": "bf16"}, parallel={"pipeline_stages": 2}), 2)
    assert bf["bf16"] == {"enabled": True}
    assert bf["data_types"]["grad_accum_dtype"] == "fp32"  # bf16 + pipeline: fp32 accumulation
    assert "data_types" not in deepspeed_config(cfg_of(train={"precision": "bf16"}), 2)
    fp = deepspeed_config(cfg_of(train={"precision": "fp16", "initial_loss_scale_power": 12}), 1)
    assert fp["fp16"]["enabled"] and fp["fp16"]["loss_scale"] == 0 and fp["fp16"]["initial_scale_power"] == 12


def test_activation_checkpointing_is_per_layer_not_deepspeeds_interval():
    ds = deepspeed_config(cfg_of(parallel={"pipeline_stages": 2, "activation_checkpointing": True}), 2)
    assert ds["pipeline"]["activation_checkpoint_interval"] == 0  # hgscale.training.recompute wraps the layers


@pytest.mark.parametrize("policy, layers", [
    # "1@1 2@2 1@1": embed 0, block 1 (level 0), down 2 (0), blocks 3-4 (1), up 5 (2), block 6 (2), head 7
    (True, {1, 2, 3, 4, 5, 6}), (False, set()), ("full_resolution", {1, 2, 5, 6}), ([1], {3, 4}), ([2], {5, 6})])
def test_recomputed_layers_follow_the_levels(policy, layers):
    from hgscale.training.recompute import recomputed_layers

    cfg = cfg_of(parallel={"activation_checkpointing": policy})
    assert cfg.model.hierarchy == "1@1 2@2 1@1"
    assert recomputed_layers(cfg) == layers


def test_passthrough_and_conflicts():
    ds = deepspeed_config(cfg_of(deepspeed={"flops_profiler": {"enabled": True}, "gradient_clipping": 1.0}), 1)
    assert ds["flops_profiler"] == {"enabled": True}  # extra key passed through; equal value is no conflict
    with pytest.raises(ConfigError) as e:
        deepspeed_config(cfg_of(deepspeed={"gradient_clipping": 0.5, "zero_optimization": {"stage": 3}}), 1)
    msg = str(e.value)
    assert "deepspeed.gradient_clipping = 0.5 conflicts" in msg and "train.grad_clip" in msg
    assert "deepspeed.zero_optimization.stage = 3 conflicts" in msg and "parallel.zero_stage" in msg
    with pytest.raises(ConfigError, match="deepspeed.optimizer = .* conflicts"):
        deepspeed_config(cfg_of(deepspeed={"optimizer": "SGD"}), 1)


def test_zero23_with_pipeline_refused_before_anything():
    with pytest.raises(ConfigError, match="zero_stage = 2 cannot be combined with pipeline_stages = 2"):
        cfg_of(parallel={"pipeline_stages": 2, "zero_stage": 2})


def test_stages_exceed_layers():
    cfg = cfg_of(parallel={"pipeline_stages": 16})
    with pytest.raises(ConfigError, match="pipeline_stages = 16 exceeds the"):
        deepspeed_config(cfg, 16)


def test_lr_schedule_shapes():
    cfg = cfg_of(train={"lr": 1.0, "min_lr": 0.1, "warmup_steps": 10, "steps": 110, "lr_schedule": "cosine"})
    assert lr_at(cfg, 0) == pytest.approx(0.1) and lr_at(cfg, 9) == pytest.approx(1.0)
    assert lr_at(cfg, 10) == pytest.approx(1.0)
    assert lr_at(cfg, 60) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the cosine
    assert lr_at(cfg, 110) == pytest.approx(0.1) and lr_at(cfg, 500) == pytest.approx(0.1)
    rs = cfg_of(train={"lr": 1.0, "warmup_steps": 100, "lr_schedule": "rsqrt"})
    assert lr_at(rs, 399) == pytest.approx(math.sqrt(100 / 400))
    const = cfg_of(train={"lr": 0.5, "warmup_steps": 0, "lr_schedule": "constant"})
    assert lr_at(const, 0) == lr_at(const, 10_000) == 0.5


def test_lr_schedule_drives_torch_scheduler():
    import torch

    from hgscale.core.schedule import lr_multiplier
    cfg = cfg_of(train={"lr": 2e-3, "warmup_steps": 5, "steps": 20})
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=cfg.train.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_multiplier(cfg))
    seen = []
    for _ in range(20):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([lr_at(cfg, s) for s in range(20)])


def test_shipped_configs_generate(tmp_path):
    expected_world = {"enwik8_xl": 8, "enwik8_baseline": 8, "imagenet32": 8, "imagenet64": 8, "cifar10": 1, "demo": 1}
    for name, world in expected_world.items():
        cfg = load_config(ROOT / "configs" / f"{name}.json")
        ds = deepspeed_config(cfg, world)
        assert ds["train_batch_size"] == ParallelLayout.of(cfg, world).global_batch
    xl = load_config(ROOT / "configs" / "enwik8_xl.json")
    assert xl.train.betas == [0.9, 0.98] and xl.train.eps == 1e-9 and xl.train.lr == 4.1e-4
    assert xl.model.hierarchy == "5@1 24@3 5@1" and xl.data.seq_len == 2048 and xl.train.global_batch_size == 8


def test_train_entry_reports_config_errors_before_any_process_group(tmp_path):
    cfg = json.loads((ROOT / "configs" / "demo.json").read_text())
    cfg["parallel"] = {"pipeline_stages": 2, "zero_stage": 3}
    cfg["train"]["global_batch_size"] = 5
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(cfg))
    r = subprocess.run([sys.executable, str(ROOT / "hgscale" / "train.py"), "--config", str(path)],
                       capture_output=True, text=True, timeout=120, env={"PATH": "/usr/bin:/bin", "RANK": "0",
                                                                         "WORLD_SIZE": "2"})
    assert r.returncode == 2
    assert "zero_stage = 3 cannot be combined with pipeline_stages = 2" in r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""


def test_train_entry_reports_missing_dataset(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "hgscale" / "train.py"), "--config",
                        str(ROOT / "configs" / "demo.json"), f"data.url={tmp_path / 'nowhere'}"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "nowhere" in r.stderr and "Traceback" not in r.stderr


def test_train_entry_checks_config_against_dataset(tmp_path):
    from data_pipelines.demo_corpus import write_demo_corpus
    data = tmp_path / "demo"
    write_demo_corpus(str(data))
    r = subprocess.run([sys.executable, str(ROOT / "hgscale" / "train.py"), "--config",
                        str(ROOT / "configs" / "demo.json"), f"data.url={data}", "model.vocab_size=100",
                        "data.valid_split=validation"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "vocab_size 256 > model.vocab_size = 100" in r.stderr and "no split 'validation'" in r.stderr


def test_recomputed_layers_run_their_forward_again_in_backward():
    """full_resolution on "1@1 2@2 1@1": layers 1, 2, 5, 6 run twice per step, the shortened blocks 3, 4 once."""
    from collections import Counter

    from torch import nn

    from hgscale.models import HourglassLM, lm_loss
    from hgscale.training.recompute import recompute_in_backward, recomputed_layers

    cfg = cfg_of(parallel={"activation_checkpointing": "full_resolution"})
    model = HourglassLM(cfg.model)
    for i in recomputed_layers(cfg):
        recompute_in_backward(model.layers[i])
    calls = Counter()
    for i, layer in enumerate(model.layers):
        norm = next((m for m in layer.modules() if isinstance(m, nn.LayerNorm)), None)
        if norm is not None:  # the first LayerNorm inside each layer runs once per forward of the layer
            norm.register_forward_hook(lambda *a, _i=i: calls.update([_i]))
    tokens = torch.randint(0, 256, (2, 17))
    lm_loss(model(tokens[:, :-1]), tokens[:, 1:]).backward()
    assert {i: calls[i] for i in range(1, 8)} == {1: 2, 2: 2, 3: 1, 4: 1, 5: 2, 6: 2, 7: 1}


def test_the_gradient_bucket_is_no_larger_than_the_model():
    from hgscale.models.flops import layer_params

    n = sum(layer_params(cfg_of().model))
    assert deepspeed_config(cfg_of(), 1)["zero_optimization"]["reduce_bucket_size"] == n < 5e8
    mine = deepspeed_config(cfg_of(deepspeed={"zero_optimization": {"reduce_bucket_size": 123}}), 1)
    assert mine["zero_optimization"]["reduce_bucket_size"] == 123  # the user's own value is kept
    assert "reduce_bucket_size" not in deepspeed_config(cfg_of(parallel={"zero_stage": 0}), 1)["zero_optimization"]
