"""What a run records once: flattened config with secrets masked, versions, git commit, dataset summary."""
from __future__ import annotations

import importlib.metadata
import json
import platform
import subprocess
import sys
from pathlib import Path

from hgscale.core.secrets import MASK, is_secret_key, mask_args, mask_secrets, mask_value  # noqa: F401


def flatten(obj, prefix: str = "", sep: str = ".") -> dict[str, str]:
    """{"a": {"b": 1, "c": [1, 2]}} -> {"a.b": "1", "a.c": "[1, 2]"}; lists stay one JSON value."""
    out: dict[str, str] = {}
    if isinstance(obj, dict):
        if not obj and prefix:
            out[prefix] = "{}"
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}{sep}{k}" if prefix else str(k), sep))
    elif isinstance(obj, (list, tuple)):
        out[prefix] = json.dumps(obj, default=str)
    elif isinstance(obj, bool) or obj is None:
        out[prefix] = json.dumps(obj)
    else:
        out[prefix] = str(obj)
    return out


def _dist_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def versions() -> dict[str, str]:
    """Versions that decide numerics and speed; deepspeed by metadata (importing it costs seconds)."""
    import torch

    out = {"python": platform.python_version(), "torch": torch.__version__,
           "deepspeed": _dist_version("deepspeed"), "mlflow": _dist_version("mlflow"),
           "hgscale": _dist_version("hgscale"), "cuda": torch.version.cuda or "none",
           "platform": platform.platform()}
    if torch.cuda.is_available():
        try:
            out["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        except Exception:  # noqa: BLE001 - builds without NCCL
            out["nccl"] = "none"
        out["gpu"] = torch.cuda.get_device_name(0)
        out["gpu_count_per_node"] = str(torch.cuda.device_count())
    return out


def git_info(path: str | Path | None = None) -> dict[str, str]:
    """Commit and dirty flag of the checkout holding ``path`` (default: this package); {} outside git."""
    cwd = Path(path or Path(__file__).resolve().parent)
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                                timeout=10).stdout.strip()
        if not commit:
            return {}
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return {"commit": commit, "dirty": str(bool(dirty)).lower()}
    except (OSError, subprocess.SubprocessError):
        return {}


def manifest_summary(manifest: dict | None) -> dict[str, str]:
    """Scalars of a dataset manifest (two levels deep) and the sizes of its lists, e.g. number of shards."""
    if not manifest:
        return {}
    out: dict[str, str] = {}

    def walk(obj, prefix, depth):
        for k, v in obj.items():
            key = f"{prefix}.{k}" if prefix else str(k)
            if isinstance(v, dict):
                if depth < 2:
                    walk(v, key, depth + 1)
                else:
                    out[key + ".n"] = str(len(v))
            elif isinstance(v, (list, tuple)):
                out[key + ".n"] = str(len(v))
            else:
                out[key] = str(v)
    walk(manifest, "", 0)
    return dict(list(out.items())[:200])   # a manifest is a summary, not a second copy of the data


def command_line(argv: list[str] | None = None) -> str:
    """The command that started the run (program name and masked arguments, see ``mask_args``)."""
    argv = list(sys.argv if argv is None else argv)
    return " ".join([Path(argv[0]).name if argv else "python", *mask_args(argv[1:])])[:6000]
