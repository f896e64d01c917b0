"""DeepSpeed engine set-up: one path for `deepspeed hgscale/train.py` and a single `python` process.

    rt = init_distributed(cfg)                  # env rendezvous (RANK, WORLD_SIZE, ...); gloo on CPU
    eng = TrainEngine(cfg, ds_json, rt)         # ZeRO data-parallel, or a pipeline when pipeline_stages > 1
    loss = eng.train_step(data_iter)            # one optimizer step over the global batch
    val = eng.eval_loss(batches)                # mean nats/token over all data-parallel ranks

Data: in data-parallel mode every rank reads its own (inputs, labels) micro-batches; in pipeline mode
only the first and last stage read, and both read the stream of their data-parallel rank, so they see the
same samples in the same order (``reads_data``, ``dp_rank``).
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from hgscale.config import Config
from hgscale.core.net import free_port
from hgscale.core.schedule import lr_multiplier
from hgscale.core.status import InfraError
from hgscale.models import HourglassLM, lm_loss
from hgscale.models.dropout import DropoutKeys
from hgscale.models.loss import lm_loss_sum
from hgscale.training.pipeline import pipeline_module, stage_parts
from hgscale.training.recompute import recompute_in_backward, recomputed_layers


@dataclass
class Runtime:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    backend: str


def world_from_env() -> int:
    """World size from the launcher's env; a bare `python` run becomes rank 0 of a world of one."""
    if "RANK" not in os.environ and "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    os.environ.setdefault("LOCAL_RANK", os.environ.get("RANK", "0"))
    return int(os.environ.get("WORLD_SIZE", "1"))


SHM_SEGMENT = "/dev/shm/deepspeed_allreduce_buffer_{uid}_{addr}_{port}_{rank}"  # DeepSpeed's cpu/comm/shm.cpp


def release_shm_segment(dist) -> Path | None:
    """Unlink this rank's DeepSpeed shared-memory allreduce segment once every rank has mapped it.

    With all ranks on one host (LOCAL_SIZE == WORLD_SIZE, CPU backends), DeepSpeed's init creates a 67 MB
    segment per rank in /dev/shm, maps every rank's, and never unlinks them: each run, finished or killed,
    would leave them in memory until reboot. After a barrier every rank has mapped every segment, so the
    names can go: the mappings stay valid, and the memory is freed when the last rank exits, however it
    exits. Returns the path removed, if any."""
    if os.environ.get("LOCAL_SIZE") != os.environ.get("WORLD_SIZE"):
        return None  # ranks on several hosts: DeepSpeed creates no segment
    path = Path(SHM_SEGMENT.format(uid=os.getuid(), addr=os.environ.get("MASTER_ADDR", ""),
                                   port=os.environ.get("MASTER_PORT", ""), rank=dist.get_rank()))
    if dist.get_world_size() > 1:
        dist.barrier()  # every rank has mapped every segment
    if not path.exists():
        return None  # DeepSpeed's shared-memory op is not built here
    path.unlink(missing_ok=True)
    return path


