"""Heatmaps of explanations: images for vision models, colored tokens for text.

``heatmap(explanation)`` returns a list of RGB ``PIL.Image.Image`` s, one per sample, at the input's
resolution (``np.asarray(img)`` gives the (H, W, 3) uint8 array; ``size=(H, W)`` upsamples the map,
bilinearly, before it is colored). ``heatmap_overlay(explanation, image)``
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
pixels do not wash out the rest. Each sample is scaled on its own unless ``process_batch=True``;
``vrange=(lo, hi)`` fixes the range instead (``value_range`` computes one over any number of maps, so that
heatmaps drawn separately share one color scale). ``colorbar=True`` adds a color bar with the value range
labelled on the right of each picture.
"""
from __future__ import annotations

import functools
import html as _html
import re
from typing import NamedTuple

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


def _check_percentile(percentile):
    if percentile is not None and not 0 < float(percentile) <= 100:
        raise ValueError(f"percentile must be in (0, 100], got {percentile}")


def _bounds(maps, rangescale, percentile, axes):
    """(lo, hi) that the range scaling maps to 0 and 1: (-m, m) for centered, (min, max) for extrema;
    over ``axes`` (None: all values), clipped at ``percentile``."""
    def stat(a, q, fn):
        if percentile is None:
            return fn(a, axis=axes, keepdims=True)
        return np.percentile(a, q, axis=axes, keepdims=True)

    if rangescale == "centered":
        m = stat(np.abs(maps), percentile, np.max)
        return -m, m
    if rangescale == "extrema":
        return (stat(maps, None if percentile is None else 100.0 - float(percentile), np.min),
                stat(maps, percentile, np.max))
    raise ValueError(f"rangescale must be one of {RANGESCALES}, got {rangescale!r}")


def _fixed_bounds(vrange, rangescale):
    try:
        lo, hi = (float(v) for v in vrange)
    except (TypeError, ValueError):
        raise ValueError(f"vrange must be two numbers (lo, hi), got {vrange!r}") from None
    if not (np.isfinite(lo) and np.isfinite(hi)) or lo > hi:
        raise ValueError(f"vrange must be finite with lo <= hi, got {vrange!r}")
    if rangescale == "centered":
        m = max(abs(lo), abs(hi))
        return np.array(-m), np.array(m)
    if rangescale == "extrema":
        return np.array(lo), np.array(hi)
    raise ValueError(f"rangescale must be one of {RANGESCALES}, got {rangescale!r}")


def _apply_bounds(maps, rangescale, lo, hi):
    if rangescale == "centered":
        safe = np.where(hi > 0, hi, 1.0)
        return np.clip(maps / safe, -1.0, 1.0) * 0.5 + 0.5
    span = hi - lo
    safe = np.where(span > 0, span, 1.0)
    return np.where(span > 0, np.clip((maps - lo) / safe, 0.0, 1.0), 0.0)


def _scale(maps, rangescale, percentile, process_batch, vrange):
    """(scaled maps in [0, 1], lo, hi) with lo and hi broadcastable against the maps."""
    maps = np.asarray(maps, dtype=np.float64)
    if not np.isfinite(maps).all():
        maps = np.nan_to_num(maps)
    _check_percentile(percentile)
    if vrange is not None:
        lo, hi = _fixed_bounds(vrange, rangescale)
    else:
        lo, hi = _bounds(maps, rangescale, percentile, None if process_batch else tuple(range(1, maps.ndim)))
    return _apply_bounds(maps, rangescale, lo, hi), lo, hi


def scale_range(maps: np.ndarray, rangescale: str = "centered", percentile=None,
                process_batch: bool = False, vrange=None) -> np.ndarray:
    """Map a batch of 2-D maps (N, H, W) to [0, 1] (see the module docstring)."""
    return _scale(maps, rangescale, percentile, process_batch, vrange)[0]


