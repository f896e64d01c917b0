"""The DeepSpeed JSON, generated from the typed config by one function.

    ds = deepspeed_config(cfg, world_size)      # dict, saved with every checkpoint

No process group, no deepspeed: it runs (and fails with a clear message) before any process group starts;
torch is imported only to count the model's parameters for ZeRO's gradient bucket (hgscale.models.flops).
The learning-rate schedule is handed to DeepSpeed as a client scheduler
(:mod:`hgscale.core.schedule`), not as a scheduler block.
"""
from __future__ import annotations

import json

from hgscale.config import Config, ConfigError
from hgscale.training.layout import ParallelLayout

# DeepSpeed prints its own step lines every `steps_per_print`; ours are the progress lines.
_QUIET_STEPS = 2**31 - 1


def _generated(cfg: Config, world_size: int) -> tuple[dict, dict]:
    """(DeepSpeed dict, {dotted DeepSpeed key: config field it comes from})."""
    t, p = cfg.train, cfg.parallel
    lay = ParallelLayout.unchecked(cfg, world_size)
    src: dict[str, str] = {}

    def put(tree: dict, dotted: str, value, field: str):
        node = tree
        keys = dotted.split(".")
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
        src[dotted] = field

    ds: dict = {}
    put(ds, "train_batch_size", lay.global_batch,
        "train.micro_batch_size x train.grad_accum_steps x data-parallel size")
    put(ds, "train_micro_batch_size_per_gpu", t.micro_batch_size, "train.micro_batch_size")
    put(ds, "gradient_accumulation_steps", lay.accum, "train.grad_accum_steps")
    # DeepSpeed's default is 1.0, not "off": always write it.
    put(ds, "gradient_clipping", float(t.grad_clip), "train.grad_clip")
    put(ds, "steps_per_print", _QUIET_STEPS, "(progress lines are hgscale's)")
    put(ds, "wall_clock_breakdown", False, "(step-time breakdown is measured by hgscale)")
    # torch's Adam/AdamW (foreach) runs on every accelerator without building DeepSpeed ops;
    # adam_w_mode gives decoupled weight decay (identical to Adam when weight_decay = 0, the paper's setting).
    put(ds, "optimizer.type", "Adam", "train (optimizer)")
    put(ds, "optimizer.params.lr", float(t.lr), "train.lr")
    put(ds, "optimizer.params.betas", [float(b) for b in t.betas], "train.betas")
    put(ds, "optimizer.params.eps", float(t.eps), "train.eps")
    put(ds, "optimizer.params.weight_decay", float(t.weight_decay), "train.weight_decay")
    put(ds, "optimizer.params.adam_w_mode", True, "train.weight_decay (decoupled)")
    put(ds, "optimizer.params.torch_adam", True, "train (optimizer)")
    # Our optimizer is torch's Adam; DeepSpeed calls every optimizer it did not write itself "untested".
    put(ds, "zero_allow_untested_optimizer", True, "train (optimizer)")
    put(ds, "zero_optimization.stage", p.zero_stage, "parallel.zero_stage")
    if p.zero_stage in (1, 2) and "reduce_bucket_size" not in cfg.deepspeed.get("zero_optimization", {}):
        from hgscale.models.flops import layer_params

        # DeepSpeed allocates a gradient bucket of reduce_bucket_size elements (default 5e8: 2 GB in fp32) per rank
        # whatever the model's size; no bucket need exceed the model (a `deepspeed` section value wins)
        put(ds, "zero_optimization.reduce_bucket_size", int(min(5e8, sum(layer_params(cfg.model)))),
            "model (parameter count)")
    if p.zero_stage == 3:
        # Gather the full weights into the saved model states so checkpoints export without the optimizer.
        put(ds, "zero_optimization.stage3_gather_16bit_weights_on_model_save", True, "parallel.zero_stage")
    if t.precision == "bf16":
        put(ds, "bf16.enabled", True, "train.precision")
        if p.pipeline_stages > 1:
            # bf16 gradient accumulation across micro-batches loses precision: accumulate in fp32.
            put(ds, "data_types.grad_accum_dtype", "fp32", "train.precision with parallel.pipeline_stages > 1")
    elif t.precision == "fp16":
        put(ds, "fp16.enabled", True, "train.precision")
        put(ds, "fp16.loss_scale", 0, "train.precision (0 = dynamic loss scaling)")
        put(ds, "fp16.initial_scale_power", t.initial_loss_scale_power, "train.initial_loss_scale_power")
        put(ds, "fp16.loss_scale_window", 1000, "train.precision")
        put(ds, "fp16.hysteresis", 2, "train.precision")
        put(ds, "fp16.min_loss_scale", 1, "train.precision")
    if p.pipeline_stages > 1:  # layers recompute by level on their own (hgscale.training.recompute), not by interval
        put(ds, "pipeline.activation_checkpoint_interval", 0, "parallel.activation_checkpointing")
    return ds, src


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key))
        else:
            out[key] = v
    return out


def _merge(base: dict, extra: dict) -> dict:
    out = json.loads(json.dumps(base))
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def deepspeed_config(cfg: Config, world_size: int) -> dict:
    """The DeepSpeed JSON for ``cfg`` on ``world_size`` processes.

    ``cfg.deepspeed`` keys are passed through; one that sets a generated key to a different value is an
    error naming both (set the hgscale field instead). Raises ConfigError with every problem at once.
    """
    problems = cfg.problems() + ParallelLayout.unchecked(cfg, world_size).problems(cfg)
    if problems:
        raise ConfigError(problems)
    ds, src = _generated(cfg, world_size)
    gen_flat = _flatten(ds)
    conflicts = []
    for key, value in _flatten(cfg.deepspeed).items():
        # a passthrough key that is a prefix of generated ones (e.g. "optimizer": {...}) also conflicts
        clash = [g for g in gen_flat if g == key or g.startswith(key + ".") or key.startswith(g + ".")]
        for g in clash:
            if g == key and gen_flat[g] == value:
                continue
            conflicts.append(f"deepspeed.{key} = {json.dumps(value)} conflicts with the generated "
                             f"{g} = {json.dumps(gen_flat[g])} (from {src[g]}); set the hgscale field instead")
            break
    if conflicts:
        raise ConfigError(conflicts)
    return _merge(ds, cfg.deepspeed)
