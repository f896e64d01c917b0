"""Storage as the data layer and the preparation tools use it: :mod:`hgscale.core.storage`, with its errors
raised as :class:`~hgscale.data.errors.DataError` (an outage as DataUnavailable)."""
from __future__ import annotations

import functools

from hgscale.core import storage as _storage
from hgscale.core.storage import (  # noqa: F401 - the data layer's storage names, in one place
    StorageError,
    StorageUnavailable,
    is_transient,
    join,
    register_gopen,
    storage_options,
)

from .errors import as_data_error


def _data_errors(fn):
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except StorageError as e:
            raise as_data_error(e) from None
    return wrapped


filesystem = _data_errors(_storage.filesystem)
read_bytes = _data_errors(_storage.read_bytes)
with_retries = _data_errors(_storage.with_retries)


def user_error(url: str, exc: BaseException, what: str = "read"):
    """:func:`hgscale.core.storage.user_error` as a DataError (None when the error is not the user's to fix)."""
    err = _storage.user_error(url, exc, what)
    return None if err is None else as_data_error(err)
