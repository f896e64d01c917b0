"""Image grids as PNG files, written with zlib and struct only (no imaging library).

    images = tokens_to_images(tokens, (32, 32, 3))    # (N, H*W*C) raster-order bytes -> (N, H, W, C) uint8
    write_png("grid.png", image_grid(images, cols=4))
"""
from __future__ import annotations

import math
import struct
import zlib
from pathlib import Path

import numpy as np

PAD = 2        # pixels between cells and around the grid
FILL = 255     # colour of the padding (white)


def tokens_to_images(tokens, shape: tuple[int, int, int]) -> np.ndarray:
    """(N, H*W*C) byte tokens in raster order, channels interleaved per pixel -> (N, H, W, C) uint8."""
    arr = np.asarray(tokens, dtype=np.int64)
    if arr.min(initial=0) < 0 or arr.max(initial=0) > 255:
        raise ValueError("pixel tokens must lie in [0, 255]")
    if arr.size % math.prod(shape):
        raise ValueError(f"{arr.size} tokens are no whole number of {shape} images ({math.prod(shape)} tokens each)")
    return arr.astype(np.uint8).reshape(-1, *shape)


def cell_origin(index: int, cols: int, shape: tuple[int, int, int], pad: int = PAD) -> tuple[int, int]:
    """(row, column) of the top-left pixel of cell ``index`` of a grid with ``cols`` columns."""
    H, W, _ = shape
    r, c = divmod(index, cols)
    return pad + r * (H + pad), pad + c * (W + pad)


def image_grid(images: np.ndarray, cols: int | None = None, pad: int = PAD, fill: int = FILL) -> np.ndarray:
    """(N, H, W, C) uint8 -> one (rows*(H+pad)+pad, cols*(W+pad)+pad, 3) RGB image, row-major cells.
    Grey (C = 1) images are repeated to RGB. cols defaults to ceil(sqrt(N))."""
    if images.ndim != 4:
        raise ValueError(f"image_grid takes (N, H, W, C) images; got shape {images.shape}")
    N, H, W, C = images.shape
    if C not in (1, 3):
        raise ValueError(f"images have {C} channels; a PNG grid takes 1 (grey) or 3 (RGB)")
    cols = cols or max(1, math.ceil(math.sqrt(N)))
    rows = math.ceil(N / cols)
    out = np.full((rows * (H + pad) + pad, cols * (W + pad) + pad, 3), fill, np.uint8)
    for i, img in enumerate(images):
        y, x = cell_origin(i, cols, (H, W, C), pad)
        out[y: y + H, x: x + W] = img if C == 3 else np.repeat(img, 3, axis=2)
    return out


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def write_png(path: str | Path, rgb: np.ndarray) -> Path:
    """(h, w, 3) uint8 -> an 8-bit RGB PNG (every scanline with filter type 0)."""
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    h, w, c = rgb.shape
    if c != 3:
        raise ValueError(f"write_png takes (h, w, 3) RGB; got {rgb.shape}")
    raw = np.concatenate([np.zeros((h, 1), np.uint8), rgb.reshape(h, w * 3)], axis=1).tobytes()
    png = (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
           + _chunk(b"IDAT", zlib.compress(raw, 9)) + _chunk(b"IEND", b""))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png)
    return path
