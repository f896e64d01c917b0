"""Typed configuration: one dataclass tree loaded from JSON, validated once.

    cfg = load_config("configs/demo.json", overrides=["train.lr=3e-4", "model.dropout=0.1"])

Rules:
- every field carries a one-line doc (``fld(default, "doc")``), shown by ``python -m hgscale.config --help-keys``;
- unknown keys are errors naming ``section.key`` with the closest valid key;
- wrong types name the field and the expected type;
- every problem is gathered and raised once as a :class:`ConfigError`.

This module imports neither torch nor deepspeed: it runs before any process group starts.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """One or more problems with a configuration; ``problems`` lists each as a sentence."""

    def __init__(self, problems: list[str], source: str = "config"):
        self.problems = list(problems)
        head = f"{source}: {len(self.problems)} problem(s)" if len(self.problems) > 1 else f"{source}:"
        super().__init__(head + ("\n  - " if len(self.problems) > 1 else " ") + "\n  - ".join(self.problems))


def fld(default: Any, doc: str, **kw):
    """A dataclass field with its one-line doc. Mutable defaults are copied per instance."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: json.loads(json.dumps(d)), metadata={"doc": doc}, **kw)
    return field(default=default, metadata={"doc": doc}, **kw)


# --------------------------------------------------------------------------------------------- model

DOWNSAMPLE = ("avg", "linear", "attention_avg", "attention_linear")
UPSAMPLE = ("repeat", "linear", "attention_repeat", "attention_linear")
ATTENTION = ("relative", "rotary")
ATTN_IMPL = ("auto", "sdpa", "blocked", "naive", "fused")
VANILLA_ATTENTION = ("full", "lsh")
INIT = ("trax", "normal")

# trax lr_schedules.multifactor factors: those hgscale implements, and the others trax knows (named in errors).
LR_FACTORS = ("constant", "linear_warmup", "rsqrt_decay", "cosine_decay")
_TRAX_ONLY_FACTORS = ("rsqrt_normalized_decay", "decay_every", "two_constants")
LR_SCHEDULES = ("cosine", "rsqrt", "constant")


def lr_factors(schedule: str) -> list[str]:
    """The trax factors of a multifactor schedule string ("constant * linear_warmup * rsqrt_decay"), or []
    for hgscale's own schedule names. A string with '*' is a trax multifactor string."""
    return [f.strip() for f in schedule.split("*")] if "*" in schedule else []


def lr_schedule_problems(t: "TrainConfig") -> list[str]:
    """Problems of train.lr_schedule: a trax factor we do not implement is an error, never a silent default."""
    factors = lr_factors(t.lr_schedule)
    if not factors:
        if t.lr_schedule not in LR_SCHEDULES:
            return [f"train.lr_schedule = {t.lr_schedule!r} is not one of {', '.join(LR_SCHEDULES)}, or a trax "
                    f"multifactor string of {', '.join(LR_FACTORS)} such as 'constant * linear_warmup * rsqrt_decay'"]
        return []
    out = []
    for f in factors:
        if f in _TRAX_ONLY_FACTORS:
            out.append(f"train.lr_schedule = {t.lr_schedule!r}: the trax factor {f!r} is not implemented by hgscale "
                       f"(implemented: {', '.join(LR_FACTORS)})")
        elif f not in LR_FACTORS:
            out.append(f"train.lr_schedule = {t.lr_schedule!r}: {f!r} is not a trax multifactor factor "
                       f"(implemented: {', '.join(LR_FACTORS)})")
    if "constant" not in factors:
        out.append(f"train.lr_schedule = {t.lr_schedule!r} has no 'constant' factor, so train.lr would be ignored: "
                   f"add 'constant *'")
    if "linear_warmup" in factors and t.warmup_steps < 1:
        out.append(f"train.lr_schedule = {t.lr_schedule!r} has 'linear_warmup', which divides by "
                   f"train.warmup_steps = {t.warmup_steps}: set it >= 1")
    return out


_LEVEL_RE = re.compile(r"^(\d+)@(\d+)$")