def value_range(maps, rangescale: str = "centered", percentile=None) -> tuple:
    """The (lo, hi) that ``scale_range`` maps to the colormap's ends, over all values of ``maps`` together:
    a sequence of arrays of any shapes (e.g. the channel-reduced maps of many explanations). Pass it as
    ``vrange=`` to ``heatmap`` / ``heatmap_overlay`` to draw them on one color scale."""
    _check_percentile(percentile)
    values = np.concatenate([np.nan_to_num(np.asarray(m, dtype=np.float64)).ravel() for m in maps])
    if values.size == 0:
        raise ValueError("value_range needs at least one value")
    lo, hi = _bounds(values, rangescale, percentile, None)
    return float(np.ravel(lo)[0]), float(np.ravel(hi)[0])


def colormap_lut(colormap) -> np.ndarray:
    """A (257, 3) uint8 lookup table of a matplotlib colormap (name or Colormap)."""
    return _table(colormap).copy()


def _table(colormap):
    """colormap_lut's table, the cached one itself for a name (not to be written to)."""
    return _named_lut(colormap) if isinstance(colormap, str) else _lut(colormap)


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
    return _colorize(scaled, _table(colormap))


def _colorize(scaled, lut):
    idx = np.asarray(scaled) * (_LUT_SIZE - 1) + 0.5
    np.floor(idx, out=idx)
    np.clip(idx, 0, _LUT_SIZE - 1, out=idx)
    return np.take(lut, idx.astype(np.intp), axis=0)  # 3x faster than lut[idx] on small maps


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


class _Rendered(NamedTuple):
    scaled: np.ndarray  # (N, H, W) in [0, 1]
    lo: np.ndarray  # (N,)
    hi: np.ndarray  # (N,)
    rangescale: str
    colormap: object
    lut: np.ndarray  # the colormap's (257, 3) uint8 table, looked up once per call


def _render(x, reduce, rangescale, colormap, percentile, process_batch, layout, vrange) -> _Rendered:
    val, style = _unpack(x)
    reduce, rangescale, colormap = _options(style, reduce, rangescale, colormap)
    maps = _image_maps(val, reduce, layout)
    scaled, lo, hi = _scale(maps, rangescale, percentile, process_batch, vrange)
    n = len(scaled)
    lut = _table(colormap)
    return _Rendered(scaled, np.broadcast_to(lo, (n, 1, 1)).reshape(n), np.broadcast_to(hi, (n, 1, 1)).reshape(n),
                     rangescale, colormap, lut)


def _resized(scaled, size):
    """One scaled map (H, W) resized (bilinear) to ``size`` = (H, W); unchanged when it has that size."""
    if size is None or tuple(scaled.shape) == tuple(size):
        return scaled
    from PIL import Image
    h, w = (int(v) for v in size)
    if h < 1 or w < 1:
        raise ValueError(f"size must be (height, width) with positive values, got {size}")
    up = Image.fromarray(np.ascontiguousarray(scaled, dtype=np.float32)).resize((w, h), Image.Resampling.BILINEAR)
    return np.clip(np.asarray(up), 0.0, 1.0)


def _fmt_value(v, signed):
    if v == 0:
        return "0"
    return f"{v:+.3g}" if signed else f"{v:.3g}"


