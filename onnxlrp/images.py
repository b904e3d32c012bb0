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

Large images are decoded reduced: when the model's input is much smaller than the image, a JPEG is decoded
at 1/2, 1/4 or 1/8 scale (libjpeg's draft mode) and other formats are box-averaged by an integer factor
(``Image.reduce``) before the conversion to float, keeping at least ``REDUCING_GAP`` times the model's size
for the final antialiased bilinear resize (Pillow's ``reducing_gap``). Images that need no such reduction
(within ``REDUCING_GAP`` times the model's size) take the plain path: full conversion, then the resize.
Pillow's decompression-bomb guard: images above ``PIL.Image.MAX_IMAGE_PIXELS`` load (reduced) without
Pillow's warning; above twice that (``pixel_limit()``, where Pillow raises ``DecompressionBombError``) they
are refused with an :class:`ImageTooLargeError` naming the file and its pixel count.

``load_image_and_picture`` also gives the image itself as an RGB picture (what the command line draws the
overlay on): at its own size, scaled down, aspect ratio kept, to at most ``MAX_PICTURE_PIXELS``.
"""
from __future__ import annotations

import math
import os
import re
import warnings

import numpy as np

from .errors import InputError

#: Extensions taken from folders (a file named explicitly is tried with Pillow whatever its extension).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm",
                    ".pnm")
#: torchvision's ImageNet statistics (RGB); ``onnxlrp explain`` normalizes with these by default.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_GRAY_MODES = {"1", "L", "LA", "La", "I", "F", "I;16", "I;16L", "I;16B", "I;16N"}
#: Reduced decoding keeps at least this many times the target size for the final resize (Pillow's
#: ``reducing_gap``; 3 is where Pillow calls the result indistinguishable from a full-resolution resize).
REDUCING_GAP = 3.0
#: Pictures (``load_picture``) larger than this are scaled down to it, aspect ratio kept (4096 x 4096).
MAX_PICTURE_PIXELS = 1 << 24
_PICTURE_REDUCING_GAP = 2.0  # Pillow's thumbnail default: pictures are for looking at


class ImageTooLargeError(InputError):
    """The image has more pixels than :func:`pixel_limit` allows (a possible decompression bomb)."""


def pixel_limit():
    """The most pixels an image may have: twice ``PIL.Image.MAX_IMAGE_PIXELS``, where Pillow raises
    ``DecompressionBombError`` (None when that guard is switched off)."""
    from PIL import Image
    return None if Image.MAX_IMAGE_PIXELS is None else 2 * int(Image.MAX_IMAGE_PIXELS)


def is_image_path(path) -> bool:
    return os.fspath(path).lower().endswith(IMAGE_EXTENSIONS)


def _source(path, name):
    """(what Pillow opens, the name errors give): a path, or an encoded image's bytes read from memory."""
    if isinstance(path, (bytes, bytearray, memoryview)):
        import io
        return io.BytesIO(path), name or "<image bytes>"
    path = os.fspath(path)
    return path, name or path


def open_image(path, name=None):
    """Open an image lazily (header only) with Pillow; InputError when it is not one. ``path`` may also be
    the encoded file's bytes (a Parquet image column), ``name`` what errors call it."""
    from PIL import Image, UnidentifiedImageError
    source, path = _source(path, name)
    try:
        with warnings.catch_warnings():  # images above MAX_IMAGE_PIXELS are decoded reduced: no raw warning
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(source)
    except Image.DecompressionBombError as exc:
        found = re.search(r"\((\d+) pixels\)", str(exc))
        count = f"{int(found.group(1)):,} pixels" if found else "too many pixels"
        limit = pixel_limit()
        raise ImageTooLargeError(f"{path}: the image has {count}, over the limit of "
                                 f"{limit:,} (Pillow's decompression-bomb guard); not decoded") from None
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
    else:
        target = "L" if channels == 1 else "RGB"
        arr = np.asarray(img if img.mode == target else img.convert(target), dtype=np.float32) / 255.0
    if mode.startswith("I") or mode == "F":  # 8-bit pixels / 255 are finite and within [0, 1] already
        arr = np.clip(np.nan_to_num(arr), 0.0, 1.0)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.shape[2] != channels:
        arr = np.repeat(arr[:, :, :1], channels, axis=2)
    return arr


def resize(arr: np.ndarray, size, *, box=None) -> np.ndarray:
    """Resize an (H, W, C) float array to ``size`` = (H, W) with Pillow's antialiased bilinear filter
    (``box``: the source region (left, upper, right, lower) in pixels, default the whole array)."""
    from PIL import Image
    h, w = size
    if arr.shape[:2] == (h, w) and box is None:
        return arr
    chans = [np.asarray(Image.fromarray(np.ascontiguousarray(arr[:, :, c], dtype=np.float32))
                        .resize((w, h), Image.Resampling.BILINEAR, box=box)) for c in range(arr.shape[2])]
    return np.clip(np.stack(chans, axis=2), 0.0, 1.0).astype(np.float32)


def picture_size(size, max_pixels=MAX_PICTURE_PIXELS):
    """(width, height) of an image's picture: its own ``size`` = (width, height), scaled down (aspect
    ratio kept) to at most ``max_pixels`` pixels (None: no limit)."""
    w, h = int(size[0]), int(size[1])
    if max_pixels is None or w * h <= max_pixels:
        return w, h
    r = math.sqrt(max_pixels / (w * h))
    return max(1, int(w * r)), max(1, int(h * r))


def _reducible(img, channels):
    """The image in a mode that ``Image.reduce`` averages correctly and ``_to_float`` reads the same."""
    mode = img.mode
    if mode.startswith("I;16"):
        return img.convert("I")  # same values; _to_float divides "I" by 65535 as well
    if mode in ("I", "F", "L", "RGB"):
        return img
    return img.convert("L" if channels == 1 or mode in _GRAY_MODES else "RGB")  # palettes, alpha, CMYK, "1"


def _as_array(img, size, channels, box=None):
    """The (H, W, channels) float input: integer box reduction while the image is more than REDUCING_GAP
    times ``size`` (H, W), then the conversion to float and the antialiased bilinear resize. ``box``: the
    image's extent in ``img``'s pixels when a draft decode rounded its size up (None: all of ``img``)."""
    if size is not None:
        bw, bh = (box[2], box[3]) if box is not None else img.size
        fx = max(1, int(bw / size[1] / REDUCING_GAP))
        fy = max(1, int(bh / size[0] / REDUCING_GAP))
        if fx > 1 or fy > 1:
            # the last reduced row/column averages what is left over: the resize takes the exact source
            # region in reduced pixels, as Pillow's own resize(reducing_gap=...) does
            box = (0.0, 0.0, bw / fx, bh / fy)
            img = _reducible(img, channels).reduce((fx, fy))
    arr = _to_float(img, channels)
    return resize(arr, size, box=box) if size is not None else arr


def _as_picture(img, size, box=None):
    """The image as an RGB PIL image of ``size`` (width, height); ``box`` as for _as_array."""
    from PIL import Image
    mode = img.mode
    resized = img.size != tuple(size) or box is not None
    if mode.startswith("I;16") or mode in ("I", "F"):  # through the float scaling: 16-bit is not clipped
        src = img.convert("I") if mode.startswith("I;16") else img
        if resized:
            src = src.resize(size, Image.Resampling.BILINEAR, box=box, reducing_gap=_PICTURE_REDUCING_GAP)
        return display_image(_to_float(src, 1))
    if not resized:
        return img.copy() if mode == "RGB" else img.convert("RGB")
    src = img if mode in ("L", "RGB") else _reducible(img, 3)
    return src.resize(size, Image.Resampling.BICUBIC, box=box,
                      reducing_gap=_PICTURE_REDUCING_GAP).convert("RGB")


def _read(path, size, channels, array=True, max_picture_pixels=None, name=None):
    """Decode ``path`` (or an image file's bytes) once, at the least resolution that the array (``size`` =
    (H, W), None = full) and the picture (when ``max_picture_pixels`` is given) need. Returns (array or None,
    picture or None)."""
    from PIL import Image
    img = open_image(path, name)
    path = _source(path, name)[1]
    try:
        check_channels(img, channels, path)
        w, h = img.size
        pic_size = picture_size((w, h), max_picture_pixels) if max_picture_pixels else None
        needs = []  # (width, height) each result needs from the decoder
        if array:
            needs.append((w, h) if size is None else (math.ceil(size[1] * REDUCING_GAP),
                                                      math.ceil(size[0] * REDUCING_GAP)))
        if pic_size is not None:
            needs.append((w, h) if pic_size == (w, h) else (math.ceil(pic_size[0] * _PICTURE_REDUCING_GAP),
                                                            math.ceil(pic_size[1] * _PICTURE_REDUCING_GAP)))
        need = (max(1, max(n[0] for n in needs)), max(1, max(n[1] for n in needs)))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                box = None
                if need[0] < w and need[1] < h:
                    # JPEG: decoded at 1/2, 1/4 or 1/8 scale, still >= need (others: no-op); the size is
                    # rounded up, the box says where the image ends
                    drafted = img.draft(None, need)
                    if drafted is not None and img.size != (w, h):
                        box = tuple(float(v) for v in drafted[1])
                img.load()
                if getattr(img, "n_frames", 1) > 1:
                    img.seek(0)
                arr = _as_array(img, size, channels, box) if array else None
                picture = _as_picture(img, pic_size, box) if pic_size is not None else None
        except (OSError, ValueError, SyntaxError, EOFError) as exc:
            raise InputError(f"{path}: cannot decode the image: {exc}") from None
    finally:
        img.close()
    return arr, picture


def load_image(path, size=None, channels: int = 3, name=None) -> np.ndarray:
    """Read an image as an (H, W, channels) float32 array in [0, 1], resized to ``size`` = (H, W) if given.
    ``path`` may also be the encoded file's bytes; ``name`` is then what errors call it.

    Images much larger than ``size`` are decoded reduced (see the module docstring), so that a huge image
    costs memory for its decoded 8-bit pixels, not for a float copy of them.
    """
    return _read(path, size, channels, name=name)[0]


def load_image_and_picture(path, size=None, channels: int = 3, max_picture_pixels=MAX_PICTURE_PIXELS):
    """``(load_image(path, size, channels), load_picture(path, channels, max_picture_pixels))`` from one
    decode."""
    return _read(path, size, channels, True, max_picture_pixels)


def load_picture(path, channels: int = 3, max_picture_pixels=MAX_PICTURE_PIXELS):
    """The image as an RGB PIL image at its own size, scaled down (aspect ratio kept) to at most
    ``max_picture_pixels`` (see :func:`picture_size`): what an overlay is drawn on."""
    return _read(path, None, channels, False, max_picture_pixels)[1]


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
