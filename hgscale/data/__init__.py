"""Streaming reader of prepared datasets: WebDataset shards over fsspec (local, file://, s3://).

    ds = open_dataset(cfg.data)
    stream = ds.stream("train", micro_batch_size, seq_len, dp_rank, dp_size, seed, num_workers=2)
    for inputs, labels in stream: ...          # resumable: stream.state_dict() / load_state_dict()

See dataset.py (API), stream.py (workers, resume), reader.py (order), shards.py (format), errors.py
(DataError); storage (fsspec, retries, S3) is hgscale.core.storage.
"""
from .dataset import Dataset, open_dataset
from .errors import DataError
from .io import register_gopen, storage_options
from .shards import CorruptShard, load_manifest
from .stream import Stream

__all__ = ["CorruptShard", "DataError", "Dataset", "Stream", "load_manifest", "open_dataset", "register_gopen",
           "storage_options"]
