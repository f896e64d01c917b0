"""The progress callback: every train.log_interval steps and at the last, one progress line on rank 0, the
interval's metrics to MLflow and metrics.jsonl, and the per-rank timings gathered to rank 0 (a collective: every
rank calls it)."""
from __future__ import annotations

import resource
import sys
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Callable, Mapping

import torch

from hgscale.tracking import names
from hgscale.training.callbacks import Callback, Services, StepInfo, every


def _fmt_eta(seconds: float) -> str:
    return str(timedelta(seconds=int(max(seconds, 0))))


def progress_line(step: int, steps: int, loss: float, metric: str, bits: float, lr: float, tps: float,
                  mfu: float | None, eta_s: float) -> str:
    m = f"{mfu:6.1%}" if mfu is not None else "   n/a"
    return (f"step {step:>{len(str(steps))}d}/{steps} | loss {loss:.4f} | {metric} {loss * bits:.4f} | lr {lr:.2e} | "
            f"{tps:,.0f} tok/s | MFU {m} | ETA {_fmt_eta(eta_s)}")


def peak_memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # CPU: peak resident set (Linux: KiB)


@dataclass
class Window:
    """Sums since the last progress line: loss over finite steps, wall time (pauses for validation and
    saving taken out), the engine's per-step time parts, and the lr of the last step."""

    start: int
    loss: float = 0.0
    n: int = 0
    lr: float = float("nan")
    t0: float = field(default_factory=time.perf_counter)
    parts: dict = field(default_factory=lambda: dict.fromkeys(("data_s", "wait_s", "compute_s", "optimizer_s",
                                                               "step_s"), 0.0))

    def add(self, info: StepInfo) -> None:
        for k in self.parts:
            self.parts[k] += info.timings.get(k, 0.0)
        if info.finite:
            self.loss, self.n = self.loss + info.loss, self.n + 1
        self.lr = info.lr

    def mean_loss(self) -> float:
        return self.loss / self.n if self.n else float("nan")

    def shares(self) -> dict:
        """Fractions of step time spent waiting for data, in forward+backward and in the optimizer."""
        total = max(self.parts["step_s"], 1e-9)
        return {names.DATA_WAIT_SHARE: self.parts["data_s"] / total,
                names.FWD_BWD_SHARE: self.parts["compute_s"] / total,
                names.OPTIMIZER_SHARE: self.parts["optimizer_s"] / total}


@dataclass(frozen=True)
class RunShape:
    """What the progress line needs to know of the run: metric name and scale, batch, the ideal bubble."""

    steps: int
    interval: int
    metric: str            # bpc, bpd, bits_per_token
    bits: float            # metric per nat-token of the training split
    global_batch: int
    bubble: float          # ideal pipeline bubble share


class ProgressLog(Callback):
    def __init__(self, svc: Services, shape: RunShape, meter, eng, tracker, done: int,
                 counters: Callable[[], Mapping] = dict):
        self.svc, self.shape, self.meter, self.eng, self.tracker = svc, shape, meter, eng, tracker
        self.counters = counters
        self.win = Window(done)
        self.skipped0 = eng.skipped_steps()
        self.bar = None
        if svc.rank == 0 and sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=shape.steps, initial=done, unit="step", dynamic_ncols=True, leave=False)

    def pause(self, seconds: float) -> None:
        self.win.t0 += seconds

    def after_step(self, info: StepInfo) -> None:
        self.win.add(info)
        if self.bar is not None:
            self.bar.update(1)
        if every(self.shape.interval, info.step, info.last):
            self._log(info)
            self.win = Window(info.step)

    def _log(self, info: StepInfo) -> None:
        sh, win, step = self.shape, self.win, info.step
        dt, n = time.perf_counter() - win.t0, max(step - win.start, 1)
        perf = self.meter.update(tokens=info.tokens * (step - win.start), seconds=dt,
                                 samples=sh.global_batch * (step - win.start))
        loss = win.mean_loss()
        line = progress_line(step, sh.steps, loss, sh.metric, sh.bits, win.lr, perf[names.TOKENS_PER_S],
                             perf.get(names.MFU), (sh.steps - step) * dt / n)
        self.bar.write(line) if self.bar is not None else self.svc.say(line)
        metrics = {names.TRAIN_LOSS: loss, names.train_metric(sh.metric): loss * sh.bits, names.LR: win.lr, **perf,
                   **win.shares(), names.BUBBLE_IDEAL: sh.bubble,
                   names.SKIPPED_STEPS: self.eng.skipped_steps() - self.skipped0,
                   names.PEAK_MEMORY_GB: peak_memory_gb(),
                   names.GRAD_NORM: self.eng.grad_norm(), names.LOSS_SCALE: self.eng.loss_scale()}
        self.svc.record(step, metrics)
        self.tracker.gather_and_log(step, timings={k: v / n for k, v in win.parts.items()},
                                    stage=self.eng.stage_id, device=self.eng.rt.device, counters=dict(self.counters()))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

