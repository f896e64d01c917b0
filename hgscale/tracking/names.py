"""Metric names: what the trainer logs and what plots and reports look for.

The trainer logs with the constants below. Readers (the end-of-run plot, ``hgscale report``)
also accept a few common spellings, so runs logged by other tools still plot.
Validation and test metrics are ``val/<metric>`` and ``test/<metric>`` with the dataset's metric name
(``bpc``, ``bpd``, ``bits_per_token``).
"""
from __future__ import annotations

import re

TRAIN_LOSS = "train/loss"            # mean cross-entropy, nats/token, over the log interval
LR = "train/lr"
GRAD_NORM = "train/grad_norm"
LOSS_SCALE = "train/loss_scale"
TOKENS = "train/tokens"              # cumulative training tokens (all data-parallel ranks)
FLOPS = "train/flops"                # cumulative model training FLOPs (forward + backward)
ELAPSED_S = "time/elapsed_s"         # cumulative training wall-clock seconds (survives resume)
TOKENS_PER_S = "perf/tokens_per_s"
SAMPLES_PER_S = "perf/samples_per_s"
TFLOPS_PER_DEVICE = "perf/tflops_per_device"
MFU = "perf/mfu"
PEAK_MEMORY_GB = "memory/peak_gb"
DIVERGED = "train/diverged"           # 1 at the step whose NaN/Inf loss stopped the run (exit status NAN)
SKIPPED_STEPS = "train/skipped_steps"     # fp16 steps the loss scaler skipped in the log interval
BUBBLE_IDEAL = "pipeline/bubble_share_ideal"
DATA_WAIT_SHARE = "time/data_wait_share"  # shares of step time: waiting for data, forward+backward, optimizer
FWD_BWD_SHARE = "time/fwd_bwd_share"
OPTIMIZER_SHARE = "time/optimizer_share"
VAL_LOSS = "val/loss"
BUBBLE_SHARE = "pipeline/bubble_share"    # measured: the mean share of step time a stage waits for its peers
MAX_RANK_PEAK_GB = "memory/max_rank_peak_gb"


def timing(part: str, stage: int | None = None) -> str:
    """Seconds of one part of the step (time/step_s, time/wait_s ...), of one pipeline stage when given."""
    return f"time/{part}" if stage is None else f"time/stage{stage}/{part}"


def data_counter(counter: str) -> str:
    """A counter of the data stream (data/skipped_shards, data/retries ...), summed over the ranks."""
    return f"data/{counter}"


def system(node: str, metric: str) -> str:
    """A system metric of one node: system/<node>/cpu_percent, .../rss_gb, .../gpu_peak_gb."""
    return f"system/{node}/{metric}"


def split_metric(split: str, metric_name: str) -> str:
    """A score on a dataset split: val/bpc, test/bpc, test/loss."""
    return f"{split}/{metric_name}"


def train_metric(metric_name: str) -> str:
    return split_metric("train", metric_name)


def val_source(source: str, metric_name: str) -> str:
    """Validation of one source of a mixture: val/<source>/loss, val/<source>/bpc."""
    return f"val/{source}/{metric_name}"


def data_share(source: str) -> str:
    """Fraction of the training tokens drawn from one source of a mixture."""
    return f"data/share/{source}"


def val_metric(metric_name: str) -> str:
    return split_metric("val", metric_name)


def test_metric(metric_name: str) -> str:
    return split_metric("test", metric_name)


# Readers: first key present wins.
LOSS_KEYS = (TRAIN_LOSS, "train_loss", "loss", "train/lm_loss")
FLOPS_KEYS = (FLOPS, "train/flops_total", "cumulative_flops", "total_flops", "flops")
ELAPSED_KEYS = (ELAPSED_S, "elapsed_s", "wall_clock_s", "time/wall_s")
TOKENS_PER_S_KEYS = (TOKENS_PER_S, "tokens_per_s", "tokens_per_sec", "throughput/tokens_per_s")
MFU_KEYS = (MFU, "mfu", "perf/MFU")
_VAL_RE = re.compile(r"^(val|valid|validation|eval)[/_](bpc|bpd|bits_per_token|bits_per_byte|bpb)$")
_VAL_LOSS = (VAL_LOSS, "valid/loss", "eval/loss", "val_loss")


def first_present(keys, available) -> str | None:
    """The first of ``keys`` in ``available`` (a set/dict of metric names), else None."""
    for k in keys:
        if k in available:
            return k
    return None


def find_val_key(available) -> str | None:
    """The validation bits metric of a run (val/bpc, val/bpd, ...), else its validation loss, else None."""
    bits = sorted(k for k in available if _VAL_RE.match(k))
    return bits[0] if bits else first_present(_VAL_LOSS, available)


def loss_curve_keys(available) -> tuple[str | None, str | None, str]:
    """(training key, validation key, unit) of a run's loss curves, both in one unit: ``train/bpc`` with
    ``val/bpc`` (bpd, ...) when both were logged, else the losses in nats per token."""
    val = find_val_key(available)
    m = _VAL_RE.match(val or "")
    if m and f"train/{m.group(2)}" in available:
        return f"train/{m.group(2)}", val, m.group(2)
    return first_present(LOSS_KEYS, available), first_present(_VAL_LOSS, available), "loss (nats/token)"


_MLFLOW_UNSAFE = re.compile(r"[^\w./\- :]")  # MLflow metric names: word characters, / . - space and :


def harness_metric(task: str, metric: str) -> str:
    """A downstream score of lm-evaluation-harness: harness/<task>/<metric> from lm_eval's result keys ("acc,none"
    -> harness/<task>/acc; a filter other than "none" follows: "exact_match,strict-match" ->
    harness/<task>/exact_match/strict-match); characters MLflow refuses in a name become "_"."""
    name, _, filt = metric.partition(",")
    tail = name if filt in ("", "none") else f"{name}/{filt}"
    return _MLFLOW_UNSAFE.sub("_", f"harness/{task}/{tail}")
