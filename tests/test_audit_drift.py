"""onnxlrp audit, issue 10 part 3: drift against a baseline (regression) and another export (compare), the
report folder, --config TOML, image inputs and the faithfulness options."""
from __future__ import annotations

import base64
import json
import os
import zlib

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import onnxlrp
from onnxlrp.auditing import BaselineError, audit, load_baseline
from onnxlrp.auditing.drift import decode_array, encode_array, topk_overlap
from onnxlrp.cli import main

from .helpers_fixtures import fixture_path

MLP = str(fixture_path("mlp"))


def _perturbed(path, tmp_path, which=1, factor=1.5):
    """A copy of ``path`` with its ``which``-th weight matrix changed: an export that drifted."""
    m = onnx.load(path)
    weights = [t for t in m.graph.initializer if len(t.dims) >= 2]
    w = numpy_helper.to_array(weights[which]).copy()
    w[0] *= -factor
    weights[which].CopyFrom(numpy_helper.from_array(w, weights[which].name))
    out = tmp_path / f"drifted_{os.path.basename(path)}"
    onnx.save(m, out)
    return str(out)


# -- regression against a baseline ----------------------------------------------------------------------------
def test_baseline_round_trip_passes_and_a_perturbed_weight_fails_naming_its_layer(tmp_path):
    base = tmp_path / "audit.json"
    first = audit(MLP, onnxlrp.EpsilonPlus(), precision_check=False, samples=3, seed=5)
    first.save_baseline(base)
    loaded = load_baseline(base)
    np.testing.assert_array_equal(loaded.inputs, first.data["inputs"])
    np.testing.assert_array_equal(loaded.relevance, first.data["relevance"])

    again = audit(MLP, onnxlrp.EpsilonPlus(), precision_check=False, baseline=base)
    reg = again.check("regression")
    assert reg.status == "pass" and max(reg.figures["relevance_rel_l2"]) == 0.0, reg.summary
    assert again.inputs.startswith("3 of the baseline")  # the baseline's inputs, not new synthetic ones

    drifted = audit(_perturbed(MLP, tmp_path), onnxlrp.EpsilonPlus(), precision_check=False, baseline=base)
    reg = drifted.check("regression")
    assert reg.status == "fail" and not drifted.passed
    assert reg.figures["model_changed"] is True
    changed = next(l for l in drifted.data["layers"] if l["op"] == "Gemm" and l["index"] > 0)
    assert reg.layer == f"{changed['index']} {changed['name']}"
    assert "other parameters than in the baseline" in reg.summary and "relative L2" in reg.summary


def test_regression_names_a_changed_rule_and_refuses_other_inputs(tmp_path):
    base = tmp_path / "audit.json"
    audit(MLP, onnxlrp.EpsilonPlus(), precision_check=False).save_baseline(base)
    other_rules = audit(MLP, onnxlrp.EpsilonRule(0.5), precision_check=False, baseline=base)
    assert "other rules than in the baseline" in other_rules.check("regression").summary
    x = np.random.default_rng(1).standard_normal((4, 20)).astype(np.float32)
    other_inputs = audit(MLP, onnxlrp.EpsilonPlus(), inputs=x, precision_check=False, baseline=base)
    assert other_inputs.check("regression").status == "fail"
    assert "other inputs than the baseline" in other_inputs.check("regression").summary


def test_drift_bounds_are_thresholds(tmp_path):
    base = tmp_path / "audit.json"
    audit(MLP, onnxlrp.EpsilonPlus(), precision_check=False).save_baseline(base)
    slight = _perturbed(MLP, tmp_path, which=0, factor=1.0001)
    tight = audit(slight, onnxlrp.EpsilonPlus(), precision_check=False, baseline=base,
                  thresholds={"drift_rtol": 1e-9, "drift_output_rtol": 1e-9})
    loose = audit(slight, onnxlrp.EpsilonPlus(), precision_check=False, baseline=base,
                  thresholds={"drift_rtol": 0.5, "drift_output_rtol": 0.5, "drift_topk_overlap": 0.0})
    assert tight.check("regression").status == "fail"
    assert loose.check("regression").status == "pass"
    assert "(within the bounds)" in loose.check("regression").summary  # the changed layer is still said


