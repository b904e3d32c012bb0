"""Heatmaps: onnxlrp.heatmap, heatmap_overlay and text_heatmap (numpy + Pillow + matplotlib only)."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import onnxlrp
from onnxlrp import Explanation, heatmap, heatmap_overlay, text_heatmap
from onnxlrp.heatmaps import colorize, colormap_lut, readable_text_color, reduce_channels, scale_range, value_range

FIXTURES = Path(__file__).resolve().parent.parent / "models_fixtures"


def _expl(val, style="attribution"):
    val = np.asarray(val, dtype=np.float32)
    return Explanation(val=val, output=np.zeros((len(val), 2), np.float32),
                       output_selection=np.zeros(len(val), np.int64), heatmap=style)


def _signed_map():
    """(1, 3, 4, 4) relevance whose channel sum is +, - and 0 in known places."""
    val = np.zeros((1, 3, 4, 4), np.float32)
    val[0, 0, 0, :] = 1.0        # row 0 positive
    val[0, 1, 1, :] = -2.0       # row 1 negative (the largest magnitude)
    val[0, :, 2, 0] = [1, -1, 0]  # row 2 col 0: channels cancel -> 0
    return val


def test_heatmap_returns_one_rgb_pil_image_per_sample():
    val = np.random.default_rng(0).standard_normal((3, 3, 8, 5)).astype(np.float32)
    imgs = heatmap(_expl(val))
    assert len(imgs) == 3
    for img in imgs:
        assert isinstance(img, Image.Image) and img.mode == "RGB" and img.size == (5, 8)
        assert np.asarray(img).dtype == np.uint8


def test_attribution_red_positive_blue_negative_white_zero():
    img = np.asarray(heatmap(_expl(_signed_map()))[0]).astype(int)
    r, g, b = img[..., 0], img[..., 1], img[..., 2]
    assert np.all(r[0] > b[0] + 50)                     # positive: red
    assert np.all(b[1] > r[1] + 50)                     # negative: blue
    assert tuple(img[2, 0]) == (255, 255, 255)          # channels cancel: exactly white
    assert tuple(img[3, 3]) == (255, 255, 255)          # zero: exactly white
    # centered: +1 is half of the largest magnitude (2), so row 0 is lighter than row 1 is dark
    assert img[0, 0, 1] > img[1, 0, 1] - 1


def test_sign_is_kept_for_random_relevance():
    val = np.random.default_rng(1).standard_normal((2, 3, 16, 16)).astype(np.float32)
    for s, img in zip(val.sum(1), heatmap(val)):
        a = np.asarray(img).astype(int)
        strong = np.abs(s) > np.abs(s).max() / 256
        assert np.array_equal(np.sign(a[..., 0] - a[..., 2])[strong], np.sign(s)[strong])
        assert np.all(a[..., 0][~strong] == a[..., 2][~strong])


@pytest.mark.parametrize("reduce,expected", [
    ("sum", lambda v: v.sum(1)),
    ("norm", lambda v: np.sqrt((v ** 2).sum(1))),
    ("maxabs", lambda v: np.abs(v).max(1)),
    ("sumabs", lambda v: np.abs(v).sum(1)),
    ("abssum", lambda v: np.abs(v.sum(1))),
])
def test_reductions(reduce, expected):
    v = np.random.default_rng(2).standard_normal((2, 3, 4, 4))
    np.testing.assert_allclose(reduce_channels(v, reduce), expected(v), rtol=1e-12)


def test_rangescales_and_percentile_clipping():
    m = np.array([[[-1.0, 0.0, 0.5, 4.0]]])
    np.testing.assert_allclose(scale_range(m, "centered"), [[[0.375, 0.5, 0.5625, 1.0]]])
    np.testing.assert_allclose(scale_range(m, "extrema"), [[[0.0, 0.2, 0.3, 1.0]]])
    # one outlier: clipping at a percentile keeps the rest visible
    x = np.concatenate([np.linspace(-1, 1, 999), [1000.0]])[None, None]
    plain = scale_range(x, "centered")
    clipped = scale_range(x, "centered", percentile=99)
    assert np.abs(plain[0, 0, :999] - 0.5).max() < 0.001
    assert np.abs(clipped[0, 0, :999] - 0.5).max() > 0.45
    assert clipped.max() == 1.0


def test_all_zero_relevance_is_white_and_constant_extrema_is_low_end():
    assert np.all(np.asarray(heatmap(np.zeros((1, 3, 4, 4)))[0]) == 255)
    sens = np.asarray(heatmap(_expl(np.ones((1, 3, 4, 4)), "sensitivity"))[0])
    assert np.all(sens == 0)  # "gray" colormap, constant map -> its low end


def test_presets_follow_explanation_heatmap():
    val = np.random.default_rng(3).standard_normal((1, 3, 6, 6)).astype(np.float32)
    sens = np.asarray(heatmap(_expl(val, "sensitivity"))[0]).astype(int)
    assert np.all(sens[..., 0] == sens[..., 1]) and np.all(sens[..., 1] == sens[..., 2])  # gray map
    norm = np.sqrt((val[0] ** 2).sum(0))
    assert sens[..., 0].flat[norm.argmax()] == 255 and sens[..., 0].flat[norm.argmin()] == 0
    cam = np.asarray(heatmap(_expl(val, "cam"))[0])
    assert not np.array_equal(cam, sens)
    # keyword arguments override the preset
    same = np.asarray(heatmap(_expl(val, "cam"), reduce="norm", rangescale="extrema", colormap="gray")[0])
    assert np.array_equal(same, sens)
    with pytest.raises(ValueError, match="preset"):
        heatmap(_expl(val, "nonsense"))


def test_layouts_batch_scaling_and_errors():
    val = np.random.default_rng(4).standard_normal((2, 3, 5, 7)).astype(np.float32)
    nchw = [np.asarray(i) for i in heatmap(val)]
    nhwc = [np.asarray(i) for i in heatmap(val.transpose(0, 2, 3, 1), layout="NHWC")]
    assert all(np.array_equal(a, b) for a, b in zip(nchw, nhwc))
    three_d = [np.asarray(i) for i in heatmap(val.sum(1))]
    assert all(np.array_equal(a, b) for a, b in zip(nchw, three_d))
    val[1] *= 100
    together = [np.asarray(i) for i in heatmap(val, process_batch=True)]
    assert np.abs(together[0].astype(int) - 255).max() < 10  # dwarfed by the other sample: near white
    with pytest.raises(ValueError, match="text_heatmap"):
        heatmap(np.zeros((2, 20)))
    with pytest.raises(ValueError, match="colormap"):
        heatmap(val, colormap="no-such-map")
    with pytest.raises(ValueError, match="reduce"):
        heatmap(val, reduce="mean")
    import matplotlib
    assert np.asarray(heatmap(val, colormap=matplotlib.colormaps["bwr"])[0]).shape == (5, 7, 3)


def test_colorize_center_is_exact():
    assert tuple(colorize(np.array([0.5]), "seismic")[0]) == (255, 255, 255)
    assert tuple(colorize(np.array([0.5]), "bwr")[0]) == (255, 255, 255)


def test_overlay_blends_only_where_relevant():
    rng = np.random.default_rng(5)
    image = (rng.random((4, 4, 3)) * 255).astype(np.uint8)
    gray = np.repeat((image.astype(np.float32) @ np.array([0.299, 0.587, 0.114]))[:, :, None], 3, axis=2)
    out = np.asarray(heatmap_overlay(_expl(_signed_map()), image, alpha=0.6)[0]).astype(float)
    assert out.shape == (4, 4, 3)
    np.testing.assert_allclose(out[3], gray[3], atol=1.0)        # zero relevance: the (desaturated) image
    assert out[1, 0, 2] > out[1, 0, 0] + 30                      # strongest negative: blue tint
    assert out[0, 0, 0] > out[0, 0, 2] + 30                      # positive: red tint
    color = np.asarray(heatmap(_signed_map())[0]).astype(float)
    np.testing.assert_allclose(out[1, 0], 0.4 * gray[1, 0] + 0.6 * color[1, 0], atol=1.0)
    zero_alpha = np.asarray(heatmap_overlay(_signed_map(), image, alpha=0.0, grayscale=False)[0])
    assert np.array_equal(zero_alpha, image)


def test_overlay_resizes_to_the_image_and_takes_lists():
    val = np.random.default_rng(6).standard_normal((2, 3, 8, 8)).astype(np.float32)
    big = Image.new("RGB", (32, 24), (200, 100, 50))
    outs = heatmap_overlay(val, big)
    assert [o.size for o in outs] == [(32, 24), (32, 24)]
    outs = heatmap_overlay(val, [np.zeros((8, 8, 3)), np.ones((8, 8))])
    assert len(outs) == 2 and outs[1].size == (8, 8)
    with pytest.raises(ValueError, match="images"):
        heatmap_overlay(val, [big, big, big])


def test_heatmap_of_a_real_explanation():
    analyzer = onnxlrp.LRP(FIXTURES / "vgg.onnx", onnxlrp.EpsilonGammaBox(-3, 3), verbose=False, device="cpu")
    x = np.random.default_rng(7).standard_normal((2, 3, 32, 32)).astype(np.float32)
    expl = analyzer.analyze(x)
    imgs = onnxlrp.heatmap(expl)
    assert len(imgs) == 2 and imgs[0].size == (32, 32)
    s = expl.val[0].sum(0)
    a = np.asarray(imgs[0]).astype(int)
    strong = np.abs(s) > np.abs(s).max() / 256
    assert strong.sum() > 100
    assert np.array_equal(np.sign(a[..., 0] - a[..., 2])[strong], np.sign(s)[strong])
    over = onnxlrp.heatmap_overlay(expl, x.transpose(0, 2, 3, 1).clip(0, 1))
    assert len(over) == 2 and over[0].size == (32, 32)


def _on_colormap(img, colormap="seismic"):
    """Every pixel is one of the colormap's lookup-table colors."""
    def code(rgb):
        rgb = np.asarray(rgb, dtype=np.int64).reshape(-1, 3)
        return (rgb[:, 0] << 16) | (rgb[:, 1] << 8) | rgb[:, 2]
    return bool(np.all(np.isin(code(img), code(colormap_lut(colormap)))))


