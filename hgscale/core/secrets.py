"""Secret masking: credentials never reach logs, MLflow params, checkpoints or uploaded objects.

    mask_secrets({"data": {"url": "s3://AKIA...:pw@bucket"}})    # a deep copy with credentials masked
    mask_args(["train.aws_secret=abc"]) -> ["train.aws_secret=***"]
"""
from __future__ import annotations

import re

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