def leave_process_group(status: int, clean: bool) -> int:
    """The exit of a training process: returns ``status`` after a clean end, never returns otherwise.

    ``clean``: every rank passed the final barrier, so the process group is destroyed and the interpreter
    finalizes as usual. Otherwise (an error raised on some ranks) the process exits at once: gloo's worker
    threads still alive at interpreter finalization abort the process (SIGABRT, exit -6 in place of the status
    the launcher acts on), and destroying a group whose peers may still be inside a collective can block."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return status
    if clean:
        dist.destroy_process_group()
        return status
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


class RendezvousError(InfraError):
    """The process group could not form (the rendezvous store or a peer unreachable): exit INFRA, requeued."""


def init_distributed(cfg: Config) -> Runtime:
    import deepspeed
    import torch.distributed as dist

    world = world_from_env()
    local_rank = int(os.environ["LOCAL_RANK"])
    cuda = torch.cuda.is_available()
    backend = cfg.parallel.backend if cfg.parallel.backend != "auto" else ("nccl" if cuda else "gloo")
    if cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        from datetime import timedelta  # a lost rank ends a collective after parallel.timeout_s, not 30 min
        try:
            deepspeed.init_distributed(dist_backend=backend, verbose=False,
                                       timeout=timedelta(seconds=cfg.parallel.timeout_s))
        except dist.DistError as e:  # the store or a peer unreachable: the network or a node, not the config
            addr = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
            raise RendezvousError(f"rendezvous of {world} processes at {addr} failed ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0][:200]}) within parallel.timeout_s = "
                                  f"{cfg.parallel.timeout_s:g} s; a requeued job retries it") from None
        release_shm_segment(dist)
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if not cuda:
        # peaked softmax tails underflow into denormal floats, which halve CPU GEMM speed
        torch.set_flush_denormal(True)
    return Runtime(dist.get_rank(), local_rank, world, device, backend)


class LossModel(nn.Module):
    """HourglassLM plus its loss, the module DeepSpeed wraps in data-parallel mode."""

    def __init__(self, model: HourglassLM):
        super().__init__()
        self.model = model

    def forward(self, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """inputs, labels (B, T) -> the mean loss; with a sharded sequence, this rank's share of it (the shards'
        losses add up to the mean: hgscale.training.sequence)."""
        logits = self.model(inputs)  # (B, n, V): this rank's unpadded positions
        seq = self.model.seq
        if seq.size == 1:
            return lm_loss(logits, labels)
        mine = seq.shard_labels(labels, self.model.cfg.total_factor(), logits.shape[1])
        return lm_loss_sum(logits, mine) / labels.numel()


class _Timed:
    """Wraps a batch iterator and adds the time spent waiting in next() to ``seconds``."""

    def __init__(self, it, device):
        self.it, self.device, self.seconds = it, device, 0.0

    def __iter__(self):
        return self

    def __next__(self):
        t0 = time.perf_counter()
        x, y = next(self.it)
        self.seconds += time.perf_counter() - t0
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)


class TrainEngine:
    def __init__(self, cfg: Config, ds_json: dict, rt: Runtime, initial: dict | None = None):
        """``initial``: HourglassLM weights (model.init_from) loaded into the layers this rank builds, before
        DeepSpeed copies them into its optimizer's fp32 masters."""
        import deepspeed
        import torch.distributed as dist

        self.cfg, self.rt, self.dist = cfg, rt, dist
        self.pipeline = cfg.parallel.pipeline_stages > 1
        self.seq = None  # the sequence-parallel shard (parallel.sequence_parallel > 1)
        self.accum = cfg.train.grad_accum_steps
        torch.manual_seed(cfg.train.seed + rt.rank)  # weights are seeded per layer, dropout per layer and micro-batch
        scheduler = lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_multiplier(cfg))  # noqa: E731
        if self.pipeline:
            self.parts = stage_parts(cfg, cfg.parallel.pipeline_stages)
            module = pipeline_module(cfg, self.parts, initial)
        else:
            self.parts = None
            model = HourglassLM(cfg.model, seed=cfg.train.seed)
            if initial is not None:
                model.load_state_dict(initial)
            if cfg.parallel.sequence_parallel > 1:
                from hgscale.training.sequence import UlyssesSequence

                self.seq = UlyssesSequence(cfg.parallel.sequence_parallel)
                model.shard_sequence(self.seq)
            for i in recomputed_layers(cfg):
                recompute_in_backward(model.layers[i])
            module = LossModel(model)
        if cfg.train.compile:  # regional: per layer of this stage, after checkpointing wrapped them
            from hgscale.training.compile import compile_layers

            say = print if rt.rank == 0 else (lambda *a: None)
            compile_layers(module.forward_funcs if self.pipeline else module.model.layers, say=say,
                           retained_backward=self.pipeline, device=rt.device)
        params = [p for p in module.parameters() if p.requires_grad]
        self.engine, _, _, _ = deepspeed.initialize(model=module, config=ds_json, model_parameters=params,
                                                    lr_scheduler=scheduler, mpu=self.seq.groups if self.seq else None)
        if self.pipeline:
            grid = self.engine.grid
            self.stage_id, self.num_stages = self.engine.stage_id, self.engine.num_stages
            self.dp_rank, self.dp_size = grid.data_parallel_id, grid.data_parallel_size
            self.is_first, self.is_last = self.engine.is_first_stage(), self.engine.is_last_stage()
            from hgscale.training.pipe_timing import CommTimer
            self.comm = CommTimer(self.engine)
        else:  # the ranks sharing a sequence read the same batches
            self.stage_id, self.num_stages = 0, 1
            sp = cfg.parallel.sequence_parallel
            self.dp_rank, self.dp_size = rt.rank // sp, rt.world_size // sp
            self.is_first = self.is_last = True
        self.reads_data = self.is_first or self.is_last
        # masks from (seed, step, global micro-batch, layer[, sequence shard])
        self.dropout_keys = DropoutKeys(cfg.train.seed, self.seq.rank if self.seq else 0)
        first = self.parts[self.stage_id] if self.pipeline else 0
        layers = module.forward_funcs if self.pipeline else module.model.layers
        self.dropout_keys.attach(module, [(first + i, layer) for i, layer in enumerate(layers)])
        self.timings: dict[str, float] = {}
        self.applied_lr = float("nan")

    # ------------------------------------------------------------------------------------ training
    def train_step(self, data_iter) -> float:
        """One optimizer step over the global batch; returns the mean loss (nats/token) on every rank.
        ``timings`` gets data_s (waiting for batches), compute_s (fwd+bwd), optimizer_s and, in a pipeline,
        wait_s (waiting on the neighbouring stages)."""
        it = _Timed(data_iter, self.rt.device) if data_iter is not None else None
        # the lr this step's update uses, as the optimizer holds it (the scheduler moves it after the step)
        self.applied_lr = float(self.engine.get_lr()[0])
        self.dropout_keys.begin_step(self.engine.global_steps, self.dp_rank * self.accum)
        t0 = time.perf_counter()
        if self.pipeline:
            loss = float(self.engine.train_batch(it))
            total = time.perf_counter() - t0
            data_s, wait_s = (it.seconds if it else 0.0), self.comm.take()
            # forward, backward and the optimizer step all run inside train_batch: compute_s holds the three;
            # wait_s is the time spent in sends/receives, waiting on the neighbouring stages (the bubble)
            self.timings = {"data_s": data_s, "wait_s": wait_s, "compute_s": total - data_s - wait_s,
                            "optimizer_s": 0.0, "step_s": total}
        else:
            self.engine.train()
            acc = torch.zeros((), device=self.rt.device)
            for i in range(self.accum):
                x, y = next(it)
                loss_t = self.engine(x, y)
                self.engine.backward(loss_t)
                acc += loss_t.detach().float()
                if i < self.accum - 1:
                    self.engine.step()  # DeepSpeed only steps the optimizer at the accumulation boundary
            t1 = time.perf_counter()
            self.engine.step()
            t2 = time.perf_counter()
            acc /= self.accum
            if self.rt.world_size > 1:  # the sum of the sequence shards' losses, averaged over data parallelism
                self.dist.all_reduce(acc)
                acc /= self.dp_size
            loss = float(acc)
            self.timings = {"data_s": it.seconds, "compute_s": t1 - t0 - it.seconds, "optimizer_s": t2 - t1,
                            "step_s": time.perf_counter() - t0}
        return loss

    def grad_norm(self) -> float | None:
        g = self.engine.get_global_grad_norm()
        return None if g is None else float(g)

    def loss_scale(self) -> float | None:
        if self.cfg.train.precision != "fp16":
            return None
        s = getattr(self.engine.optimizer, "loss_scale", None) or getattr(self.engine.optimizer, "cur_scale", None)
        return None if s is None else float(s)

    def skipped_steps(self) -> int:
        return int(getattr(self.engine, "skipped_steps", 0))

    # ---------------------------------------------------------------------------------- evaluation
    def agree_min(self, n: int) -> int:
        """The smallest ``n`` over all ranks (ranks that read no data pass a large number)."""
        t = torch.tensor([n], dtype=torch.long, device=self.rt.device)
        self.dist.all_reduce(t, op=self.dist.ReduceOp.MIN)
        return int(t.item())

    def eval_loss(self, batches: list | None) -> float | None:
        """Mean loss over ``batches`` (this rank's (inputs, labels) list; None on stages that read no
        data), averaged over data-parallel ranks. All ranks call it; None if no rank has a batch."""
        B, T = self.cfg.train.micro_batch_size, self.cfg.data.seq_len
        if batches is not None:  # a pipeline's buffers have the training shape
            batches = [(x, y) for x, y in batches if tuple(x.shape) == (B, T)]
        n = self.agree_min(len(batches) if batches is not None else 1 << 30)
        if n == 0:
            return None
        if self.pipeline:
            it = iter([(x.to(self.rt.device), y.to(self.rt.device)) for x, y in batches[:n]]) if batches else None
            loss = float(self.engine.eval_batch(it, num_micro_batches=n))
            self.engine.module.train()
            return loss
        self.engine.eval()
        acc = torch.zeros((), device=self.rt.device)
        with torch.no_grad():
            for x, y in batches[:n]:
                acc += self.engine(x.to(self.rt.device), y.to(self.rt.device)).float()
        self.engine.train()
        acc /= n
        if self.rt.world_size > 1:
            self.dist.all_reduce(acc)
            acc /= self.dp_size
        return float(acc)

    # ---------------------------------------------------------------------------------- agreement
    def any_rank(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any (preemption signals, NaN stops)."""
        t = torch.tensor([1 if flag else 0], dtype=torch.long, device=self.rt.device)
        self.dist.all_reduce(t, op=self.dist.ReduceOp.MAX)
        return bool(t.item())

    def barrier(self) -> None:
        self.dist.barrier()

    def from_rank0(self, value):
        """Rank 0's ``value`` on every rank (a picklable object: an attempt id)."""
        box = [value]
        if self.rt.world_size > 1:
            self.dist.broadcast_object_list(box, src=0)
        return box[0]

    def topology(self) -> dict:
        from hgscale.training.layout import ParallelLayout

        lay = ParallelLayout.unchecked(self.cfg, self.rt.world_size)
        return {**lay.topology(self.parts), "backend": self.rt.backend, "device": str(self.rt.device)}
