"""The error of a dataset a user can fix (manifest, shard, split): a kind of storage error, so one ``except
StorageError`` catches both a missing object and a corrupt shard."""
from hgscale.core.storage import StorageError


class DataError(StorageError):
    """A problem with a dataset a user can fix (URL, manifest, shard, split); the message says how."""
