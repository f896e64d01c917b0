"""Names and markers of a checkpoint directory, and durable writes: the one place that knows them.

    checkpoint.dir/
        latest                  the tag of the newest complete checkpoint (replaced atomically)
        step00001000/           DeepSpeed's files (model/optimizer/scheduler states, per stage and rank) plus
            hgscale.json        step, tracking run id, resolved config and DeepSpeed JSON (secrets masked), layout
            rank00003.pt        per rank: RNG states, data-stream position of its data-parallel rank, meters
            COMPLETE            written last, after every rank's files (and their directory) are on disk

Local and object-storage checkpoints (:mod:`hgscale.checkpoint.remote`) share these names; the layout keys
say which parallel layout wrote a checkpoint (another layout is converted by :mod:`hgscale.checkpoint.reshard`).
Imports neither torch nor deepspeed.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

from hgscale.core.status import UserError

COMPLETE, META, LATEST, UPLOADED = "COMPLETE", "hgscale.json", "latest", ".uploaded"
TAG_RE = re.compile(r"^step(\d{8,})$")
RANK_FILE_RE = re.compile(r"^rank(\d{5})\.pt$")
# what a checkpoint's optimizer state is tied to: another value needs a conversion (reshard)
LAYOUT_KEYS = ("world_size", "pipeline_stages", "zero_stage", "stage_boundaries", "sequence_parallel_size")
_LAYOUT_DEFAULTS = {"sequence_parallel_size": 1}  # what a checkpoint written before the key existed had
CONVERTED = "elastic"  # <tag>/elastic/: the per-parameter form a layout change is loaded from (reshard)


class CheckpointError(UserError):
    """A checkpoint that cannot be used; the message names it and the fix."""


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def tag_step(tag: str) -> int:
    return int(TAG_RE.match(tag).group(1))


def rank_file(tag_dir: Path, rank: int) -> Path:
    return Path(tag_dir) / f"rank{rank:05d}.pt"


def complete_tags(root: Path) -> list[str]:
    """Tags of ``root`` holding COMPLETE, oldest first."""
    root = Path(root)
    tags = [p.name for p in root.iterdir() if p.is_dir() and TAG_RE.match(p.name) and (p / COMPLETE).exists()] \
        if root.is_dir() else []
    return sorted(tags, key=tag_step)


def latest_tag(root: str | Path) -> str | None:
    """The newest complete checkpoint in ``root``: the one ``latest`` names, else the newest complete one."""
    root = Path(root)
    f = root / LATEST
    if f.is_file():
        tag = f.read_text().strip()
        if TAG_RE.match(tag) and (root / tag / COMPLETE).exists():
            return tag
    tags = complete_tags(root)
    return tags[-1] if tags else None


def newest_readable(tags: list[str], meta_of, warn) -> str | None:
    """The first of ``tags`` (newest first) whose hgscale.json reads (``meta_of(tag)`` raises CheckpointError when
    it does not); each one skipped is named by ``warn``: a corrupt newest checkpoint costs one interval, not the
    run. None without tags; when none of them reads, a CheckpointError (a fresh start would prune them all)."""
    for tag in tags:
        try:
            meta_of(tag)
            return tag
        except CheckpointError as e:
            warn(f"warning: skipping checkpoint {tag}: {e}; resuming from the one before it")
    if tags:
        raise CheckpointError(f"no complete checkpoint of {len(tags)} ({', '.join(tags[:3])}) can be read: move them "
                              f"away to start fresh, or set checkpoint.resume=never")
    return None


def resume_candidates(root: Path) -> list[str]:
    """Complete tags of ``root``, newest first, the one ``latest`` names at the front."""
    tags = complete_tags(root)[::-1]
    named = latest_tag(root)
    return [named] + [t for t in tags if t != named] if named else tags


def resolve(spec: str | Path) -> tuple[Path, str]:
    """(root, tag) for a checkpoint root (its latest) or one tag directory. Raises CheckpointError."""
    p = Path(spec)
    if (p / COMPLETE).exists():
        return p.parent, p.name
    if p.is_dir():
        tag = latest_tag(p)
        if tag:
            return p, tag
    raise CheckpointError(f"no complete checkpoint at {str(p)!r}: pass a checkpoint directory holding "
                          f"'{LATEST}' or a step directory holding '{COMPLETE}'")


def read_meta(tag_dir: Path) -> dict:
    """hgscale.json of a checkpoint; a missing or corrupt one is a CheckpointError naming the file."""
    f = Path(tag_dir) / META
    try:
        meta = json.loads(f.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {str(tag_dir)!r} has no {META}: it was not written by hgscale, or its "
                              f"save was cut short; pass another checkpoint") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint file {str(f)!r} is corrupt ({type(e).__name__}: {e}); resume from an "
                              f"earlier checkpoint or start fresh with checkpoint.resume=never") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("step"), int) or not isinstance(
            meta.get("topology"), dict) or not isinstance(meta.get("config"), dict):
        raise CheckpointError(f"checkpoint file {str(f)!r} is corrupt (no step, topology or config); resume from "
                              f"an earlier checkpoint or start fresh with checkpoint.resume=never")
    return meta


def saved_dp(t: dict) -> int:
    """Data-parallel size of a checkpoint's topology dict (older checkpoints record world and stages only)."""
    return t.get("data_parallel_size", t["world_size"] // max(t["pipeline_stages"], 1))


def zero_partitions(t: dict) -> int:
    """How many ranks of a pipeline stage hold a ZeRO partition each: data-parallel x sequence-parallel ranks."""
    return saved_dp(t) * t.get("sequence_parallel_size", 1)


def describe(t: dict) -> str:
    """'2 stage(s) x 1 data-parallel, ZeRO-1' (' x 2 sequence-parallel' when so) for a topology dict."""
    sp = t.get("sequence_parallel_size", 1)
    sp = f" x {sp} sequence-parallel" if sp > 1 else ""
    return f"{t['pipeline_stages']} stage(s) x {saved_dp(t)} data-parallel{sp}, ZeRO-{t['zero_stage']}"


def layout_changed(have: dict, want: dict) -> bool:
    return any(have.get(k, _LAYOUT_DEFAULTS.get(k)) != want.get(k, _LAYOUT_DEFAULTS.get(k)) for k in LAYOUT_KEYS)


# ------------------------------------------------------------------------------------- durable writes
def fsync_dir(path: Path) -> None:
    """Make a directory's entries (new, renamed or removed files) durable."""
    fd = os.open(str(path), os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file under ``root`` and every directory, deepest first (DeepSpeed's files included)."""
    root = Path(root)
    for dirpath, _, files in sorted(os.walk(root), key=lambda w: -w[0].count(os.sep)):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


def atomic_write(path: Path, text: str) -> None:
    """Write, fsync, rename over ``path``, fsync the directory: readers see the old or the new file, never half
    of one, and a power cut after the return keeps the new one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
