"""The trainer behind `hgscale/train.py`: build, resume, then run steps and let each part act when it is due.

    tr = Trainer(cfg, ds_json, dataset)   # process group, engine, checkpoint, tracking, data stream
    status = tr.run()                      # 0 finished or preempted (checkpoint saved), 3 NaN loss

What happens at which step is decided by the parts, in this order: the profiler (train.profile_steps),
NaN guard, progress log, validation (per source for a mixture, with the sources' shares), preemption,
checkpointing, and the hang watchdog (:mod:`hgscale.distributed.parts`, ``mixture_parts``, ``profiling``,
``watchdog``). The loop itself only runs optimizer steps.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from hgscale.checkpoint import CheckpointManager, resume_point
from hgscale.config import Config
from hgscale.distributed.ds_config import batch_layout
from hgscale.distributed.mixture_parts import data_parts
from hgscale.distributed.parts import Checkpointing, Halt, NanGuard, Part, Preemption, ProgressLog, StepResult
from hgscale.distributed.profiling import Profiling
from hgscale.distributed.watchdog import Watchdog


class Trainer:
    def __init__(self, cfg: Config, ds_json: dict, dataset):
        from hgscale.distributed.engine import TrainEngine, init_distributed

        preemption = Preemption()  # before the process group: a signal during start-up is not lost
        self.cfg, self.dataset = cfg, dataset
        self.rt = init_distributed(cfg)
        self.eng = TrainEngine(cfg, ds_json, self.rt)
        self.ckpt = CheckpointManager(cfg, self.eng, ds_json)
        self._stopped = False
        state = self._resume()
        self.step = int(state.get("step", 0))
        self.last_saved = self.step if state else None
        self._start_tracking(cfg, ds_json, state)
        self._open_stream(state)
        self._start_meter(state)
        self.progress = ProgressLog(self)
        self.mark("started")
        watchdog = [Watchdog(self)] if cfg.train.hang_timeout_s != 0 else []
        profiling = [Profiling(self)] if cfg.train.profile_steps else []
        self.parts: list[Part] = [*profiling, NanGuard(), self.progress, *data_parts(self), preemption,
                                  Checkpointing(), *watchdog]  # the watchdog closes last

    # ------------------------------------------------------------------------------------------ set-up
    def _resume(self) -> dict:
        where = resume_point(self.cfg)
        if not where:
            return {}
        state = self.ckpt.load(*where)
        src = f"{self.cfg.checkpoint.dir.rstrip('/')}/{where[1]}" if self.ckpt.remote else where[0] / where[1]
        self.say(f"resumed from {src} at step {state['step']}")
        return state

    def _start_tracking(self, cfg: Config, ds_json: dict, state: dict) -> None:
        from hgscale.distributed.plan import stage_plan
        from hgscale.tracking import Tracker

        self.tracker = Tracker(cfg, self.rt.rank, self.rt.world_size, resume_run_id=state.get("run_id"))
        if not state:
            plan = stage_plan(cfg, self.eng.num_stages) if self.eng.pipeline else None
            self.tracker.log_run_info(cfg, ds_json, self.eng.topology(), self.dataset.manifest, plan)
        self.metrics_path = Path(cfg.run_dir) / "metrics.jsonl"
        if self.rt.rank == 0:
            self.metrics_path.parent.mkdir(parents=True, exist_ok=True)

    def _open_stream(self, state: dict) -> None:
        """Only ranks that read data (every rank, or a pipeline's first and last stage) open the stream."""
        t, d = self.cfg.train, self.cfg.data
        self.stream = self.it = None
        if self.eng.reads_data:
            # the global batch fixes the order of windows; this rank reads its share of each
            self.stream = self.dataset.stream(d.train_split, t.micro_batch_size, d.seq_len, self.eng.dp_rank,
                                              self.eng.dp_size, seed=d.seed,
                                              global_batch_size=batch_layout(self.cfg, self.rt.world_size)
                                              ["global_batch_size"])
            if "data" in state:
                self.stream.load_state_dict(state["data"])
            self.it = iter(self.stream)

    def _start_meter(self, state: dict) -> None:
        from hgscale.models import flops_per_token
        from hgscale.tracking import EfficiencyMeter, peak_flops, pipeline_bubble_fraction

        cfg, t, d = self.cfg, self.cfg.train, self.cfg.data
        self.meter = EfficiencyMeter(flops_per_token(cfg.model, d.seq_len), n_devices=self.rt.world_size,
                                     peak_flops_per_device=peak_flops(self.rt.device, cfg.tracking.peak_tflops,
                                                                      t.precision))
        if "meter" in state:
            self.meter.load_state_dict(state["meter"])
        self.global_batch = batch_layout(cfg, self.rt.world_size)["global_batch_size"]
        self.tokens_per_step = self.global_batch * d.seq_len
        self.bubble = pipeline_bubble_fraction(self.eng.num_stages, t.grad_accum_steps)
        # metric = nats/token x factor; SentencePiece splits each have their own bytes per token
        self.bits, self.metric = self.dataset.bits_per_nat_token_for(d.train_split), self.dataset.metric_name

    # ------------------------------------------------------------------------------------------ services
    def say(self, *args) -> None:
        if self.rt.rank == 0:
            print(*args, flush=True)

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

    def mark(self, phase: str) -> None:
        """Progress the watchdog sees: what the main thread does now, and since when."""
        self.phase, self.phase_t = phase, time.monotonic()

    def stop(self) -> None:
        """End the run after the current step's parts (exit status 0)."""
        self._stopped = True

    # ------------------------------------------------------------------------------------------ the loop
    def run(self) -> int:
        """Train to train.steps, or until a part stops the run. Returns the exit status."""
        t, lay = self.cfg.train, batch_layout(self.cfg, self.rt.world_size)
        self.say(f"training {self.cfg.model.hierarchy!r} for {t.steps} steps: {self.rt.world_size} process(es), "
                 f"{self.eng.num_stages} stage(s) x {self.eng.dp_size} data-parallel, "
                 f"ZeRO-{self.cfg.parallel.zero_stage}, {t.precision}, global batch {lay['global_batch_size']} x "
                 f"{self.cfg.data.seq_len} tokens")
        status = 0
        try:
            while self.step < t.steps and not self._stopped:
                self._one_step()
        except Halt as h:
            status = h.status
        except BaseException:  # a crash still closes the tracking run, marked FAILED
            self.tracker.close(status="FAILED")
            raise
        return self._finish(status)

    def _one_step(self) -> None:
        for p in self.parts:
            p.before_step(self, self.step + 1)
        self.mark(f"step {self.step + 1}")
        loss = self.eng.train_step(self.it)
        self.step += 1
        r = StepResult(self.step, loss, dict(self.eng.timings))
        for p in self.parts:
            self.mark(f"{type(p).__name__} after step {self.step}")
            t0 = time.perf_counter()
            p.after_step(self, r)
            if p.pauses_clock:  # validation and saving do not count as training time
                self.progress.pause(time.perf_counter() - t0)

    def _finish(self, status: int) -> int:
        for p in self.parts:
            self.mark(f"closing {type(p).__name__}")
            p.close(self)
        finished = status == 0 and self.step >= self.cfg.train.steps
        if finished:
            self.say(f"finished {self.cfg.train.steps} steps; checkpoint {self.cfg.checkpoint.dir}/latest")
        self.tracker.close(status="FINISHED" if finished else ("KILLED" if status == 0 else "FAILED"))
        if self.stream is not None and hasattr(self.stream, "close"):
            self.stream.close()
        self.eng.barrier()
        return status
