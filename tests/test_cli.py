"""The command line: onnxlrp explain / check / layers / rules / export (click's CliRunner and subprocesses)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

import onnxlrp
from onnxlrp.cli import main
from onnxlrp.cli.app import cli
from onnxlrp.images import IMAGENET_MEAN, IMAGENET_STD, load_image, normalize

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "models_fixtures"
VGG = str(FIXTURES / "vgg.onnx")
EXAMPLE = str(FIXTURES / "example.png")
EGB = ["--composite", "EpsilonGammaBox", "--low", "-3", "--high", "3"]


def _runner():
    try:  # click < 8.2 mixes stderr into stdout unless told not to
        return CliRunner(mix_stderr=False)
    except TypeError:
        return CliRunner()


def invoke(*args):
    return _runner().invoke(cli, [str(a) for a in args], prog_name="onnxlrp")


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _api_relevance(model, image_paths, composite, size=(32, 32), channels=3, layout="NCHW"):
    """The relevance the Python API gives for the CLI's default preprocessing."""
    xs = []
    for p in image_paths:
        a = load_image(p, size=size, channels=channels)
        a = normalize(a, IMAGENET_MEAN if channels == 3 else (0.449,), IMAGENET_STD if channels == 3 else (0.226,))
        xs.append(a.transpose(2, 0, 1) if layout == "NCHW" else a)
    analyzer = onnxlrp.LRP(model, composite, verbose=False, device="cpu")
    return analyzer.analyze(np.stack(xs))


def _assert_sign_colors(png, relevance_chw):
    """Red where the channel-summed relevance is positive, blue where negative, white where ~0."""
    s = relevance_chw.sum(0)
    img = np.asarray(Image.open(png).convert("RGB")).astype(int)
    assert img.shape[:2] == s.shape
    strong = np.abs(s) > np.abs(s).max() / 256
    assert strong.mean() > 0.5
    assert np.array_equal(np.sign(img[..., 0] - img[..., 2])[strong], np.sign(s)[strong])
    assert np.all(img[~strong] == 255)


