"""The paper presets are trax's gin files (trax/supervised/configs/hourglass_*.gin), their learning-rate
schedules are trax's multifactor formula, and a gin value we do not implement is an error at load time."""
import json
import math

import pytest

from hgscale.config import ConfigError, load_config
from hgscale.core.schedule import lr_at, lr_multiplier
from hgscale.training.ds_config import deepspeed_config

COS, RSQRT = "constant * linear_warmup * cosine_decay", "constant * linear_warmup * rsqrt_decay"

# (gin file, HourglassLM.* and multifactor.* / train.* values as the gin file writes them)
GIN = {
    "cifar10": ("hourglass_cifar10.gin", dict(d_model=512, d_ff=2048, n_heads=8, hierarchy="1@1 8@3 1@1",
                downsample="attention_linear", upsample="attention_linear", dropout=0.0, vanilla_attention="full"),
                dict(lr=1e-3, lr_schedule=COS, warmup_steps=5000, decay_steps=100000, steps=100000)),
    "imagenet32": ("hourglass_imagenet32.gin", dict(d_model=512, d_ff=2048, n_heads=8, hierarchy="3@1 24@3 3@1",
                   downsample="attention_linear", upsample="attention_linear", dropout=0.01, attn_dropout=0.01),
                   dict(lr=0.0442, lr_schedule=RSQRT, warmup_steps=8000, steps=400000)),
    "imagenet64": ("hourglass_imagenet64.gin", dict(d_model=768, d_ff=3072, n_heads=8, hierarchy="3@1 12@3 3@1",
                   downsample="linear", upsample="linear", dropout=0.0, vanilla_attention="lsh", lsh_chunk_len=256,
                   lsh_n_hashes=2, lsh_chunks_before=1, lsh_n_buckets=0),
                   dict(lr=0.03125, lr_schedule=RSQRT, warmup_steps=8000, steps=500000)),
    "enwik8_xl": ("hourglass_enwik8.gin", dict(d_model=512, d_ff=2048, n_heads=8, hierarchy="5@1 24@3 5@1",
                  downsample="attention_avg", upsample="attention_repeat", dropout=0.2, attn_dropout=0.2,
                  vocab_size=256),
                  dict(lr=4.1e-4, lr_schedule=COS, warmup_steps=4000, decay_steps=350000, steps=263000,
                       global_batch_size=8)),
    "wiki40b": ("hourglass_wiki40b.gin", dict(d_model=512, d_ff=2048, n_heads=8, hierarchy="4@1 8@4 4@1",
                downsample="attention_avg", upsample="attention_linear", dropout=0.0, vocab_size=32000),
                dict(lr=1e-3, lr_schedule=COS, warmup_steps=10000, decay_steps=125000, steps=125000,
                     global_batch_size=128)),
}


@pytest.mark.parametrize("name", GIN)
def test_preset_is_its_gin_file(name):
    gin, model, train = GIN[name]
    cfg = load_config(f"configs/{name}.json")
    for key, want in model.items():
        assert getattr(cfg.model, key) == want, f"model.{key} ({gin})"
    for key, want in train.items():
        assert getattr(cfg.train, key) == want, f"train.{key} ({gin})"
    t = cfg.train
    assert (t.betas, t.eps, t.weight_decay, t.min_lr, cfg.model.init) == ([0.9, 0.98], 1e-9, 0.0, 0.0, "trax")
    assert t.grad_clip == 0.0  # trax clips nothing
    assert cfg.data.seq_len == {"wiki40b": 2048, "enwik8_xl": 2048, "imagenet64": 12288}.get(name, 3072)
    assert gin in open("README.md").read()


@pytest.mark.parametrize("path", ["configs/enwik8_xl.json", "configs/enwik8_baseline.json", "configs/cifar10.json",
                                  "configs/imagenet32.json", "configs/imagenet64.json", "configs/wiki40b.json"])
def test_no_preset_clips_gradients(path):
    cfg = load_config(path)
    t = cfg.train
    dp = t.global_batch_size // (t.micro_batch_size * t.grad_accum_steps) if t.global_batch_size else 1
    assert deepspeed_config(cfg, cfg.parallel.pipeline_stages * dp)["gradient_clipping"] == 0.0


