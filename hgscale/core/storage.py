"""Storage access for shards: fsspec filesystems (local, file://, s3://), retries, clear errors.

One place decides how a URL is opened, so the shard writers (data_pipelines) and the streaming
reader (hgscale.data) see the same endpoint, region and credentials:

- S3 endpoint and region come from ``data.s3_endpoint_url`` / ``data.s3_region`` or the usual
  ``AWS_ENDPOINT_URL(_S3)`` / ``AWS_DEFAULT_REGION`` variables; credentials only from the AWS
  environment (``AWS_ACCESS_KEY_ID`` ...) or profile, so they never enter a config, a log or MLflow.
- s3fs's and botocore's own silent retries are switched off: :func:`read_bytes` retries transient
  errors itself, with exponential back-off, and reports each one (counted and logged by the caller).
- webdataset's ``gopen`` gets an ``s3`` handler (webdataset 1.0 has none) that opens through s3fs,
  so ``webdataset.WebDataset("s3://...")`` pipelines read the same shards with the same settings.

The stream's workers read whole shards with fsspec and parse them with the standard tarfile module:
importing the webdataset package imports torch (1-3 s per worker start on a small machine), which
the workers do not otherwise need. Neither is imported here at module level.
"""
from __future__ import annotations

import errno
import hashlib
import os
import sys
import time
from typing import Any, Callable

import fsspec

from hgscale.core.status import InfraError, UserError


class StorageError(UserError):
    """Storage that cannot be used as asked (a missing object, wrong credentials, an unknown bucket): the message
    names the URL and the fix. Datasets raise their own kind of it (hgscale.data.DataError)."""


class StorageUnavailable(StorageError, InfraError):
    """Storage that kept failing after every retry (an outage, not a wrong URL): a requeued job may succeed."""


#: Options shared by writers and readers; plain values only (picklable, no secrets).
DEFAULT_OPTIONS = dict(endpoint_url="", region="", retries=5, retry_backoff_s=0.5, timeout_s=60.0)


def storage_options(data_cfg: Any = None, **overrides) -> dict:
    """Storage options from a DataConfig (or defaults), with keyword overrides."""
    opts = dict(DEFAULT_OPTIONS)
    if data_cfg is not None:
        opts.update(endpoint_url=data_cfg.s3_endpoint_url, region=data_cfg.s3_region,
                    retries=data_cfg.retries, retry_backoff_s=data_cfg.retry_backoff_s,
                    timeout_s=getattr(data_cfg, "request_timeout_s", DEFAULT_OPTIONS["timeout_s"]))
    opts.update({k: v for k, v in overrides.items() if v is not None})
    return opts


def _s3_kwargs(opts: dict) -> dict:
    endpoint = opts.get("endpoint_url") or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    region = opts.get("region") or os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
    timeout = float(opts.get("timeout_s") or DEFAULT_OPTIONS["timeout_s"])
    kw: dict = dict(
        config_kwargs={"retries": {"total_max_attempts": 1}, "connect_timeout": timeout, "read_timeout": timeout},
        client_kwargs={},
    )
    if endpoint:
        kw["endpoint_url"] = endpoint
    if region:
        kw["client_kwargs"]["region_name"] = region
    return kw


def filesystem(url: str, opts: dict | None = None):
    """(fsspec filesystem, path inside it) for a local path, file:// or s3:// URL."""
    opts = opts or DEFAULT_OPTIONS
    proto = url.split("://", 1)[0] if "://" in url else "file"
    if proto in ("s3", "s3a"):
        return _s3fs(opts), url.split("://", 1)[1]
    if proto == "file":
        return fsspec.filesystem("file"), url.split("://", 1)[1] if "://" in url else url
    return fsspec.core.url_to_fs(url)


_S3_CACHE: dict = {}
_CRED_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
              "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION")


def _s3fs(opts: dict):
    """One S3FileSystem per process, options and credentials: changed AWS_* variables give a new one
    (fsspec's own instance cache would keep using the old keys). The key is a digest, never the secret."""
    import s3fs
    kw = _s3_kwargs(opts)
    env = "\0".join(os.environ.get(k, "") for k in _CRED_VARS)
    key = (repr(sorted(kw.items())), hashlib.sha256(env.encode()).hexdigest())
    fs = _S3_CACHE.get(key)
    if fs is None:
        fs = _S3_CACHE[key] = s3fs.S3FileSystem(**{**kw, "skip_instance_cache": True})
        fs.retries = 1  # with_retries retries, counts and logs; s3fs would retry silently
    return fs


def join(root: str, rel: str) -> str:
    return root.rstrip("/") + "/" + rel.lstrip("/")


# ------------------------------------------------------------------------------------ error handling

