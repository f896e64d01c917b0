"""Images as sequences of pixel bytes: downsampled ImageNet 32x32 / 64x64 and CIFAR-10.

    python -m data_pipelines.images imagenet32 --source ~/data/Imagenet32 --out s3://bucket/imagenet32
    python -m data_pipelines.images imagenet64 --source ~/data/Imagenet64 --out DIR
    python -m data_pipelines.images cifar10 --source ~/data/cifar-10-python.tar.gz --out DIR

Inputs are the official formats:
- downsampled ImageNet (Chrabaszcz et al. 2017): ``train_data_batch_1..10.npz`` and ``val_data.npz``
  under ``--source`` (any depth), each with ``data`` (N, 3*H*W) uint8 in planar order (all R, all G,
  all B; rows top to bottom) and 1-based ``labels``;
- CIFAR-10: the python pickles ``data_batch_1..5`` and ``test_batch`` (a directory, or the
  ``cifar-10-python.tar.gz`` archive), same planar layout, 32x32.

Each image becomes 3*H*W tokens (vocabulary 256) in raster order with RGB interleaved, as in the
paper: r(0,0) g(0,0) b(0,0) r(0,1) ... . Splits: train = the training batches minus the last
``--holdout`` images (= valid); test = the official validation / test set (the paper's reported set).
"""
from __future__ import annotations

import argparse
import io
import pickle
import re
import sys
import tarfile
from pathlib import Path
from typing import Iterator

import numpy as np

from hgscale.data.errors import DataError

from . import run_cli
from .shards import DatasetWriter, add_storage_args, opts_from_args, summary

DATASETS = {"imagenet32": 32, "imagenet64": 64, "cifar10": 32}
HOLDOUT = {"imagenet32": 10_000, "imagenet64": 10_000, "cifar10": 5_000}
IMAGES_PER_SAMPLE = 64  # tar members per image would cost 50 % in headers; a block costs < 1 %


def planar_to_raster(data: np.ndarray, side: int) -> np.ndarray:
    """(N, 3*H*W) planar RGB -> (N, H*W*3) raster order, RGB interleaved per pixel."""
    n = data.shape[0]
    if data.shape[1] != 3 * side * side:
        raise DataError(f"images have {data.shape[1]} values each; {side}x{side} RGB needs {3 * side * side}")
    return np.ascontiguousarray(data.reshape(n, 3, side, side).transpose(0, 2, 3, 1).reshape(n, -1))


def _natural(path: Path) -> tuple:
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name))


def imagenet_batches(source: Path, split: str) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(data, labels) of each official npz batch of ``split`` ('train' or 'val'), in order."""
    pattern = "train_data_batch_*.npz" if split == "train" else "val_data.npz"
    files = sorted(source.rglob(pattern), key=_natural)
    if not files:
        raise DataError(f"no {pattern} under {source}; unpack the official downsampled-ImageNet npz archives there")
    for f in files:
        with np.load(f) as z:
            if "data" not in z or "labels" not in z:
                raise DataError(f"{f} lacks 'data' / 'labels'; it is not an official downsampled-ImageNet batch")
            yield np.asarray(z["data"], dtype=np.uint8), np.asarray(z["labels"]).astype(np.int64) - 1  # 0-based


def cifar_batches(source: Path, split: str) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(data, labels) of each CIFAR-10 python batch of ``split`` ('train' or 'val')."""
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    if source.is_file() and tarfile.is_tarfile(source):
        with tarfile.open(source) as tar:
            members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
            blobs = [tar.extractfile(members[n]).read() if n in members else None for n in names]
    else:
        paths = {p.name: p for p in source.rglob("*_batch*")} if source.is_dir() else {}
        blobs = [paths[n].read_bytes() if n in paths else None for n in names]
    for name, blob in zip(names, blobs, strict=True):
        if blob is None:
            raise DataError(f"CIFAR-10 batch {name} not found in {source}; pass the cifar-10-batches-py directory or "
                            f"cifar-10-python.tar.gz")
        d = pickle.load(io.BytesIO(blob), encoding="bytes")
        yield np.asarray(d[b"data"], dtype=np.uint8), np.asarray(d[b"labels"], dtype=np.int64)


def prepare(dataset: str, source: str, out: str, holdout: int | None = None, shard_bytes: int = 4 << 20,
            opts: dict | None = None, progress: bool = True, overwrite: bool = True) -> dict:
    if dataset not in DATASETS:
        raise DataError(f"dataset {dataset!r} is not one of {', '.join(DATASETS)}")
    side = DATASETS[dataset]
    src = Path(source).expanduser()
    if not src.exists():
        raise DataError(f"--source {source} does not exist")
    batches = cifar_batches if dataset == "cifar10" else imagenet_batches
    holdout = HOLDOUT[dataset] if holdout is None else holdout
    with DatasetWriter(out, name=dataset, modality="image", vocab_size=256, shard_bytes=shard_bytes, opts=opts,
                       overwrite=overwrite, extra={"sample_tokens": 3 * side * side, "image_shape": [side, side, 3],
                                                   "source": {"format": "npz" if dataset != "cifar10" else "pickle",
                                                              "holdout": holdout}}) as w:
        # one batch file in memory at a time (ImageNet64 is 16 GB): the last `holdout` images seen so
        # far wait in `tail`; whatever is older than that is training data
        tail_px, tail_y = np.zeros((0, 3 * side * side), np.uint8), np.zeros(0, np.int64)
        for data, y in _progress(batches(src, "train"), progress, "train batches"):
            tail_px = np.concatenate([tail_px, planar_to_raster(data, side)])
            tail_y = np.concatenate([tail_y, y])
            cut = len(tail_px) - holdout
            if cut > 0:
                _write_images(w, "train", tail_px[:cut], tail_y[:cut])
                tail_px, tail_y = tail_px[cut:], tail_y[cut:]
        if "train" not in w.splits:
            raise DataError(f"--holdout {holdout} leaves no training images out of {len(tail_px)}")
        _write_images(w, "valid", tail_px, tail_y)
        for data, y in _progress(batches(src, "val"), progress, "test batches"):
            _write_images(w, "test", planar_to_raster(data, side), y)
    return w.manifest()


def _progress(it, on: bool, desc: str):
    if not on:
        return it
    from tqdm import tqdm
    return tqdm(it, desc=desc, unit="file")


def _write_images(w: DatasetWriter, split: str, px: np.ndarray, labels: np.ndarray) -> None:
    """(N, H*W*3) images as samples of IMAGES_PER_SAMPLE images each."""
    for i in range(0, len(px), IMAGES_PER_SAMPLE):
        w.add(split, px[i:i + IMAGES_PER_SAMPLE].reshape(-1), label=labels[i:i + IMAGES_PER_SAMPLE])
    w.add_bytes(split, px.size)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_pipelines.images", description=__doc__.splitlines()[0])
    p.add_argument("dataset", choices=sorted(DATASETS))
    p.add_argument("--source", required=True, help="directory of the official npz batches / CIFAR pickles or tar.gz")
    p.add_argument("--holdout", type=int, default=None, help="training images held out as the valid split")
    p.add_argument("--no-progress", action="store_true")
    add_storage_args(p)
    args = p.parse_args(argv)
    m = prepare(args.dataset, args.source, args.out, args.holdout, args.shard_bytes, opts_from_args(args),
                not args.no_progress, not args.no_overwrite)
    print(summary(m, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