def parse_hierarchy(spec: str) -> list[tuple[int, int]]:
    """Parse the paper's notation ``"5@1 24@3 5@1"`` into ``[(n_layers, cumulative_factor), ...]``.

    The string is a palindrome of factors (layer counts may differ between the way down and up),
    the outermost factor is 1, factors strictly grow to the middle and each divides the next inner one.
    Raises ValueError showing the string and what is wrong.
    """
    def bad(why: str) -> ValueError:
        return ValueError(f"model.hierarchy {spec!r}: {why} "
                          f"(example: \"5@1 24@3 5@1\"; a plain Transformer is \"12@1\")")

    if not isinstance(spec, str) or not spec.strip():
        raise bad("is empty")
    levels = []
    for tok in spec.split():
        m = _LEVEL_RE.match(tok)
        if not m:
            raise bad(f"item {tok!r} is not of the form N@K (N layers at cumulative shortening factor K)")
        n, k = int(m.group(1)), int(m.group(2))
        if k < 1:
            raise bad(f"item {tok!r} has factor {k}; factors are >= 1")
        levels.append((n, k))
    if len(levels) % 2 == 0:
        raise bad(f"has {len(levels)} items; it must have an odd number (way down, middle, way up)")
    factors = [k for _, k in levels]
    if factors != factors[::-1]:
        raise bad(f"factors {factors} are not a palindrome")
    if factors[0] != 1:
        raise bad(f"the outermost factor is {factors[0]}; it must be 1 (full resolution)")
    mid = len(levels) // 2
    for outer, inner in zip(factors[:mid], factors[1:mid + 1], strict=True):
        if inner <= outer or inner % outer:
            raise bad(f"factor {inner} does not strictly grow from {outer} and divide by it")
    if levels[mid][0] < 1:
        raise bad("the innermost level has no layers")
    return levels


