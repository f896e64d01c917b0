"""The training loop behind `hgscale/train.py`: build, resume, train, validate, checkpoint, stop.

Preemption: SIGUSR1 or SIGTERM sets a flag; after the current step every rank learns whether any rank
was signalled (one all-reduce per step), all save a checkpoint together, rank 0 prints
"preempted at step N; checkpoint saved" and the process exits 0. Starting the same command again
resumes from that checkpoint (same tracking run, same data position).

A NaN/Inf loss: with fp16 DeepSpeed's loss scaler skips the step and lowers the scale; otherwise the run
stops without saving, naming the step and the last good checkpoint (exit status 3).
"""
from __future__ import annotations

import json
import resource
import signal
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch

from hgscale.checkpoint import CheckpointError, CheckpointManager, layout_problem, resume_point
from hgscale.config import Config
from hgscale.distributed.ds_config import batch_layout, lr_at

EXIT_NAN = 3


class _Signals:
    def __init__(self):
        self.received: str | None = None
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        self.received = signal.Signals(signum).name

    def ignore(self):
        """After the preemption checkpoint: a repeated signal must not kill a rank during shutdown
        (the interpreter puts default handlers back while it exits)."""
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)


def _fmt_eta(seconds: float) -> str:
    return str(timedelta(seconds=int(max(seconds, 0))))


def _progress_line(step: int, steps: int, loss: float, metric: str, bits: float, lr: float, tps: float,
                   mfu: float | None, eta_s: float) -> str:
    m = f"{mfu:6.1%}" if mfu is not None else "   n/a"
    return (f"step {step:>{len(str(steps))}d}/{steps} | loss {loss:.4f} | {metric} {loss * bits:.4f} | lr {lr:.2e} | "
            f"{tps:,.0f} tok/s | MFU {m} | ETA {_fmt_eta(eta_s)}")


class _Window:
    """Sums since the last progress line: mean loss over finite steps, wall time (pauses for validation
    and saving taken out) and the engine's per-step time parts."""

    PARTS = ("data_s", "compute_s", "optimizer_s", "step_s")

    def __init__(self, step: int):
        self.reset(step)

    def reset(self, step: int) -> None:
        self.start, self.loss, self.n, self.t0 = step, 0.0, 0, time.perf_counter()
        self.parts = dict.fromkeys(self.PARTS, 0.0)

    def add(self, loss: float, finite: bool, timings: dict) -> None:
        for k in self.parts:
            self.parts[k] += timings.get(k, 0.0)
        if finite:
            self.loss, self.n = self.loss + loss, self.n + 1

    def pause(self, seconds: float) -> None:
        self.t0 += seconds

    def mean_loss(self) -> float:
        return self.loss / self.n if self.n else float("nan")

    def shares(self) -> dict:
        """Fractions of step time spent waiting for data, in forward+backward and in the optimizer."""
        total = max(self.parts["step_s"], 1e-9)
        return {"time/data_wait_share": self.parts["data_s"] / total,
                "time/fwd_bwd_share": self.parts["compute_s"] / total,
                "time/optimizer_share": self.parts["optimizer_s"] / total}


def _peak_memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # CPU: peak resident set (Linux: KiB)


