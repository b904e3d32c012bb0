"""Writing 8-bit pictures as PNG files: one zlib stream over numpy-filtered rows, no per-row Python.

Pillow's PNG writer picks a filter for every row (the sum of absolute differences over all five filters) and
builds each chunk in Python: a 32x32 heatmap took 134 us to encode and a 64x64 one 250 us, more than the
relevance of a small model's input (``onnxlrp explain`` on a folder writes two per input). Here every row
gets PNG's "Up" filter (the difference to the row above, one vectorized subtraction), which compresses
photographs and smooth heatmaps about as well as Pillow's choice (640x480: 104 vs 112 kB for a photograph,
246 vs 248 kB for an overlay) in a third to a half of the time, at zlib level 1 as before.
"""
from __future__ import annotations

import struct
import zlib

import numpy as np

from .files import write_bytes

_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_COLOR_TYPES = {1: 0, 2: 4, 3: 2, 4: 6}  # channels -> gray, gray + alpha, RGB, RGBA
_FILTER_UP = 2


def _chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(data, zlib.crc32(tag)))


def encode_png(pixels, level: int = 1) -> bytes:
    """The PNG file of ``pixels``: a uint8 array (H, W) or (H, W, C) with C = 1 (gray), 2 (gray + alpha),
    3 (RGB) or 4 (RGBA), or a PIL image in one of those modes; zlib ``level`` 0-9."""
    a = np.asarray(pixels)
    if a.dtype != np.uint8:
        raise ValueError(f"encode_png takes uint8 pixels, got {a.dtype}")
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3 or a.shape[2] not in _COLOR_TYPES or a.shape[0] < 1 or a.shape[1] < 1:
        raise ValueError(f"encode_png takes (H, W) or (H, W, 1-4) pixels, got shape {a.shape}")
    h, w, c = a.shape
    rows = a.reshape(h, w * c)
    filtered = np.empty((h, 1 + w * c), np.uint8)
    filtered[:, 0] = _FILTER_UP
    filtered[0, 1:] = rows[0]  # the row above the first is zeros
    np.subtract(rows[1:], rows[:-1], out=filtered[1:, 1:])  # modulo 256, as the filter is defined
    header = struct.pack(">IIBBBBB", w, h, 8, _COLOR_TYPES[c], 0, 0, 0)  # 8 bits, deflate, no interlace
    return (_SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(filtered.data, level))
            + _chunk(b"IEND", b""))


def write_png(pixels, target, level: int = 1) -> None:
    """``encode_png(pixels, level)`` written to ``target`` whole, never through a planted link
    (onnxlrp.files.write_bytes)."""
    write_bytes(target, encode_png(pixels, level))
