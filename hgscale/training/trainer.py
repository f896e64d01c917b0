"""The trainer behind `hgscale/train.py`: build, resume, then run steps; each callback acts when it is due.

    tr = Trainer(cfg, ds_json, dataset)   # process group, engine, checkpoint, tracking, data stream
    status = tr.run()                      # hgscale.core.status: OK finished or preempted, NAN

The order of a step reads in :meth:`Trainer.train`. The callbacks, in order (:mod:`hgscale.training.callbacks`,
``progress``, ``profiling``, ``watchdog``): the profiler (train.profile_steps), NaN guard, progress log,
validation (per source for a mixture) and the sources' shares, preemption, checkpointing, and the hang watchdog.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from hgscale.checkpoint.manager import CheckpointManager, resume_point
from hgscale.config import Config
from hgscale.core.signals import stop_signals_held
from hgscale.core.status import HANG, OK, name_of, status_of
from hgscale.training.callbacks import (
    Callback,
    Checkpointing,
    Halt,
    NanGuard,
    Preemption,
    Services,
    SourceShares,
    StepInfo,
    Validation,
)
from hgscale.training.layout import ParallelLayout
from hgscale.training.progress import ProgressLog, RunShape
from hgscale.training.watchdog import Progress, Watchdog


def _record_step(line: str) -> float:
    """The step of a metrics.jsonl line; inf for a line cut short by a killed attempt (dropped with the others)."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")


