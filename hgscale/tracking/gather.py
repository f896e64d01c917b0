"""Rank-0 collection of what only other ranks know: per-stage step timings and per-node resources.

``gather_to_rank0`` is a collective: EVERY rank of the group must call it at the same point of the loop
(the trainer calls ``Tracker.gather_and_log`` on all ranks at each log interval), or the job hangs.
``aggregate`` turns the gathered records into metric names MLflow can chart.
"""
from __future__ import annotations

from collections import defaultdict
from statistics import mean

from . import names
from .records import clean_key


def gather_to_rank0(obj, group=None) -> list | None:
    """All ranks' ``obj`` as a list on rank 0 (index = rank in group), None elsewhere; [obj] without a process group."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return [obj]
    rank = dist.get_rank(group)
    out = [None] * dist.get_world_size(group) if rank == 0 else None
    dist.gather_object(obj, out, dst=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
    return out


def aggregate(records: list[dict]) -> dict[str, float]:
    """Metrics from per-rank records ``{"rank", "stage", "node", "timings": {name_s: s}, "system": {...}}``.

    - ``time/<name>``: the slowest rank (a synchronous step waits for it); ``time/stage<s>/<name>``: mean over the
      data-parallel ranks of stage s.
    - ``pipeline/bubble_share``: share of the step a stage waits on its neighbouring stages, wait_s / step_s,
      averaged over stages (pipelines only: their ranks report wait_s).
    - ``system/<node>/...``: node CPU and memory from the node's first rank, RSS summed over its ranks, GPU peak
      memory the largest on the node.
    - ``memory/max_rank_peak_gb``: the largest per-rank peak (GPU memory, else RSS) of the job.
    - ``data/<counter>``: a counter (storage retries, skipped corrupt shards) summed over the ranks of the first
      stage: each data-parallel rank's stream once (a pipeline's last stage reads the same stream again).
    """
    out = _timing_metrics(records)
    out.update(_counter_metrics(records))
    out.update(_system_metrics(records))
    return out


def _timing_metrics(records: list[dict]) -> dict[str, float]:
    """``time/...`` per step part and stage, and ``pipeline/bubble_share``."""
    out: dict[str, float] = {}
    by_stage: dict[int, list[dict]] = defaultdict(list)
    for r in records:
        by_stage[int(r.get("stage", 0))].append(r.get("timings") or {})
    parts = sorted({k for recs in by_stage.values() for t in recs for k in t})
    for name in parts:
        vals = [t[name] for recs in by_stage.values() for t in recs if name in t]
        out[names.timing(clean_key(name))] = max(vals)
        if len(by_stage) > 1:
            for s, recs in sorted(by_stage.items()):
                sv = [t[name] for t in recs if name in t]
                if sv:
                    out[names.timing(clean_key(name), s)] = mean(sv)
    idle = []
    for recs in by_stage.values():
        per = [t["wait_s"] / t["step_s"] for t in recs if t.get("step_s") and "wait_s" in t]
        if per:
            idle.append(mean(per))
    if idle:
        out[names.BUBBLE_SHARE] = mean(idle)
    return out


def _counter_metrics(records: list[dict]) -> dict[str, float]:
    """``data/<counter>`` summed over the first stage's ranks."""
    totals: dict[str, float] = defaultdict(float)
    for r in records:
        if int(r.get("stage", 0)) == 0:
            for k, v in (r.get("counters") or {}).items():
                totals[names.data_counter(clean_key(k))] += float(v)
    return dict(totals)


def _system_metrics(records: list[dict]) -> dict[str, float]:
    """``system/<node>/...`` per node and ``memory/max_rank_peak_gb``."""
    out: dict[str, float] = {}
    by_node: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        if r.get("system"):
            by_node[str(r["system"].get("node", r.get("node", "node")))].append(r["system"])
    peaks = []
    for node, sys_recs in sorted(by_node.items()):
        n = clean_key(node)
        first = sys_recs[0]
        for k in ("cpu_percent", "mem_used_gb", "mem_percent"):
            if k in first:
                out[names.system(n, k)] = float(first[k])
        out[names.system(n, "rss_gb")] = sum(float(s.get("rss_gb", 0.0)) for s in sys_recs)
        gpu = [float(s["gpu_peak_gb"]) for s in sys_recs if "gpu_peak_gb" in s]
        if gpu:
            out[names.system(n, "gpu_peak_gb")] = max(gpu)
        util = [float(s["gpu_util_percent"]) for s in sys_recs if "gpu_util_percent" in s]
        if util:
            out[names.system(n, "gpu_util_percent")] = mean(util)
        peaks += [float(s.get("gpu_peak_gb", s.get("rss_gb", 0.0))) for s in sys_recs]
    if peaks:
        out[names.MAX_RANK_PEAK_GB] = max(peaks)
    return out
