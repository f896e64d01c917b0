"""The parallel layout of a run: the one owner of the world / stages / data-parallel / micro-batch /
accumulation arithmetic and of its error messages (as torchtitan's ParallelDims).

    lay = ParallelLayout.of(cfg, world_size)     # raises ConfigError naming the numbers when they do not fit
    lay.dp, lay.global_batch, lay.describe()

Pure Python: runs before any process group starts (preflight, the Slurm launcher, the DeepSpeed JSON).
"""
from __future__ import annotations

from dataclasses import dataclass

from hgscale.config import Config, ConfigError


@dataclass(frozen=True)
class ParallelLayout:
    world: int          # processes
    stages: int         # pipeline stages
    micro: int          # sequences per micro-batch per data-parallel rank
    accum: int          # micro-batches accumulated per optimizer step
    zero_stage: int
    sp: int = 1         # ranks sharing each sequence (parallel.sequence_parallel)

    @classmethod
    def of(cls, cfg: Config, world_size: int, source: str = "config") -> "ParallelLayout":
        lay = cls.unchecked(cfg, world_size)
        problems = lay.problems(cfg)
        if problems:
            raise ConfigError(problems, source)
        return lay

    @classmethod
    def unchecked(cls, cfg: Config, world_size: int) -> "ParallelLayout":
        """The layout as configured; ``train.grad_accum_steps = 0`` takes global_batch_size / (micro x dp), so the
        same config keeps its global batch on whatever world size a (shrunk) allocation gives (0 if it does not
        divide: :meth:`problems` says so)."""
        t, p = cfg.train, cfg.parallel
        accum = t.grad_accum_steps
        if accum == 0:
            per_step = t.micro_batch_size * (world_size // max(p.pipeline_stages * p.sequence_parallel, 1))
            accum = t.global_batch_size // per_step if per_step and t.global_batch_size % per_step == 0 else 0
        return cls(world_size, p.pipeline_stages, t.micro_batch_size, accum, p.zero_stage, p.sequence_parallel)

    @staticmethod
    def implied_world(cfg: Config) -> int:
        """The processes a config's own numbers imply: stages x ranks sharing a sequence x the data-parallel size
        that train.global_batch_size / (micro_batch_size x grad_accum_steps) gives (1 when it gives none)."""
        t, p = cfg.train, cfg.parallel
        per_rank = t.micro_batch_size * t.grad_accum_steps
        dp = t.global_batch_size // per_rank if per_rank and t.global_batch_size % per_rank == 0 else 1
        return p.pipeline_stages * p.sequence_parallel * max(dp, 1)

    def resolve(self, cfg: Config) -> Config:
        """``cfg`` with this layout's accumulation written in (for train.grad_accum_steps = 0), for everything that
        reads the config after the world size is known."""
        cfg.train.grad_accum_steps = self.accum
        return cfg

    @property
    def dp(self) -> int:
        """Data-parallel size: processes per pipeline stage, over the ranks that share a sequence."""
        return self.world // max(self.stages * self.sp, 1)

    @property
    def _dp_equation(self) -> str:
        sp = f" / {self.sp} sharing a sequence" if self.sp > 1 else ""
        return f"{self.world} processes / {self.stages} stages{sp}"

    @property
    def global_batch(self) -> int:
        """Sequences per optimizer step = micro x accumulation x data-parallel size."""
        return self.micro * self.accum * self.dp

    def problems(self, cfg: Config) -> list[str]:
        """Why ``cfg`` cannot run on this many processes, each with the equation and its numbers."""
        if self.stages < 1 or self.world % self.stages:
            return [f"world size {self.world} is not divisible by parallel.pipeline_stages = {self.stages}: "
                    f"launch a multiple of {self.stages} processes"]
        out = self._sequence_problems(cfg)
        if out:
            return out
        want = cfg.train.global_batch_size
        if cfg.train.grad_accum_steps == 0 and not want:
            return ["train.grad_accum_steps = 0 derives the accumulation from train.global_batch_size, which is 0: "
                    "set train.global_batch_size (or grad_accum_steps >= 1)"]
        if cfg.train.grad_accum_steps == 0 and self.accum == 0:
            return [f"train.global_batch_size = {want} is not a multiple of micro_batch_size {self.micro} x "
                    f"data-parallel size {self.dp} (= {self._dp_equation}), so no "
                    f"grad_accum_steps reaches it: choose a global batch divisible by {self.micro * self.dp}"]
        if want and want != self.global_batch:
            out.append(f"train.global_batch_size = {want} != micro_batch_size {self.micro} x grad_accum_steps "
                       f"{self.accum} x data-parallel size {self.dp} (= {self._dp_equation}) = {self.global_batch}")
        if not cfg.model.problems() and self.stages > 1:
            n_layers = cfg.model.n_layers() + 2 + 2 * (len(cfg.model.levels()) // 2)
            if self.stages > n_layers:
                out.append(f"parallel.pipeline_stages = {self.stages} exceeds the {n_layers} pipeline layers "
                           f"of model.hierarchy {cfg.model.hierarchy!r}")
        return out

    def as_dict(self) -> dict:
        """The layout as checkpoints and run parameters record it."""
        return {"world_size": self.world, "pipeline_stages": self.stages, "data_parallel_size": self.dp,
                "sequence_parallel_size": self.sp, "micro_batch_size": self.micro, "grad_accum_steps": self.accum,
                "global_batch_size": self.global_batch, "zero_stage": self.zero_stage}

    def topology(self, stage_boundaries: list[int] | None) -> dict:
        """What a checkpoint records of the layout that wrote it (the keys a resume compares, and a few more)."""
        return {"world_size": self.world, "pipeline_stages": self.stages, "data_parallel_size": self.dp,
                "zero_stage": self.zero_stage, "stage_boundaries": stage_boundaries, "sequence_parallel_size": self.sp}

    def describe(self) -> str:
        sp = f" x {self.sp} sequence-parallel" if self.sp > 1 else ""
        return (f"{self.world} process(es), {self.stages} stage(s) x {self.dp} data-parallel{sp}, "
                f"ZeRO-{self.zero_stage}, global batch {self.global_batch} = micro {self.micro} x accumulation "
                f"{self.accum} x {self.dp}")

    def _sequence_problems(self, cfg: Config) -> list[str]:
        """What parallel.sequence_parallel = N needs: N ranks per sequence out of the world, heads to share out,
        and parts that can run on a shard (every length works: the embedding pads to a multiple of N x the total
        shortening factor, so every level's shards are equal and whole shortening windows)."""
        n, m = self.sp, cfg.model
        if n == 1:
            return []
        out = []
        if self.world % (self.stages * n):
            out.append(f"world size {self.world} is not divisible by parallel.sequence_parallel = {n} x "
                       f"pipeline_stages = {self.stages}: launch a multiple of {self.stages * n} processes")
        if self.stages > 1:
            out.append(f"parallel.sequence_parallel = {n} cannot be combined with pipeline_stages = {self.stages}: "
                       f"DeepSpeed's pipeline topology has no sequence axis; use sequence_parallel with "
                       f"pipeline_stages=1 (and data parallelism), or pipeline stages without it")
        if m.n_heads % n:
            fits = [d for d in range(2, m.n_heads + 1) if m.n_heads % d == 0]
            out.append(f"parallel.sequence_parallel = {n} does not divide model.n_heads = {m.n_heads}: each rank "
                       f"attends with n_heads / N heads; use one of {fits or [1]}")
        if m.vanilla_attention == "lsh":
            out.append("parallel.sequence_parallel > 1 with model.vanilla_attention = 'lsh': LSH attention sorts "
                       "the whole sequence by hash and has no sharded form; use vanilla_attention='full'")
        return out
