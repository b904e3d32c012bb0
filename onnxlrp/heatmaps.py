"""Heatmaps of explanations: images for vision models, colored tokens for text.

``heatmap(explanation)`` returns a list of RGB ``PIL.Image.Image`` s, one per sample, at the input's
resolution (``np.asarray(img)`` gives the (H, W, 3) uint8 array). ``heatmap_overlay(explanation, image)``
draws them over the input images; ``text_heatmap(tokens, relevance)`` colors tokens for the terminal
(ANSI) and for HTML.

The style follows ``Explanation.heatmap`` (as in RelevancePropagation.jl / VisionHeatmaps.jl):

=============  ==========  ===========  ==========================================================
preset         reduce      rangescale   colormap
=============  ==========  ===========  ==========================================================
attribution    sum         centered     "seismic": red positive, blue negative, white zero
sensitivity    norm        extrema      "gray": black low, white high
cam            sum         extrema      "jet"
=============  ==========  ===========  ==========================================================

Keyword arguments override the preset. Colormaps are matplotlib's (any registered name, or a
``matplotlib.colors.Colormap``).

reduce (over the channel axis): ``sum`` (keeps the sign), ``norm`` (L2 norm), ``maxabs`` (largest
absolute value), ``sumabs`` (sum of absolute values), ``abssum`` (absolute value of the sum).

rangescale: ``centered`` maps [-m, m] to [0, 1] with m the largest absolute value, so that zero is the
colormap's middle (white for "seismic"); ``extrema`` maps [min, max] to [0, 1]. ``percentile=99.5``
clips the range to that percentile of the values (of |values| for centered) so that a few extreme
pixels do not wash out the rest. Each sample is scaled on its own unless ``process_batch=True``.
"""
from __future__ import annotations

import functools
import html as _html
import re

import numpy as np

from .explanation import Explanation

PRESETS = {
    "attribution": {"reduce": "sum", "rangescale": "centered", "colormap": "seismic"},
    "sensitivity": {"reduce": "norm", "rangescale": "extrema", "colormap": "gray"},
    "cam": {"reduce": "sum", "rangescale": "extrema", "colormap": "jet"},
}
REDUCTIONS = ("sum", "norm", "maxabs", "sumabs", "abssum")
RANGESCALES = ("centered", "extrema")
#: Odd lookup-table size: the middle entry sits exactly on the colormap's center (pure white for "seismic").
_LUT_SIZE = 257


def _unpack(x):
    if isinstance(x, Explanation):
        return np.asarray(x.val), x.heatmap
    return np.asarray(x), "attribution"


def _options(style, reduce, rangescale, colormap):
    preset = PRESETS.get(style)
    if preset is None:
        raise ValueError(f"unknown heatmap preset {style!r}; expected one of {sorted(PRESETS)}")
    reduce = reduce or preset["reduce"]
    rangescale = rangescale or preset["rangescale"]
    colormap = colormap if colormap is not None else preset["colormap"]
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}")
    if rangescale not in RANGESCALES:
        raise ValueError(f"rangescale must be one of {RANGESCALES}, got {rangescale!r}")
    return reduce, rangescale, colormap


def reduce_channels(val: np.ndarray, reduce: str = "sum", axis: int = 1) -> np.ndarray:
    """Collapse the channel axis with one of REDUCTIONS."""
    v = np.asarray(val, dtype=np.float64)
    if reduce == "sum":
        return v.sum(axis=axis)
    if reduce == "norm":
        return np.sqrt((v * v).sum(axis=axis))
    if reduce == "maxabs":
        return np.abs(v).max(axis=axis)
    if reduce == "sumabs":
        return np.abs(v).sum(axis=axis)
    if reduce == "abssum":
        return np.abs(v.sum(axis=axis))
    raise ValueError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}")