def test_size_upsamples_the_scaled_map_before_coloring():
    """heatmap(size=...) resizes the map, not the colors: every pixel stays on the colormap (an RGB resize
    would blend red and blue into purple), signs and the exact white of zero are kept."""
    val = _signed_map()
    big = heatmap(val, size=(40, 24))[0]
    assert big.size == (24, 40) and _on_colormap(big)
    a = np.asarray(big).astype(int)
    assert np.all(a[2, 3:21, 0] > a[2, 3:21, 2] + 50)       # inside row 0 (positive): red
    assert np.all(a[14, 3:21, 2] > a[14, 3:21, 0] + 50)     # inside row 1 (negative): blue
    assert tuple(a[35, 20]) == (255, 255, 255)              # inside the zero rows: white
    same = heatmap(val, size=(4, 4))[0]
    assert np.array_equal(np.asarray(same), np.asarray(heatmap(val)[0]))  # its own size: unchanged
    with pytest.raises(ValueError, match="size"):
        heatmap(val, size=(0, 4))


def test_value_range_and_vrange_share_one_scale():
    rng = np.random.default_rng(9)
    a = rng.standard_normal((1, 3, 6, 6))
    b = 10 * rng.standard_normal((1, 3, 8, 5))   # another shape, ten times stronger
    maps = [reduce_channels(a, "sum")[0], reduce_channels(b, "sum")[0]]
    lo, hi = value_range(maps)
    assert hi == pytest.approx(max(np.abs(m).max() for m in maps)) and lo == -hi
    lo_e, hi_e = value_range(maps, "extrema")
    assert (lo_e, hi_e) == (pytest.approx(min(m.min() for m in maps)), pytest.approx(max(m.max() for m in maps)))
    clipped = value_range(maps, percentile=50)
    assert 0 < clipped[1] < hi
    # vrange over two same-shaped maps is process_batch=True
    c = rng.standard_normal((2, 3, 6, 6))
    together = [np.asarray(i) for i in heatmap(c, process_batch=True)]
    vr = value_range(list(reduce_channels(c, "sum")))
    assert all(np.array_equal(x, np.asarray(heatmap(c[i:i + 1], vrange=vr)[0])) for i, x in enumerate(together))
    # the weaker map, on the stronger one's scale, is paler than on its own
    own = np.asarray(heatmap(a)[0]).astype(int)
    shared = np.asarray(heatmap(a, vrange=(lo, hi))[0]).astype(int)
    assert np.abs(shared - 255).sum() < np.abs(own - 255).sum() / 3
    # centered uses the larger magnitude of (lo, hi); extrema the range as given
    np.testing.assert_allclose(scale_range(np.array([[[-1.0, 1.0]]]), vrange=(-0.5, 2.0)), [[[0.25, 0.75]]])
    np.testing.assert_allclose(scale_range(np.array([[[0.0, 1.0, 3.0]]]), "extrema", vrange=(1.0, 2.0)),
                               [[[0.0, 0.0, 1.0]]])
    for bad in ((1.0,), (2.0, 1.0), (0.0, np.inf), "ab"):
        with pytest.raises(ValueError, match="vrange"):
            heatmap(a, vrange=bad)