def test_topk_overlap():
    a = np.arange(200.0)[None]
    assert topk_overlap(a, a) == [1.0]
    assert topk_overlap(a, -a) == [0.0]  # the two most relevant features are the least relevant now
    b = a.copy()
    b[0, -1] = -1  # one of the top 2 moves away
    assert topk_overlap(a, b) == [0.5]


@pytest.mark.parametrize("damage,message", [
    (lambda doc: "not json", "not JSON"),
    (lambda doc: {"format": "other"}, "not an onnxlrp audit baseline"),
    (lambda doc: {**doc, "format_version": 99}, "format version 99"),
    (lambda doc: {**doc, "arrays": {**doc["arrays"], "relevance": {**doc["arrays"]["relevance"], "dtype": "object"}}},
     "dtype 'object'"),
    (lambda doc: {**doc, "arrays": {**doc["arrays"], "inputs": {**doc["arrays"]["inputs"], "shape": [2 ** 20, 2 ** 20]}}},
     "declares"),
    (lambda doc: {**doc, "arrays": {**doc["arrays"], "output": {**doc["arrays"]["output"], "zlib_base64": "@@@"}}},
     "damaged data"),
])
def test_a_damaged_baseline_is_refused_by_name(tmp_path, damage, message):
    base = tmp_path / "audit.json"
    audit(MLP, precision_check=False, samples=2).save_baseline(base)
    doc = json.loads(base.read_text())
    damaged = damage(doc)
    base.write_text(damaged if isinstance(damaged, str) else json.dumps(damaged))
    with pytest.raises(BaselineError, match=message):
        load_baseline(base)


def test_a_decompression_bomb_in_a_baseline_stops_at_the_declared_shape():
    bomb = {"dtype": "float32", "shape": [4], "zlib_base64": base64.b64encode(zlib.compress(bytes(1 << 28))).decode()}
    assert len(bomb["zlib_base64"]) < 400_000  # 256 MiB of zeros in a few hundred KB
    with pytest.raises(BaselineError, match="does not hold a float32 array of shape"):
        decode_array(bomb, "array 'x'", "audit.json")
    ok = np.arange(6, dtype=np.float32).reshape(2, 3)
    np.testing.assert_array_equal(decode_array(encode_array(ok), "x", "f"), ok)


def test_cli_baseline_update_compare_and_exit_codes(tmp_path, capsys):
    base = tmp_path / "audit.json"
    args = ["audit", MLP, "-c", "EpsilonPlus", "--no-precision", "-q", "--baseline", str(base)]
    assert main(args, standalone_mode=False) == 2  # no baseline yet: a usage error that says how to make one
    assert "--update-baseline" in capsys.readouterr().err
    assert main(args + ["--update-baseline"], standalone_mode=False) == 0
    assert base.is_file() and "regression    SKIP" in capsys.readouterr().out
    assert main(args, standalone_mode=False) == 0
    assert "regression    PASS" in capsys.readouterr().out
    assert main(["audit", _perturbed(MLP, tmp_path)] + args[2:], standalone_mode=False) == 1
    assert "regression    FAIL" in capsys.readouterr().out
    base.write_text("{")
    assert main(args, standalone_mode=False) == 1
    err = capsys.readouterr().err
    assert "not an onnxlrp audit baseline" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


# -- compare two exports -------------------------------------------------------------------------------------
def test_compare_legacy_and_dynamo_exports_agree_and_a_drifted_one_does_not(tmp_path):
    composite = onnxlrp.EpsilonPlus()
    same = audit(MLP, composite, precision_check=False, compare=str(fixture_path("mlp_dynamo")))
    cmp = same.check("compare")
    assert cmp.status == "pass" and max(cmp.figures["relevance_rel_l2"]) < 1e-5, cmp.summary
    other = audit(MLP, composite, precision_check=False, compare=_perturbed(MLP, tmp_path))
    assert other.check("compare").status == "fail" and "relative L2" in other.check("compare").summary
    refused = audit(MLP, composite, precision_check=False, compare=str(fixture_path("vgg")))
    assert refused.check("compare").status == "fail" and "does not take" in refused.check("compare").summary


