"""Checks between the config, the opened dataset and the checkpoint to resume from, made before any
process group starts (``hgscale/train.py`` turns the problems into one error message)."""
from __future__ import annotations

from hgscale.checkpoint.layout import CheckpointError
from hgscale.checkpoint.manager import resume_point
from hgscale.config import Config
from hgscale.core.storage import StorageError
from hgscale.training.layout import ParallelLayout


def _data_problems(cfg: Config, dataset, world_size: int) -> list[str]:
    out, d, t = [], cfg.data, cfg.train
    if dataset.vocab_size > cfg.model.vocab_size:
        out.append(f"the dataset at {dataset.root} has vocab_size {dataset.vocab_size} > model.vocab_size = "
                   f"{cfg.model.vocab_size}; set model.vocab_size={dataset.vocab_size}")
    for field in ("train_split",) + (("valid_split",) if t.eval_interval else ()):
        try:
            dataset.num_tokens(getattr(d, field))
        except StorageError as e:
            out.append(str(e))
            continue
        if field == "valid_split":
            dp = ParallelLayout.unchecked(cfg, world_size).dp
            have = dataset.eval_windows(d.valid_split, d.seq_len)
            if have < t.micro_batch_size * dp:
                out.append(f"split {d.valid_split!r} of {dataset.root} holds {have} windows of data.seq_len = "
                           f"{d.seq_len} tokens, fewer than one validation batch (micro_batch_size "
                           f"{t.micro_batch_size} x data-parallel size {dp}); lower them or set train.eval_interval=0")
    return out


def _checkpoint_problems(cfg: Config, world_size: int) -> list[str]:
    from hgscale.checkpoint.remote import start_up_problems
    storage = start_up_problems(cfg)  # s3:// checkpoint.dir: bucket, credentials, staging dir
    if storage:
        return storage
    try:
        where = resume_point(cfg)
    except (CheckpointError, StorageError) as e:
        return [str(e)]
    if not where:
        return []
    from hgscale.checkpoint.reshard import resume_problems
    from hgscale.training.pipeline import stage_parts

    p = cfg.parallel  # the layout TrainEngine.topology() will report, known without starting it
    want = {"world_size": world_size, "pipeline_stages": p.pipeline_stages, "zero_stage": p.zero_stage,
            "data_parallel_size": world_size // p.pipeline_stages,
            "stage_boundaries": stage_parts(cfg, p.pipeline_stages) if p.pipeline_stages > 1 else None}
    # another layout is converted on resume; a different model, batch or an unconvertible layout is not
    return resume_problems(where[0] / where[1], cfg, world_size, want)


def preflight(cfg: Config, dataset, world_size: int) -> list[str]:
    """Every problem found, as one sentence each; empty when the run can start."""
    return _data_problems(cfg, dataset, world_size) + _checkpoint_problems(cfg, world_size)
