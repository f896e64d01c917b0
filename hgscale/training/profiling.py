"""torch.profiler traces of chosen training steps (`train.profile_steps="20-22"`), a trainer part.

    prof = StepProfiler(run_dir, "20-22", rank, steps=1000, say=print)
    prof.on_step_start(step); ...train step...; prof.on_step_end(step)   # or: the Profiling callback

Every rank records CPU (and CUDA) activities with memory for those steps and writes a Chrome trace
``run_dir/profiles/steps_20-22_rank<r>.json`` (open in chrome://tracing or https://ui.perfetto.dev); rank 0
prints the top-10 operators by self time and logs the folder to MLflow as artifacts. Steps outside the
run (beyond train.steps, or already done before a resume) print one message; training goes on.
On CUDA, an out-of-memory error writes ``run_dir/profiles/oom_rank<r>.pickle`` (a memory snapshot for
https://pytorch.org/memory_viz) before the process exits.
"""
from __future__ import annotations

from pathlib import Path

from hgscale.core.notation import parse_steps
from hgscale.training.callbacks import Callback, Services, StepInfo


def _oom_observer(path: Path):
    import torch

    def observer(device, alloc, device_alloc, device_free):
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            import pickle
            pickle.dump(torch.cuda.memory._snapshot(), f)
        print(f"CUDA out of memory: memory snapshot written to {path}", flush=True)

    return observer


def watch_cuda_oom(path: Path) -> bool:
    """On CUDA: record allocation history and write a snapshot to ``path`` on out-of-memory. The only use
    of torch's private memory-history API in hgscale (torch documents it for exactly this)."""
    import torch

    if not torch.cuda.is_available():
        return False
    torch.cuda.memory._record_memory_history(max_entries=100_000)
    torch._C._cuda_attach_out_of_memory_observer(_oom_observer(path))
    return True


class StepProfiler:
    """Profiles steps first..last (1-based, as the trainer counts them) on this rank."""

    def __init__(self, run_dir, spec: str, rank: int, steps: int, done: int = 0, say=print):
        self.first, self.last = parse_steps(spec)
        self.rank, self.say, self.prof, self.done, self.trace = rank, say, None, None, None
        self.dir = Path(run_dir) / "profiles"
        self.active = done < self.first and self.last <= steps
        if not self.active:
            where = f"the run ends at step {steps}" if self.last > steps else f"it resumes after step {done}"
            say(f"train.profile_steps = {spec!r} lies outside this run ({where}): no profile is recorded")
        watch_cuda_oom(self.dir / f"oom_rank{rank}.pickle")

    def on_step_start(self, step: int) -> None:
        if self.active and step == self.first:
            import torch
            from torch.profiler import ProfilerActivity, profile

            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            self.prof = profile(activities=acts, profile_memory=True, record_shapes=True)
            self.prof.__enter__()

    def on_step_end(self, step: int) -> Path | None:
        """After the last profiled step: stops, writes the trace, returns its path (else None)."""
        if self.prof is None or step != self.last:
            return None
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.prof.__exit__(None, None, None)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.trace = self.dir / f"steps_{self.first}-{self.last}_rank{self.rank}.json"
        self.prof.export_chrome_trace(str(self.trace))
        self.active, self.done, self.prof = False, self.prof, None
        if self.rank == 0:
            self.say(f"profile of steps {self.first}-{self.last} (rank 0), top 10 operators by self time; "
                     f"traces of every rank in {self.dir}")
            self.say(self.top_ops())
        return self.trace

    def abandon(self) -> None:
        """The run ended inside the profiled range: stop recording, write nothing."""
        if self.prof is not None:
            self.prof.__exit__(None, None, None)
            self.prof = None

    def top_ops(self, n: int = 10) -> str:
        import torch

        key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        return self.done.key_averages().table(sort_by=key, row_limit=n)


class Profiling(Callback):
    """The callback around a StepProfiler: after the last profiled step every rank has written its trace; rank 0
    then logs the folder to MLflow (``log_artifact``)."""

    pauses_clock = True  # writing traces is not training time

    def __init__(self, svc: Services, run_dir: str, spec: str, steps: int, done: int, barrier, log_artifact):
        self.svc, self.barrier, self.log_artifact = svc, barrier, log_artifact
        self.p = StepProfiler(run_dir, spec, svc.rank, steps, done=done, say=svc.say)

    def before_step(self, step: int) -> None:
        self.p.on_step_start(step)

    def after_step(self, info: StepInfo) -> None:
        if self.p.on_step_end(info.step) is not None:
            self.barrier()  # COLLECTIVE: every rank profiles the same steps
            if self.svc.rank == 0:
                self.log_artifact(self.p.dir, "profiles")

    def close(self) -> None:
        self.p.abandon()