def test_compare_an_onnxruntime_optimized_export(tmp_path):
    import onnxruntime as ort
    optimized = tmp_path / "vgg_optimized.onnx"
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(optimized)
    ort.InferenceSession(str(fixture_path("vgg")), options, providers=["CPUExecutionProvider"])
    report = audit(str(fixture_path("vgg")), onnxlrp.EpsilonGammaBox(-3, 3), precision_check=False, samples=2,
                   compare=str(optimized), fail_on=("compare",))
    assert report.check("compare").status == "pass", report.check("compare").summary


# -- the report folder ---------------------------------------------------------------------------------------
def test_report_folder_has_readable_pictures_and_a_page(tmp_path, capsys):
    from PIL import Image
    out = tmp_path / "report"
    assert main(["audit", str(fixture_path("resnet")), "-c", "EpsilonGammaBox", "--low", "-3", "--high", "3",
                 "--samples", "2", "--no-precision", "-q", "--report", str(out)], standalone_mode=False) == 0
    names = sorted(os.listdir(out))
    assert names == ["conservation.png", "faithfulness.png", "index.html", "relevance.png", "report.json"]
    for name in names[:2] + names[3:4]:
        with Image.open(out / name) as img:
            assert img.format == "PNG" and img.width >= 600 and img.height >= 300
    page = (out / "index.html").read_text()
    for check in onnxlrp.auditing.CHECKS:
        assert f"<td>{check}</td>" in page
    assert "faithfulness.png" in page and json.loads((out / "report.json").read_text())["passed"] is True


def test_report_of_vectors_and_into_a_file_refused(tmp_path, capsys):
    report = audit(MLP, precision_check=False, samples=2)
    files = report.write_report(tmp_path / "r")
    assert {os.path.basename(f) for f in files} >= {"index.html", "relevance.png", "faithfulness.png"}
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["audit", MLP, "--no-precision", "-q", "--report", str(blocker)], standalone_mode=False) in (1, 2)
    assert blocker.read_text() == "x"


# -- --config, image inputs, faithfulness options --------------------------------------------------------------
def test_config_toml_sets_options_and_the_command_line_wins(tmp_path, capsys):
    conf = tmp_path / "audit.toml"
    conf.write_text('composite = "EpsilonPlus"\nsamples = 2\nno_precision = true\n'
                    'fail_on = ["forward", "health"]\nforward-rtol = 1e-30\nbaseline = "base.json"\n')
    assert main(["audit", MLP, "--config", str(conf), "--json", "-q", "--update-baseline"],
                standalone_mode=False) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["inputs"].startswith("2 synthetic") and data["fail_on"] == ["forward", "health"]
    forward = next(c for c in data["checks"] if c["name"] == "forward")
    assert forward["figures"]["rtol"] == 1e-30
    assert next(c for c in data["checks"] if c["name"] == "precision")["status"] == "skip"
    assert (tmp_path / "base.json").is_file()  # relative to the config file's folder
    assert main(["audit", MLP, "--config", str(conf), "--json", "-q", "--forward-rtol", "1e-3"],
                standalone_mode=False) == 0
    forward = next(c for c in json.loads(capsys.readouterr().out)["checks"] if c["name"] == "forward")
    assert forward["figures"]["rtol"] == 1e-3
    conf.write_text("forward_rtoll = 1\n")
    assert main(["audit", MLP, "--config", str(conf)], standalone_mode=False) == 2
    assert "unknown option 'forward_rtoll'" in capsys.readouterr().err
    conf.write_text("samples = [\n")
    assert main(["audit", MLP, "--config", str(conf)], standalone_mode=False) == 2
    assert "not valid TOML" in capsys.readouterr().err