def test_colorbar_draws_the_colormap_and_labels_its_range():
    from onnxlrp.heatmaps import _fmt_value
    val = np.random.default_rng(10).standard_normal((2, 3, 50, 40)).astype(np.float32)
    plain = heatmap(val)
    bars = heatmap(val, colorbar=True)
    assert len(bars) == 2
    for p, b in zip(plain, bars):
        arr = np.asarray(b)
        assert b.height == 96 and b.width > 40 + 30  # small pictures get a bar tall enough for its labels
        top = (96 - 50) // 2
        np.testing.assert_array_equal(arr[top:top + 50, :40], np.asarray(p))
        right = arr[:, 40:]
        for color in colorize(np.array([1.0, 0.5, 0.0]), "seismic"):  # both ends and the white middle
            assert np.any(np.all(right == color, axis=-1)), color
    big = heatmap(val[:1], size=(400, 320), colorbar=True, rangescale="extrema", colormap="viridis")[0]
    assert big.height == 400 and big.width > 320 + 40
    assert np.any(np.all(np.asarray(big)[:, 320:] == colorize(np.array([1.0]), "viridis")[0], axis=-1))
    over = heatmap_overlay(val[:1], np.zeros((50, 40, 3), np.uint8), colorbar=True)[0]
    assert over.size == bars[0].size
    assert [_fmt_value(v, True) for v in (0.0123456, 0.0, -0.0123456)] == ["+0.0123", "0", "-0.0123"]
    assert _fmt_value(2.5e-7, False) == "2.5e-07"


