"""Image helpers that need no imaging library: tensors to uint8 grids and a PNG encoder (stdlib zlib)."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import torch

__all__ = ["to_uint8", "make_grid", "encode_png", "upscale_nearest"]


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[B, 3, H, W] in [0, 1] -> uint8 [B, H, W, 3]."""
    return (images.detach().float().clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def upscale_nearest(image: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour upscale of an [H, W, C] array, so 32x32 drawings stay crisp on screen."""
    if factor <= 1:
        return image
    return image.repeat(factor, axis=0).repeat(factor, axis=1)


def make_grid(cells: np.ndarray, rows: int, cols: int, pad: int = 2, fill: int = 255) -> np.ndarray:
    """Tile uint8 [rows*cols, H, W, 3] cells into one [rows*(H+pad)+pad, cols*(W+pad)+pad, 3] image."""
    n, h, w, c = cells.shape
    if n != rows * cols:
        raise ValueError(f"{n} cells do not fill a {rows}x{cols} grid")
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), fill, dtype=np.uint8)
    for i in range(n):
        r, k = divmod(i, cols)
        y, x = pad + r * (h + pad), pad + k * (w + pad)
        grid[y : y + h, x : x + w] = cells[i]
    return grid


def encode_png(image: np.ndarray) -> bytes:
    """Encode an RGB uint8 [H, W, 3] array as PNG bytes."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError("encode_png expects a uint8 [H, W, 3] array")
    h, w, _ = image.shape
    raw = b"".join(b"\x00" + image[y].tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")


def save_png(image: np.ndarray, path: str | Path) -> None:
    Path(path).write_bytes(encode_png(image))


def load_image(path: Path) -> torch.Tensor:
    """An image file as [3, H, W] in [0, 1] (needs Pillow, which every WebUI ships through gradio)."""
    from ziplora.errors import InvalidRequestError

    try:
        from PIL import Image
    except ImportError:
        raise InvalidRequestError("reading reference images needs the Pillow package") from None
    try:
        with Image.open(path) as img:
            rgb = np.asarray(img.convert("RGB"), dtype=np.uint8)
    except (OSError, ValueError) as err:
        raise InvalidRequestError(f"{Path(path).name}: not a readable image ({err})") from None
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1).float() / 255