def scale_range(maps: np.ndarray, rangescale: str = "centered", percentile=None,
                process_batch: bool = False) -> np.ndarray:
    """Map a batch of 2-D maps (N, H, W) to [0, 1] (see the module docstring)."""
    maps = np.nan_to_num(np.asarray(maps, dtype=np.float64))
    if percentile is not None and not 0 < float(percentile) <= 100:
        raise ValueError(f"percentile must be in (0, 100], got {percentile}")
    axes = None if process_batch else tuple(range(1, maps.ndim))

    def stat(a, q, fn):
        if percentile is None:
            return fn(a, axis=axes, keepdims=True)
        return np.percentile(a, q, axis=axes, keepdims=True)

    if rangescale == "centered":
        m = stat(np.abs(maps), percentile, np.max)
        safe = np.where(m > 0, m, 1.0)
        return np.clip(maps / safe, -1.0, 1.0) * 0.5 + 0.5
    if rangescale == "extrema":
        lo = stat(maps, None if percentile is None else 100.0 - float(percentile), np.min)
        hi = stat(maps, percentile, np.max)
        span = hi - lo
        safe = np.where(span > 0, span, 1.0)
        return np.where(span > 0, np.clip((maps - lo) / safe, 0.0, 1.0), 0.0)
    raise ValueError(f"rangescale must be one of {RANGESCALES}, got {rangescale!r}")


def colormap_lut(colormap) -> np.ndarray:
    """A (257, 3) uint8 lookup table of a matplotlib colormap (name or Colormap)."""
    if isinstance(colormap, str):
        return _named_lut(colormap).copy()
    return _lut(colormap)


@functools.lru_cache(maxsize=32)
def _named_lut(name):
    return _lut(name)


def _lut(colormap):
    import matplotlib
    from matplotlib.colors import Colormap
    if isinstance(colormap, Colormap):
        cmap = colormap
    else:
        try:
            cmap = matplotlib.colormaps[colormap]
        except KeyError:
            raise ValueError(f"unknown colormap {colormap!r}; use a matplotlib colormap name such as "
                             "'seismic', 'bwr', 'coolwarm', 'gray', 'inferno', 'viridis' or 'jet'") from None
    rgba = cmap.resampled(_LUT_SIZE)(np.arange(_LUT_SIZE))
    return (np.asarray(rgba)[:, :3] * 255.0 + 0.5).astype(np.uint8)


def colorize(scaled: np.ndarray, colormap="seismic") -> np.ndarray:
    """Values in [0, 1] -> uint8 RGB (..., 3) through the colormap (0.5 lands exactly on its middle)."""
    lut = colormap_lut(colormap)
    idx = np.clip(np.floor(np.asarray(scaled) * (_LUT_SIZE - 1) + 0.5), 0, _LUT_SIZE - 1).astype(np.intp)
    return lut[idx]


def _image_maps(val, reduce, layout):
    val = np.asarray(val)
    if val.ndim == 4:
        layout = layout.upper()
        if layout not in ("NCHW", "NHWC"):
            raise ValueError(f"layout must be 'NCHW' or 'NHWC', got {layout!r}")
        return reduce_channels(val, reduce, axis=1 if layout == "NCHW" else 3)
    if val.ndim == 3:  # (N, H, W): one channel per sample
        return reduce_channels(val[:, None], reduce, axis=1)
    raise ValueError(f"heatmap() renders image-shaped relevance with a batch axis, (N, C, H, W) or (N, H, W); "
                     f"got shape {val.shape}. For token relevance use onnxlrp.text_heatmap")


def _render(x, reduce, rangescale, colormap, percentile, process_batch, layout):
    val, style = _unpack(x)
    reduce, rangescale, colormap = _options(style, reduce, rangescale, colormap)
    maps = _image_maps(val, reduce, layout)
    scaled = scale_range(maps, rangescale, percentile, process_batch)
    return scaled, colorize(scaled, colormap), rangescale