class Trainer:
    def __init__(self, cfg: Config, ds_json: dict, dataset):
        from hgscale.training.engine import TrainEngine, init_distributed

        preemption = Preemption()  # before the process group: a signal during start-up is not lost
        self.cfg, self.dataset = cfg, dataset
        with stop_signals_held():  # DeepSpeed may compile an op (a child process): held, handled after start-up
            self.rt = init_distributed(cfg)
            where = resume_point(cfg)  # a fresh start builds its layers from model.init_from, when set
            self.eng = TrainEngine(cfg, ds_json, self.rt, self._initial_weights() if not where else None)
        self.layout = ParallelLayout.of(cfg, self.rt.world_size)
        self.ckpt = CheckpointManager(cfg, self.eng, ds_json)
        self._stopped = False
        state = self._resume(where)
        self.step = int(state.get("step", 0))
        self.last_saved = self.step if state else None
        self.progress = Progress(self.step)
        self._start_tracking(cfg, ds_json, state)
        self._open_stream(state)
        self._start_meter(state)
        self.svc = Services(self.rt.rank, self.say, self.record, self.save, self.stop, lambda: self.last_saved)
        self.callbacks = self._callbacks(preemption.bind(self.svc, self.eng.any_rank))
        self.progress.mark("started")

    # ------------------------------------------------------------------------------------------ set-up
    def _initial_weights(self) -> dict | None:
        if not self.cfg.model.init_from:
            return None
        from hgscale.checkpoint.export import initial_weights

        self.say(f"starting from the weights of {self.cfg.model.init_from} (model.init_from)")
        return initial_weights(self.cfg.model)

    def _resume(self, where: tuple | None) -> dict:
        if not where:
            return {}
        state = self.ckpt.load(*where)
        src = f"{self.cfg.checkpoint.dir.rstrip('/')}/{where[1]}" if self.ckpt.remote else where[0] / where[1]
        self.say(f"resumed from {src} at step {state['step']}")
        return state

    def _start_tracking(self, cfg: Config, ds_json: dict, state: dict) -> None:
        from hgscale.tracking import Tracker
        from hgscale.training.plan import stage_plan

        self.tracker = Tracker(cfg, self.rt.rank, self.rt.world_size, resume_run_id=state.get("run_id"))
        if not state:
            plan = stage_plan(cfg, self.eng.num_stages) if self.eng.pipeline else None
            self.tracker.log_run_info(cfg, ds_json, self.eng.topology(), self.dataset.manifest, plan)
        self.metrics_path = Path(cfg.run_dir) / "metrics.jsonl"
        if self.rt.rank == 0:
            self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
            if state:
                self._drop_records_after(int(state["step"]))

    def _drop_records_after(self, step: int) -> None:
        """metrics.jsonl without the records of steps after the checkpoint resumed from: those steps run again, and
        each step is to appear once (an attempt that died after its last checkpoint logged them already)."""
        if not self.metrics_path.is_file():
            return
        kept = [ln for ln in self.metrics_path.read_text().splitlines() if _record_step(ln) <= step]
        tmp = self.metrics_path.with_name(self.metrics_path.name + ".tmp")
        tmp.write_text("".join(ln + "\n" for ln in kept))
        tmp.replace(self.metrics_path)

    def _open_stream(self, state: dict) -> None:
        """Only ranks that read data (every rank, or a pipeline's first and last stage) open the stream."""
        t, d = self.cfg.train, self.cfg.data
        self.stream = self.it = None
        if self.eng.reads_data:
            # the global batch fixes the order of windows; this rank reads its share of each
            self.stream = self.dataset.stream(d.train_split, t.micro_batch_size, d.seq_len, self.eng.dp_rank,
                                              self.eng.dp_size, seed=d.seed, global_batch_size=self.layout.global_batch)
            if "data" in state:
                self.stream.load_state_dict(state["data"])
            self.it = iter(self.stream)

    def _start_meter(self, state: dict) -> None:
        from hgscale.models import flops_per_token
        from hgscale.tracking import EfficiencyMeter, peak_flops

        cfg, t, d = self.cfg, self.cfg.train, self.cfg.data
        self.meter = EfficiencyMeter(flops_per_token(cfg.model, d.seq_len), n_devices=self.rt.world_size,
                                     peak_flops_per_device=peak_flops(self.rt.device, cfg.tracking.peak_tflops,
                                                                      t.precision))
        if "meter" in state:
            self.meter.load_state_dict(state["meter"])
        # metric = nats/token x factor; SentencePiece splits each have their own bytes per token
        self.bits, self.metric = self.dataset.bits_per_nat_token_for(d.train_split), self.dataset.metric_name

    def _callbacks(self, preemption: Preemption) -> list[Callback]:
        from hgscale.tracking import pipeline_bubble_fraction
        from hgscale.training.profiling import Profiling

        cfg, t, svc = self.cfg, self.cfg.train, self.svc
        shape = RunShape(t.steps, t.log_interval, self.metric, self.bits, self.layout.global_batch,
                         pipeline_bubble_fraction(self.eng.num_stages, t.grad_accum_steps))
        counters = lambda: self.stream.stats if self.stream is not None else {}  # noqa: E731 - read counters
        self.progress_log = ProgressLog(svc, shape, self.meter, self.eng, self.tracker, self.step, counters)
        profiling = [Profiling(svc, cfg.run_dir, t.profile_steps, t.steps, self.step, self.eng.barrier,
                               self.tracker.log_artifact)] if t.profile_steps else []
        remote = self.ckpt.remote
        watchdog = [Watchdog(self.progress, self.rt.rank, self.rt.world_size, t.hang_timeout_s, cfg.run_dir,
                             (lambda: remote.progress_t) if remote else (lambda: 0.0),
                             on_hang=lambda: self.tracker.close("FAILED", timeout=10.0, exit_status=name_of(HANG)))
                    ] if t.hang_timeout_s else []
        return [*profiling, NanGuard(svc, t.precision, cfg.checkpoint.dir), self.progress_log,
                *self._data_callbacks(), preemption,
                Checkpointing(svc, cfg.checkpoint.interval, remote.wait if remote else None),
                *watchdog]  # the watchdog closes last

    def _data_callbacks(self) -> list[Callback]:
        """Validation (per source for a mixture) and, for a mixture, the sources' shares."""
        t, d = self.cfg.train, self.cfg.data
        sources = self.dataset.sources  # a mixture's (name, weight, dataset) per source, else None
        sets = []
        if t.eval_interval and self.eng.reads_data:
            sets = self.dataset.eval_sets(d.valid_split, t.micro_batch_size, d.seq_len, self.eng.dp_rank,
                                          self.eng.dp_size, max_batches=t.eval_batches)
        elif t.eval_interval:  # a pipeline's middle stage: no batches, but the same collectives
            named = sources or [(None, None, self.dataset)]
            sets = [(n, None, ds.bits_per_nat_token_for(d.valid_split)) for n, _, ds in named]
        out: list[Callback] = [Validation(self.svc, t.eval_interval, self.eng.eval_loss, sets, self.metric)]
        if sources is not None:
            out.append(SourceShares(self.svc, t.log_interval,
                                    lambda: self.stream.source_tokens if self.stream is not None else {}))
        return out

    def _budget(self, cb: Callback) -> tuple[float | None, str]:
        """The time a callback's phase may take without progress: a save (and the upload wait) its own budget."""
        if cb.budget_key is None:
            return None, ""
        section, key = cb.budget_key.split(".")
        return getattr(getattr(self.cfg, section), key), cb.budget_key

    # ------------------------------------------------------------------------------------------ services
    def say(self, *args, err: bool = False) -> None:
        if self.rt.rank == 0:
            print(*args, file=sys.stderr if err else sys.stdout, flush=True)

    def record(self, step: int, metrics: dict) -> None:
        """Metrics to MLflow and, on rank 0, one line of metrics.jsonl (None values are left out)."""
        metrics = {k: v for k, v in metrics.items() if v is not None}
        self.tracker.log_metrics(metrics, step)
        if self.rt.rank == 0:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps({"step": step, **metrics}) + "\n")

    def save(self, step: int) -> None:
        """COLLECTIVE: a checkpoint of every rank at ``step``."""
        rank_state = {"meter": self.meter.state_dict()}
        if self.stream is not None:
            rank_state["data"] = self.stream.state_dict()
        self.ckpt.save(step, rank_state, self.tracker.run_id)
        self.last_saved = step

    def stop(self) -> None:
        """End the run after the current step's callbacks (exit status OK)."""
        self._stopped = True

    # ------------------------------------------------------------------------------------------ the loop
    def run(self) -> int:
        """Train to train.steps, or until a callback stops the run. Returns the exit status."""
        t, sp = self.cfg.train, self.cfg.parallel.sequence_parallel
        self.say(f"training {self.cfg.model.hierarchy!r} for {t.steps} steps: {self.rt.world_size} process(es), "
                 f"{self.eng.num_stages} stage(s) x {self.eng.dp_size} data-parallel"
                 f"{f' x {sp} sharing each sequence' if sp > 1 else ''}, "
                 f"ZeRO-{self.cfg.parallel.zero_stage}, {t.precision}, global batch {self.layout.global_batch} x "
                 f"{self.cfg.data.seq_len} tokens")
        status = OK
        try:
            while self.step < t.steps and not self._stopped:
                self.train()
        except Halt as h:
            status = h.status
        except BaseException as e:
            self._abandon(status_of(e))
            raise
        return self._finish(status)

    def train(self) -> None:
        """One step: the callbacks' before_step, the optimizer step, then each callback's after_step (the time of
        those that do no training is taken out of the throughput window)."""
        for cb in self.callbacks:
            cb.before_step(self.step + 1)
        self.progress.mark(f"step {self.step + 1}")
        loss = self.eng.train_step(self.it)
        self.step = self.progress.step = self.step + 1
        info = StepInfo(self.step, loss, dict(self.eng.timings), self.layout.global_batch * self.cfg.data.seq_len,
                        self.eng.applied_lr, self.cfg.train.steps, self.layout)
        for cb in self.callbacks:
            self.progress.mark(f"{type(cb).__name__} after step {self.step}", *self._budget(cb))
            t0 = time.perf_counter()
            cb.after_step(info)
            if cb.pauses_clock:
                self.progress_log.pause(time.perf_counter() - t0)

    def _abandon(self, status: int) -> None:
        """After a crash: the tracking run closed FAILED with the exit status, the watchdog's thread stopped, and
        the data workers ended (they block the stop signals, so nothing else would end them)."""
        self.tracker.close(status="FAILED", exit_status=name_of(status))
        for cb in self.callbacks:
            if isinstance(cb, Watchdog):
                cb.close()
        if self.stream is not None:
            self.stream.close()

    def _finish(self, status: int) -> int:
        for cb in self.callbacks:
            self.progress.mark(f"closing {type(cb).__name__}", *self._budget(cb))  # the final upload wait
            cb.close()
        finished = status == OK and self.step >= self.cfg.train.steps
        if finished:
            self.say(f"finished {self.cfg.train.steps} steps; checkpoint {self.cfg.checkpoint.dir}/latest")
        self.tracker.close(status="FINISHED" if finished else ("KILLED" if status == OK else "FAILED"),
                           exit_status=name_of(status))
        for line in self.tracker.link_lines():
            self.say(line)
        if self.stream is not None:
            self.stream.close()
        self.eng.barrier()
        return status