@dataclass
class ModelConfig:
    """Hourglass language model (Nawrot et al. 2021)."""

    size: str = fld("", "Named size to start from (see MODEL_SIZES); explicit keys override it.")
    vocab_size: int = fld(256, "Vocabulary size (256 for bytes and pixels).")
    d_model: int = fld(512, "Width of the residual stream.")
    n_heads: int = fld(8, "Attention heads; must divide d_model.")
    d_ff: int = fld(2048, "Hidden width of the feed-forward blocks.")
    hierarchy: str = fld("5@1 24@3 5@1", "Layers at cumulative shortening factors, paper notation.")
    downsample: str = fld("attention_avg", f"Shortening: one of {', '.join(DOWNSAMPLE)}.")
    upsample: str = fld("attention_repeat", f"Upsampling: one of {', '.join(UPSAMPLE)}.")
    attention: str = fld("relative", f"Attention positions: one of {', '.join(ATTENTION)}.")
    dropout: float = fld(0.2, "Dropout on embeddings, residual branches and feed-forward hidden units.")
    attn_dropout: float = fld(0.0, "Dropout on attention probabilities.")
    max_seq_len: int = fld(8192, "Longest sequence (tokens) the model is built for (evaluation context included).")
    init: str = fld("trax", "Weight initialisation: 'trax' (Glorot-uniform dense layers, embedding "
                            "U(+-sqrt(3/d_model)), as trax) or 'normal' (N(0, init_std) weights, zero biases).")
    init_std: float = fld(0.02, "Standard deviation of the normal initialisation of weights (model.init = 'normal').")
    vanilla_attention: str = fld("full", "Attention of the full-resolution (factor 1) blocks: 'full' (model.attention) "
                                         "or 'lsh' (trax PureLSHSelfAttention: shared QK, rotary, causal).")
    lsh_chunk_len: int = fld(256, "LSH: sorted positions per chunk (trax chunk_len).")
    lsh_n_hashes: int = fld(2, "LSH: hashing rounds (trax n_hashes).")
    lsh_chunks_before: int = fld(1, "LSH: earlier chunks each chunk also attends to (trax n_chunks_before).")
    lsh_n_buckets: int = fld(0, "LSH: buckets per round, even; 0 = trax's 2 * max(1, T // lsh_chunk_len).")
    attn_impl: str = fld("auto", "Relative attention kernel: 'auto' (fused on GPU, blocked on CPU), 'fused', 'sdpa', "
                                 "'blocked' or 'naive'.")

    def levels(self) -> list[tuple[int, int]]:
        return parse_hierarchy(self.hierarchy)

    def total_factor(self) -> int:
        """Product shortening at the innermost level (the largest cumulative factor)."""
        return max(k for _, k in self.levels())

    def n_layers(self) -> int:
        return sum(n for n, _ in self.levels())

    def problems(self) -> list[str]:
        out = []
        try:
            self.levels()
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
        for name in ("vocab_size", "d_model", "d_ff", "max_seq_len"):
            if getattr(self, name) < 1:
                out.append(f"model.{name} = {getattr(self, name)} must be >= 1")
        for name in ("dropout", "attn_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
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


# Named sizes. `debug` is what CPU tests and the demo build on. The paper's sizes follow google/trax
# trax/supervised/configs/hourglass_<name>.gin (HourglassLM.*; trax passes `dropout` to attention too).
MODEL_SIZES: dict[str, dict[str, Any]] = {
    "debug": dict(vocab_size=256, d_model=32, n_heads=2, d_ff=64, hierarchy="1@1 2@2 1@1",
                  dropout=0.0, max_seq_len=512),
    "small": dict(d_model=256, n_heads=4, d_ff=1024, hierarchy="2@1 8@3 2@1", max_seq_len=2048),
    "enwik8": dict(vocab_size=256, d_model=512, n_heads=8, d_ff=2048, hierarchy="5@1 24@3 5@1",
                   downsample="attention_avg", upsample="attention_repeat", attention="relative",
                   dropout=0.2, attn_dropout=0.2, max_seq_len=8192),  # trax drops attention probs at `dropout` too
    "enwik8_baseline": dict(vocab_size=256, d_model=512, n_heads=8, d_ff=2048, hierarchy="34@1",
                            attention="relative", dropout=0.2, attn_dropout=0.2, max_seq_len=8192),
    "imagenet32": dict(vocab_size=256, d_model=512, n_heads=8, d_ff=2048, hierarchy="3@1 24@3 3@1",
                       downsample="attention_linear", upsample="attention_linear", dropout=0.01,
                       attn_dropout=0.01, max_seq_len=3072),
    "imagenet64": dict(vocab_size=256, d_model=768, n_heads=8, d_ff=3072, hierarchy="3@1 12@3 3@1",
                       downsample="linear", upsample="linear", dropout=0.0, max_seq_len=12288,
                       vanilla_attention="lsh", lsh_chunk_len=256, lsh_n_hashes=2, lsh_chunks_before=1),
    "cifar10": dict(vocab_size=256, d_model=512, n_heads=8, d_ff=2048, hierarchy="1@1 8@3 1@1",
                    downsample="attention_linear", upsample="attention_linear", dropout=0.0, max_seq_len=3072),
    "wiki40b": dict(vocab_size=32000, d_model=512, n_heads=8, d_ff=2048, hierarchy="4@1 8@4 4@1",
                    downsample="attention_avg", upsample="attention_linear", attention="relative",
                    dropout=0.0, attn_dropout=0.0, max_seq_len=2048),
}


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
    seq_len: int = fld(2048, "Tokens per training sequence (inputs); each sample reads seq_len + 1 tokens.")
    num_workers: int = fld(2, "Data worker processes per data-parallel rank (0 = one prefetching thread in-process).")
    prefetch_batches: int = fld(4, "Micro-batches prefetched per worker.")
    shuffle: bool = fld(True, "Shuffle shard order and windows, deterministically from (seed, epoch).")
    shuffle_shards: int = fld(4, "Shards a worker holds in memory and shuffles windows across (more mixes more).")
    seed: int = fld(1234, "Seed of the data order.")
    on_corrupt: str = fld("error", "A corrupt or truncated shard: 'error' stops naming it, 'skip' skips and counts it.")
    verify_manifest: bool = fld(True, "Check shard sizes named in the manifest before training starts.")
    verify_checksums: bool = fld(False, "Also read every shard and check its sha256 and counts before training (slow).")
    worker_start_method: str = fld("forkserver",
                                   "Data workers start by 'forkserver' (fast) or 'spawn'; not fork (s3fs).")
    request_timeout_s: float = fld(60.0, "Connect/read timeout of one storage request; a slower one is retried.")
    s3_endpoint_url: str = fld("", "S3 endpoint (for MinIO, moto, ...); empty uses AWS_ENDPOINT_URL or AWS itself.")
    s3_region: str = fld("", "S3 region; empty uses AWS_DEFAULT_REGION.")
    retries: int = fld(5, "Attempts per storage request before giving up on transient errors.")
    retry_backoff_s: float = fld(0.5, "First retry delay in seconds; doubles on each retry.")


# --------------------------------------------------------------------------------------------- train

@dataclass
class TrainConfig:
    """Optimisation, schedule, precision and the training loop."""

    micro_batch_size: int = fld(8, "Sequences per micro-batch per data-parallel rank.")
    grad_accum_steps: int = fld(1, "Micro-batches accumulated per optimizer step.")
    global_batch_size: int = fld(0, "Sequences per optimizer step; 0 derives micro x accum x data-parallel size.")
    steps: int = fld(1000, "Optimizer steps to train.")
    lr: float = fld(4.1e-4, "Peak learning rate (trax multifactor schedules: multifactor.constant).")
    min_lr: float = fld(0.0, "Learning rate at the end of the cosine decay (trax multifactor: its minimum).")
    warmup_steps: int = fld(4000, "Linear warm-up steps.")
    lr_schedule: str = fld("cosine", "After warm-up: 'cosine', 'rsqrt', 'constant', or a trax multifactor string "
                                     "('constant * linear_warmup * rsqrt_decay'; train.lr is then its constant).")
    decay_steps: int = fld(0, "Steps of the cosine decay (0 = train.steps); trax cosine_decay: steps_per_cycle.")
    betas: list = fld([0.9, 0.98], "Adam betas.")
    eps: float = fld(1e-9, "Adam epsilon.")
    weight_decay: float = fld(0.0, "Decoupled weight decay (AdamW); the paper uses none.")
    grad_clip: float = fld(1.0, "Clip the global gradient norm to this value (0 disables).")
    precision: str = fld("fp32", "'fp32', 'bf16' or 'fp16' (fp16 uses dynamic loss scaling).")
    initial_loss_scale_power: int = fld(16, "fp16: initial loss scale is 2**this.")
    seed: int = fld(42, "Seed of parameter initialisation and dropout.")
    log_interval: int = fld(10, "Steps between progress lines and logged metrics.")
    eval_interval: int = fld(500, "Steps between validation runs (0 disables).")
    eval_batches: int = fld(20, "Micro-batches scored per validation run.")
    hang_timeout_s: float = fld(-1.0, "Seconds without progress before the job counts as hung and stops (exit "
                                      "status 4); -1 derives max(300, 20 x median step time), 0 disables.")
    compile: bool = fld(False, "torch.compile each layer (regional); a layer that fails runs eager.")
    profile_steps: str = fld("", "Steps to trace with torch.profiler, e.g. '20-22' or '20'; traces in "
                                 "run_dir/profiles.")


# ------------------------------------------------------------------------------------------ parallel

@dataclass
class ParallelConfig:
    """How the model is spread over processes."""

    pipeline_stages: int = fld(1, "Pipeline stages (1 = data-parallel only).")
    zero_stage: int = fld(1, "DeepSpeed ZeRO stage 0-3 (pipelines allow 0 or 1).")
    partition: str = fld("flops", "Pipeline split: 'flops' (balanced by compute), 'parameters' or 'uniform'.")
    activation_checkpointing: bool = fld(False, "Recompute block activations in the backward pass.")
    backend: str = fld("auto", "Process-group backend: 'auto' (nccl on GPU, gloo on CPU), 'nccl' or 'gloo'.")
    timeout_s: float = fld(600.0, "Process-group timeout: a collective waiting longer raises an error.")


# ------------------------------------------------------------------------------------------ tracking

@dataclass
class TrackingConfig:
    """MLflow tracking (rank 0 only)."""

    enabled: bool = fld(True, "Log to MLflow.")
    uri: str = fld("", "Tracking URI; empty uses MLFLOW_TRACKING_URI, else sqlite in the run directory.")
    experiment: str = fld("hgscale", "MLflow experiment name.")
    run_name: str = fld("", "MLflow run name; empty derives one from the config file name.")
    system_metrics: bool = fld(True, "Log CPU, memory and GPU use per node.")
    peak_tflops: float = fld(0.0, "Peak TFLOP/s per device for MFU; 0 looks up the GPU or measures the CPU.")
    start_timeout_s: float = fld(30.0, "Seconds to wait for the tracking run at start-up before training on (it is "
                                       "created later).")
    close_timeout_s: float = fld(60.0, "Seconds close() waits to deliver queued records; the rest is spooled in "
                                       "run_dir.")
    http_timeout_s: int = fld(5, "Timeout of one request to a tracking server (MLFLOW_HTTP_REQUEST_TIMEOUT if unset).")

    URI_SCHEMES = ("http", "https", "sqlite", "file", "postgresql", "mysql", "mssql", "databricks")

    def problems(self, env_uri: str = "") -> list[str]:
        """Bad tracking settings; ``env_uri`` is MLFLOW_TRACKING_URI, checked when tracking.uri is empty."""
        out = []
        uri, source = (self.uri, "tracking.uri") if self.uri else (env_uri, "MLFLOW_TRACKING_URI")
        scheme = uri.split("://", 1)[0].split("+", 1)[0].lower() if "://" in uri else ""
        if self.enabled and "://" in uri and scheme not in self.URI_SCHEMES:
            out.append(f"{source} = {uri!r} has an unknown scheme {scheme!r}: use http(s)://host:port for a "
                       f"tracking server or sqlite:///path.db for a local store")
        for name in ("start_timeout_s", "close_timeout_s", "http_timeout_s", "peak_tflops"):
            if getattr(self, name) < 0:
                out.append(f"tracking.{name} = {getattr(self, name)} must be >= 0")
        return out


# ---------------------------------------------------------------------------------------- checkpoint

@dataclass
class CheckpointConfig:
    """Checkpoints and automatic resume."""

    dir: str = fld("runs/checkpoints", "Checkpoint directory shared by all nodes: a path, file:// or s3:// URL "
                                       "(S3 settings and credentials as for data.url).")
    interval: int = fld(1000, "Steps between checkpoints (0 = only at the end and on preemption).")
    keep_last: int = fld(3, "Checkpoints kept; older ones are deleted after a successful save.")
    resume: str = fld("auto", "'auto' resumes from the latest checkpoint if any, 'never', or a checkpoint path.")
    allow_batch_change: bool = fld(False, "Resume with a global batch size other than the checkpoint's (data position "
                                          "kept in windows; the lr schedule continues by step).")
    staging_dir: str = fld("", "Node-local directory for checkpoints of a remote checkpoint.dir (s3://...) before "
                               "upload; empty: hgscale-staging under the system temp dir.")


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
        out = self.model.problems()
        t, p, d = self.train, self.parallel, self.data
        out += lr_schedule_problems(t)
        if t.precision not in ("fp32", "bf16", "fp16"):
            out.append(f"train.precision = {t.precision!r} is not one of fp32, bf16, fp16")
        if len(t.betas) != 2:
            out.append(f"train.betas = {t.betas} must hold two numbers")
        if t.profile_steps:
            from hgscale.distributed.profiling import steps_problem
            out += steps_problem(t.profile_steps)
        for name in ("micro_batch_size", "grad_accum_steps", "steps", "log_interval"):
            if getattr(t, name) < 1:
                out.append(f"train.{name} = {getattr(t, name)} must be >= 1")
        if p.zero_stage not in (0, 1, 2, 3):
            out.append(f"parallel.zero_stage = {p.zero_stage} is not one of 0, 1, 2, 3")
        if p.pipeline_stages < 1:
            out.append(f"parallel.pipeline_stages = {p.pipeline_stages} must be >= 1")
        if p.pipeline_stages > 1 and p.zero_stage > 1:
            out.append(f"parallel.zero_stage = {p.zero_stage} cannot be combined with pipeline_stages = "
                       f"{p.pipeline_stages}: DeepSpeed pipelines support ZeRO 0 or 1; set parallel.zero_stage=1")
        if p.partition not in ("flops", "parameters", "uniform"):
            out.append(f"parallel.partition = {p.partition!r} is not one of flops, parameters, uniform")
        if p.backend not in ("auto", "nccl", "gloo"):
            out.append(f"parallel.backend = {p.backend!r} is not one of auto, nccl, gloo")
        if d.on_corrupt not in ("error", "skip"):
            out.append(f"data.on_corrupt = {d.on_corrupt!r} is not one of error, skip")
        if d.mixture:
            from hgscale.data.mixture import entry_problems
            out += entry_problems(d.mixture)
            if d.url:
                out.append(f"data.mixture and data.url = {d.url!r} are both set: use data.url for one dataset or "
                           f"data.mixture for several, not both")
        elif not d.url:
            out.append("data.url is empty: set it to the dataset root holding manifest.json "
                       "(e.g. data.url=s3://bucket/enwik8 or a local path), or list sources in data.mixture")
        if d.seq_len < 1:
            out.append(f"data.seq_len = {d.seq_len} must be >= 1")
        elif not out and d.seq_len > self.model.max_seq_len:
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
        if p.timeout_s <= 0:
            out.append(f"parallel.timeout_s = {p.timeout_s} must be > 0 seconds")
        scheme = self.checkpoint.dir.split("://", 1)[0].lower() if "://" in self.checkpoint.dir else "file"
        if scheme not in ("file", "s3", "s3a"):
            out.append(f"checkpoint.dir = {self.checkpoint.dir!r} has an unknown scheme {scheme!r}: use a path, "
                       f"file:///path or s3://bucket/prefix")
        return out

    def check_world(self, world_size: int) -> list[str]:
        """Problems of the parallel layout and batch arithmetic for a given number of processes."""
        out = []
        t, p = self.train, self.parallel
        if world_size % p.pipeline_stages:
            out.append(f"world size {world_size} is not divisible by parallel.pipeline_stages = {p.pipeline_stages}: "
                       f"launch a multiple of {p.pipeline_stages} processes")
            return out
        dp = world_size // p.pipeline_stages
        derived = t.micro_batch_size * t.grad_accum_steps * dp
        if t.global_batch_size and t.global_batch_size != derived:
            out.append(f"train.global_batch_size = {t.global_batch_size} != micro_batch_size {t.micro_batch_size} x "
                       f"grad_accum_steps {t.grad_accum_steps} x data-parallel size {dp} "
                       f"(= {world_size} processes / {p.pipeline_stages} stages) = {derived}")
        if not self.model.problems() and p.pipeline_stages > 1:
            n_layers = self.model.n_layers() + 2 + 2 * (len(self.model.levels()) // 2)
            if p.pipeline_stages > n_layers:
                out.append(f"parallel.pipeline_stages = {p.pipeline_stages} exceeds the {n_layers} pipeline layers "
                           f"of model.hierarchy {self.model.hierarchy!r}")
        return out

    def validate(self, world_size: int | None = None, source: str = "config") -> "Config":
        probs = self.problems() + (self.check_world(world_size) if world_size else [])
        if probs:
            raise ConfigError(probs, source)
        return self

    def dp_size(self, world_size: int) -> int:
        return world_size // self.parallel.pipeline_stages


# ------------------------------------------------------------------------------------------- loading

def _field_type(cls, name: str):
    return typing.get_type_hints(cls)[name]


def _type_name(tp) -> str:
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false",
            list: "a list", dict: "an object"}.get(tp, getattr(tp, "__name__", str(tp)))


def _coerce(value: Any, tp, path: str, problems: list[str]):
    """Check ``value`` against ``tp``; ints are accepted for floats. Returns the value or None on error."""
    ok = {
        bool: lambda v: isinstance(v, bool),
        int: lambda v: isinstance(v, int) and not isinstance(v, bool),
        float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        str: lambda v: isinstance(v, str),
        list: lambda v: isinstance(v, list),
        dict: lambda v: isinstance(v, dict),
    }[tp]
    if not ok(value):
        problems.append(f"{path} = {json.dumps(value)} has the wrong type: expected {_type_name(tp)}")
        return None
    return float(value) if tp is float else value


def _build(cls, data: Any, prefix: str, problems: list[str]):
    if not isinstance(data, dict):
        problems.append(f"{prefix or 'config'} must be an object, got {json.dumps(data)[:60]}")
        return cls()
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    if cls is ModelConfig and "size" in data:
        size = data["size"]
        if size and size not in MODEL_SIZES:
            problems.append(f"model.size = {size!r} is not one of {', '.join(MODEL_SIZES)}")
        elif size:
            kwargs.update(MODEL_SIZES[size])
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else key
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean {(prefix + '.' if prefix else '') + close[0]}?" if close else \
                f"; valid keys: {', '.join(names)}"
            problems.append(f"unknown key {path}{hint}")
            continue
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, path, problems)
        else:
            v = _coerce(value, tp, path, problems)
            if v is not None:
                kwargs[key] = v
    return cls(**kwargs)


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError([f"override {item!r} is not of the form section.key=value"])
    key, raw = item.split("=", 1)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw  # bare strings: model.hierarchy=12@1
    return key.strip().split("."), value


