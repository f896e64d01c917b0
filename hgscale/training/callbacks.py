"""The callbacks of the training loop. Each owns one concern and decides with :func:`every` when it acts; the loop
in :mod:`hgscale.training.trainer` runs steps and calls them in order, handing each a frozen :class:`StepInfo`:

    NanGuard      every step: a NaN/Inf loss outside fp16 stops the run without saving (exit status NAN), recorded
    ProgressLog   every train.log_interval steps and at the end: progress line, metrics, metrics.jsonl
    Validation    every train.eval_interval steps: validation loss and bits (per source for a mixture)
    SourceShares  a mixture's token shares, with the progress line
    Preemption    every step: did any rank get SIGUSR1/SIGTERM? then save together and stop (exit 0)
    Checkpointing every checkpoint.interval steps and at the last step

A callback gets what it needs when it is built: a :class:`Services` (say, record, save, stop, the last saved
step) and the few objects of its concern (the engine's evaluation, the meter), never the trainer. It may
implement ``before_step(step)`` (the step about to run), ``after_step(info)`` and ``close()``. Callbacks with
``pauses_clock`` do work that is not training (validation, saving): the trainer takes their time out of the
throughput window.
"""
from __future__ import annotations

import signal
from dataclasses import dataclass
from typing import Callable, Mapping

from hgscale.core.status import NAN
from hgscale.tracking import names
from hgscale.training.layout import ParallelLayout


def every(n: int, step: int, last: int | None = None) -> bool:
    """Cadence: True at every ``n``-th step (never when n <= 0), and at ``last`` when given."""
    return (n > 0 and step % n == 0) or step == last


@dataclass(frozen=True)
class StepInfo:
    """One optimizer step, as the callbacks see it."""

    step: int                   # 1-based number of the step just done
    loss: float                 # mean loss over the global batch, nats/token
    timings: Mapping[str, float]  # data_s, compute_s, optimizer_s, step_s (wait_s in a pipeline)
    tokens: int                 # tokens of the global batch
    lr: float                   # the lr the optimizer applied in this step
    last: int                   # train.steps: the step the run ends at
    layout: ParallelLayout      # processes, stages, data-parallel size, micro-batch, accumulation

    @property
    def finite(self) -> bool:
        return self.loss == self.loss and abs(self.loss) != float("inf")


@dataclass(frozen=True)
class Services:
    """What a callback may do to the run."""

    rank: int
    say: Callable[..., None]                 # one line on rank 0 (err=True: to stderr)
    record: Callable[[int, dict], None]      # metrics to MLflow and metrics.jsonl
    save: Callable[[int], None]              # COLLECTIVE: a checkpoint at this step
    stop: Callable[[], None]                 # end the run after this step's callbacks (exit 0)
    last_saved: Callable[[], int | None]     # the step of the newest checkpoint of this run, if any


class Halt(Exception):
    """Raised by a callback to end the run at once, with ``status`` as the exit status."""

    def __init__(self, status: int):
        super().__init__(status)
        self.status = status


class Callback:
    pauses_clock = False
    #: the config key of the time this callback's phase may take without a step (None: the hang timeout)
    budget_key: str | None = None

    def before_step(self, step: int) -> None:
        pass

    def after_step(self, info: StepInfo) -> None:
        pass

    def close(self) -> None:
        pass


# ------------------------------------------------------------------------------------------ NaN guard

class NanGuard(Callback):
    """With fp16 DeepSpeed's loss scaler skips a non-finite step and lowers the scale; otherwise stop, recording
    ``train/diverged`` = 1 at the step (MLflow and metrics.jsonl: a sweep, run here or on Slurm, knows the run
    diverged; a resume drops the record with the steps after its checkpoint)."""

    def __init__(self, svc: Services, precision: str, checkpoint_dir: str):
        self.svc, self.precision, self.where = svc, precision, checkpoint_dir

    def after_step(self, info: StepInfo) -> None:
        if info.finite or self.precision == "fp16":
            return
        saved = self.svc.last_saved()
        good = f"step {saved}" if saved is not None else "none"
        self.svc.say(f"error: the training loss is {info.loss} at step {info.step}; stopping without saving. The "
                     f"last good checkpoint is {good} in {self.where}; lower train.lr or raise train.warmup_steps "
                     f"before resuming", err=True)
        self.svc.record(info.step, {names.DIVERGED: 1.0})
        raise Halt(NAN)


# ------------------------------------------------------------------------------------------ validation

