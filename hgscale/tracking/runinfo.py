"""What a run records once: flattened config with secrets masked, versions, git commit, dataset summary."""
from __future__ import annotations

import importlib.metadata
import json
import platform
import re
import subprocess
import sys
from pathlib import Path

MASK = "***"
# A key segment (split on . _ - /) naming a credential. Only string values are masked: a number under a
# key like "bits_per_nat_token" is no secret.
_SECRET_WORDS = {"secret", "secrets", "password", "passwd", "pwd", "token", "apikey", "credential", "credentials",
                 "key", "auth", "authorization", "bearer", "signature", "private", "passphrase", "sessiontoken"}
_SECRET_KEY_RE = re.compile(r"(secret|password|passwd|api_?key|access_?key|private_?key|session_?token|"
                            r"auth_?token|access_?token|credential)", re.I)
# Values that are credentials whatever their key: AWS key ids, PEM private keys, bearer tokens,
# GitHub / Hugging Face / OpenAI-style tokens, and user:password@ inside URLs.
_SECRET_VALUE_RES = [
    re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"\bBearer\s+\S{8,}", re.I),
    re.compile(r"\b(ghp|gho|ghs|github_pat|hf|sk|xox[abp])[-_][A-Za-z0-9_-]{16,}\b"),
]
_URL_PASSWORD_RE = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<user>[^:/@\s]+):(?P<pw>[^@/\s]+)@", re.I)
_URL_QUERY_SECRET_RE = re.compile(r"([?&](?:[^=&]*(?:signature|token|secret|key|credential)[^=&]*)=)[^&\s]+", re.I)


def is_secret_key(key: str) -> bool:
    words = set(re.split(r"[._\-/ ]+", key.lower()))
    return bool(words & _SECRET_WORDS) or bool(_SECRET_KEY_RE.search(key))


def mask_value(value: str) -> str:
    """Mask credentials inside a string value (URL passwords and signed-URL query secrets keep the rest)."""
    for rx in _SECRET_VALUE_RES:
        if rx.search(value):
            return MASK
    value = _URL_PASSWORD_RE.sub(lambda m: f"{m['scheme']}{m['user']}:{MASK}@", value)
    return _URL_QUERY_SECRET_RE.sub(lambda m: m.group(1) + MASK, value)


def mask_secrets(obj, key: str = ""):
    """A deep copy of a JSON-like structure with secret-looking keys' string values and secret values masked."""
    if isinstance(obj, dict):
        return {k: mask_secrets(v, f"{key}.{k}" if key else str(k)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [mask_secrets(v, key) for v in obj]
    if isinstance(obj, str):
        leaf = key.rsplit(".", 1)[-1]
        if obj and is_secret_key(leaf) and not _plain_literal(obj):
            return MASK
        return mask_value(obj)
    return obj


def _plain_literal(value: str) -> bool:
    """Numbers, booleans and null written as strings ("3.2", "None"): settings, not credentials."""
    if value.strip().lower() in ("none", "null", "true", "false"):
        return True
    try:
        float(value)
        return True
    except ValueError:
        return False


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


def mask_args(args: list[str]) -> list[str]:
    """Command-line arguments with secret ``key=value`` overrides, the value after a ``--secret`` flag and
    credentials inside values masked."""
    out, hide_next = [], False
    for arg in args:
        if hide_next:
            out.append(MASK)
            hide_next = False
        elif "=" in arg and is_secret_key(arg.split("=", 1)[0].lstrip("-").rsplit(".", 1)[-1]):
            out.append(arg.split("=", 1)[0] + "=" + MASK)
        elif arg.startswith("--") and is_secret_key(arg[2:]):
            out.append(arg)
            hide_next = True
        else:
            out.append(mask_value(arg))
    return out


def command_line(argv: list[str] | None = None) -> str:
    """The command that started the run (program name and masked arguments, see ``mask_args``)."""
    argv = list(sys.argv if argv is None else argv)
    return " ".join([Path(argv[0]).name if argv else "python", *mask_args(argv[1:])])[:6000]
