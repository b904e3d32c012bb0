"""Hostile and big inputs, pictures at the image's own size, --colorbar / --shared-scale and Ctrl-C
(``onnxlrp explain`` through click's CliRunner or ``onnxlrp.cli.main``, and ``onnxlrp.images``)."""
from __future__ import annotations

import json
import os
import pickle
import struct
import subprocess
import sys
import textwrap
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import onnxlrp
from onnxlrp import images
from onnxlrp.cli import main
from onnxlrp.cli.app import cli
from onnxlrp.heatmaps import colorize, reduce_channels, value_range
from onnxlrp.images import ImageTooLargeError, load_image, load_picture

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "models_fixtures"
VGG = str(FIXTURES / "vgg.onnx")
EXAMPLE = FIXTURES / "example.png"
EXAMPLE_LARGE = FIXTURES / "example_large.png"
EGB = ["--composite", "EpsilonGammaBox", "--low", "-3", "--high", "3"]


def invoke(*args):
    try:  # click < 8.2 mixes stderr into stdout unless told not to
        runner = CliRunner(mix_stderr=False)
    except TypeError:
        runner = CliRunner()
    return runner.invoke(cli, [str(a) for a in args], prog_name="onnxlrp")


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _write_png(path, width, height, pixels=True):
    """An RGB PNG written row by row (a few MB of memory whatever its size): the top half mid-gray, a band
    of a color ramp below the middle, the rest black. ``pixels=False`` writes the header only (enough for
    Pillow to refuse the size)."""
    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    idat = b""
    if pixels:
        comp = zlib.compressobj(9)
        gray = b"\x00" + b"\x80" * (3 * width)
        black = b"\x00" + bytes(3 * width)
        ramp = b"\x00" + bytes(v for x in range(width) for v in (x * 255 // width, 64, 255 - x * 255 // width))
        parts = [comp.compress(gray if y < height // 2 else ramp if y < height // 2 + height // 8 else black)
                 for y in range(height)]
        idat = b"".join(parts) + comp.flush()
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)))
        f.write(chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def _reference_load(path, size, channels=3):
    """The full-resolution path load_image took before reduced decoding: all pixels to float, then resize."""
    img = images.open_image(path)
    with img:
        img.load()
        return images.resize(images._to_float(img, channels), size)


# -- 1. big images: reduced decoding, bounded memory, no raw DecompressionBombWarning ------------------------
def test_huge_png_for_a_small_model_costs_its_decoded_pixels_not_floats(tmp_path):
    """A 12000 x 12000 PNG (a few hundred KB) for a 32 x 32 input: once 34 s and 6 GB (converted to
    float32 at full size, then resized); now decoded, box-reduced and resized, with no warning."""
    big = _write_png(tmp_path / "big.png", 12000, 12000)
    assert big.stat().st_size < 4 << 20
    script = textwrap.dedent(f"""
        import json, resource, warnings
        import numpy as np
        from onnxlrp.images import load_image
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            a = load_image({str(big)!r}, size=(32, 32))
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
        print(json.dumps({{"peak_mb": peak / 1024, "warnings": [str(w.message) for w in caught],
                          "shape": a.shape, "top": a[:14].mean(axis=(0, 1)).tolist(),
                          "bottom": a[-10:].mean(axis=(0, 1)).tolist()}}))
    """)
    proc = subprocess.run([sys.executable, "-c", script], env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # no raw warning line either
    got = json.loads(proc.stdout)
    assert got["warnings"] == []
    assert got["shape"] == [32, 32, 3]
    np.testing.assert_allclose(got["top"], 128 / 255, atol=1e-3)      # the gray half
    np.testing.assert_allclose(got["bottom"], 0.0, atol=1e-3)         # the black end
    # the decoded 8-bit image is 576 MB in Pillow (4 bytes a pixel); the float path needed ~6 GB
    assert got["peak_mb"] < 800, got


def test_reduced_decoding_matches_the_full_resolution_path(tmp_path):
    """Fixture-sized images take the unchanged path (bit-identical); big PNGs and JPEGs are decoded reduced
    and stay within a small tolerance of the full-resolution result, for every channel mode."""
    for path, size in ((EXAMPLE, (32, 32)), (EXAMPLE_LARGE, (32, 32)), (EXAMPLE_LARGE, (24, 20)),
                       (EXAMPLE_LARGE, (72, 96))):
        np.testing.assert_array_equal(load_image(path, size), _reference_load(path, size))
    rng = np.random.default_rng(0)
    base = Image.open(EXAMPLE_LARGE).convert("RGB").resize((2400, 1800), Image.Resampling.BICUBIC)
    noisy = np.clip(np.asarray(base).astype(np.int16) + rng.integers(-20, 21, (1800, 2400, 3)), 0, 255)
    photo = Image.fromarray(noisy.astype(np.uint8))
    files = {"png": photo, "jpg": photo, "gray.png": photo.convert("L"), "palette.png": photo.convert("P"),
             "rgba.png": photo.convert("RGBA"), "gray16.png": Image.fromarray(noisy[..., 0].astype(np.uint16) * 257)}
    for name, img in files.items():
        path = tmp_path / f"big.{name}"
        img.save(path, **({"quality": 95} if name == "jpg" else {}))
        for size in ((32, 32), (224, 224), (60, 90)):
            got, ref = load_image(path, size), _reference_load(path, size)
            assert got.shape == ref.shape == (*size, 3)
            diff = np.abs(got - ref)
            assert diff.max() < 0.03 and diff.mean() < 0.002, (name, size, diff.max(), diff.mean())


def test_images_over_pillows_limit_load_reduced_without_a_warning(tmp_path, monkeypatch, recwarn):
    """Between PIL.Image.MAX_IMAGE_PIXELS and twice that Pillow warns (DecompressionBombWarning): such an
    image loads, no warning reaches the user, and the CLI writes its pictures at the image's size."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000_000)
    path = _write_png(tmp_path / "wide.png", 1500, 1000)  # 1.5 M pixels
    a = load_image(path, (32, 32))
    assert a.shape == (32, 32, 3)
    assert load_picture(path).size == (1500, 1000)
    r = invoke("explain", VGG, path, "--out", tmp_path / "o")
    assert r.exit_code == 0, r.stderr
    assert "Warning" not in r.stderr and "decompression" not in r.stderr.lower()
    assert [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)] == []
    with warnings.catch_warnings():  # this test's own look at the 1.5 M pixel overlay
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        assert Image.open(tmp_path / "o" / "wide_overlay.png").size == (1500, 1000)


def test_an_image_over_the_hard_limit_is_an_error_row(tmp_path):
    """Over twice MAX_IMAGE_PIXELS (Pillow's DecompressionBombError): one line naming the file and its pixel
    count; in the CLI that input's error row, the other inputs explained, exit 1."""
    bomb = _write_png(tmp_path / "bomb.png", 20000, 10000, pixels=False)  # 200 M pixels, 60 bytes
    with pytest.raises(ImageTooLargeError, match=r"bomb\.png: the image has 200,000,000 pixels, over the limit of "
                                                 r"178,956,970") as exc:
        load_image(bomb, (32, 32))
    assert "\n" not in str(exc.value)
    r = invoke("explain", VGG, EXAMPLE, bomb, "--out", tmp_path / "o")
    assert r.exit_code == 1, r.stderr
    assert "Traceback" not in r.stderr and "DecompressionBomb" not in r.stderr
    rows = r.stdout.strip().splitlines()[1:]
    assert rows[0].split()[0].endswith("example.png") and rows[1].split()[:2] == [str(bomb), "error"]
    errors = [line for line in r.stderr.splitlines() if "error" in line]
    assert errors == [f"onnxlrp: error: {bomb}: the image has 200,000,000 pixels, over the limit of 178,956,970 "
                      "(Pillow's decompression-bomb guard); not decoded"]
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["example_heatmap.png", "example_overlay.png"]


def test_an_image_that_does_not_decode_is_an_error_row(tmp_path):
    """A truncated file passes the header check; decoding it fails: that input's error row, not a run
    stopped halfway with some pictures written."""
    data = (FIXTURES / "example_large.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    r = invoke("explain", VGG, EXAMPLE, tmp_path / "cut.png", "--out", tmp_path / "o", "--json")
    assert r.exit_code == 1, r.stderr
    results = json.loads(r.stdout)["results"]
    assert [row["status"] for row in results] == ["ok", "error"]
    assert results[1]["error"].startswith("cannot decode the image")
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["example_heatmap.png", "example_overlay.png"]


# -- 2. .npy inputs that are not .npy arrays --------------------------------------------------------------
class _Trap:
    """Unpickling this writes a file: proof that a pickle was (not) loaded."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_npz_renamed_npy_and_pickles_are_one_line_errors(tmp_path):
    np.savez(tmp_path / "batch.npz", x=np.zeros((3, 32, 32), np.float32), y=np.ones(2))
    os.replace(tmp_path / "batch.npz", tmp_path / "batch.npy")
    r = invoke("explain", VGG, tmp_path / "batch.npy", "--out", tmp_path / "o")
    assert r.exit_code == 1
    assert "Traceback" not in r.stderr and "AttributeError" not in r.stderr
    assert r.stderr.strip().splitlines() == [f"Error: {tmp_path / 'batch.npy'}: is an .npz archive (of 'x', 'y'), "
                                             "not a .npy array; save the input with numpy.save"]
    assert not (tmp_path / "o").exists()

    trapped = tmp_path / "pickle_ran"
    np.save(tmp_path / "objects.npy", np.array([_Trap(str(trapped)), 1], dtype=object), allow_pickle=True)
    (tmp_path / "raw.npy").write_bytes(pickle.dumps(_Trap(str(trapped))))
    for name in ("objects.npy", "raw.npy"):
        r = invoke("explain", VGG, tmp_path / name, "--out", tmp_path / "o")
        assert r.exit_code == 1
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"Error: {tmp_path / name}: holds pickled Python objects")
        assert "allow_pickle=False" in lines[0]
    assert not trapped.exists()


# -- 3. pictures at the image's own size, --colorbar, --shared-scale ----------------------------------------
def test_heatmap_and_overlay_are_written_at_the_images_own_size(tmp_path):
    """example_large.png (96 x 72) for a 32 x 32 model: both pictures 96 x 72, the heatmap the relevance
    map upsampled before coloring, the overlay drawn on the image itself; .npy inputs keep the model's
    size; the relevance .npy stays at the model's size."""
    x = np.random.default_rng(0).standard_normal((3, 32, 32)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    out = tmp_path / "o"
    r = invoke("explain", VGG, *EGB, EXAMPLE_LARGE, tmp_path / "x.npy", "--out", out, "--save-npy")
    assert r.exit_code == 0, r.stderr
    rel = np.load(out / "example_large_relevance.npy")
    assert rel.shape == (3, 32, 32)
    heat = Image.open(out / "example_large_heatmap.png")
    over = Image.open(out / "example_large_overlay.png")
    assert heat.size == over.size == (96, 72)
    np.testing.assert_array_equal(np.asarray(heat), np.asarray(onnxlrp.heatmap(rel[None], size=(72, 96))[0]))
    picture = Image.open(EXAMPLE_LARGE).convert("RGB")
    np.testing.assert_array_equal(np.asarray(over), np.asarray(onnxlrp.heatmap_overlay(rel[None], picture)[0]))
    # the strongest relevance keeps its sign in the upsampled picture
    s = rel.sum(0)
    i, j = np.unravel_index(np.abs(s).argmax(), s.shape)
    px = np.asarray(heat).astype(int)[int((i + 0.5) * 72 / 32), int((j + 0.5) * 96 / 32)]
    assert np.sign(px[0] - px[2]) == np.sign(s[i, j])
    assert Image.open(out / "x_heatmap.png").size == (32, 32)


def test_pictures_of_huge_images_are_capped(tmp_path, monkeypatch):
    monkeypatch.setattr(images, "MAX_PICTURE_PIXELS", 40_000)
    assert images.picture_size((4000, 1000), 40_000) == (400, 100)
    assert images.picture_size((30, 20), 40_000) == (30, 20)
    path = _write_png(tmp_path / "pano.png", 4000, 1000)
    r = invoke("explain", VGG, path, "--out", tmp_path / "o")
    assert r.exit_code == 0, r.stderr
    for kind in ("heatmap", "overlay"):
        assert Image.open(tmp_path / "o" / f"pano_{kind}.png").size == (400, 100)


def _two_images(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    base = np.asarray(Image.open(EXAMPLE).convert("RGB"))
    Image.fromarray(base).save(folder / "a.png")
    Image.fromarray(255 - base[::-1]).save(folder / "b.png")
    return folder


def test_shared_scale_draws_every_input_on_one_range(tmp_path):
    folder = _two_images(tmp_path)
    for flag, out in ((None, tmp_path / "own"), ("--shared-scale", tmp_path / "shared")):
        r = invoke("explain", VGG, *EGB, folder, "--out", out, "--save-npy", "--batch-size", 1,
                   *([flag] if flag else []))
        assert r.exit_code == 0, r.stderr
    rels = [np.load(tmp_path / "own" / f"{n}_relevance.npy") for n in "ab"]
    maps = [reduce_channels(r, "sum", axis=0).astype(np.float32) for r in rels]  # what the CLI keeps
    lo, hi = value_range(maps)
    assert (lo, hi) == (-hi, pytest.approx(max(np.abs(m).max() for m in maps)))
    for n, rel, m in zip("ab", rels, maps):
        np.testing.assert_array_equal(np.load(tmp_path / "shared" / f"{n}_relevance.npy"), rel)
        own = np.asarray(Image.open(tmp_path / "own" / f"{n}_heatmap.png"))
        shared = np.asarray(Image.open(tmp_path / "shared" / f"{n}_heatmap.png"))
        np.testing.assert_array_equal(own, np.asarray(onnxlrp.heatmap(rel[None])[0]))
        np.testing.assert_array_equal(shared, np.asarray(onnxlrp.heatmap(m[None], vrange=(lo, hi))[0]))
    weaker = int(np.argmin([np.abs(m).max() for m in maps]))
    n = "ab"[weaker]
    own = np.asarray(Image.open(tmp_path / "own" / f"{n}_heatmap.png")).astype(int)
    shared = np.asarray(Image.open(tmp_path / "shared" / f"{n}_heatmap.png")).astype(int)
    assert np.abs(shared - 255).sum() < np.abs(own - 255).sum()  # paler next to the stronger map


def test_colorbar_labels_the_range_next_to_the_picture(tmp_path):
    r = invoke("explain", VGG, *EGB, EXAMPLE_LARGE, "--out", tmp_path / "plain", "--save-npy")
    assert r.exit_code == 0, r.stderr
    r = invoke("explain", VGG, *EGB, EXAMPLE_LARGE, "--out", tmp_path / "bar", "--colorbar")
    assert r.exit_code == 0, r.stderr
    for kind in ("heatmap", "overlay"):
        plain = np.asarray(Image.open(tmp_path / "plain" / f"example_large_{kind}.png"))
        bar = np.asarray(Image.open(tmp_path / "bar" / f"example_large_{kind}.png"))
        assert bar.shape[0] == 96 and bar.shape[1] > 96 + 40  # the picture is 96 x 72, the bar needs 96 high
        top = (96 - 72) // 2
        np.testing.assert_array_equal(bar[top:top + 72, :96], plain)  # the picture itself is unchanged
        right = bar[:, 96:]
        ends = colorize(np.array([1.0, 0.0]), "seismic")
        for color in ends:  # the colormap's two ends are in the bar
            assert np.any(np.all(right == color, axis=-1)), color
        assert np.any(right.sum(-1) < 150)  # dark label text
    rel = np.load(tmp_path / "plain" / "example_large_relevance.npy")
    expected = onnxlrp.heatmap(rel[None], size=(72, 96), colorbar=True)[0]
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "bar" / "example_large_heatmap.png")),
                                  np.asarray(expected))
    r = invoke("explain", FIXTURES / "mlp.onnx", "--text", "x", "--tokenizer", "t.json", "--colorbar")
    assert r.exit_code == 2 and "--colorbar" in r.stderr


# -- 4. Ctrl-C: the finished inputs' table, exit 130 --------------------------------------------------------
def _interrupt_on_call(monkeypatch, n):
    """Ctrl-C while the command waits for the n-th batch's relevance run (where the main thread, which
    Python gives the interrupt to, spends its time; the runs themselves may be on threads of their own)."""
    import onnxlrp.cli.explain as explain_module
    real, calls = explain_module._Run._hand_over, []

    def hand_over(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(explain_module._Run, "_hand_over", hand_over)
    return calls


def _three_images(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    base = np.asarray(Image.open(EXAMPLE).convert("RGB"))
    for i in range(3):
        Image.fromarray(np.roll(base, 5 * i, axis=1)).save(folder / f"img{i}.png")
    return folder


@pytest.mark.parametrize("limit, calls", [(None, [1, 4]), (0, [1, 1, 1, 1, 1])])
def test_a_batch_is_drawn_in_one_go_and_each_picture_is_its_own(tmp_path, monkeypatch, limit, calls):
    """One batch of five images, four of one size and one larger: the four are drawn together (one call of
    heatmaps_and_overlays), the other on its own (its size); pictures over BATCH_DRAW_PIXELS (here: all) one
    by one. Every picture is the public functions' drawing of its own relevance."""
    import onnxlrp.cli.explain as explain_module
    import onnxlrp.heatmaps as heatmaps_module
    if limit is not None:
        monkeypatch.setattr(explain_module, "BATCH_DRAW_PIXELS", limit)
    folder = _three_images(tmp_path)
    base = np.asarray(Image.open(EXAMPLE).convert("RGB"))
    Image.fromarray(base[::-1]).save(folder / "img3.png")
    Image.open(EXAMPLE_LARGE).save(folder / "img4.png")
    real, batches = heatmaps_module.heatmaps_and_overlays, []

    def counting(maps, *args, **kwargs):
        batches.append(len(maps))
        return real(maps, *args, **kwargs)

    monkeypatch.setattr(heatmaps_module, "heatmaps_and_overlays", counting)
    out = tmp_path / "o"
    r = invoke("explain", VGG, *EGB, folder, "--out", out, "--save-npy", "-b", "5")
    assert r.exit_code == 0, r.stderr
    assert sorted(batches) == calls
    for i in range(5):
        rel = np.load(out / f"img{i}_relevance.npy")
        picture = Image.open(folder / f"img{i}.png").convert("RGB")
        size = (picture.height, picture.width)
        np.testing.assert_array_equal(np.asarray(Image.open(out / f"img{i}_heatmap.png")),
                                      np.asarray(onnxlrp.heatmap(rel[None], size=size)[0]))
        np.testing.assert_array_equal(np.asarray(Image.open(out / f"img{i}_overlay.png")),
                                      np.asarray(onnxlrp.heatmap_overlay(rel[None], picture)[0]))


@pytest.mark.parametrize("extra", [[], ["--shared-scale"]])
def test_ctrl_c_prints_the_finished_inputs_and_exits_130(tmp_path, monkeypatch, capsys, extra):
    folder = _three_images(tmp_path)
    _interrupt_on_call(monkeypatch, 2)
    out = tmp_path / "o"
    code = main(["explain", VGG, str(folder), "--out", str(out), "--batch-size", "1", *extra],
                standalone_mode=False)
    captured = capsys.readouterr()
    assert code == 130, captured.err
    lines = captured.out.strip().splitlines()
    assert lines[0].split()[:3] == ["input", "predicted", "score"]
    assert len(lines) == 2 and lines[1].split()[0] == str(folder / "img0.png")
    assert "onnxlrp: interrupted after 1 of 3 inputs" in captured.err
    assert "Traceback" not in captured.err and "Aborted" not in captured.err
    assert "wrote 1 heatmap, 1 overlay" in captured.err
    assert sorted(p.name for p in out.iterdir()) == ["img0_heatmap.png", "img0_overlay.png"]


def test_ctrl_c_with_json_and_nothing_finished(tmp_path, monkeypatch, capsys):
    folder = _three_images(tmp_path)
    _interrupt_on_call(monkeypatch, 3)
    code = main(["explain", VGG, str(folder), "--out", str(tmp_path / "o"), "-b", "1", "--json", "-q"],
                standalone_mode=False)
    captured = capsys.readouterr()
    assert code == 130
    doc = json.loads(captured.out)
    assert doc["interrupted"] is True and doc["inputs"] == 3
    assert [Path(row["input"]).name for row in doc["results"]] == ["img0.png", "img1.png"]
    assert captured.err.strip() == "onnxlrp: interrupted after 2 of 3 inputs"

    _interrupt_on_call(monkeypatch, 1)
    r = invoke("explain", VGG, folder, "--out", tmp_path / "none", "-b", "1")
    assert r.exit_code == 130
    assert "interrupted after 0 of 3 inputs" in r.stderr
    assert not (tmp_path / "none").exists()  # nothing written: no empty folder left behind


def test_json_says_when_a_run_is_complete(tmp_path):
    r = invoke("explain", VGG, EXAMPLE, "--out", tmp_path / "o", "--json")
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["interrupted"] is False and doc["inputs"] == 1 == len(doc["results"])


@pytest.mark.parametrize("shared", [False, True])
def test_ctrl_c_while_writing_keeps_whole_inputs_only(tmp_path, monkeypatch, capsys, shared):
    """Ctrl-C between an input's files removes the ones it already has (an input is written all or none);
    with --shared-scale, a Ctrl-C while the pictures are drawn keeps the inputs drawn so far."""
    import onnxlrp.cli.explain as explain_module
    folder = _three_images(tmp_path)
    real, calls = explain_module.save_png, []

    def save_png(img, target):
        calls.append(target)
        if len(calls) == 4:  # img1's overlay: img0 is complete, img1 has its heatmap only
            raise KeyboardInterrupt
        return real(img, target)

    monkeypatch.setattr(explain_module, "save_png", save_png)
    out = tmp_path / "o"
    code = main(["explain", VGG, str(folder), "--out", str(out), "-b", "1", "--save-npy",
                 *(["--shared-scale"] if shared else [])], standalone_mode=False)
    captured = capsys.readouterr()
    assert code == 130, captured.err
    assert len(captured.out.strip().splitlines()) == 2  # the header and img0
    assert "interrupted after 1 of 3 inputs" in captured.err
    assert sorted(p.name for p in out.iterdir()) == ["img0_heatmap.png", "img0_overlay.png", "img0_relevance.npy"]
