"""The parts of the training loop. Each owns one concern and decides for itself when it acts; the loop in
:mod:`hgscale.distributed.trainer` only runs steps and calls them in order:

    NanGuard      every step: a NaN/Inf loss outside fp16 stops the run without saving (exit status 3)
    ProgressLog   every train.log_interval steps and at the end: progress line, metrics, metrics.jsonl
    Validation    every train.eval_interval steps: validation loss and bits
    Preemption    every step: did any rank get SIGUSR1/SIGTERM? then save together and stop (exit 0)
    Checkpointing every checkpoint.interval steps and at the last step

A part may implement ``before_step(tr, step)`` (``step`` is the one about to run), ``after_step(tr, r)``
and ``close(tr)``. Parts with ``pauses_clock`` do work that is not training (validation, saving): the
trainer takes their time out of the throughput window.
"""
from __future__ import annotations

import resource
import signal
import sys
import time
from dataclasses import dataclass, field
from datetime import timedelta

import torch

from hgscale.distributed.ds_config import lr_at

EXIT_NAN = 3


@dataclass
class StepResult:
    """What the engine reported for one optimizer step."""

    step: int          # 1-based number of the step just done
    loss: float        # mean loss over the global batch, nats/token
    timings: dict      # data_s, compute_s, optimizer_s, step_s of this step

    @property
    def finite(self) -> bool:
        return self.loss == self.loss and abs(self.loss) != float("inf")


class Halt(Exception):
    """Raised by a part to end the run at once, with ``status`` as the exit status."""

    def __init__(self, status: int):
        super().__init__(status)
        self.status = status


class Part:
    pauses_clock = False

    def before_step(self, tr, step: int) -> None:
        pass

    def after_step(self, tr, r: StepResult) -> None:
        pass

    def close(self, tr) -> None:
        pass


# ------------------------------------------------------------------------------------------ NaN guard

class NanGuard(Part):
    """With fp16 DeepSpeed's loss scaler skips a non-finite step and lowers the scale; otherwise stop."""

    def after_step(self, tr, r: StepResult) -> None:
        if r.finite or tr.cfg.train.precision == "fp16":
            return
        if tr.rt.rank == 0:
            good = f"step {tr.last_saved}" if tr.last_saved is not None else "none"
            print(f"error: the training loss is {r.loss} at step {r.step}; stopping without saving. The last good "
                  f"checkpoint is {good} in {tr.cfg.checkpoint.dir}; lower train.lr or raise train.warmup_steps "
                  f"before resuming", file=sys.stderr, flush=True)
        raise Halt(EXIT_NAN)


# ------------------------------------------------------------------------------------------ progress

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
    saving taken out) and the engine's per-step time parts."""

    start: int
    loss: float = 0.0
    n: int = 0
    t0: float = field(default_factory=time.perf_counter)
    parts: dict = field(default_factory=lambda: dict.fromkeys(("data_s", "wait_s", "compute_s", "optimizer_s",
                                                               "step_s"), 0.0))

    def add(self, r: StepResult) -> None:
        for k in self.parts:
            self.parts[k] += r.timings.get(k, 0.0)
        if r.finite:
            self.loss, self.n = self.loss + r.loss, self.n + 1

    def mean_loss(self) -> float:
        return self.loss / self.n if self.n else float("nan")

    def shares(self) -> dict:
        """Fractions of step time spent waiting for data, in forward+backward and in the optimizer."""
        total = max(self.parts["step_s"], 1e-9)
        return {"time/data_wait_share": self.parts["data_s"] / total,
                "time/fwd_bwd_share": self.parts["compute_s"] / total,
                "time/optimizer_share": self.parts["optimizer_s"] / total}