def test_overlay_of_a_big_image_matches_the_pixelwise_formula():
    """The overlay is blended a megapixel at a time: the same result as the formula on the whole image."""
    from PIL import Image
    from onnxlrp.heatmaps import _resized
    val = np.random.default_rng(11).standard_normal((1, 3, 8, 8))
    bg = (np.random.default_rng(12).random((1100, 1000, 3)) * 255).astype(np.uint8)
    out = np.asarray(heatmap_overlay(val, bg, alpha=0.5)[0]).astype(np.float32)
    s = _resized(scale_range(val.sum(1))[0], (1100, 1000))
    gray = np.repeat((bg.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32))[:, :, None], 3, axis=2)
    a = (0.5 * np.sqrt(np.abs(2.0 * s - 1.0)))[:, :, None].astype(np.float32)
    expected = np.clip((1 - a) * gray + a * colorize(s).astype(np.float32) + 0.5, 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(out, expected)
    assert _on_colormap(Image.fromarray(np.asarray(heatmap(val, size=(1100, 1000))[0])))


@pytest.mark.parametrize("options", [{}, {"size": (20, 12)}, {"rangescale": "extrema", "colormap": "jet"},
                                     {"percentile": 90.0, "colorbar": True}, {"vrange": (-0.5, 2.0)}])
@pytest.mark.parametrize("one_size", [True, False])
def test_heatmaps_and_overlays_are_heatmap_and_heatmap_overlay_pixel_for_pixel(options, one_size):
    """The batch drawing (one numpy pass over maps and pictures of one size; one by one otherwise) gives what
    the public functions give, sample by sample; a NaN in one map leaves the others as they were."""
    from onnxlrp.heatmaps import heatmaps_and_overlays
    rng = np.random.default_rng(5)
    maps = rng.standard_normal((4, 10, 6)) * np.array([1e-3, 1.0, 50.0, 0.0])[:, None, None]
    maps[1, 2, 3] = np.nan
    sizes = [(10, 6)] * 4 if one_size else [(10, 6), (13, 9), (10, 6), (4, 30)]
    pictures = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]
    heats, overlays = heatmaps_and_overlays(maps, pictures, 0.7, **options)
    assert len(heats) == len(overlays) == 4
    for k in range(4):
        one = {key: v for key, v in options.items()}
        np.testing.assert_array_equal(heats[k], np.asarray(heatmap(maps[k][None], **one)[0]))
        one.pop("size", None)
        np.testing.assert_array_equal(overlays[k], np.asarray(heatmap_overlay(maps[k][None], pictures[k], 0.7, **one)[0]))
        assert heats[k].dtype == overlays[k].dtype == np.uint8
    only_heats = heatmaps_and_overlays(maps, None, **options)
    assert only_heats[1] is None and all((a == b).all() for a, b in zip(only_heats[0], heats))
    assert heatmaps_and_overlays(maps, pictures, 0.7, draw_heatmaps=False, **options)[0] is None
    with pytest.raises(ValueError, match="alpha"):
        heatmaps_and_overlays(maps, pictures, 1.5)


