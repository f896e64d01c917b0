"""Checks between the config, the opened dataset and the checkpoint to resume from, made before any
process group starts (``hgscale/train.py`` turns the problems into one error message)."""
from __future__ import annotations

import os

from hgscale.checkpoint.layout import CheckpointError
from hgscale.checkpoint.manager import resume_point
from hgscale.config import Config
from hgscale.core.storage import StorageError, StorageUnavailable
from hgscale.training.layout import ParallelLayout


def _data_problems(cfg: Config, dataset, world_size: int) -> list[str]:
    out, d, t = [], cfg.data, cfg.train
    if dataset.vocab_size > cfg.model.vocab_size:
        out.append(f"the dataset at {dataset.root} has vocab_size {dataset.vocab_size} > model.vocab_size = "
                   f"{cfg.model.vocab_size}; set model.vocab_size={dataset.vocab_size}")
    for field in ("train_split",) + (("valid_split",) if t.eval_interval else ()):
        try:
            dataset.num_tokens(getattr(d, field))
        except StorageUnavailable:  # an outage: exit INFRA (requeued), not a problem to fix in the config
            raise
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


def read_amplification_warning(cfg: Config, dataset, world_size: int) -> str | None:
    """A warning when this many data-parallel ranks read more than 1 + 1/16 of the training split per epoch
    (the data order's lanes: hgscale/data/order.py), with what would read less."""
    from hgscale.data.order import SHARDS_PER_LANE, lane_count, lane_reads, read_amplification

    try:
        n_shards = len(dataset.manifest["splits"][cfg.data.train_split]["shards"])
    except (AttributeError, KeyError, TypeError):
        return None  # a mixture: each source has its own lanes
    dp, lanes = ParallelLayout.unchecked(cfg, world_size).dp, lane_count(n_shards)
    if lane_reads(lanes, dp) == 1.0:  # the ranks share no lane: only the shards lane boundaries cut, read twice
        return None
    reads = read_amplification(n_shards, dp)
    good = [d for d in (1, 2, 4, 8, 16, 32, 64) if d <= lanes and lanes % d == 0]
    return (f"warning: {dp} data-parallel ranks read about {reads:.2f}x the {n_shards}-shard split "
            f"{cfg.data.train_split!r} per epoch (its {lanes} lane(s) are shared by ranks): a data-parallel size "
            f"dividing {lanes} ({', '.join(map(str, good))}) reads it once, and more shards ({SHARDS_PER_LANE} per "
            f"lane, up to 64 lanes) allow more ranks")


def _layout(cfg: Config, world_size: int) -> dict:
    """The topology TrainEngine.topology() will report, known without starting it."""
    from hgscale.training.pipeline import stage_parts

    lay = ParallelLayout.unchecked(cfg, world_size)
    return lay.topology(stage_parts(cfg, lay.stages) if lay.stages > 1 else None)


def _checkpoint_problems(cfg: Config, world_size: int) -> list[str]:
    from hgscale.checkpoint.remote import is_remote, start_up_problems

    storage = start_up_problems(cfg)  # s3:// checkpoint.dir: bucket, credentials, staging dir
    if storage:
        return storage
    try:
        where = resume_point(cfg)
    except StorageUnavailable:  # an outage, not a problem of the config: raised, exit INFRA (requeued)
        raise
    except (CheckpointError, StorageError) as e:
        return [str(e)]
    if not where:
        return []
    from hgscale.training.compat import resume_problems

    names = None
    if is_remote(cfg.checkpoint.dir):  # what the store holds of the checkpoint (its hgscale.json alone is staged)
        from hgscale.checkpoint.remote import RemoteCheckpoints

        store = RemoteCheckpoints(cfg, int(os.environ.get("RANK", "0")), world_size)
        names = None if store.remote_conversion(where[1]) else store.file_names(where[1])
    # another layout is converted on resume; a different model, batch or an unconvertible layout is not
    return resume_problems(where[0] / where[1], cfg, world_size, _layout(cfg, world_size),
                           local=not is_remote(cfg.checkpoint.dir), names=names)


def convert_for_layout(cfg: Config, world_size: int, rank: int) -> None:
    """Before any process group: the checkpoint to resume from, converted to this run's layout if it has another
    (rank 0 converts, streaming, in this one process; the other ranks wait for the finished conversion), so no
    collective timeout bounds a conversion of a large model. On object storage the conversion is uploaded beside
    the checkpoint, and every rank downloads it."""
    from hgscale.checkpoint.layout import layout_changed, read_meta
    from hgscale.checkpoint.remote import is_remote
    from hgscale.checkpoint.reshard import convert_before_start

    where = resume_point(cfg)
    if where is None:
        return
    tag_dir = where[0] / where[1]
    if not layout_changed(read_meta(tag_dir)["topology"], _layout(cfg, world_size)):
        return
    if is_remote(cfg.checkpoint.dir):  # made once, uploaded beside the checkpoint, downloaded by every rank
        from hgscale.checkpoint.remote import RemoteCheckpoints
        from hgscale.checkpoint.reshard import convert

        RemoteCheckpoints(cfg, rank, world_size).share_conversion(where[1], convert)
    else:
        convert_before_start(tag_dir, rank)


def preflight(cfg: Config, dataset, world_size: int) -> list[str]:
    """Every problem found, as one sentence each; empty when the run can start."""
    from hgscale.checkpoint.export import init_from_problem

    init = init_from_problem(cfg.model) if cfg.model.init_from else None
    return _data_problems(cfg, dataset, world_size) + _checkpoint_problems(cfg, world_size) + ([init] if init else [])