class ProgressLog(Part):
    """Every train.log_interval steps and at the last: one progress line on rank 0, the interval's metrics to
    MLflow and metrics.jsonl, and the per-rank timings gathered to rank 0 (a collective: every rank calls it)."""

    def __init__(self, tr):
        self.win = Window(tr.step)
        self.skipped0 = tr.eng.skipped_steps()
        self.bar = None
        if tr.rt.rank == 0 and sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=tr.cfg.train.steps, initial=tr.step, unit="step", dynamic_ncols=True, leave=False)

    def pause(self, seconds: float) -> None:
        self.win.t0 += seconds

    def after_step(self, tr, r: StepResult) -> None:
        self.win.add(r)
        if self.bar is not None:
            self.bar.update(1)
        t = tr.cfg.train
        if r.step % t.log_interval == 0 or r.step == t.steps:
            self._log(tr, r.step)
            self.win = Window(r.step)

    def _log(self, tr, step: int) -> None:
        from hgscale.tracking import names

        t, win = tr.cfg.train, self.win
        dt, n = time.perf_counter() - win.t0, max(step - win.start, 1)
        perf = tr.meter.update(tokens=tr.tokens_per_step * (step - win.start), seconds=dt,
                               samples=tr.global_batch * (step - win.start))
        loss, lr = win.mean_loss(), lr_at(tr.cfg, step - 1)
        line = progress_line(step, t.steps, loss, tr.metric, tr.bits, lr, perf[names.TOKENS_PER_S],
                             perf.get(names.MFU), (t.steps - step) * dt / n)
        self.bar.write(line) if self.bar is not None else tr.say(line)
        metrics = {names.TRAIN_LOSS: loss, f"train/{tr.metric}": loss * tr.bits, names.LR: lr, **perf,
                   **win.shares(), "pipeline/bubble_share_ideal": tr.bubble,
                   "train/skipped_steps": tr.eng.skipped_steps() - self.skipped0,
                   names.PEAK_MEMORY_GB: peak_memory_gb(),
                   names.GRAD_NORM: tr.eng.grad_norm(), names.LOSS_SCALE: tr.eng.loss_scale()}
        tr.record(step, metrics)
        tr.tracker.gather_and_log(step, timings={k: v / n for k, v in win.parts.items()},
                                  stage=tr.eng.stage_id, device=tr.rt.device,
                                  counters=getattr(tr.stream, "stats", None) or {})

    def close(self, tr) -> None:
        if self.bar is not None:
            self.bar.close()


# ------------------------------------------------------------------------------------------ validation

class Validation(Part):
    """Every train.eval_interval steps: mean validation loss over the data-parallel ranks, in nats and bits."""

    pauses_clock = True

    def __init__(self, tr):
        t, d = tr.cfg.train, tr.cfg.data
        self.interval = t.eval_interval
        self.batches = None
        self.bits = tr.dataset.bits_per_nat_token_for(d.valid_split) if self.interval else 0.0
        if self.interval and tr.eng.reads_data:
            self.batches = list(tr.dataset.eval_batches(d.valid_split, t.micro_batch_size, d.seq_len, tr.eng.dp_rank,
                                                        tr.eng.dp_size, max_batches=t.eval_batches))

    def after_step(self, tr, r: StepResult) -> None:
        if self.interval and r.step % self.interval == 0:
            self.run(tr, r.step)

    def run(self, tr, step: int) -> None:
        from hgscale.tracking import names

        loss = tr.eng.eval_loss(self.batches)
        if loss is not None:
            tr.say(f"validation at step {step}: loss {loss:.4f} | {tr.metric} {loss * self.bits:.4f}")
            tr.record(step, {names.val_metric(tr.metric): loss * self.bits, "val/loss": loss})


# ------------------------------------------------------------------------------------------ preemption

class Preemption(Part):
    """SIGUSR1 or SIGTERM sets a flag; after each step every rank learns whether any rank was signalled (one
    all-reduce), all save a checkpoint together and the run stops with exit status 0. Starting the same command
    again resumes from that checkpoint (same tracking run, same data position)."""

    pauses_clock = True
    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

    def __init__(self):
        self.received: str | None = None
        for sig in self.SIGNALS:
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        self.received = signal.Signals(signum).name

    def after_step(self, tr, r: StepResult) -> None:
        if not tr.eng.any_rank(self.received is not None):
            return
        tr.save(r.step)
        # a repeated signal must not kill a rank during shutdown (the interpreter restores default handlers)
        for sig in self.SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        tr.say(f"preempted at step {r.step}; checkpoint saved")
        tr.stop()


# ------------------------------------------------------------------------------------------ checkpoints

class Checkpointing(Part):
    """Every checkpoint.interval steps (0: never) and at the last step, unless this step was just saved."""

    pauses_clock = True

    def after_step(self, tr, r: StepResult) -> None:
        every = tr.cfg.checkpoint.interval
        due = (every and r.step % every == 0) or r.step == tr.cfg.train.steps
        if due and tr.last_saved != r.step:
            tr.save(r.step)

    def close(self, tr) -> None:
        if tr.ckpt.remote is not None:  # s3://: the run ends once every rank's upload is done and latest moved
            tr.ckpt.remote.wait()
