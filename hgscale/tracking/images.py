"""Image grids as PNG files, written with zlib and struct only (no imaging library), and image samples of a
model: the first images of a split, completions of them, grids beside their originals.

    images = tokens_to_images(tokens, (32, 32, 3))    # (N, H*W*C) raster-order bytes -> (N, H, W, C) uint8
    write_png("grid.png", image_grid(images, cols=4))
"""
from __future__ import annotations

import math
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

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


# ---------------------------------------------------------------------------------- image datasets

def image_spec(ds) -> tuple[int, int, int]:
    """(H, W, C) of an image dataset's samples."""
    if ds.manifest.get("image_shape"):
        return tuple(int(v) for v in ds.manifest["image_shape"])
    side = math.isqrt(int(ds.manifest["sample_tokens"]) // 3)
    return side, side, 3


def first_images(ds, split: str, n: int, tokens_per_image: int) -> np.ndarray:
    """The first n images of ``split`` (cycled when it has fewer): (n, tokens_per_image) int64."""
    parts, have = [], 0
    for part in ds.iter_split(split):
        parts.append(part)
        have += len(part)
        if have >= n * tokens_per_image:
            break
    flat = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    imgs = flat[: len(flat) // tokens_per_image * tokens_per_image].reshape(-1, tokens_per_image).astype(np.int64)
    if not len(imgs):
        raise ValueError(f"split {split!r} of {ds.root} holds no whole image of {tokens_per_image} tokens")
    return imgs[np.arange(n) % len(imgs)]


def sample_images(model, originals: np.ndarray, given: int, generator: torch.Generator | None = None,
                  **kw) -> np.ndarray:
    """Complete each original (N, T) after its first ``given`` tokens -> (N, T) sampled images."""
    from hgscale.models.generation import generate

    prompt = torch.from_numpy(originals[:, :given]).to(next(model.parameters()).device)
    out = generate(model, prompt, originals.shape[1] - given, generator=generator, **kw)
    return out.cpu().numpy()


def images_grid(samples: np.ndarray, shape: tuple[int, int, int], originals: np.ndarray | None = None) -> np.ndarray:
    """(N, H*W*C) samples -> a grid image: alone (ceil(sqrt(N)) columns) or each beside its original (pairs
    side by side)."""
    imgs = tokens_to_images(samples, shape)
    if originals is None:
        return image_grid(imgs)
    pairs = np.stack([imgs, tokens_to_images(originals, shape)], axis=1).reshape(-1, *imgs.shape[1:])
    return image_grid(pairs, cols=2 * max(1, math.ceil(math.sqrt(len(imgs)))))