def _with_overrides(data: dict, overrides: list[str], problems: list[str]) -> dict:
    for item in overrides or []:
        try:
            keys, value = _parse_override(item)
        except ConfigError as e:
            problems.extend(e.problems)
            continue
        node, cls = data, Config
        for i, k in enumerate(keys[:-1]):
            hints = typing.get_type_hints(cls) if cls else {}
            cls = hints.get(k) if dataclasses.is_dataclass(hints.get(k)) else None
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                problems.append(f"override {item!r}: {'.'.join(keys[:i + 1])} is not a section")
                break
        else:
            # a string given for a numeric field stays a string and fails the type check with its path
            hints = typing.get_type_hints(cls) if cls else {}
            if hints.get(keys[-1]) is str and not isinstance(value, str):
                value = item.split("=", 1)[1]
            node[keys[-1]] = value
    return data


def config_from_dict(data: dict, overrides: list[str] | None = None, source: str = "config",
                     validate: bool = True) -> Config:
    problems: list[str] = []
    data = _with_overrides(json.loads(json.dumps(data)), overrides or [], problems)
    cfg = _build(Config, data, "", problems)
    if problems:
        raise ConfigError(problems + (cfg.problems() if validate else []), source)
    return cfg.validate(source=source) if validate else cfg


def load_config(path: str | Path, overrides: list[str] | None = None, validate: bool = True) -> Config:
    """Read a JSON config, apply dotted ``key=value`` overrides, check everything, raise once."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"config file {str(path)!r} does not exist; pass an existing JSON file "
                           f"(see configs/)"], str(path))
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError([f"is not valid JSON: {e}"], str(path)) from None
    return config_from_dict(data, overrides, source=str(path), validate=validate)


def field_docs(cls=Config, prefix: str = "") -> list[tuple[str, str, Any]]:
    """(dotted key, doc, default) for every field of the tree."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        if dataclasses.is_dataclass(hints[f.name]):
            out += field_docs(hints[f.name], key)
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            out.append((key, f.metadata.get("doc", ""), default))
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m hgscale.config [CONFIG] [key=value ...]`` prints the resolved config, or ``--help-keys``."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m hgscale.config",
                                 description="Print the resolved config of CONFIG with overrides applied, or every "
                                             "config key with its default and doc.")
    ap.add_argument("config", nargs="?", help="JSON config file (see configs/)")
    ap.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.lr=3e-4")
    ap.add_argument("--help-keys", action="store_true", help="list every config key, its default and its doc")
    args = ap.parse_args(argv)
    if args.help_keys or args.config is None:
        for key, doc, default in field_docs():
            print(f"{key:36s} {json.dumps(default):>22s}  {doc}")
        return 0
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(cfg.to_dict(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