def heatmap(explanation, *, reduce=None, rangescale=None, colormap=None, percentile=None, process_batch=False,
            layout="NCHW") -> list:
    """One RGB ``PIL.Image`` per sample, at the input's resolution.

    ``explanation``: an :class:`onnxlrp.Explanation` (its ``heatmap`` field picks the preset) or a
    relevance array with a batch axis, (N, C, H, W) (``layout="NHWC"`` for channels-last) or (N, H, W).
    ``reduce``, ``rangescale``, ``colormap`` override the preset; ``percentile`` clips the range;
    ``process_batch=True`` scales all samples together (their colors become comparable).
    With the default attribution style, red pixels have positive relevance, blue negative, white zero.
    """
    from PIL import Image
    _, rgb, _ = _render(explanation, reduce, rangescale, colormap, percentile, process_batch, layout)
    return [Image.fromarray(np.ascontiguousarray(a)) for a in rgb]


def _as_rgb_arrays(image, n):
    from PIL import Image
    if isinstance(image, Image.Image) or (isinstance(image, np.ndarray) and image.ndim in (2, 3)):
        images = [image]
    else:  # an (N, H, W, C) array or a sequence of images
        images = list(image)
    if len(images) == 1 and n > 1:
        images = images * n
    if len(images) != n:
        raise ValueError(f"got {len(images)} images for {n} explained samples")
    out = []
    for im in images:
        if isinstance(im, Image.Image):
            a = np.asarray(im.convert("RGB"), dtype=np.uint8)
        else:
            a = np.asarray(im)
            if np.issubdtype(a.dtype, np.floating):
                a = (np.clip(a, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
            a = a.astype(np.uint8)
            if a.ndim == 2:
                a = a[:, :, None]
            if a.shape[2] == 1:
                a = np.repeat(a, 3, axis=2)
            a = a[:, :, :3]
        out.append(a)
    return out


def heatmap_overlay(explanation, image, alpha=0.6, *, grayscale=True, reduce=None, rangescale=None,
                    colormap=None, percentile=None, process_batch=False, layout="NCHW") -> list:
    """The heatmap drawn over ``image``: one RGB ``PIL.Image`` per sample, at the image's size.

    ``image``: a PIL image or an (H, W, 3) array (uint8, or float in [0, 1]) for one sample, or a list /
    (N, H, W, 3) array of them. The heatmap is resized to the image (bilinear). Each pixel mixes in the
    heatmap color with weight ``alpha * sqrt(intensity)``, where intensity is the relevance magnitude
    scaled to [0, 1] (|2v - 1| for the centered range, v for extrema): pixels without relevance show the
    image, the most relevant ones ``alpha`` parts heatmap (the square root keeps weaker relevance
    visible). ``grayscale=True`` desaturates the image first so
    the heatmap colors stand out.
    """
    from PIL import Image
    scaled, rgb, rs = _render(explanation, reduce, rangescale, colormap, percentile, process_batch, layout)
    backgrounds = _as_rgb_arrays(image, len(rgb))
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    out = []
    for s, color, bg in zip(scaled, rgb, backgrounds):
        h, w = bg.shape[:2]
        intensity = np.abs(2.0 * s - 1.0) if rs == "centered" else s
        if color.shape[:2] != (h, w):
            color = np.asarray(Image.fromarray(np.ascontiguousarray(color)).resize((w, h), Image.Resampling.BILINEAR))
            intensity = np.asarray(Image.fromarray(intensity.astype(np.float32))
                                   .resize((w, h), Image.Resampling.BILINEAR))
        base = bg.astype(np.float32)
        if grayscale:
            gray = base @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
            base = np.repeat(gray[:, :, None], 3, axis=2)
        a = (float(alpha) * np.sqrt(np.clip(intensity, 0.0, 1.0)))[:, :, None].astype(np.float32)
        mixed = (1.0 - a) * base + a * color.astype(np.float32)
        out.append(Image.fromarray(np.clip(mixed + 0.5, 0, 255).astype(np.uint8)))
    return out


# -- text --------------------------------------------------------------------------------------------------
def _luminance(rgb) -> float:
    """WCAG relative luminance of an sRGB uint8 color."""
    c = np.asarray(rgb, dtype=np.float64) / 255.0
    lin = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    return float(lin @ np.array([0.2126, 0.7152, 0.0722]))


def readable_text_color(background) -> tuple:
    """Black or white, whichever contrasts more with ``background`` (WCAG contrast ratio)."""
    lum = _luminance(background)
    return (0, 0, 0) if (lum + 0.05) / 0.05 >= 1.05 / (lum + 0.05) else (255, 255, 255)


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class TextHeatmap:
    """Tokens with their relevance and colors. ``str()`` / ``.ansi()`` give 24-bit ANSI terminal text,
    ``.html()`` an HTML snippet (Jupyter shows it directly)."""

    def __init__(self, tokens, relevance, colors, sep=" "):
        self.tokens = list(tokens)
        self.relevance = np.asarray(relevance)
        self.colors = [tuple(int(v) for v in c) for c in colors]
        self.text_colors = [readable_text_color(c) for c in self.colors]
        self.sep = sep

    def ansi(self) -> str:
        parts = []
        for tok, bg, fg in zip(self.tokens, self.colors, self.text_colors):
            tok = _CONTROL.sub("", str(tok))
            parts.append(f"\x1b[38;2;{fg[0]};{fg[1]};{fg[2]}m\x1b[48;2;{bg[0]};{bg[1]};{bg[2]}m{tok}\x1b[0m")
        return self.sep.join(parts)

    def html(self) -> str:
        spans = []
        for tok, r, bg, fg in zip(self.tokens, self.relevance, self.colors, self.text_colors):
            spans.append(f'<span style="background-color:#{bg[0]:02x}{bg[1]:02x}{bg[2]:02x};'
                         f'color:#{fg[0]:02x}{fg[1]:02x}{fg[2]:02x};padding:0 0.15em;border-radius:0.2em" '
                         f'title="{float(r):.4g}">{_html.escape(str(tok))}</span>')
        return ('<div style="line-height:1.9;font-family:monospace">' + _html.escape(self.sep).join(spans)
                + "</div>")

    def _repr_html_(self):
        return self.html()

    def __str__(self):
        return self.ansi()

    def __repr__(self):
        return f"TextHeatmap({len(self.tokens)} tokens)"


def text_heatmap(tokens, relevance, *, reduce="sum", rangescale="centered", colormap="seismic", percentile=None,
                 sep=" ") -> TextHeatmap:
    """Color ``tokens`` by ``relevance``: red positive, blue negative, white zero (by default).

    ``relevance``: one value per token, shape (T,), or per token and feature, (T, D) (e.g. the relevance
    of an embedding input), reduced over D with ``reduce``; a leading batch axis of 1 is dropped. The text
    color is black or white, whichever reads better on the token's background. Returns a
    :class:`TextHeatmap`: ``print(th)`` for the terminal, ``th.html()`` for HTML.
    """
    tokens = list(tokens)
    if isinstance(relevance, Explanation):
        relevance = relevance.val
    rel = np.asarray(relevance, dtype=np.float64)
    if rel.ndim == 3 and rel.shape[0] == 1:  # (1, T, D)
        rel = rel[0]
    elif rel.ndim == 2 and rel.shape[0] == 1 and rel.shape[1] == len(tokens) != 1:  # (1, T)
        rel = rel[0]
    if rel.ndim == 2:
        rel = reduce_channels(rel, reduce, axis=1)
    if rel.ndim != 1 or rel.shape[0] != len(tokens):
        raise ValueError(f"relevance of shape {np.shape(relevance)} does not match {len(tokens)} tokens "
                         "(expected (T,) or (T, D))")
    scaled = scale_range(rel[None], rangescale, percentile)[0]
    return TextHeatmap(tokens, rel, colorize(scaled, colormap), sep=sep)