def _transient_types() -> tuple:
    out: list = [ConnectionError, TimeoutError]
    try:
        from s3fs.core import S3_RETRYABLE_ERRORS
        out += list(S3_RETRYABLE_ERRORS)
    except ImportError:  # s3fs not installed: local paths only
        pass
    try:
        import botocore.exceptions as be
        out += [be.EndpointConnectionError, be.ConnectionClosedError, be.ReadTimeoutError,
                be.ConnectTimeoutError, be.ResponseStreamingError]
    except (ImportError, AttributeError):
        pass
    try:
        import aiohttp
        out += [aiohttp.ClientError]
    except ImportError:
        pass
    return tuple(out)


_TRANSIENT_ERRNO = {errno.EREMOTEIO, errno.EBUSY, errno.ECONNRESET, errno.ECONNABORTED, errno.EPIPE,
                    errno.ETIMEDOUT, errno.EAGAIN}


def is_transient(exc: BaseException) -> bool:
    """Connection resets, timeouts, 5xx and throttling: worth another try. Missing objects and
    denied access are not."""
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, StorageError)):
        return False
    if isinstance(exc, _transient_types()):
        return True
    if isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNO:
        return True
    text = str(exc)
    return any(s in text for s in ("InternalError", "ServiceUnavailable", "SlowDown", "(500)", "(503)",
                                    "Connection reset", "Server disconnected"))


def user_error(url: str, exc: BaseException, what: str = "read") -> StorageError | None:
    """A StorageError naming ``url`` and the fix for errors the user can fix, else None.
    Never includes credentials: botocore messages name neither the key nor the secret."""
    name = type(exc).__name__
    if isinstance(exc, FileNotFoundError):
        kind = "bucket" if "bucket" in str(exc).lower() else "object"
        return StorageError(f"cannot {what} {url}: no such {kind} (FileNotFoundError); check data.url, that the "
                         f"dataset was written there, and data.s3_endpoint_url")
    if isinstance(exc, PermissionError) or "InvalidAccessKeyId" in str(exc) or "SignatureDoesNotMatch" in str(exc):
        return StorageError(f"cannot {what} {url}: access denied ({_short(exc)}); the storage credentials are wrong "
                         f"or lack permission: check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)")
    if name in ("NoCredentialsError", "PartialCredentialsError"):
        return StorageError(f"cannot {what} {url}: no storage credentials found; set AWS_ACCESS_KEY_ID and "
                         f"AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)")
    return None


def _short(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:200]


def with_retries(url: str, fn: Callable[[], Any], opts: dict, on_retry: Callable[[str], None] | None = None,
                 what: str = "read") -> Any:
    """Call ``fn`` until it succeeds; transient errors are retried up to ``opts['retries']`` attempts
    in all, waiting retry_backoff_s, 2x, 4x ... between them. ``on_retry(message)`` is told of each."""
    attempts = max(1, int(opts.get("retries", 5)))
    delay = float(opts.get("retry_backoff_s", 0.5))
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - classified below
            err = user_error(url, exc, what)
            if err is not None:
                raise err from None
            if not is_transient(exc):
                raise
            if attempt == attempts:
                raise StorageUnavailable(f"cannot {what} {url}: storage kept failing after {attempts} attempts "
                                f"(last error: {type(exc).__name__}: {_short(exc)}); check the endpoint and "
                                f"network, or raise data.retries") from None
            if on_retry is not None:
                on_retry(f"transient storage error on {url} ({type(exc).__name__}: {_short(exc)}); "
                         f"retry {attempt}/{attempts - 1} in {delay:.2f} s")
            time.sleep(delay)
            delay *= 2


def read_bytes(url: str, opts: dict, on_retry: Callable[[str], None] | None = None) -> bytes:
    """The whole object at ``url`` (one GET on S3), retrying transient errors."""
    fs, path = filesystem(url, opts)
    return with_retries(url, lambda: fs.cat_file(path), opts, on_retry)


# --------------------------------------------------------------------------------- webdataset hook

_GOPEN_OPTS: dict = {}


def _gopen_s3(url: str, mode: str = "rb", bufsize: int = 8192, **kw):
    fs, path = filesystem(url, _GOPEN_OPTS or DEFAULT_OPTIONS)
    return fs.open(path, mode)


def register_gopen(opts: dict | None = None) -> None:
    """Teach ``webdataset.gopen`` the s3:// scheme (opened through s3fs with ``opts``)."""
    import webdataset.gopen  # noqa: F401 - the module object lives in sys.modules
    _GOPEN_OPTS.clear()
    _GOPEN_OPTS.update(opts or DEFAULT_OPTIONS)
    schemes = sys.modules["webdataset.gopen"].gopen_schemes
    schemes["s3"] = _gopen_s3
    schemes["s3a"] = _gopen_s3
