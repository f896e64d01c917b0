"""What a rank stages and reads of a checkpoint on object storage: its private node-local staging directory, and
which files of a checkpoint each rank downloads on resume (or rank 0 to build a conversion).

    root = staging_root(cfg, rank)                  # <staging base>/<hash of checkpoint.dir>/rank00003
    stage, layers = stage_of(meta, rank)            # its pipeline stage and that stage's layer indices
    needed("mp_rank_01_model_states.pt", rank, stage, layers)
"""
from __future__ import annotations

import hashlib
import os
import re
import stat
import tempfile
from pathlib import Path

from hgscale.checkpoint.layout import COMPLETE, CONVERTED, META, RANK_FILE_RE, saved_dp
from hgscale.core.storage import StorageError

_LAYER_RE = re.compile(r"^layer_(\d+)-model_states\.pt$")


def default_staging_base() -> Path:
    """A per-user directory on node-local disk: $SLURM_TMPDIR or $TMPDIR when set, else the system temp dir."""
    tmp = os.environ.get("SLURM_TMPDIR") or os.environ.get("TMPDIR") or tempfile.gettempdir()
    return Path(tmp) / f"hgscale-staging-{os.getuid()}"


def private_dir(path: Path) -> Path:
    """``path`` created with mode 0700, or checked to be this user's and closed to others: in a shared temp dir
    another local user could otherwise plant files that this rank uploads or resumes from."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.lstat()
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise StorageError(f"checkpoint.staging_dir {str(path)!r} is not a private directory of this user (owner uid "
                           f"{st.st_uid}, mode {stat.S_IMODE(st.st_mode):o}; want uid {os.getuid()}, mode 700): "
                           f"remove it, or set checkpoint.staging_dir to a directory only you can write")
    return path


def staging_root(cfg, rank: int) -> Path:
    """checkpoint.staging_dir (default: :func:`default_staging_base`) / one folder per checkpoint URL / this rank."""
    base = Path(cfg.checkpoint.staging_dir) if cfg.checkpoint.staging_dir else default_staging_base()
    url_id = hashlib.sha256(cfg.checkpoint.dir.encode()).hexdigest()[:12]
    return base / url_id / f"rank{rank:05d}"


def needed(name: str, rank: int, stage: int, layers: range | None) -> bool:
    """Whether the rank at pipeline ``stage`` reads ``name`` of a checkpoint on resume: the metadata, its own rank
    file, its stage's files (DeepSpeed names them mp_rank_<stage>; ZeRO reads every data-parallel rank's
    optimizer slice of its stage) and, in a pipeline, the layer files of its stage."""
    m = RANK_FILE_RE.match(name)
    if m:
        return int(m.group(1)) == rank
    m = _LAYER_RE.match(name)
    if m:
        return layers is None or int(m.group(1)) in layers
    if "mp_rank_" in name:
        return f"mp_rank_{stage:02d}" in name
    return not name.startswith(".") and name not in (COMPLETE, CONVERTED)


def for_conversion(name: str) -> bool:
    """Whether ``name`` is read when a checkpoint of another layout is loaded from its conversion: the metadata and
    rank 0's file (the data position and meters are the same on every rank); the conversion itself comes apart."""
    return name in (META, "rank00000.pt")


def source_file(name: str) -> bool:
    """Whether rank 0 reads ``name`` to build a conversion: every file of the checkpoint, no markers."""
    return not name.startswith(".") and name not in (COMPLETE, CONVERTED)


def stage_of(meta: dict, rank: int) -> tuple[int, range | None]:
    """(pipeline stage of ``rank``, the layer indices it holds) from a checkpoint's topology (pipe-major ranks)."""
    topo = meta["topology"]
    stages = topo["pipeline_stages"]
    if stages <= 1:
        return 0, None
    stage = rank // saved_dp(topo)
    bounds = topo.get("stage_boundaries")
    if isinstance(bounds, list) and len(bounds) == stages + 1:
        return stage, range(bounds[stage], bounds[stage + 1])
    return stage, None