def _append_jsonl(path: Path, record: dict) -> None:
    """A local record beside MLflow (rank 0): one JSON line per log interval or validation."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def preflight(cfg: Config, dataset, world_size: int) -> list[str]:
    """Problems between the config, the opened dataset and the checkpoint to resume from, found before any
    process group starts."""
    from hgscale.data import DataError

    out, d, t = [], cfg.data, cfg.train
    if dataset.vocab_size > cfg.model.vocab_size:
        out.append(f"the dataset at {d.url} has vocab_size {dataset.vocab_size} > model.vocab_size = "
                   f"{cfg.model.vocab_size}; set model.vocab_size={dataset.vocab_size}")
    for field in ("train_split",) + (("valid_split",) if t.eval_interval else ()):
        try:
            dataset.num_tokens(getattr(d, field))
        except DataError as e:
            out.append(str(e))
            continue
        if field == "valid_split":
            dp = batch_layout(cfg, world_size)["data_parallel_size"]
            have = dataset.eval_windows(d.valid_split, d.seq_len)
            if have < t.micro_batch_size * dp:
                out.append(f"split {d.valid_split!r} of {d.url} holds {have} windows of data.seq_len = {d.seq_len} "
                           f"tokens, fewer than one validation batch (micro_batch_size {t.micro_batch_size} x "
                           f"data-parallel size {dp}); lower them or set train.eval_interval=0")
    try:
        where = resume_point(cfg)
    except CheckpointError as e:
        return out + [str(e)]
    if where:  # the layout TrainEngine.topology() will report, known without starting it
        from hgscale.distributed.pipeline import stage_parts

        p = cfg.parallel
        want = {"world_size": world_size, "pipeline_stages": p.pipeline_stages, "zero_stage": p.zero_stage,
                "stage_boundaries": stage_parts(cfg, p.pipeline_stages) if p.pipeline_stages > 1 else None}
        problem = layout_problem(where[0] / where[1], want)
        if problem:
            out.append(problem)
    return out


def run(cfg: Config, ds_json: dict, dataset) -> int:
    """Train ``cfg`` (already validated, with its DeepSpeed JSON and opened dataset). Returns an exit status."""
    from hgscale.distributed.engine import TrainEngine, init_distributed
    from hgscale.distributed.plan import stage_plan
    from hgscale.models import flops_per_token
    from hgscale.tracking import EfficiencyMeter, Tracker, names, peak_flops, pipeline_bubble_fraction

    signals = _Signals()
    rt = init_distributed(cfg)
    eng = TrainEngine(cfg, ds_json, rt)
    lay = batch_layout(cfg, rt.world_size)
    t, d = cfg.train, cfg.data
    say = (lambda *a: print(*a, flush=True)) if rt.rank == 0 else (lambda *a: None)  # noqa: E731

    ckpt = CheckpointManager(cfg, eng, ds_json)
    state: dict = {}
    where = resume_point(cfg)
    if where:
        state = ckpt.load(*where)
        say(f"resumed from {where[0] / where[1]} at step {state['step']}")
    step = int(state.get("step", 0))
    tracker = Tracker(cfg, rt.rank, rt.world_size, resume_run_id=state.get("run_id"))
    plan = stage_plan(cfg, eng.num_stages) if eng.pipeline else None
    if not state:
        tracker.log_run_info(cfg, ds_json, eng.topology(), dataset.manifest, plan)

    stream = it = None
    if eng.reads_data:
        stream = dataset.stream(d.train_split, t.micro_batch_size, d.seq_len, eng.dp_rank, eng.dp_size, seed=d.seed)
        if "data" in state:
            stream.load_state_dict(state["data"])
        it = iter(stream)
    val_batches = None
    if t.eval_interval and eng.reads_data:
        val_batches = list(dataset.eval_batches(d.valid_split, t.micro_batch_size, d.seq_len, eng.dp_rank,
                                                eng.dp_size, max_batches=t.eval_batches))

    fpt = flops_per_token(cfg.model, d.seq_len)
    meter = EfficiencyMeter(fpt, n_devices=rt.world_size,
                            peak_flops_per_device=peak_flops(rt.device, cfg.tracking.peak_tflops, t.precision))
    if "meter" in state:
        meter.load_state_dict(state["meter"])
    # metric = nats/token x factor; SentencePiece splits each have their own bytes per token
    bits, bits_val, metric = (dataset.bits_per_nat_token_for(d.train_split),
                              dataset.bits_per_nat_token_for(d.valid_split) if t.eval_interval else 0.0,
                              dataset.metric_name)
    tokens_per_step = lay["global_batch_size"] * d.seq_len
    bubble = pipeline_bubble_fraction(eng.num_stages, t.grad_accum_steps)

    def save(at: int) -> None:
        rank_state = {"meter": meter.state_dict()}
        if stream is not None:
            rank_state["data"] = stream.state_dict()
        ckpt.save(at, rank_state, tracker.run_id)

    def validate(at: int) -> None:
        loss = eng.eval_loss(val_batches)
        if loss is not None:
            say(f"validation at step {at}: loss {loss:.4f} | {metric} {loss * bits_val:.4f}")
            vals = {names.val_metric(metric): loss * bits_val, "val/loss": loss}
            tracker.log_metrics(vals, at)
            if rt.rank == 0:
                _append_jsonl(metrics_path, {"step": at, **vals})

    metrics_path = Path(cfg.run_dir) / "metrics.jsonl"
    if rt.rank == 0:
        metrics_path.parent.mkdir(parents=True, exist_ok=True)
    bar = None
    if rt.rank == 0 and sys.stderr.isatty():
        from tqdm import tqdm
        bar = tqdm(total=t.steps, initial=step, unit="step", dynamic_ncols=True, leave=False)
    say(f"training {cfg.model.hierarchy!r} for {t.steps} steps: {rt.world_size} process(es), "
        f"{eng.num_stages} stage(s) x {eng.dp_size} data-parallel, ZeRO-{cfg.parallel.zero_stage}, "
        f"{t.precision}, global batch {lay['global_batch_size']} x {d.seq_len} tokens")
    status, last_saved = 0, step if where else None
    win, skipped0 = _Window(step), eng.skipped_steps()
    try:
        while step < t.steps:
            loss = eng.train_step(it)
            step += 1
            finite = loss == loss and abs(loss) != float("inf")
            win.add(loss, finite, eng.timings)
            if not finite and t.precision != "fp16":
                if rt.rank == 0:
                    good = f"step {last_saved}" if last_saved is not None else "none"
                    print(f"error: the training loss is {loss} at step {step}; stopping without saving. The last good "
                          f"checkpoint is {good} in {cfg.checkpoint.dir}; lower train.lr or raise train.warmup_steps "
                          f"before resuming", file=sys.stderr, flush=True)
                status = EXIT_NAN
                break
            if bar is not None:
                bar.update(1)
            if step % t.log_interval == 0 or step == t.steps:
                dt = time.perf_counter() - win.t0
                win_steps = step - win.start
                perf = meter.update(tokens=tokens_per_step * win_steps, seconds=dt,
                                    samples=lay["global_batch_size"] * win_steps)
                steps_in = max(win_steps, 1)
                mean_loss = win.mean_loss()
                lr = lr_at(cfg, step - 1)
                eta = (t.steps - step) * dt / steps_in
                line = _progress_line(step, t.steps, mean_loss, metric, bits, lr, perf[names.TOKENS_PER_S],
                                      perf.get(names.MFU), eta)
                if bar is not None:
                    bar.write(line)
                else:
                    say(line)
                metrics = {names.TRAIN_LOSS: mean_loss, f"train/{metric}": mean_loss * bits, names.LR: lr, **perf,
                           **win.shares(), "time/bubble_share": bubble,
                           "train/skipped_steps": eng.skipped_steps() - skipped0,
                           names.PEAK_MEMORY_GB: _peak_memory_gb()}
                for name, value in ((names.GRAD_NORM, eng.grad_norm()), (names.LOSS_SCALE, eng.loss_scale())):
                    if value is not None:
                        metrics[name] = value
                tracker.log_metrics(metrics, step)
                if rt.rank == 0:
                    _append_jsonl(metrics_path, {"step": step, **{k: v for k, v in metrics.items() if v is not None}})
                tracker.gather_and_log(step, timings={k: v / steps_in for k, v in win.parts.items()},
                                       stage=eng.stage_id, device=rt.device)
                win.reset(step)
            t_pause = time.perf_counter()  # validation and saving do not count as training time
            if t.eval_interval and step % t.eval_interval == 0:
                validate(step)
            preempted = eng.any_rank(signals.received is not None)
            if preempted or (cfg.checkpoint.interval and step % cfg.checkpoint.interval == 0) or step == t.steps:
                save(step)
                last_saved = step
            win.pause(time.perf_counter() - t_pause)
            if preempted:
                signals.ignore()
                say(f"preempted at step {step}; checkpoint saved")
                break
    except BaseException:  # a crash still closes the tracking run, marked FAILED
        tracker.close(status="FAILED")
        raise
    if bar is not None:
        bar.close()
    if status == 0 and step >= t.steps:
        say(f"finished {t.steps} steps; checkpoint {cfg.checkpoint.dir}/latest")
    tracker.close(status="FINISHED" if status == 0 and step >= t.steps else ("KILLED" if status == 0 else "FAILED"))
    if stream is not None and hasattr(stream, "close"):
        stream.close()
    eng.barrier()
    return status