def trax_multifactor(factors, constant, warmup_steps, steps_per_cycle, step):
    """trax/supervised/lr_schedules.py multifactor(), transcribed; trax's Loop calls it with step 1, 2, ..."""
    ret = 1.0
    for name in [n.strip() for n in factors.split("*")]:
        if name == "constant":
            ret *= constant
        elif name == "linear_warmup":
            ret *= min(1.0, step / warmup_steps)
        elif name == "rsqrt_decay":
            ret /= math.sqrt(max(step, warmup_steps))
        elif name == "cosine_decay":
            progress = max(0.0, (step - warmup_steps) / float(steps_per_cycle))
            ret *= 0.5 * (1.0 + math.cos(math.pi * (progress % 1.0)))
    return ret


@pytest.mark.parametrize("name", GIN)
def test_schedule_is_trax_multifactor(name):
    cfg = load_config(f"configs/{name}.json")
    t = cfg.train
    cycle = t.decay_steps or t.steps
    mult = lr_multiplier(cfg)
    for step in (0, 1, t.warmup_steps // 2, t.warmup_steps - 1, t.warmup_steps, 3 * t.warmup_steps, t.steps // 2,
                 t.steps - 1, t.warmup_steps + cycle + 7):  # the last one: trax's cosine restarts after a cycle
        want = trax_multifactor(t.lr_schedule, t.lr, t.warmup_steps, cycle, step + 1)
        assert lr_at(cfg, step) == pytest.approx(want, rel=1e-12), step
        assert mult(step) * t.lr == pytest.approx(want, rel=1e-12)  # what DeepSpeed's client scheduler applies


def test_peak_learning_rates():
    cfgs = {n: load_config(f"configs/{n}.json") for n in GIN}
    peak = {n: max(lr_at(c, s) for s in range(0, 2 * c.train.warmup_steps)) for n, c in cfgs.items()}
    assert peak["imagenet32"] == pytest.approx(0.0442 / math.sqrt(8000))  # about 4.9e-4
    assert peak["imagenet64"] == pytest.approx(0.03125 / math.sqrt(8000))  # about 3.5e-4
    assert peak["cifar10"] == pytest.approx(1e-3) and peak["wiki40b"] == pytest.approx(1e-3)


def test_min_lr_is_trax_minimum():
    cfg = load_config("configs/cifar10.json", ["train.min_lr=1e-4"])
    assert lr_at(cfg, 0) == 1e-4  # warm-up starts at the floor, as trax's `minimum`
    assert lr_at(cfg, 5000) == pytest.approx(1e-3)


def _preset_with(tmp_path, section, **values):
    data = json.load(open("configs/imagenet64.json"))
    data[section].update(values)
    path = tmp_path / "preset.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("section,values,words", [
    ("train", {"lr_schedule": "constant * linear_warmup * decay_every"},
     ["train.lr_schedule", "'decay_every' is not implemented", "rsqrt_decay"]),
    ("train", {"lr_schedule": "constant * linear_warmup * rsqrt_normalized_decay"}, ["'rsqrt_normalized_decay'"]),
    ("train", {"lr_schedule": "constant * linear_warmpu * rsqrt_decay"}, ["'linear_warmpu' is not a trax"]),
    ("train", {"lr_schedule": "linear_warmup * rsqrt_decay"}, ["no 'constant' factor"]),
    ("train", {"lr_schedule": "constant * linear_warmup", "warmup_steps": 0}, ["divides by train.warmup_steps"]),
    ("train", {"lr_schedule": "multifactor"}, ["train.lr_schedule = 'multifactor' is not one of"]),
    ("model", {"vanilla_attention": "SelfAttention"},
     ["model.vanilla_attention = 'SelfAttention' is not one of full, lsh"]),
    ("model", {"init": "glorot"}, ["model.init = 'glorot' is not one of trax, normal"]),
    ("model", {"downsample": "LinearPooling"}, ["model.downsample = 'LinearPooling' is not one of"]),
    ("model", {"lsh_n_buckets": 7}, ["model.lsh_n_buckets = 7"]),
    ("model", {"hierarchy": "12@1", "size": "imagenet64"}, ["relative-attention biases would get no gradient"]),
])
def test_unimplemented_gin_value_is_an_error_at_load(tmp_path, section, values, words):
    with pytest.raises(ConfigError) as e:
        load_config(_preset_with(tmp_path, section, **values))
    for w in words:
        assert w in str(e.value)
