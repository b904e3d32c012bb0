"""Reading images into model inputs: Pillow in, float arrays out.

``load_image(path, size=(H, W), channels=3)`` gives an (H, W, C) float32 array in [0, 1] (the picture the
model sees, before normalization); ``normalize`` and ``to_layout`` turn it into one model input sample.
The command line (``onnxlrp explain``) uses these; they are public for scripts that want the same
preprocessing.

Conversions: 8-bit images are divided by 255, 16-bit ones (mode ``I;16``, ``I``) by 65535, float images
(mode ``F``) are taken as [0, 1] (divided by 255 when their maximum is above 1). For 3-channel models
every image becomes RGB (grayscale is repeated, palettes are expanded, an alpha channel is dropped as
torchvision's loader does); for 1-channel models grayscale images are used as they are and color images
are refused (convert them to grayscale first, so that the conversion is yours to choose).
"""
from __future__ import annotations

import os

import numpy as np

from .errors import InputError

#: Extensions taken from folders (a file named explicitly is tried with Pillow whatever its extension).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm",
                    ".pnm")
#: torchvision's ImageNet statistics (RGB); ``onnxlrp explain`` normalizes with these by default.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_GRAY_MODES = {"1", "L", "LA", "La", "I", "F", "I;16", "I;16L", "I;16B", "I;16N"}


def is_image_path(path) -> bool:
    return os.fspath(path).lower().endswith(IMAGE_EXTENSIONS)


def open_image(path):
    """Open an image lazily (header only) with Pillow; InputError when it is not one."""
    from PIL import Image, UnidentifiedImageError
    path = os.fspath(path)
    try:
        return Image.open(path)
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a folder, expected an image file") from None
    except UnidentifiedImageError:
        raise InputError(f"{path}: not an image (Pillow cannot identify it)") from None
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: cannot read the image: {exc}") from None


def image_channels(img) -> int:
    """1 for grayscale modes (with or without alpha), 3 for color modes."""
    return 1 if img.mode in _GRAY_MODES else 3


def check_channels(img, channels: int, path="<image>") -> None:
    """Raise InputError when an image cannot give a model ``channels`` channels."""
    if channels not in (1, 3):
        raise InputError(f"{path}: the model takes {channels}-channel input, but images give 1 (grayscale) or "
                         f"3 (RGB) channels; pass the input as a .npy array instead")
    if channels == 1 and image_channels(img) != 1:
        raise InputError(f"{path}: is a color image (mode {img.mode}, 3 channels) but the model takes 1 channel; "
                         "convert it to grayscale first")


def _to_float(img, channels: int) -> np.ndarray:
    mode = img.mode
    if mode.startswith("I;16"):
        arr = np.asarray(img, dtype=np.float32) / 65535.0
    elif mode == "I":
        arr = np.asarray(img, dtype=np.float32) / 65535.0
    elif mode == "F":
        arr = np.asarray(img, dtype=np.float32)
        if arr.size and float(np.nanmax(arr)) > 1.0:
            arr = arr / 255.0
    elif channels == 1:
        arr = np.asarray(img.convert("L"), dtype=np.float32) / 255.0
    else:
        arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    arr = np.clip(np.nan_to_num(arr), 0.0, 1.0)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.shape[2] != channels:
        arr = np.repeat(arr[:, :, :1], channels, axis=2)
    return arr


def resize(arr: np.ndarray, size) -> np.ndarray:
    """Resize an (H, W, C) float array to ``size`` = (H, W) with Pillow's antialiased bilinear filter."""
    from PIL import Image
    h, w = size
    if arr.shape[:2] == (h, w):
        return arr
    chans = [np.asarray(Image.fromarray(np.ascontiguousarray(arr[:, :, c], dtype=np.float32))
                        .resize((w, h), Image.Resampling.BILINEAR)) for c in range(arr.shape[2])]
    return np.clip(np.stack(chans, axis=2), 0.0, 1.0).astype(np.float32)


def load_image(path, size=None, channels: int = 3) -> np.ndarray:
    """Read an image as an (H, W, channels) float32 array in [0, 1], resized to ``size`` = (H, W) if given."""
    path = os.fspath(path)
    img = open_image(path)
    check_channels(img, channels, path)
    try:
        img.load()
        if getattr(img, "n_frames", 1) > 1:
            img.seek(0)
        arr = _to_float(img, channels)
    except (OSError, ValueError, SyntaxError) as exc:
        raise InputError(f"{path}: cannot decode the image: {exc}") from None
    finally:
        img.close()
    return resize(arr, size) if size is not None else arr


def normalize(arr: np.ndarray, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> np.ndarray:
    """(x - mean) / std per channel (last axis); a single value applies to every channel."""
    c = arr.shape[-1]
    mean = np.asarray(mean, dtype=np.float32).reshape(-1)
    std = np.asarray(std, dtype=np.float32).reshape(-1)
    for name, v in (("mean", mean), ("std", std)):
        if v.size not in (1, c):
            raise InputError(f"{name} has {v.size} values for {c}-channel images (give 1 or {c})")
    if np.any(std == 0):
        raise InputError("std must not be zero")
    return ((arr - mean) / std).astype(np.float32)


def to_layout(arr: np.ndarray, layout: str) -> np.ndarray:
    """(H, W, C) -> (C, H, W) for "NCHW"; unchanged for "NHWC"."""
    if layout.upper() == "NCHW":
        return np.ascontiguousarray(np.transpose(arr, (2, 0, 1)))
    if layout.upper() == "NHWC":
        return np.ascontiguousarray(arr)
    raise ValueError(f"layout must be 'NCHW' or 'NHWC', got {layout!r}")


def detect_layout(input_shape) -> str:
    """NCHW or NHWC from a 4-D model input shape (dims may be strings when dynamic).

    A dimension of 1 or 3 right after the batch axis means NCHW, one at the end means NHWC; when both or
    neither fit, NCHW (the ONNX convention) is assumed.
    """
    if input_shape is None or len(input_shape) != 4:
        raise ValueError(f"expected a 4-D input shape, got {input_shape}")
    first, last = input_shape[1], input_shape[3]
    first_c = isinstance(first, int) and first in (1, 3, 4)
    last_c = isinstance(last, int) and last in (1, 3, 4)
    if last_c and not first_c:
        return "NHWC"
    return "NCHW"


def split_shape(input_shape, layout: str):
    """(channels, height, width) of a 4-D input shape; None for dynamic dims."""
    dims = [d if isinstance(d, int) and d > 0 else None for d in input_shape[1:]]
    if layout.upper() == "NCHW":
        c, h, w = dims
    else:
        h, w, c = dims
    return c, h, w


def display_image(arr: np.ndarray):
    """An (H, W, C) float [0, 1] array as an RGB PIL image (what the overlay is drawn on)."""
    from PIL import Image
    u8 = (np.clip(arr, 0, 1) * 255.0 + 0.5).astype(np.uint8)
    if u8.shape[2] == 1:
        u8 = np.repeat(u8, 3, axis=2)
    return Image.fromarray(np.ascontiguousarray(u8[:, :, :3]))
