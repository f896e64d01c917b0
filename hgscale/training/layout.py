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
            per_step = t.micro_batch_size * (world_size // max(p.pipeline_stages, 1))
            accum = t.global_batch_size // per_step if per_step and t.global_batch_size % per_step == 0 else 0
        return cls(world_size, p.pipeline_stages, t.micro_batch_size, accum, p.zero_stage)

    def resolve(self, cfg: Config) -> Config:
        """``cfg`` with this layout's accumulation written in (for train.grad_accum_steps = 0), for everything that
        reads the config after the world size is known."""
        cfg.train.grad_accum_steps = self.accum
        return cfg

    @property
    def dp(self) -> int:
        """Data-parallel size: processes per pipeline stage."""
        return self.world // max(self.stages, 1)

    @property
    def global_batch(self) -> int:
        """Sequences per optimizer step = micro x accumulation x data-parallel size."""
        return self.micro * self.accum * self.dp

    def problems(self, cfg: Config) -> list[str]:
        """Why ``cfg`` cannot run on this many processes, each with the equation and its numbers."""
        if self.stages < 1 or self.world % self.stages:
            return [f"world size {self.world} is not divisible by parallel.pipeline_stages = {self.stages}: "
                    f"launch a multiple of {self.stages} processes"]
        out = []
        want = cfg.train.global_batch_size
        if cfg.train.grad_accum_steps == 0 and not want:
            return ["train.grad_accum_steps = 0 derives the accumulation from train.global_batch_size, which is 0: "
                    "set train.global_batch_size (or grad_accum_steps >= 1)"]
        if cfg.train.grad_accum_steps == 0 and self.accum == 0:
            return [f"train.global_batch_size = {want} is not a multiple of micro_batch_size {self.micro} x "
                    f"data-parallel size {self.dp} (= {self.world} processes / {self.stages} stages), so no "
                    f"grad_accum_steps reaches it: choose a global batch divisible by {self.micro * self.dp}"]
        if want and want != self.global_batch:
            out.append(f"train.global_batch_size = {want} != micro_batch_size {self.micro} x grad_accum_steps "
                       f"{self.accum} x data-parallel size {self.dp} (= {self.world} processes / {self.stages} "
                       f"stages) = {self.global_batch}")
        if not cfg.model.problems() and self.stages > 1:
            n_layers = cfg.model.n_layers() + 2 + 2 * (len(cfg.model.levels()) // 2)
            if self.stages > n_layers:
                out.append(f"parallel.pipeline_stages = {self.stages} exceeds the {n_layers} pipeline layers "
                           f"of model.hierarchy {cfg.model.hierarchy!r}")
        return out

    def as_dict(self) -> dict:
        """The layout as checkpoints and run parameters record it."""
        return {"world_size": self.world, "pipeline_stages": self.stages, "data_parallel_size": self.dp,
                "micro_batch_size": self.micro, "grad_accum_steps": self.accum,
                "global_batch_size": self.global_batch, "zero_stage": self.zero_stage}

    def topology(self, stage_boundaries: list[int] | None) -> dict:
        """What a checkpoint records of the layout that wrote it (the keys a resume compares, and a few more)."""
        return {"world_size": self.world, "pipeline_stages": self.stages, "data_parallel_size": self.dp,
                "zero_stage": self.zero_stage, "stage_boundaries": stage_boundaries}

    def describe(self) -> str:
        return (f"{self.world} process(es), {self.stages} stage(s) x {self.dp} data-parallel, ZeRO-{self.zero_stage}, "
                f"global batch {self.global_batch} = micro {self.micro} x accumulation {self.accum} x {self.dp}")