def test_image_inputs_are_preprocessed_as_explain_does(tmp_path, capsys):
    png = str(fixture_path("vgg")).replace("vgg.onnx", "example.png")
    assert main(["audit", str(fixture_path("vgg")), "--inputs", png, "--inputs", png, "--no-precision", "--json",
                 "-q"], standalone_mode=False) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["inputs"] == "2 given" and data["passed"]
    from onnxlrp.images import load_image, normalize, to_layout
    x = to_layout(normalize(load_image(png, size=(32, 32), channels=3)), "NCHW")
    report = audit(str(fixture_path("vgg")), inputs=np.stack([x, x]), precision_check=False)
    fwd = next(c for c in data["checks"] if c["name"] == "forward")
    assert fwd["figures"]["max_abs_error"] == report.check("forward").figures["max_abs_error"]
    assert main(["audit", MLP, "--inputs", png], standalone_mode=False) == 1
    assert "is not an image" in capsys.readouterr().err


def test_faithfulness_options():
    report = audit(str(fixture_path("vgg")), precision_check=False, samples=2,
                   faithfulness=dict(patch_size=8, steps=4, fill="mean", random_orders=3))
    faith = report.check("faithfulness").figures
    assert faith["patches"] == 16 and faith["steps"] == 4 and faith["fill"] == "mean"
    assert faith["random_orders"] == 4 and len(faith["relevance"]["morf_curve"]) == 5
    assert audit(MLP, precision_check=False, faithfulness=dict(patch_size=5)).check(
        "faithfulness").figures["patches"] == 4  # 20 features in groups of 5
    for bad in (dict(steps=0), dict(fill="median"), dict(fill=float("nan")), dict(patch=3)):
        with pytest.raises(ValueError, match="faithfulness option"):
            audit(MLP, faithfulness=bad)


def test_compare_a_float16_export_within_loosened_bounds(tmp_path):
    """An fp16 conversion of the fixture: its rounding (~1e-3) fails the default output bound (1e-4) and
    passes the bounds a team sets for fp16."""
    from onnx import TensorProto
    m = onnx.load(str(fixture_path("vgg")))
    for t in m.graph.initializer:
        if t.data_type == TensorProto.FLOAT:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), t.name))
    for v in list(m.graph.input) + list(m.graph.output) + list(m.graph.value_info):
        if v.type.tensor_type.elem_type == TensorProto.FLOAT:
            v.type.tensor_type.elem_type = TensorProto.FLOAT16
    half = tmp_path / "vgg_fp16.onnx"
    onnx.save(m, half)
    composite = onnxlrp.EpsilonGammaBox(-3, 3)
    strict = audit(str(fixture_path("vgg")), composite, precision_check=False, samples=2, compare=str(half))
    assert strict.check("compare").status == "fail" and "outputs differ" in strict.check("compare").summary
    loose = audit(str(fixture_path("vgg")), composite, precision_check=False, samples=2, compare=str(half),
                  thresholds={"drift_output_rtol": 1e-2, "drift_rtol": 2e-2})
    cmp = loose.check("compare")
    assert cmp.status == "pass" and 1e-5 < max(cmp.figures["relevance_rel_l2"]) < 2e-2, cmp.summary


def test_the_readme_config_runs_as_written(tmp_path, monkeypatch, capsys):
    """The README's audit.toml, beside a folder of images, on the VGG fixture: a baseline is written, then
    the next audit passes against it."""
    import re
    import shutil
    readme = open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "README.md"), encoding="utf-8").read()
    (block,) = re.findall(r"```toml\n(.*?)```", readme, flags=re.S)
    ci = tmp_path / "ci"
    (ci / "audit_inputs").mkdir(parents=True)
    shutil.copy(str(fixture_path("vgg")).replace("vgg.onnx", "example.png"), ci / "audit_inputs" / "cat.png")
    (ci / "audit.toml").write_text(block)
    monkeypatch.chdir(tmp_path)
    args = ["audit", str(fixture_path("vgg")), "--config", "ci/audit.toml", "--no-precision", "-q"]
    assert main(args + ["--update-baseline"], standalone_mode=False) == 0
    assert (ci / "audit.json").is_file()
    capsys.readouterr()
    assert main(args + ["--json"], standalone_mode=False) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["inputs"] == "1 given" and data["rules"].startswith("EpsilonGammaBox")  # the same image again
    assert next(c for c in data["checks"] if c["name"] == "regression")["status"] == "pass"