def _conv_model(path, channels=3, hw=(16, 16), layout="NCHW", seed=0):
    """A small Conv-Relu-GAP-Gemm classifier (3 classes); hw=None makes height and width dynamic."""
    rng = np.random.default_rng(seed)
    h, w = hw if hw else ("H", "W")
    shape = ["N", channels, h, w] if layout == "NCHW" else ["N", h, w, channels]
    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, shape)
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])
    inits = [numpy_helper.from_array(rng.standard_normal((4, channels, 3, 3)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "b1"),
             numpy_helper.from_array(rng.standard_normal((3, 4)).astype(np.float32), "w2"),
             numpy_helper.from_array(rng.standard_normal(3).astype(np.float32), "b2")]
    nodes, src = [], "image"
    if layout == "NHWC":
        nodes.append(helper.make_node("Transpose", ["image"], ["nchw"], perm=[0, 3, 1, 2], name="to_nchw"))
        src = "nchw"
    nodes += [helper.make_node("Conv", [src, "w1", "b1"], ["c"], pads=[1, 1, 1, 1], name="conv"),
              helper.make_node("Relu", ["c"], ["r"], name="relu"),
              helper.make_node("GlobalAveragePool", ["r"], ["p"], name="gap"),
              helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
              helper.make_node("Gemm", ["f", "w2", "b2"], ["logits"], transB=1, name="fc")]
    model = helper.make_model(helper.make_graph(nodes, "small", [x], [y], inits),
                              opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(model, path)
    return str(path)


def _unsupported_model(path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])
    w = numpy_helper.from_array(np.ones((4, 3), np.float32), "W")
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
             helper.make_node("Sin", ["h"], ["y"], name="sin0")]
    onnx.save(helper.make_model(helper.make_graph(nodes, "g", [x], [y], [w]),
                                opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)
    return str(path)


def _error_line(result):
    """The single stderr line of a failed run (and no traceback)."""
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    assert "Traceback" not in result.stderr
    errors = [l for l in lines if l.startswith("Error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


# -- the headline command ---------------------------------------------------------------------------------------
def test_exact_command_in_a_fresh_process(tmp_path):
    """`onnxlrp explain models_fixtures/vgg.onnx --composite EpsilonGammaBox --low -3 --high 3
    models_fixtures/example.png` from a clean working folder: heatmap red where relevance > 0, overlay."""
    shutil.copytree(FIXTURES, tmp_path / "models_fixtures",
                    ignore=lambda d, names: [n for n in names if not n.startswith(("vgg.onnx", "example.png"))])
    cmd = [sys.executable, "-m", "onnxlrp", "explain", "models_fixtures/vgg.onnx", "--composite",
           "EpsilonGammaBox", "--low", "-3", "--high", "3", "models_fixtures/example.png"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "lrp_out"
    assert sorted(p.name for p in out.iterdir()) == ["example_heatmap.png", "example_overlay.png"]
    expl = _api_relevance(VGG, [EXAMPLE], onnxlrp.EpsilonGammaBox(-3, 3))
    _assert_sign_colors(out / "example_heatmap.png", expl.val[0])
    overlay = Image.open(out / "example_overlay.png")
    assert overlay.mode == "RGB" and overlay.size == (32, 32)
    # the summary table: header + one row with the file, the top class and the relevance sum
    header, row = proc.stdout.strip().splitlines()
    assert header.split()[:3] == ["input", "predicted", "score"]
    assert row.split()[0] == "models_fixtures/example.png"
    assert int(row.split()[1]) == int(expl.output[0].argmax())
    assert float(row.split()[-1]) == pytest.approx(float(expl.val[0].sum()), abs=1e-3)
    assert "wrote 1 heatmap, 1 overlay" in proc.stderr


def test_console_script_and_main():
    tomllib = pytest.importorskip("tomllib")
    with open(ROOT / "pyproject.toml", "rb") as f:
        assert tomllib.load(f)["project"]["scripts"]["onnxlrp"] == "onnxlrp.cli:main"
    assert main(["--version"], standalone_mode=False) == 0
    assert main(["explain"], standalone_mode=False) == 2
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0


def test_saved_relevance_and_json_match_the_api(tmp_path):
    r = invoke("explain", VGG, *EGB, EXAMPLE, FIXTURES / "example_large.png", "--out", tmp_path / "o",
               "--save-npy", "--json")
    assert r.exit_code == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["rules"] == "EpsilonGammaBox(low=-3, high=3)"
    assert [row["name"] for row in data["results"]] == ["example", "example_large"]
    expl = _api_relevance(VGG, [EXAMPLE, FIXTURES / "example_large.png"], onnxlrp.EpsilonGammaBox(-3, 3))
    for i, row in enumerate(data["results"]):
        saved = np.load(row["relevance"])
        np.testing.assert_allclose(saved, expl.val[i], rtol=1e-5, atol=1e-7)
        assert row["predicted"] == row["explained"] == int(expl.output[i].argmax())
        assert row["score"] == pytest.approx(float(expl.output[i].max()), rel=1e-5)
        assert row["relevance_sum"] == pytest.approx(float(expl.val[i].sum()), rel=1e-4, abs=1e-6)
        if i == 0:  # example.png is 32 x 32, the model's size: the heatmap's pixels are the relevance's
            _assert_sign_colors(row["heatmap"], expl.val[i])
        # pictures at the image's own size (the large one's map upsampled from the model's 32 x 32)
        assert Image.open(row["heatmap"]).size == Image.open(row["overlay"]).size == Image.open(row["input"]).size


def test_label_files_are_validated_and_sparse(tmp_path):
    """{"300000000": "x"} is one entry (it once allocated 2.4 GB); negative keys are refused, not wrapped
    around to label another class; a label past the outputs is noted."""
    from onnxlrp.cli.explain import load_labels
    huge = tmp_path / "huge.json"
    huge.write_text('{"300000000": "x", "7": "seven"}')
    assert load_labels(str(huge)) == {300000000: "x", 7: "seven"}
    r = invoke("explain", VGG, EXAMPLE, "--out", tmp_path / "o", "--output-selection", 7, "--labels", huge)
    assert r.exit_code == 0, r.stderr
    assert "(seven)" in r.stdout and "labels class 300000000, the model has 10 outputs" in r.stderr
    for text, message in (('{"-1": "x", "3": "y"}', "label key -1 is negative"),
                          ('{"-2": "x"}', "label key -2 is negative"), ('{"a": "x"}', "must be class indices, got 'a'")):
        bad = tmp_path / "bad.json"
        bad.write_text(text)
        r = invoke("explain", VGG, EXAMPLE, "--out", tmp_path / "b", "--labels", bad)
        assert r.exit_code == 1 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert not (tmp_path / "b").exists()


def test_default_rules_output_selection_and_labels(tmp_path):
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(f"class{i}" for i in range(10)))
    r = invoke("explain", VGG, EXAMPLE, "--out", tmp_path / "o", "--output-selection", 7, "--labels", labels,
               "--save-npy")
    assert r.exit_code == 0, r.stderr
    assert "EpsilonPlus()" in r.stderr
    header, row = r.stdout.strip().splitlines()
    assert "explained" in header and "(class7)" in row
    expl = _api_relevance(VGG, [EXAMPLE], onnxlrp.EpsilonPlus())
    analyzer = onnxlrp.LRP(VGG, onnxlrp.EpsilonPlus(), verbose=False, device="cpu")
    x = normalize(load_image(EXAMPLE, (32, 32)), IMAGENET_MEAN, IMAGENET_STD).transpose(2, 0, 1)[None]
    np.testing.assert_allclose(np.load(tmp_path / "o" / "example_relevance.npy"),
                               analyzer.analyze(x, 7).val[0], rtol=1e-5, atol=1e-7)
    assert f"({'class%d' % int(expl.output[0].argmax())})" in row


def test_rule_option_and_heatmap_options(tmp_path):
    r = invoke("explain", VGG, "--rule", "epsilon", "--epsilon", "0.01", EXAMPLE, "--out", tmp_path / "o",
               "--reduce", "norm", "--rangescale", "extrema", "--colormap", "inferno", "--clip-percentile", "99",
               "--json")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["rules"] == "EpsilonRule(epsilon=0.01) on every layer it fits"
    r = invoke("explain", VGG, "--rule", "ZBox", EXAMPLE, "--out", tmp_path / "o2")
    assert r.exit_code == 2 and "--low and --high" in r.stderr


def test_folder_of_50_images_progress_bar_and_no_overwrite(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    base = np.asarray(Image.open(EXAMPLE).convert("RGB"))
    for i in range(50):
        Image.fromarray(np.roll(base, i, axis=1)).save(folder / f"img{i:02d}.png")
    (folder / "notes.txt").write_text("not an image: skipped in folders")
    out = tmp_path / "out"
    r = invoke("explain", VGG, *EGB, folder, "--out", out, "--batch-size", 16, "--progress")
    assert r.exit_code == 0, r.stderr
    assert "explaining 16/50" in r.stderr and "explaining 50/50 (100%)" in r.stderr
    files = sorted(p.name for p in out.iterdir())
    assert len(files) == 100 and files[0] == "img00_heatmap.png"
    assert len(r.stdout.strip().splitlines()) == 51
    stamps = {p: p.stat().st_mtime_ns for p in out.iterdir()}

    again = invoke("explain", VGG, *EGB, folder, "--out", out)
    assert again.exit_code == 1
    assert "pass --force" in _error_line(again)
    assert {p: p.stat().st_mtime_ns for p in out.iterdir()} == stamps

    forced = invoke("explain", VGG, *EGB, folder, "--out", out, "--force", "--batch-size", 64)
    assert forced.exit_code == 0, forced.stderr
    assert "explaining" not in forced.stderr  # one batch, not a terminal: no progress bar
    assert sorted(p.name for p in out.iterdir()) == files


def test_image_kinds_are_handled(tmp_path):
    """Grayscale, RGBA, palette, 16-bit and JPEG images all become 3-channel model inputs."""
    rgb = np.asarray(Image.open(FIXTURES / "example_large.png").convert("RGB"))
    Image.fromarray(rgb).convert("L").save(tmp_path / "gray.png")
    Image.fromarray(rgb).convert("RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(rgb).convert("P").save(tmp_path / "palette.gif")
    Image.fromarray((rgb[..., 0].astype(np.uint16) * 257)).save(tmp_path / "gray16.png")
    Image.fromarray(rgb).save(tmp_path / "photo.jpg", quality=90)
    r = invoke("explain", VGG, *EGB, tmp_path, "--out", tmp_path / "o", "--json")
    assert r.exit_code == 0, r.stderr
    names = [row["name"] for row in json.loads(r.stdout)["results"]]
    assert names == ["gray", "gray16", "palette", "photo", "rgba"]
    g16 = load_image(tmp_path / "gray16.png")
    np.testing.assert_allclose(g16[..., 0], rgb[..., 0] / 255.0, atol=1e-6)
    np.testing.assert_allclose(load_image(tmp_path / "rgba.png"), rgb / 255.0, atol=1e-6)


def test_npy_inputs_and_non_image_models(tmp_path):
    x = np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)
    np.save(tmp_path / "batch.npy", x)
    np.save(tmp_path / "one.npy", x[0])
    r = invoke("explain", VGG, *EGB, tmp_path / "batch.npy", tmp_path / "one.npy", "--out", tmp_path / "o",
               "--save-npy", "--json")
    assert r.exit_code == 0, r.stderr
    rows = json.loads(r.stdout)["results"]
    assert [row["name"] for row in rows] == ["batch_0", "batch_1", "batch_2", "one"]
    assert all(row["overlay"] is None for row in rows)  # no picture to draw on
    expl = onnxlrp.LRP(VGG, onnxlrp.EpsilonGammaBox(-3, 3), verbose=False, device="cpu").analyze(x)
    np.testing.assert_allclose(np.load(rows[1]["relevance"]), expl.val[1], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.load(rows[3]["relevance"]), expl.val[0], rtol=1e-5, atol=1e-7)

    feats = np.random.default_rng(1).standard_normal((5, 20)).astype(np.float32)
    np.save(tmp_path / "feats.npy", feats)
    r = invoke("explain", FIXTURES / "mlp.onnx", tmp_path / "feats.npy", "--out", tmp_path / "m")
    assert r.exit_code == 0, r.stderr
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [f"feats_{i}_relevance.npy" for i in range(5)]


def test_nhwc_and_dynamic_models(tmp_path):
    nhwc = _conv_model(tmp_path / "nhwc.onnx", layout="NHWC")
    r = invoke("explain", nhwc, *EGB, EXAMPLE, "--out", tmp_path / "o", "--save-npy")
    assert r.exit_code == 0, r.stderr
    rel = np.load(tmp_path / "o" / "example_relevance.npy")
    assert rel.shape == (16, 16, 3)
    heat = np.asarray(Image.open(tmp_path / "o" / "example_heatmap.png"))
    assert heat.shape == (32, 32, 3)  # the image's size; the model's input is 16 x 16
    np.testing.assert_array_equal(heat, np.asarray(onnxlrp.heatmap(rel[None], layout="NHWC", size=(32, 32))[0]))
    expl = _api_relevance(nhwc, [EXAMPLE], onnxlrp.EpsilonGammaBox(-3, 3), size=(16, 16), layout="NHWC")
    np.testing.assert_allclose(rel, expl.val[0], rtol=1e-5, atol=1e-7)

    dyn = _conv_model(tmp_path / "dyn.onnx", hw=None)
    r = invoke("explain", dyn, EXAMPLE, FIXTURES / "example_large.png", "--out", tmp_path / "d", "--json")
    assert r.exit_code == 0, r.stderr
    assert Image.open(tmp_path / "d" / "example_large_heatmap.png").size == (96, 72)  # kept its size
    r = invoke("explain", dyn, FIXTURES / "example_large.png", "--out", tmp_path / "d2", "--input-shape", "3,24,20")
    assert r.exit_code == 0, r.stderr
    assert Image.open(tmp_path / "d2" / "example_large_heatmap.png").size == (96, 72)  # the image's size


# -- bad inputs: one line, exit 1 or 2, nothing written -----------------------------------------------------------
def _bad_cases(tmp_path):
    (tmp_path / "notes.png").write_text("this is text, not a PNG")
    (tmp_path / "model.onnx").write_bytes(b"\x00\x01garbage that is not protobuf" * 10)
    (tmp_path / "a_file").write_text("x")
    gray_model = _conv_model(tmp_path / "gray_model.onnx", channels=1)
    np.save(tmp_path / "four_channels.npy", np.zeros((4, 32, 32), np.float32))
    return {
        "missing input": ([VGG, tmp_path / "nope.png"], "nope.png: no such file"),
        "missing model": ([tmp_path / "nope.onnx", EXAMPLE], "nope.onnx: no such file"),
        "non-ONNX model": ([tmp_path / "model.onnx", EXAMPLE], "not an ONNX model"),
        "image as model": ([EXAMPLE, EXAMPLE], "not an ONNX model"),
        "non-image": ([VGG, tmp_path / "notes.png"], "not an image"),
        "color image, 1-channel model": ([gray_model, EXAMPLE], "the model takes 1 channel"),
        "wrong channel count .npy": ([VGG, tmp_path / "four_channels.npy"], "wrong channel count"),
        "output selection out of range": ([VGG, EXAMPLE, "--output-selection", 10], "out of range"),
        "negative output selection": ([VGG, EXAMPLE, "--output-selection", -2], "-2"),
        "image for a non-image model": ([FIXTURES / "mlp.onnx", EXAMPLE], "not an image"),
        "EpsilonGammaBox without bounds": ([VGG, EXAMPLE, "--composite", "EpsilonGammaBox"], "--low and --high"),
        "option of another preset": ([VGG, EXAMPLE, "--composite", "EpsilonPlus", "--gamma", 1], "--gamma"),
        "unknown preset": ([VGG, EXAMPLE, "--composite", "Nope"], "Nope"),
    }


@pytest.mark.parametrize("case", ["missing input", "missing model", "non-ONNX model", "image as model", "non-image",
                                  "color image, 1-channel model", "wrong channel count .npy",
                                  "output selection out of range", "negative output selection",
                                  "image for a non-image model", "EpsilonGammaBox without bounds",
                                  "option of another preset", "unknown preset"])
def test_bad_inputs_fail_cleanly(tmp_path, case):
    args, message = _bad_cases(tmp_path)[case]
    out = tmp_path / "out"
    r = invoke("explain", *args, "--out", out)
    assert r.exit_code in (1, 2), (r.exit_code, r.stdout, r.stderr)
    assert message in _error_line(r)
    assert not out.exists(), "nothing may be written"
    assert r.stdout == ""


@pytest.mark.parametrize("where", ["is a file", "under a file"])
def test_unwritable_output_folder(tmp_path, where):
    (tmp_path / "a_file").write_text("x")
    out = tmp_path / "a_file" if where == "is a file" else tmp_path / "a_file" / "sub"
    r = invoke("explain", VGG, EXAMPLE, "--out", out)
    assert r.exit_code == 1
    assert "--out" in _error_line(r)
    assert (tmp_path / "a_file").read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_folder(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        r = invoke("explain", VGG, EXAMPLE, "--out", ro / "out")
        assert r.exit_code == 1 and "cannot write" in _error_line(r)
    finally:
        ro.chmod(0o700)
    assert list(ro.iterdir()) == []


def test_debug_shows_the_traceback(tmp_path):
    (tmp_path / "m.onnx").write_bytes(b"not a model at all")
    r = invoke("explain", tmp_path / "m.onnx", EXAMPLE, "--out", tmp_path / "o", "--debug")
    assert r.exit_code == 1 and "Traceback" in r.stderr and "ModelLoadError" in r.stderr


def test_cuda_request_without_cuda_fails_in_one_line(tmp_path):
    from onnxlrp.runtime import cuda_available
    if cuda_available():
        pytest.skip("CUDA works here")
    r = invoke("explain", VGG, EXAMPLE, "--device", "cuda", "--out", tmp_path / "o")
    assert r.exit_code == 1 and "cuda" in _error_line(r).lower()
    assert not (tmp_path / "o").exists()


# -- check / layers / rules ---------------------------------------------------------------------------------------
def test_check(tmp_path):
    ok = invoke("check", VGG)
    assert ok.exit_code == 0 and "OK, every node is supported" in ok.stdout and "12 layers" in ok.stdout
    bad = invoke("check", _unsupported_model(tmp_path / "sin.onnx"))
    assert bad.exit_code == 1
    assert "1 node not supported" in bad.stdout and "node 'sin0' (op type Sin)" in bad.stdout
    r = invoke("explain", tmp_path / "sin.onnx", EXAMPLE, "--out", tmp_path / "o")
    assert r.exit_code == 1 and "'sin0' (Sin)" in _error_line(r)
    dyn = invoke("check", _conv_model(tmp_path / "dyn.onnx", hw=None))
    assert dyn.exit_code == 0 and "--input-shape" in dyn.stdout
    dyn = invoke("check", tmp_path / "dyn.onnx", "--input-shape", "3,8,8")
    assert dyn.exit_code == 0 and "run on a zero input" in dyn.stdout
    assert invoke("check", tmp_path / "none.onnx").exit_code == 1


def test_layers_and_rules():
    r = invoke("layers", VGG)
    assert r.exit_code == 0
    lines = r.stdout.splitlines()
    assert lines[0].split()[0] == "index" and len(lines) == 13
    assert "ZPlusRule()" in lines[1]  # the default preset, EpsilonPlus
    r = invoke("rules", VGG, *EGB)
    assert r.exit_code == 0
    assert "=> ZBoxRule(low=-3.0, high=3.0)" in r.stdout.splitlines()[2]
    assert "GammaRule(gamma=0.25)" in r.stdout and r.stdout.rstrip().endswith(")")
    r = invoke("rules", VGG, "--composite", "epsilonplusflat", "--epsilon", "1e-3")
    assert r.exit_code == 0 and "FlatRule()" in r.stdout and "EpsilonRule(epsilon=0.001)" in r.stdout
    r = invoke("rules", VGG, "--composite", "EpsilonPlus", "--rule", "ZeroRule")
    assert r.exit_code == 2


def test_help_texts():
    r = invoke("--help")
    assert r.exit_code == 0 and r.stdout.startswith("Usage: onnxlrp [OPTIONS] COMMAND")
    for cmd in ("explain", "check", "layers", "rules", "export"):
        assert cmd in r.stdout
    r = invoke("explain", "--help")
    assert r.exit_code == 0
    for needle in ("EpsilonGammaBox", "--low", "--output-selection", "--labels", "--mean", "--no-normalize",
                   "--layout", "--batch-size", "--device", "--force", "--save-npy", "--json", "red positive",
                   "Rules (default: EpsilonPlus)"):
        assert needle in r.stdout, needle
    assert "doc_string" in invoke("export", "--help").stdout


# -- export -----------------------------------------------------------------------------------------------------
def test_export_runs_in_plain_onnxruntime(tmp_path):
    out = tmp_path / "lrp.onnx"
    r = invoke("export", VGG, *EGB, "-o", out)
    assert r.exit_code == 0, r.stderr
    assert "output_selection int64 (N)" in r.stdout and "normalize_output_relevance" in r.stdout
    assert "Rules:" in r.stdout and "ZBoxRule" in r.stdout
    doc = onnx.load(str(out)).doc_string
    assert "output_selection" in doc and "relevance" in doc

    x = np.random.default_rng(3).standard_normal((3, 3, 32, 32)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    script = textwrap.dedent(f"""
        import sys
        import numpy as np
        import onnxruntime as ort
        sess = ort.InferenceSession({str(out)!r}, providers=["CPUExecutionProvider"])
        x = np.load({str(tmp_path / "x.npy")!r})
        feeds = {{"input": x, "output_selection": np.array([-1, 2, -1], dtype=np.int64),
                  "normalize_output_relevance": np.array(True)}}
        out, rel, used = sess.run(["output", "relevance", "output_selection_used"], feeds)
        np.save({str(tmp_path / "rel.npy")!r}, rel)
        np.save({str(tmp_path / "used.npy")!r}, used)
        assert not any(m == "onnxlrp" or m.startswith("onnxlrp.") for m in sys.modules), "onnxlrp was imported"
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-I", "-c", script], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    analyzer = onnxlrp.LRP(VGG, onnxlrp.EpsilonGammaBox(-3, 3), verbose=False, device="cpu")
    top = analyzer.analyze(x)
    sel = np.where(np.array([-1, 2, -1]) < 0, top.output_selection, 2)
    expected = analyzer.analyze(x, sel)
    np.testing.assert_array_equal(np.load(tmp_path / "used.npy"), sel)
    np.testing.assert_allclose(np.load(tmp_path / "rel.npy"), expected.val, rtol=1e-5, atol=1e-7)

    again = invoke("export", VGG, "-o", out)
    assert again.exit_code == 1 and "--force" in _error_line(again)
    assert invoke("export", VGG, "-o", out, "--force", "-q").stdout.strip() == str(out)


def test_export_of_dynamic_models_needs_input_shape(tmp_path):
    dyn = _conv_model(tmp_path / "dyn.onnx", hw=None)
    r = invoke("export", dyn, "-o", tmp_path / "d.onnx")
    assert r.exit_code == 1 and "--input-shape" in _error_line(r)
    assert not (tmp_path / "d.onnx").exists()
    r = invoke("export", dyn, "-o", tmp_path / "d.onnx", "--input-shape", "3,12,10")
    assert r.exit_code == 0, r.stderr
    import onnxruntime as ort
    sess = ort.InferenceSession(str(tmp_path / "d.onnx"), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((2, 3, 12, 10)).astype(np.float32)
    rel = sess.run(["relevance"], {"image": x, "output_selection": np.array([-1, -1], np.int64),
                                   "normalize_output_relevance": np.array(True)})[0]
    assert rel.shape == x.shape
    assert invoke("export", dyn, "-o", tmp_path / "e.onnx", "--input-shape", "3,12").exit_code == 2


def test_non_finite_inputs_and_results_are_errors_not_pictures(tmp_path):
    """NaN/Inf inputs (and inputs that overflow the forward pass) get an error row each, no picture that
    would read as 'no relevance', exit 1, and strict JSON (null, not NaN); the other inputs are explained."""
    rng = np.random.default_rng(0)
    good = rng.standard_normal((3, 32, 32)).astype(np.float32)
    nan = good.copy()
    nan[0, 3, 4] = np.nan
    huge = np.full_like(good, 3e38)  # finite, but the convolutions overflow to inf
    for name, a in (("good", good), ("nan", nan), ("huge", huge)):
        np.save(tmp_path / f"{name}.npy", a)
    inputs = [tmp_path / f"{n}.npy" for n in ("good", "nan", "huge")]
    r = invoke("explain", VGG, *inputs, "--out", tmp_path / "o", "--json", "--save-npy")
    assert r.exit_code == 1, r.stderr
    doc = json.loads(r.stdout, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    status = {Path(row["input"]).stem: (row["status"], row["error"]) for row in doc["results"]}
    assert status["good"] == ("ok", None)
    assert status["nan"][0] == "error" and "NaN or infinite" in status["nan"][1]
    assert status["huge"][0] == "error" and "not finite" in status["huge"][1]
    assert [Path(row["input"]).stem for row in doc["results"]] == ["good", "nan", "huge"]
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["good_heatmap.png", "good_relevance.npy"]
    r = invoke("explain", VGG, *inputs, "--out", tmp_path / "t")
    assert r.exit_code == 1
    assert any(line.split()[1:2] == ["error"] for line in r.stdout.splitlines())
    assert "nan.npy: the input holds NaN or infinite values" in r.stderr
