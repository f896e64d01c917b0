"""Typed configuration: one dataclass tree loaded from JSON, validated once.

    cfg = load_config("configs/demo.json", overrides=["train.lr=3e-4", "model.dropout=0.1"])

Rules:
- every field carries a one-line doc (``fld(default, "doc")``), shown by ``hgscale config --help-keys``;
- unknown keys are errors naming ``section.key`` with the closest valid key;
- wrong types name the field and the expected type;
- every float must be finite, and a field's bound (``fld(..., ge=0)`` / ``gt=0``) holds;
- every problem is gathered and raised once as a :class:`ConfigError`.

This module imports neither torch nor deepspeed: it runs before any process group starts.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import typing
from dataclasses import dataclass
from pathlib import Path

from hgscale.core.loader import ConfigError, build, fld, range_problems, read_json_file, with_overrides
from hgscale.core.loader import field_docs as _field_docs
from hgscale.core.notation import (
    INIT_GROUPS,
    INIT_RECIPES,
    INIT_SCHEMES,
    checkpointed_levels,
    mixture_problems,
    parse_hierarchy,
    parse_init_layers,
    steps_problem,
)
from hgscale.core.presets import MODEL_SIZES
from hgscale.core.schedule import lr_schedule_problems

__all__ = ["Config", "ConfigError", "MODEL_SIZES", "config_from_dict", "field_docs", "load_config", "parse_hierarchy"]


# --------------------------------------------------------------------------------------------- model

DOWNSAMPLE = ("avg", "linear", "attention_avg", "attention_linear")
UPSAMPLE = ("repeat", "linear", "attention_repeat", "attention_linear")
ATTENTION = ("relative", "rotary")
ATTN_IMPL = ("auto", "sdpa", "blocked", "naive", "fused")
VANILLA_ATTENTION = ("full", "lsh")
INIT = INIT_SCHEMES

@dataclass
class ModelConfig:
    """Hourglass language model (Nawrot et al. 2021)."""

    size: str = fld("", "Named size to start from (see MODEL_SIZES); explicit keys override it.")
    vocab_size: int = fld(256, "Vocabulary size (256 for bytes and pixels).", ge=1)
    d_model: int = fld(512, "Width of the residual stream.", ge=1)
    n_heads: int = fld(8, "Attention heads; must divide d_model.")
    d_ff: int = fld(2048, "Hidden width of the feed-forward blocks.", ge=1)
    hierarchy: str = fld("5@1 24@3 5@1", "Layers at cumulative shortening factors, paper notation.")
    downsample: str = fld("attention_avg", f"Shortening: one of {', '.join(DOWNSAMPLE)}.")
    upsample: str = fld("attention_repeat", f"Upsampling: one of {', '.join(UPSAMPLE)}.")
    attention: str = fld("relative", f"Attention positions: one of {', '.join(ATTENTION)}.")
    dropout: float = fld(0.2, "Dropout on embeddings, residual branches and feed-forward hidden units.")
    attn_dropout: float = fld(0.0, "Dropout on attention probabilities.")
    max_seq_len: int = fld(8192, "Longest sequence (tokens) the model is built for (evaluation context included).",
                           ge=1)
    init: str = fld("trax", "Weight initialisation: 'trax' (Glorot-uniform dense layers, embedding "
                            "U(+-sqrt(3/d_model)), as trax) or 'normal' (N(0, init_std) weights, zero biases).")
    init_std: float = fld(0.02, "Standard deviation of the normal initialisation of weights (model.init = 'normal').",
                          gt=0)
    init_layers: str = fld("", f"Layer groups initialised otherwise than model.init: space-separated group=scheme "
                               f"pairs (groups: {', '.join(INIT_GROUPS)}), or a named recipe: "
                               + "; ".join(f"'{k}' = '{v}'" for k, v in INIT_RECIPES.items())
                               + " (blocks at factor 1 from N(0, init_std): the small-budget recipe of BENCHMARKS.md).")
    vanilla_attention: str = fld("full", "Attention of the full-resolution (factor 1) blocks: 'full' (model.attention) "
                                         "or 'lsh' (trax PureLSHSelfAttention: shared QK, rotary, causal).")
    lsh_chunk_len: int = fld(256, "LSH: sorted positions per chunk (trax chunk_len).")
    lsh_n_hashes: int = fld(2, "LSH: hashing rounds (trax n_hashes).")
    lsh_chunks_before: int = fld(1, "LSH: earlier chunks each chunk also attends to (trax n_chunks_before).")
    lsh_n_buckets: int = fld(0, "LSH: buckets per round, even; 0 = trax's 2 * max(1, T // lsh_chunk_len).")
    attn_impl: str = fld("auto", "Relative attention kernel: 'auto' (fused on GPU, blocked on CPU), 'fused', 'sdpa', "
                                 "'blocked' or 'naive'.")
    init_from: str = fld("", "Start from the weights of an exported directory (hgscale export, either --format) "
                             "instead of model.init; a run that resumes a checkpoint ignores it.")

    def levels(self) -> list[tuple[int, int]]:
        return parse_hierarchy(self.hierarchy)

    def total_factor(self) -> int:
        """Product shortening at the innermost level (the largest cumulative factor)."""
        return max(k for _, k in self.levels())

    def n_layers(self) -> int:
        return sum(n for n, _ in self.levels())

    def problems(self) -> list[str]:
        out = []
        for check in (self.levels, lambda: parse_init_layers(self.init_layers)):
            try:
                check()
            except ValueError as e:
                out.append(str(e))
        for name, choices in (("downsample", DOWNSAMPLE), ("upsample", UPSAMPLE), ("attention", ATTENTION),
                              ("attn_impl", ATTN_IMPL), ("vanilla_attention", VANILLA_ATTENTION), ("init", INIT)):
            val = getattr(self, name)
            if val not in choices:
                out.append(f"model.{name} = {val!r} is not one of {', '.join(choices)}")
        if self.n_heads < 1 or self.d_model % max(self.n_heads, 1):
            out.append(f"model.d_model = {self.d_model} is not divisible by model.n_heads = {self.n_heads}")
        elif self.attention == "rotary" and (self.d_model // self.n_heads) % 2:
            out.append(f"model.attention = 'rotary' needs an even head width; "
                       f"d_model/n_heads = {self.d_model // self.n_heads}")
        if self.vanilla_attention == "lsh":
            out += self._lsh_problems()
        out += range_problems(self, "model")
        for name in ("dropout", "attn_dropout"):
            if math.isfinite(getattr(self, name)) and not 0.0 <= getattr(self, name) < 1.0:
                out.append(f"model.{name} = {getattr(self, name)} must be in [0, 1)")
        return out

    def _lsh_problems(self) -> list[str]:
        out = [f"model.{n} = {getattr(self, n)} must be >= 1" for n in ("lsh_chunk_len", "lsh_n_hashes")
               if getattr(self, n) < 1]
        if self.lsh_chunks_before < 0:
            out.append(f"model.lsh_chunks_before = {self.lsh_chunks_before} must be >= 0")
        if self.lsh_n_buckets < 0 or self.lsh_n_buckets % 2:
            out.append(f"model.lsh_n_buckets = {self.lsh_n_buckets} must be 0 (automatic) or a positive even number")
        if self.d_model % 2:
            out.append(f"model.vanilla_attention = 'lsh' rotates queries/keys over d_model, which must be even; "
                       f"model.d_model = {self.d_model}")
        try:
            if self.attention == "relative" and len(self.levels()) == 1:
                out.append(f"model.vanilla_attention = 'lsh' makes every block of {self.hierarchy!r} LSH, so the "
                           f"relative-attention biases would get no gradient: set model.attention = 'rotary'")
        except ValueError:
            pass  # the hierarchy's own problem is reported once, above
        return out


# ---------------------------------------------------------------------------------------------- data

@dataclass
class DataConfig:
    """Where shards live and how they stream (hgscale.data)."""

    url: str = fld("", "Dataset root holding manifest.json and shards: a path, file:// or s3:// URL.")
    mixture: list = fld([], "Instead of url: weighted sources [{\"name\", \"url\", \"weight\"}, ...]; windows drawn "
                            "from each with probability proportional to its weight (hgscale/data/mixture.py).")
    train_split: str = fld("train", "Split name used for training.")
    valid_split: str = fld("valid", "Split name used for periodic validation.")
    test_split: str = fld("test", "Split name used for the final test score.")
    seq_len: int = fld(2048, "Tokens per training sequence (inputs); each sample reads seq_len + 1 tokens.", ge=1)
    num_workers: int = fld(2, "Data worker processes per data-parallel rank (0 = one prefetching thread in-process).",
                           ge=0)
    prefetch_batches: int = fld(4, "Micro-batches prefetched per worker.", ge=1)
    shuffle: bool = fld(True, "Shuffle shard order and windows, deterministically from (seed, epoch).")
    shuffle_shards: int = fld(4, "Shards a worker holds in memory and shuffles windows across (more mixes more).",
                              ge=1)
    seed: int = fld(1234, "Seed of the data order.")
    on_corrupt: str = fld("error", "A corrupt or truncated shard: 'error' stops naming it, 'skip' skips and counts it.")
    verify_manifest: bool = fld(True, "Check shard sizes named in the manifest before training starts.")
    verify_checksums: bool = fld(False, "Also read every shard and check its sha256 and counts before training (slow).")
    worker_start_method: str = fld("forkserver",
                                   "Data workers start by 'forkserver' (fast) or 'spawn'; not fork (s3fs).")
    request_timeout_s: float = fld(60.0, "Connect/read timeout of one storage request; a slower one is retried.",
                                   gt=0)
    s3_endpoint_url: str = fld("", "S3 endpoint (for MinIO, moto, ...); empty uses AWS_ENDPOINT_URL or AWS itself.")
    s3_region: str = fld("", "S3 region; empty uses AWS_DEFAULT_REGION.")
    retries: int = fld(5, "Attempts per storage request before giving up on transient errors.", ge=1)
    retry_backoff_s: float = fld(0.5, "First retry delay in seconds; doubles on each retry.", ge=0)


# --------------------------------------------------------------------------------------------- train

@dataclass
class TrainConfig:
    """Optimisation, schedule, precision and the training loop."""

    micro_batch_size: int = fld(8, "Sequences per micro-batch per data-parallel rank.", ge=1)
    grad_accum_steps: int = fld(1, "Micro-batches accumulated per optimizer step; 0 derives it from "
                                   "global_batch_size on any world size (a job that may shrink).", ge=0)
    global_batch_size: int = fld(0, "Sequences per optimizer step; 0 derives micro x accum x data-parallel size.", ge=0)
    steps: int = fld(1000, "Optimizer steps to train.", ge=1)
    lr: float = fld(4.1e-4, "Peak learning rate (trax multifactor schedules: multifactor.constant).", gt=0)
    min_lr: float = fld(0.0, "Learning rate at the end of the cosine decay (trax multifactor: its minimum).", ge=0)
    warmup_steps: int = fld(4000, "Linear warm-up steps.", ge=0)
    lr_schedule: str = fld("cosine", "After warm-up: 'cosine', 'rsqrt', 'constant', or a trax multifactor string "
                                     "('constant * linear_warmup * rsqrt_decay'; train.lr is then its constant).")
    decay_steps: int = fld(0, "Steps of the cosine decay (0 = train.steps); trax cosine_decay: steps_per_cycle.", ge=0)
    betas: list = fld([0.9, 0.98], "Adam betas.")
    eps: float = fld(1e-9, "Adam epsilon.", gt=0)
    weight_decay: float = fld(0.0, "Decoupled weight decay (AdamW); the paper uses none.", ge=0)
    grad_clip: float = fld(1.0, "Clip the global gradient norm to this value (0 disables).", ge=0)
    precision: str = fld("fp32", "'fp32', 'bf16' or 'fp16' (fp16 uses dynamic loss scaling).")
    initial_loss_scale_power: int = fld(16, "fp16: initial loss scale is 2**this.", ge=0)
    seed: int = fld(42, "Seed of parameter initialisation and dropout.")
    log_interval: int = fld(10, "Steps between progress lines and logged metrics.", ge=1)
    eval_interval: int = fld(500, "Steps between validation runs (0 disables).", ge=0)
    eval_batches: int = fld(20, "Micro-batches scored per validation run.")
    eval_timeout_s: float = fld(3600.0, "Seconds a validation run may take (its own budget; a rank that stops in it "
                                        "is caught at hang_timeout_s all the same).", gt=0)
    hang_timeout_s: float = fld(-1.0, "Seconds without progress before the job counts as hung and stops (exit "
                                      "status 4); -1 derives max(300, 20 x median step time), 0 disables.")
    compile: bool = fld(False, "torch.compile each layer (regional); a layer that fails runs eager.")
    profile_steps: str = fld("", "Steps to trace with torch.profiler, e.g. '20-22' or '20'; traces in "
                                 "run_dir/profiles.")


# ------------------------------------------------------------------------------------------ parallel

@dataclass
class ParallelConfig:
    """How the model is spread over processes."""

    pipeline_stages: int = fld(1, "Pipeline stages (1 = data-parallel only).", ge=1)
    zero_stage: int = fld(1, "DeepSpeed ZeRO stage 0-3 (pipelines allow 0 or 1).")
    partition: str = fld("flops", "Pipeline split: 'flops' (balanced by compute), 'parameters' or 'uniform'.")
    activation_checkpointing: bool | str | list = fld(
        False, "Recompute activations in the backward pass: true/'all', false/'none', 'full_resolution' (the factor-1 "
               "levels, which hold most activations) or a list of level indices of model.hierarchy.")
    sequence_parallel: int = fld(1, "Ranks sharing each sequence (DeepSpeed-Ulysses): each holds 1/N of the tokens; "
                                    "attention runs on all tokens for 1/N of the heads.", ge=1)
    backend: str = fld("auto", "Process-group backend: 'auto' (nccl on GPU, gloo on CPU), 'nccl' or 'gloo'.")
    timeout_s: float = fld(600.0, "Process-group timeout: a collective waiting longer raises an error.", gt=0)


# ------------------------------------------------------------------------------------------ tracking

@dataclass
class TrackingConfig:
    """MLflow tracking (rank 0 only)."""

    enabled: bool = fld(True, "Log to MLflow.")
    uri: str = fld("", "Tracking URI; empty uses MLFLOW_TRACKING_URI, else sqlite in the run directory.")
    experiment: str = fld("hgscale", "MLflow experiment name.")
    run_name: str = fld("", "MLflow run name; empty derives one from the config file name.")
    system_metrics: bool = fld(True, "Log CPU, memory and GPU use per node.")
    peak_tflops: float = fld(0.0, "Peak TFLOP/s per device for MFU; 0 looks up the GPU or measures the CPU.", ge=0)
    start_timeout_s: float = fld(30.0, "Seconds to wait for the tracking run at start-up before training on (it is "
                                       "created later).", ge=0)
    close_timeout_s: float = fld(60.0, "Seconds close() waits to deliver queued records; the rest is spooled in "
                                       "run_dir.", ge=0)
    http_timeout_s: int = fld(5, "Timeout of one request to a tracking server (MLFLOW_HTTP_REQUEST_TIMEOUT if unset).",
                              ge=0)

    URI_SCHEMES = ("http", "https", "sqlite", "file", "postgresql", "mysql", "mssql", "databricks")

    def problems(self, env_uri: str = "") -> list[str]:
        """Bad tracking settings; ``env_uri`` is MLFLOW_TRACKING_URI, checked when tracking.uri is empty."""
        out = []
        uri, source = (self.uri, "tracking.uri") if self.uri else (env_uri, "MLFLOW_TRACKING_URI")
        scheme = uri.split("://", 1)[0].split("+", 1)[0].lower() if "://" in uri else ""
        if self.enabled and "://" in uri and scheme not in self.URI_SCHEMES:
            out.append(f"{source} = {uri!r} has an unknown scheme {scheme!r}: use http(s)://host:port for a "
                       f"tracking server or sqlite:///path.db for a local store")
        return out


# ---------------------------------------------------------------------------------------- checkpoint

@dataclass
class CheckpointConfig:
    """Checkpoints and automatic resume."""

    dir: str = fld("runs/checkpoints", "Checkpoint directory shared by all nodes: a path, file:// or s3:// URL "
                                       "(S3 settings and credentials as for data.url).")
    interval: int = fld(1000, "Steps between checkpoints (0 = only at the end and on preemption).", ge=0)
    keep_last: int = fld(3, "Checkpoints kept; older ones are deleted after a successful save.", ge=1)
    resume: str = fld("auto", "'auto' resumes from the latest checkpoint if any, 'never', or a checkpoint path.")
    allow_batch_change: bool = fld(False, "Resume with a global batch size other than the checkpoint's (data position "
                                          "kept in windows; the lr schedule continues by step).")
    save_timeout_s: float = fld(3600.0, "Seconds a save (with the wait for the previous upload, and the final one) "
                                        "may take before the watchdog counts it as a hang; a rank whose heartbeat "
                                        "stops is caught at train.hang_timeout_s all the same.")
    staging_dir: str = fld("", "Node-local directory for checkpoints of a remote checkpoint.dir (s3://...) before "
                               "upload; empty: hgscale-staging-<uid> (mode 0700) under $SLURM_TMPDIR, $TMPDIR or the "
                               "system temp dir.")


# ------------------------------------------------------------------------------------------------ top

@dataclass
class Config:
    """The whole run."""

    model: ModelConfig = fld(None, "Model architecture.")
    data: DataConfig = fld(None, "Data source and streaming.")
    train: TrainConfig = fld(None, "Optimisation and loop.")
    parallel: ParallelConfig = fld(None, "Parallel layout.")
    tracking: TrackingConfig = fld(None, "MLflow tracking.")
    checkpoint: CheckpointConfig = fld(None, "Checkpointing.")
    run_dir: str = fld("runs/default", "Directory for logs, the local tracking store and outputs.")
    deepspeed: dict = fld({}, "Extra DeepSpeed JSON keys passed through; conflicts with generated keys are errors.")

    def __post_init__(self):
        for f in dataclasses.fields(self):
            if dataclasses.is_dataclass(_field_type(Config, f.name)) and getattr(self, f.name) is None:
                setattr(self, f.name, _field_type(Config, f.name)())

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def problems(self) -> list[str]:
        """Every problem that can be seen without knowing the world size."""
        out = self.model.problems() + range_problems(self, skip=("model",))
        t, p, d = self.train, self.parallel, self.data
        out += lr_schedule_problems(t)
        if t.precision not in ("fp32", "bf16", "fp16"):
            out.append(f"train.precision = {t.precision!r} is not one of fp32, bf16, fp16")
        if len(t.betas) != 2 or not all(type(b) in (int, float) and 0 <= b < 1 for b in t.betas):
            out.append(f"train.betas = {t.betas} must hold two numbers in [0, 1)")
        if t.eval_interval > 0 and t.eval_batches < 1:
            out.append(f"train.eval_batches = {t.eval_batches} must be >= 1 while train.eval_interval > 0")
        if t.min_lr > t.lr > 0:
            out.append(f"train.min_lr = {t.min_lr} exceeds train.lr = {t.lr}: the decay would rise")
        if t.profile_steps:
            out += steps_problem(t.profile_steps)
        if p.zero_stage not in (0, 1, 2, 3):
            out.append(f"parallel.zero_stage = {p.zero_stage} is not one of 0, 1, 2, 3")
        if p.pipeline_stages > 1 and p.zero_stage > 1:
            out.append(f"parallel.zero_stage = {p.zero_stage} cannot be combined with pipeline_stages = "
                       f"{p.pipeline_stages}: DeepSpeed pipelines support ZeRO 0 or 1; set parallel.zero_stage=1")
        if p.partition not in ("flops", "parameters", "uniform"):
            out.append(f"parallel.partition = {p.partition!r} is not one of flops, parameters, uniform")
        if p.backend not in ("auto", "nccl", "gloo"):
            out.append(f"parallel.backend = {p.backend!r} is not one of auto, nccl, gloo")
        if not self.model.problems():
            try:
                checkpointed_levels(p.activation_checkpointing, self.model.levels())
            except ValueError as e:
                out.append(str(e))
        if d.on_corrupt not in ("error", "skip"):
            out.append(f"data.on_corrupt = {d.on_corrupt!r} is not one of error, skip")
        if d.mixture:
            out += mixture_problems(d.mixture)
            if d.url:
                out.append(f"data.mixture and data.url = {d.url!r} are both set: use data.url for one dataset or "
                           f"data.mixture for several, not both")
        elif not d.url:
            out.append("data.url is empty: set it to the dataset root holding manifest.json "
                       "(e.g. data.url=s3://bucket/enwik8 or a local path), or list sources in data.mixture")
        if not out and d.seq_len > self.model.max_seq_len:
            out.append(f"data.seq_len = {d.seq_len} exceeds model.max_seq_len = {self.model.max_seq_len}")
        # data.seq_len need not divide by the total shortening factor, pipelines included: the embedding
        # layer pads every batch to the same multiple, so stage shapes stay fixed; the loss strips the padding.
        out += self.tracking.problems(os.environ.get("MLFLOW_TRACKING_URI", ""))
        if self.checkpoint.resume not in ("auto", "never") and not self.checkpoint.resume:
            out.append("checkpoint.resume is empty: use 'auto', 'never' or a checkpoint path")
        elif "://" in self.checkpoint.resume:
            out.append(f"checkpoint.resume = {self.checkpoint.resume!r}: takes 'auto', 'never' or a local checkpoint "
                       f"path; to resume from a URL set checkpoint.dir to it and checkpoint.resume=auto")
        if t.hang_timeout_s < 0 and t.hang_timeout_s != -1:
            out.append(f"train.hang_timeout_s = {t.hang_timeout_s}: use seconds > 0, -1 (derived) or 0 (off)")
        scheme = self.checkpoint.dir.split("://", 1)[0].lower() if "://" in self.checkpoint.dir else "file"
        if scheme not in ("file", "s3", "s3a"):
            out.append(f"checkpoint.dir = {self.checkpoint.dir!r} has an unknown scheme {scheme!r}: use a path, "
                       f"file:///path or s3://bucket/prefix")
        return out

    def validate(self, source: str = "config") -> "Config":
        """Raise one ConfigError with every problem (the layout's, which need the world size, are
        :class:`hgscale.training.layout.ParallelLayout`'s)."""
        probs = self.problems()
        if probs:
            raise ConfigError(probs, source)
        return self


# ------------------------------------------------------------------------------------------- loading

def _field_type(cls, name: str):
    return typing.get_type_hints(cls)[name]


def config_from_dict(data: dict, overrides: list[str] | None = None, source: str = "config",
                     validate: bool = True) -> Config:
    problems: list[str] = []
    data = with_overrides(Config, json.loads(json.dumps(data)), overrides or [], problems)
    cfg = build(Config, data, "", problems, presets={"model": MODEL_SIZES})
    if problems:
        raise ConfigError(problems + (cfg.problems() if validate else []), source)
    return cfg.validate(source=source) if validate else cfg


def load_config(path: str | Path, overrides: list[str] | None = None, validate: bool = True) -> Config:
    """Read a JSON config, apply dotted ``key=value`` overrides, check everything, raise once."""
    return config_from_dict(read_json_file(path), overrides, source=str(path), validate=validate)


def field_docs() -> list[tuple[str, str, object]]:
    """(dotted key, doc, default) for every key of the config tree (``hgscale config --help-keys``)."""
    return _field_docs(Config)