# -- text ----------------------------------------------------------------------------------------------------
def test_text_heatmap_ansi_and_html():
    th = text_heatmap(["The", "movie", "was", "<great>"], [0.1, -1.0, 0.0, 1.0])
    ansi = str(th)
    assert ansi == th.ansi()
    assert ansi.count("\x1b[0m") == 4
    assert re.sub(r"\x1b\[[0-9;]*m", "", ansi) == "The movie was <great>"
    assert "\x1b[48;2;255;255;255m" in ansi  # "was" has zero relevance: white background
    html = th.html()
    assert "&lt;great&gt;" in html and "<great>" not in html
    assert html.count("<span") == 4 and th._repr_html_() == html
    assert "background-color:#ffffff" in html


def test_text_color_is_readable_on_every_background():
    def contrast(a, b):
        from onnxlrp.heatmaps import _luminance
        la, lb = sorted([_luminance(a), _luminance(b)], reverse=True)
        return (la + 0.05) / (lb + 0.05)

    th = text_heatmap([f"t{i}" for i in range(41)], np.linspace(-1, 1, 41))
    for bg, fg in zip(th.colors, th.text_colors):
        assert fg in ((0, 0, 0), (255, 255, 255))
        assert contrast(bg, fg) >= 4.5, (bg, fg)  # WCAG AA for normal text
    assert readable_text_color((0, 0, 77)) == (255, 255, 255)   # dark blue -> white text
    assert readable_text_color((255, 250, 250)) == (0, 0, 0)     # near white -> black text


def test_text_heatmap_shapes():
    rel = np.random.default_rng(8).standard_normal((1, 3, 16))  # (batch, tokens, embedding)
    th = text_heatmap(["a", "b", "c"], rel)
    np.testing.assert_allclose(th.relevance, rel[0].sum(-1))
    assert len(text_heatmap(["a", "b"], np.array([[1.0, -1.0]])).tokens) == 2
    with pytest.raises(ValueError, match="tokens"):
        text_heatmap(["a", "b"], [1.0, 2.0, 3.0])
    assert "\x1b" not in re.sub(r"\x1b\[[0-9;]*m", "", str(text_heatmap(["a\x1b[31m"], [1.0])))
