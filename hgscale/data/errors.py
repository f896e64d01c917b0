"""The errors of a dataset a user can fix (manifest, shard, split, or the storage it lives on): kinds of storage
error, so one ``except StorageError`` catches a missing object and a corrupt shard alike, while the data layer's
callers see DataError for everything a dataset does."""
from __future__ import annotations

from hgscale.core.storage import StorageError, StorageUnavailable


class DataError(StorageError):
    """A problem with a dataset a user can fix (URL, manifest, shard, split); the message says how."""


class DataUnavailable(DataError, StorageUnavailable):
    """The dataset's storage kept failing after every retry (an outage): a requeued job may succeed."""


def as_data_error(e: StorageError) -> DataError:
    if isinstance(e, DataError):
        return e
    return DataUnavailable(str(e)) if isinstance(e, StorageUnavailable) else DataError(str(e))
