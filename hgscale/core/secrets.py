"""Secret masking: credentials never reach logs, MLflow params, checkpoints or uploaded objects.

    mask_secrets({"data": {"url": "s3://AKIA...:pw@bucket"}})    # a deep copy with credentials masked
    mask_args(["train.aws_secret=abc"]) -> ["train.aws_secret=***"]

Under a secret-looking key every non-empty string is masked, digits included ({"token": "1234"}), except null and
boolean literals ("None", "false": settings) and numbers as text under a key that names a quantity per token
(``bytes_per_token``, ``bits_per_nat_token``: "per" makes it a rate, not a credential). Numbers that are not
strings are never masked. In URLs the password is masked (``https://user:***@host``), and the whole user-info
where it is a credential by itself: a user with no password (``https://***@host``, a token) and object-store URLs
(``s3://***@bucket``, whose user is an access key).
"""
from __future__ import annotations

import re

MASK = "***"
# A key segment (split on . _ - /) naming a credential. Only string values are masked: a number under a
# key like "bits_per_nat_token" is no secret, nor is "3.7" under one (see _is_rate_key).
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
# user-info: everything before the last "@" ahead of the host (a password may hold "@"); not across / ? # or blanks
_URL_USERINFO_RE = re.compile(r"(?P<scheme>(?P<proto>[a-z][a-z0-9+.-]*)://)(?P<info>[^/?#\s]+)@", re.I)
# schemes whose user name is itself a key (an access key id, an account key): the whole user-info is masked
_KEY_USER_SCHEMES = {"s3", "s3a", "s3n", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss", "r2", "wasb", "wasbs"}
_URL_QUERY_SECRET_RE = re.compile(r"([?&](?:[^=&]*(?:signature|token|secret|key|credential)[^=&]*)=)[^&\s]+", re.I)


def is_secret_key(key: str) -> bool:
    words = set(re.split(r"[._\-/ ]+", key.lower()))
    return bool(words & _SECRET_WORDS) or bool(_SECRET_KEY_RE.search(key))


def _is_rate_key(key: str) -> bool:
    """A key naming a quantity per something (bytes_per_token, bits_per_nat_token, tokens_per_s)."""
    return "per" in re.split(r"[._\-/ ]+", key.lower())


def _mask_userinfo(m: re.Match) -> str:
    user, has_password, _ = m["info"].partition(":")
    if has_password and user and m["proto"].lower() not in _KEY_USER_SCHEMES:
        return f"{m['scheme']}{user}:{MASK}@"  # user:password@ keeps the user name
    return f"{m['scheme']}{MASK}@"


def mask_value(value: str) -> str:
    """Mask credentials inside a string value (URL user-info and signed-URL query secrets keep the rest)."""
    for rx in _SECRET_VALUE_RES:
        if rx.search(value):
            return MASK
    value = _URL_USERINFO_RE.sub(_mask_userinfo, value)
    return _URL_QUERY_SECRET_RE.sub(lambda m: m.group(1) + MASK, value)


def mask_secrets(obj, key: str = ""):
    """A deep copy of a JSON-like structure with secret-looking keys' string values and secret values masked."""
    if isinstance(obj, dict):
        return {k: mask_secrets(v, f"{key}.{k}" if key else str(k)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [mask_secrets(v, key) for v in obj]
    if isinstance(obj, str):
        leaf = key.rsplit(".", 1)[-1]
        if obj and is_secret_key(leaf) and not _plain_literal(obj, leaf):
            return MASK
        return mask_value(obj)
    return obj


def _plain_literal(value: str, key: str) -> bool:
    """Null and booleans written as strings ("None", "false"), and numbers as text ("3.7") under a key that names
    a rate: settings, not credentials. Digits under any other secret key ({"token": "1234"}) may be a PIN or a
    numeric token."""
    if value.strip().lower() in ("none", "null", "true", "false"):
        return True
    if not _is_rate_key(key):
        return False
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