class Validation(Callback):
    """Every train.eval_interval steps: mean validation loss over the data-parallel ranks, in nats and bits, per
    source for a mixture (then the overall loss weighs the sources' batches). ``sets`` holds (name, batches,
    bits per nat) per source, name None for a plain dataset; a pipeline's middle stage has batches None but runs
    the same collectives."""
    budget_key = "train.eval_timeout_s"  # a long validation is slow, not stuck

    pauses_clock = True

    def __init__(self, svc: Services, interval: int, eval_loss: Callable, sets: list, metric: str):
        self.svc, self.interval, self.eval_loss, self.sets, self.metric = svc, interval, eval_loss, sets, metric

    def after_step(self, info: StepInfo) -> None:
        if every(self.interval, info.step):
            self.run(info.step)

    def run(self, step: int) -> None:
        from hgscale.data.mixture import combine_eval

        rows, vals = [], {}
        for name, batches, bits in self.sets:
            loss = self.eval_loss(batches)  # COLLECTIVE, once per source on every rank
            if loss is None:
                continue
            if name is not None:
                vals[names.val_source(name, "loss")] = loss
                vals[names.val_source(name, self.metric)] = loss * bits
            rows.append((loss, len(batches or ()) or 1, bits))  # equal batch shapes: batches weigh the tokens
        if not rows:
            return
        loss, overall = combine_eval(rows) if len(self.sets) > 1 else (rows[0][0], rows[0][0] * rows[0][2])
        vals.update({names.VAL_LOSS: loss, names.val_metric(self.metric): overall})
        per = " | ".join(f"{n} {vals[names.val_source(n, self.metric)]:.4f}" for n, _, _ in self.sets
                         if n is not None and names.val_source(n, "loss") in vals)
        self.svc.say(f"validation at step {step}: loss {loss:.4f} | {self.metric} {overall:.4f}"
                     + (f" ({per})" if per else ""))
        self.svc.record(step, vals)


class SourceShares(Callback):
    """data/share/<name>: the fraction of the training tokens drawn so far from each source of a mixture (the
    counts are global, the same on every rank that reads data)."""

    def __init__(self, svc: Services, interval: int, counts: Callable[[], Mapping[str, int]]):
        self.svc, self.interval, self.counts = svc, interval, counts

    def after_step(self, info: StepInfo) -> None:
        if not every(self.interval, info.step, info.last):
            return
        counts = self.counts()
        total = sum(counts.values())
        if total:
            self.svc.record(info.step, {names.data_share(n): c / total for n, c in counts.items()})


# ------------------------------------------------------------------------------------------ preemption

class Preemption(Callback):
    """SIGUSR1 or SIGTERM sets a flag; after each step every rank learns whether any rank was signalled (one
    all-reduce), all save a checkpoint together and the run stops with exit status 0. Starting the same command
    again resumes from that checkpoint (same tracking run, same data position). Installed before the process
    group starts, so a signal during start-up is not lost; ``bind`` gives it the all-reduce later."""
    budget_key = "checkpoint.save_timeout_s"  # a save, and the upload wait, are slow, not stuck

    pauses_clock = True
    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

    def __init__(self):
        self.received: str | None = None
        self.svc: Services | None = None
        self.any_rank: Callable[[bool], bool] | None = None
        for sig in self.SIGNALS:
            signal.signal(sig, self._handler)

    def bind(self, svc: Services, any_rank: Callable[[bool], bool]) -> "Preemption":
        self.svc, self.any_rank = svc, any_rank
        return self

    def _handler(self, signum, frame):
        self.received = signal.Signals(signum).name

    def after_step(self, info: StepInfo) -> None:
        if not self.any_rank(self.received is not None):
            return
        self.svc.save(info.step)
        # a repeated signal must not kill a rank during shutdown (the interpreter restores default handlers)
        for sig in self.SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        self.svc.say(f"preempted at step {info.step}; checkpoint saved")
        self.svc.stop()


# ------------------------------------------------------------------------------------------ checkpoints

class Checkpointing(Callback):
    """Every checkpoint.interval steps (0: never) and at the last step, unless this step was just saved; at the
    end, waits for a remote checkpoint's upload (``wait_uploads``)."""
    budget_key = "checkpoint.save_timeout_s"  # a save, and the upload wait, are slow, not stuck

    pauses_clock = True

    def __init__(self, svc: Services, interval: int, wait_uploads: Callable[[], object] | None = None):
        self.svc, self.interval, self.wait_uploads = svc, interval, wait_uploads

    def after_step(self, info: StepInfo) -> None:
        if every(self.interval, info.step, info.last) and self.svc.last_saved() != info.step:
            self.svc.save(info.step)

    def close(self) -> None:
        if self.wait_uploads is not None:  # s3://: the run ends once every rank's upload is done and latest moved
            self.wait_uploads()