def _with_colorbar(img, lo, hi, colormap, rangescale):
    """``img`` with a vertical color bar on its right: the colormap from ``hi`` (top) to ``lo`` (bottom),
    the two ends and the middle labelled with their values."""
    from PIL import Image, ImageDraw, ImageFont
    w, h = img.size
    height = max(h, 96)  # room for three legible labels next to small pictures
    font_size = int(np.clip(height // 16, 10, 48))
    font = ImageFont.load_default(size=font_size)
    pad, bar_w = max(3, font_size // 2), max(8, font_size)
    margin = font_size // 2 + 1  # the end labels are centered on the bar's ends
    bar_h = max(2, height - 2 * margin)
    centered = rangescale == "centered"
    ticks = [(hi, 0), ((lo + hi) / 2 if not centered else 0.0, (bar_h - 1) / 2), (lo, bar_h - 1)]
    labels = [_fmt_value(float(v), centered) for v, _ in ticks]
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_w = int(np.ceil(max(measure.textlength(t, font=font) for t in labels)))
    canvas = Image.new("RGB", (w + pad + bar_w + pad // 2 + 3 + text_w + pad, height), (255, 255, 255))
    canvas.paste(img, (0, (height - h) // 2))
    colors = colorize(np.linspace(1.0, 0.0, bar_h), colormap)  # the colormap's own colors, top = hi
    x0 = w + pad
    canvas.paste(Image.fromarray(np.ascontiguousarray(np.repeat(colors[:, None, :], bar_w, axis=1))), (x0, margin))
    draw = ImageDraw.Draw(canvas)
    draw.rectangle((x0 - 1, margin - 1, x0 + bar_w, margin + bar_h), outline=(96, 96, 96))
    for (_, y), text in zip(ticks, labels):
        y = margin + int(round(y))
        draw.line((x0 + bar_w, y, x0 + bar_w + 3, y), fill=(96, 96, 96))
        draw.text((x0 + bar_w + 3 + pad // 2, y), text, fill=(0, 0, 0), font=font, anchor="lm")
    return canvas


def heatmap(explanation, *, reduce=None, rangescale=None, colormap=None, percentile=None, process_batch=False,
            layout="NCHW", size=None, vrange=None, colorbar=False) -> list:
    """One RGB ``PIL.Image`` per sample, at the input's resolution (or ``size``).

    ``explanation``: an :class:`onnxlrp.Explanation` (its ``heatmap`` field picks the preset) or a
    relevance array with a batch axis, (N, C, H, W) (``layout="NHWC"`` for channels-last) or (N, H, W).
    ``reduce``, ``rangescale``, ``colormap`` override the preset; ``percentile`` clips the range;
    ``process_batch=True`` scales all samples together (their colors become comparable), ``vrange=(lo,
    hi)`` uses that range instead (see :func:`value_range`). ``size=(H, W)``: the scaled map is resized
    to it (bilinear) before it is colored, e.g. to the original image's size. ``colorbar=True`` adds a
    color bar with the value range labelled on the right.
    With the default attribution style, red pixels have positive relevance, blue negative, white zero.
    """
    r = _render(explanation, reduce, rangescale, colormap, percentile, process_batch, layout, vrange)
    return [_picture(_heatmap_pixels(s, size, r.lut), r, k, colorbar) for k, s in enumerate(r.scaled)]


def _heatmap_pixels(scaled, size, lut):
    return _colorize(_resized(scaled, size), lut)


def _picture(pixels, r, k, colorbar):
    """Sample k's pixels as a PIL image, with its color bar when asked for."""
    from PIL import Image
    img = Image.fromarray(np.ascontiguousarray(pixels))
    return _with_colorbar(img, r.lo[k], r.hi[k], r.colormap, r.rangescale) if colorbar else img


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
                    colormap=None, percentile=None, process_batch=False, layout="NCHW", vrange=None,
                    colorbar=False) -> list:
    """The heatmap drawn over ``image``: one RGB ``PIL.Image`` per sample, at the image's size.

    ``image``: a PIL image or an (H, W, 3) array (uint8, or float in [0, 1]) for one sample, or a list /
    (N, H, W, 3) array of them. The scaled map is resized to the image (bilinear) and colored there. Each
    pixel mixes in the heatmap color with weight ``alpha * sqrt(intensity)``, where intensity is the
    relevance magnitude scaled to [0, 1] (|2v - 1| for the centered range, v for extrema): pixels without
    relevance show the image, the most relevant ones ``alpha`` parts heatmap (the square root keeps
    weaker relevance visible). ``grayscale=True`` desaturates the image first so the heatmap colors stand
    out. ``vrange`` and ``colorbar`` as for :func:`heatmap`.
    """
    r = _render(explanation, reduce, rangescale, colormap, percentile, process_batch, layout, vrange)
    backgrounds = _as_rgb_arrays(image, len(r.scaled))
    _check_alpha(alpha)
    return [_picture(_overlay_pixels(s, bg, alpha, grayscale, r), r, k, colorbar)
            for k, (s, bg) in enumerate(zip(r.scaled, backgrounds))]


def _check_alpha(alpha):
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")


_GRAY_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def _overlay_pixels(scaled, bg, alpha, grayscale, r):
    """One scaled map (H, W) drawn over the uint8 RGB picture ``bg`` (its own size): uint8 (h, w, 3)."""
    h, w = bg.shape[:2]
    s = _resized(scaled, (h, w))
    mixed = np.empty((h, w, 3), np.uint8)
    step = max(1, _BLEND_PIXELS // max(w, 1))  # about a megapixel at a time: big images stay cheap
    for r0 in range(0, h, step):
        rows = slice(r0, r0 + step)
        mixed[rows] = _blend(s[rows], bg[rows], alpha, grayscale, r)
    return mixed


#: pixels blended at a time (the float32 temporaries are a few times this in bytes)
_BLEND_PIXELS = 1 << 20


def _blend(s, bg, alpha, grayscale, r):
    """Scaled maps (..., h, w), at their pictures' size, over the uint8 RGB pictures ``bg`` (..., h, w, 3)."""
    intensity = np.abs(2.0 * s - 1.0) if r.rangescale == "centered" else s
    base = bg.astype(np.float32)
    if grayscale:  # one gray value for the three channels (broadcast, not repeated)
        base = (base @ _GRAY_WEIGHTS)[..., None]
    a = (float(alpha) * np.sqrt(np.clip(intensity, 0.0, 1.0)))[..., None].astype(np.float32)
    blend = (1.0 - a) * base + a * _colorize(s, r.lut).astype(np.float32)
    blend += 0.5
    np.clip(blend, 0, 255, out=blend)
    return blend.astype(np.uint8)


def heatmaps_and_overlays(maps, pictures=None, alpha=0.6, *, size=None, draw_heatmaps=True, grayscale=True,
                          rangescale=None, colormap=None, percentile=None, vrange=None, colorbar=False):
    """The heatmaps and overlays of maps (N, H, W) (channels reduced already; attribution style, each map
    scaled on its own or on ``vrange``), as lists of uint8 RGB arrays: pixel for pixel ``heatmap(maps,
    size=size, ...)`` and ``heatmap_overlay(maps, pictures, alpha, ...)`` (``pictures``: N PIL images or uint8
    arrays), from one range scaling. Maps of one size, and pictures of one size, are colored and blended in
    one go, not one by one: what ``onnxlrp explain`` draws for a batch of inputs. ``draw_heatmaps=False`` or
    ``pictures=None`` gives None for that list."""
    r = _render(np.asarray(maps), "sum", rangescale, colormap, percentile, False, "NCHW", vrange)
    n = len(r.scaled)
    heats = overlays = None
    if draw_heatmaps:
        if size is None or tuple(r.scaled.shape[1:]) == tuple(size):
            heats = list(_colorize(r.scaled, r.lut))
        else:
            heats = [_heatmap_pixels(s, size, r.lut) for s in r.scaled]
    if pictures is not None:
        _check_alpha(alpha)
        backgrounds = _as_rgb_arrays(pictures, n)
        shape = backgrounds[0].shape
        if all(bg.shape == shape for bg in backgrounds) and n * shape[0] * shape[1] <= _BLEND_PIXELS:
            scaled = np.stack([_resized(s, shape[:2]) for s in r.scaled])
            overlays = list(_blend(scaled, np.stack(backgrounds), alpha, grayscale, r))
        else:
            overlays = [_overlay_pixels(s, bg, alpha, grayscale, r) for s, bg in zip(r.scaled, backgrounds)]
    if colorbar:
        heats, overlays = ([np.asarray(_picture(p, r, k, True)) for k, p in enumerate(pixels)] if pixels else pixels
                           for pixels in (heats, overlays))
    return heats, overlays


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
