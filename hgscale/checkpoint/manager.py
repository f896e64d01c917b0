"""Checkpoints of a training run: save, automatic resume and keep-last-N (layout of a checkpoint directory in
:mod:`hgscale.checkpoint.layout`).

A crash during a save leaves a directory without COMPLETE and ``latest`` still naming the previous
checkpoint; resume only ever reads complete checkpoints and the next successful save removes the debris.
An ``s3://`` checkpoint.dir has the same layout; ranks stage and upload through :mod:`hgscale.checkpoint.remote`.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import torch

from hgscale.checkpoint.layout import (
    COMPLETE,
    LATEST,
    META,
    TAG_RE,
    CheckpointError,
    atomic_write,
    complete_tags,
    fsync_tree,
    layout_changed,
    newest_readable,
    rank_file,
    read_meta,
    resolve,
    resume_candidates,
    tag_for,
    tag_step,
)
from hgscale.checkpoint.remote import RemoteCheckpoints, is_remote, remote_resume_point
from hgscale.config import Config
from hgscale.core.secrets import mask_secrets


def resume_point(cfg: Config) -> tuple[Path, str] | None:
    """(root, tag) to resume from according to checkpoint.resume ('auto', 'never' or a path), or None.
    Raises CheckpointError for a path that holds no complete checkpoint."""
    spec = cfg.checkpoint.resume
    if spec == "never":
        return None
    if spec == "auto":
        if is_remote(cfg.checkpoint.dir):  # newest complete remote tag, its metadata staged for the layout check
            return remote_resume_point(cfg, _warn)
        root = Path(cfg.checkpoint.dir)
        tag = newest_readable(resume_candidates(root), lambda t: read_meta(root / t), _warn)
        return (root, tag) if tag else None
    return resolve(spec)


def _warn(message: str) -> None:
    """A warning on rank 0's stderr (before any process group: RANK from the launcher)."""
    if os.environ.get("RANK", "0") == "0":
        print(message, file=sys.stderr, flush=True)


def rng_state() -> dict:
    st = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    np.random.set_state(st["numpy"])
    random.setstate(st["python"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


class CheckpointManager:
    """Saves and restores a :class:`hgscale.training.engine.TrainEngine` with our client state.

    All ranks call :meth:`save` and :meth:`load` together (DeepSpeed's save is collective).
    """

    def __init__(self, cfg: Config, engine, ds_json: dict):
        self.cfg, self.eng, self.ds_json = cfg, engine, ds_json
        self.root = Path(cfg.checkpoint.dir)
        self.rank = engine.rt.rank
        self.remote = None
        if is_remote(cfg.checkpoint.dir):  # each rank writes to node-local staging; a thread uploads it
            attempt = engine.from_rank0(uuid.uuid4().hex[:12])  # COLLECTIVE: one id per job attempt
            self.remote = RemoteCheckpoints(cfg, self.rank, engine.rt.world_size, attempt)
            self.root = self.remote.local

    def save(self, step: int, rank_state: dict, run_id: str | None, extra: dict | None = None) -> Path:
        tag = tag_for(step)
        if self.remote is not None:
            self.remote.stage()  # after the previous upload: staging holds one checkpoint per rank
            if self.rank == 0:
                self.remote.clear(tag)  # an earlier attempt's files of this step: before any rank uploads
        tag_dir = self.root / tag
        if self.rank == 0 or self.remote is not None:
            if tag_dir.exists():  # debris of an interrupted save of this same step
                shutil.rmtree(tag_dir)
            tag_dir.mkdir(parents=True)
        self.eng.barrier()
        self.eng.engine.save_checkpoint(str(self.root), tag=tag, client_state={"step": step}, save_latest=False)
        torch.save({"rng": rng_state(), **rank_state}, rank_file(tag_dir, self.rank))
        if self.rank == 0:
            # checkpoints get copied and shared: credentials in URLs or passthrough keys stay out of them
            meta = {"step": step, "run_id": run_id, "time": time.time(), "config": mask_secrets(self.cfg.to_dict()),
                    "attempt": self.remote.attempt if self.remote is not None else None,
                    "deepspeed": mask_secrets(self.ds_json), "topology": self.eng.topology(), **(extra or {})}
            atomic_write(tag_dir / META, json.dumps(meta, indent=1))
        if self.remote is not None:  # COMPLETE and latest follow once every rank's upload is done
            self.remote.upload(tag)
            return tag_dir
        self.eng.barrier()  # every rank's files are written
        if self.rank == 0:
            fsync_tree(tag_dir)  # DeepSpeed's files too: COMPLETE never names data still in the page cache
            atomic_write(tag_dir / COMPLETE, "")
            atomic_write(self.root / LATEST, tag)
            self._prune(keep=tag)
        self.eng.barrier()
        return tag_dir

    def _prune(self, keep: str) -> None:
        tags = complete_tags(self.root)
        n = max(self.cfg.checkpoint.keep_last, 1)
        doomed = [t for t in tags[:-n] if t != keep]
        newest = tag_step(keep)
        for p in self.root.iterdir():  # incomplete older directories: crashed saves
            m = TAG_RE.match(p.name)
            if p.is_dir() and m and not (p / COMPLETE).exists() and int(m.group(1)) < newest:
                doomed.append(p.name)
        for t in doomed:
            shutil.rmtree(self.root / t, ignore_errors=True)

    def load(self, root: Path, tag: str) -> dict:
        """Restore engine, optimizer, scheduler and this rank's client state; returns
        {"step", "run_id", "meta", **rank_state}. A checkpoint of another layout goes through
        :mod:`hgscale.checkpoint.reshard` (converted once, kept beside it)."""
        tag_dir = root / tag
        meta = read_meta(tag_dir)
        changed = layout_changed(meta["topology"], self.eng.topology())
        if self.remote is not None:  # only the files this rank reads (for a layout change: the conversion)
            self.remote.download(tag, meta, converted=changed)
        if changed:  # train.py's preflight checked it can be converted
            from hgscale.checkpoint.reshard import load_resharded
            return load_resharded(self, root, tag)
        path, _ = self.eng.engine.load_checkpoint(str(root), tag=tag, load_optimizer_states=True,
                                                  load_lr_scheduler_states=True)
        if path is None:
            raise CheckpointError(f"DeepSpeed could not load checkpoint {str(tag_dir)!r}")
        # our own run's file, written by this rank's predecessor: DeepSpeed's loader trusts it the same way
        state = torch.load(rank_file(tag_dir, self.rank), weights_only=False)
        set_rng_state(state.pop("rng"))
        return {"step": meta["step"], "run_id": meta.get("run_id"), "meta": meta, **state}

