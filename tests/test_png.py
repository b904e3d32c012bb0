"""onnxlrp.png: PNG files from uint8 pixels, read back by Pillow exactly."""
from __future__ import annotations

import io
import os

import numpy as np
import pytest
from PIL import Image

from onnxlrp.png import encode_png, write_png


@pytest.mark.parametrize("shape, mode", [((1, 1), "L"), ((3, 9, 1), "L"), ((7, 5, 2), "LA"), ((1, 1, 3), "RGB"),
                                         ((32, 32, 3), "RGB"), ((1, 100, 3), "RGB"), ((100, 1, 3), "RGB"),
                                         ((5, 7, 4), "RGBA")])
@pytest.mark.parametrize("level", [0, 1, 9])
def test_pillow_reads_back_the_same_pixels(shape, mode, level):
    pixels = np.random.default_rng(sum(shape)).integers(0, 256, shape, dtype=np.uint8)
    img = Image.open(io.BytesIO(encode_png(pixels, level)))
    img.load()  # decodes every row and checks the chunks' CRCs
    assert img.mode == mode and img.size == (shape[1], shape[0])
    expected = pixels[:, :, 0] if pixels.ndim == 3 and shape[2] == 1 else pixels
    np.testing.assert_array_equal(np.asarray(img), expected)


def test_rows_that_differ_by_wrapping_around_and_a_pil_image():
    """The Up filter subtracts modulo 256 (0 - 255 and 255 - 0 alike); a PIL image is taken as its pixels."""
    pixels = np.zeros((4, 3, 3), np.uint8)
    pixels[1::2] = 255
    pixels[2, 1] = [1, 128, 254]
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(encode_png(pixels)))), pixels)
    img = Image.fromarray(pixels)
    assert encode_png(img) == encode_png(pixels)


def test_smooth_pictures_compress_and_noise_stays_whole():
    ramp = np.broadcast_to(np.arange(256, dtype=np.uint8)[None, :, None], (256, 256, 3))
    assert len(encode_png(ramp)) < ramp.nbytes // 50
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    assert len(encode_png(noise)) < noise.nbytes * 1.02


@pytest.mark.parametrize("bad, message", [(np.zeros((4, 4), np.float32), "uint8"),
                                          (np.zeros((4, 4, 5), np.uint8), r"\(H, W\) or \(H, W, 1-4\)"),
                                          (np.zeros((0, 4, 3), np.uint8), "shape"),
                                          (np.zeros(4, np.uint8), "shape")])
def test_refuses_what_is_not_an_8_bit_picture(bad, message):
    with pytest.raises(ValueError, match=message):
        encode_png(bad)


def test_write_png_replaces_a_planted_link_instead_of_writing_through_it(tmp_path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    target = tmp_path / "out.png"
    os.symlink(victim, target)
    pixels = np.full((2, 2, 3), 7, np.uint8)
    write_png(pixels, target)
    assert victim.read_bytes() == b"keep" and not target.is_symlink()
    np.testing.assert_array_equal(np.asarray(Image.open(target)), pixels)
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".partial")] == []
