"""Experiment tracking (MLflow, global rank 0) and compute-efficiency metrics.

- :class:`Tracker`: one MLflow run per job; metrics queued off the training thread and delivered by a
  background thread that survives tracking-server outages (``mlflow_sink``, its records in ``records``).
- ``peak_flops`` / ``mfu`` / ``achieved_flops`` / :class:`EfficiencyMeter`: MFU against a GPU peak table or a
  CPU matmul peak measured at start-up (``efficiency``).
- ``gather_to_rank0`` / ``aggregate``: per-stage timings and per-node resources collected on rank 0 (``gather``).
- ``names``: the metric names the trainer logs and the plots and ``python -m hgscale report`` read.
"""
from . import names
from .efficiency import (
                         EfficiencyMeter,
                         achieved_flops,
                         gpu_peak_tflops,
                         measure_cpu_peak,
                         mfu,
                         peak_flops,
                         pipeline_bubble_fraction,
)
from .gather import aggregate, gather_to_rank0
from .tracker import Tracker, resolve_uri

__all__ = ["Tracker", "resolve_uri", "names", "EfficiencyMeter", "achieved_flops", "gpu_peak_tflops",
           "measure_cpu_peak", "mfu", "peak_flops", "pipeline_bubble_fraction", "aggregate", "gather_to_rank0"]
