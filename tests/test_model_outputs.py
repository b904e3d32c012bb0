"""Models with several graph outputs: the first is explained unless ``output_name`` / ``--output-name``
picks another, and the choice is always said (issue 11, item 9)."""
import numpy as np
import onnx
import pytest
from onnx import helper

import onnxlrp
from onnxlrp.cli import main

from .helpers import init, make_lrp, make_model

RNG = np.random.default_rng(0)
W1, B1 = RNG.standard_normal((4, 3)), RNG.standard_normal(3)
W2, B2 = RNG.standard_normal((3, 2)), RNG.standard_normal(2)


def _two_outputs(outputs=("features", "logits")):
    """x (N, 4) -> Gemm -> Relu = features (N, 3) -> Gemm = logits (N, 2); ``outputs`` lists which are
    graph outputs, in that order."""
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"]),
             helper.make_node("Relu", ["h"], ["features"]),
             helper.make_node("Gemm", ["features", "w2", "b2"], ["logits"])]
    inits = [init("w1", W1), init("b1", B1), init("w2", W2), init("b2", B2)]
    return make_model(nodes, [("x", [None, 4])], list(outputs), inits)


def _logits_relevance(x):
    """Analytic LRP-0 of the top logit through Gemm -> Relu -> Gemm (z-rule, biases absorb their share)."""
    h = np.maximum(x @ W1 + B1, 0)
    y = h @ W2 + B2
    k = y.argmax(1)
    r_h = h * W2[:, k].T / y[np.arange(len(x)), k][:, None]
    z1 = x @ W1 + B1
    return x * ((r_h / z1) @ W1.T)


def test_first_output_is_explained_and_said(capsys):
    analyzer = onnxlrp.LRP(_two_outputs(), verbose=True, device="cpu")
    assert analyzer.model_outputs == ["features", "logits"]
    assert analyzer.output_name == "features"
    assert analyzer.output_shape[1:] == (3,)
    err = capsys.readouterr().err
    assert "has 2 outputs (features, logits); explaining 'features'" in err and "output_name=" in err


def test_output_name_picks_another_output():
    x = RNG.standard_normal((5, 4)).astype(np.float32)
    analyzer = make_lrp(_two_outputs(), output_name="logits")
    expl = analyzer.analyze(x)
    assert expl.output.shape == (5, 2)
    np.testing.assert_allclose(expl.val, _logits_relevance(x.astype(np.float64)), rtol=1e-4, atol=1e-5)
    # the same as the model that has only that output
    only = make_lrp(_two_outputs(outputs=("logits",))).analyze(x)
    np.testing.assert_array_equal(expl.val, only.val)
    assert "the model output 'logits'" in analyzer.relevance_model.doc_string
    assert [o.name for o in analyzer.relevance_model.graph.output][:2] == ["output", "relevance"]


def test_single_output_model_says_nothing(capsys):
    analyzer = onnxlrp.LRP(_two_outputs(outputs=("logits",)), verbose=True, device="cpu")
    assert analyzer.model_outputs == ["logits"] and analyzer.output_name == "logits"
    assert "outputs" not in capsys.readouterr().err


def test_unknown_output_name_is_refused():
    with pytest.raises(onnxlrp.InputError, match=r"no output named 'logit'; its outputs are \['features', 'logits'\]"):
        make_lrp(_two_outputs(), output_name="logit")


def test_inputs_only_other_outputs_need_are_dropped():
    """A second input that feeds only the output not explained is not asked for."""
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["a"]),
             helper.make_node("Add", ["a", "bias_in"], ["b"])]
    model = make_model(nodes, [("x", [None, 4]), ("bias_in", [None, 3])], ["a", "b"],
                       [init("w1", W1), init("b1", B1)])
    x = RNG.standard_normal((2, 4)).astype(np.float32)
    assert make_lrp(model).other_inputs == []
    assert make_lrp(model, output_name="a").analyze(x).val.shape == x.shape
    assert make_lrp(model, output_name="b").other_inputs == ["bias_in"]


def test_output_that_ignores_the_data_input_is_refused():
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["a"]),
             helper.make_node("Relu", ["other"], ["b"])]
    model = make_model(nodes, [("x", [None, 4]), ("other", [None, 3])], ["a", "b"], [init("w1", W1), init("b1", B1)])
    with pytest.raises(onnxlrp.InputError, match="output 'b' does not depend on the data input 'x'"):
        make_lrp(model, output_name="b")


def test_cli_export_names_and_picks_the_output(tmp_path, capsys):
    path = tmp_path / "two.onnx"
    onnx.save(_two_outputs(), path)
    out = tmp_path / "lrp.onnx"
    assert main(["export", str(path), "-o", str(out)], standalone_mode=False) == 0
    err = capsys.readouterr().err
    assert "explaining output 'features' of 2 (features, logits); choose with --output-name" in err
    assert onnx.load(out).graph.output[0].type.tensor_type.shape.dim[1].dim_value == 3

    assert main(["export", str(path), "-o", str(out), "--force", "--output-name", "logits"],
                standalone_mode=False) == 0
    assert "explaining output 'logits'" in capsys.readouterr().err
    assert onnx.load(out).graph.output[0].type.tensor_type.shape.dim[1].dim_value == 2

    assert main(["export", str(path), "-o", str(out), "--force", "--output-name", "nope"],
                standalone_mode=False) == 1
    assert "no output named 'nope'" in capsys.readouterr().err


def _second_input_model():
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["a"]),
             helper.make_node("Add", ["a", "y"], ["z"])]
    return make_model(nodes, [("x", [None, 4]), ("y", [None, 3])], ["z"], [init("w1", W1), init("b1", B1)])


@pytest.mark.parametrize("value, message", [
    (np.zeros((2, 5), np.float32), r"input 'y' expects shape \(N, 3\), got \(2, 5\) \(axis 1: 5 instead of 3\)"),
    (np.zeros((2, 3, 1), np.float32), r"input 'y' expects rank 2"),
    (np.zeros((3, 3), np.float32), r"input 'y' has 3 samples, 'x' has 2"),
    ([[0.0, 1.0, 2.0], [1.0]], r"input 'y' is not an array"),
    ([["a", "b", "c"], ["d", "e", "f"]], r"input 'y' expects dtype float32, got <U1"),
    ([[0.5, 1.0, 2.0], [1.0, 0.0, 0.0]], None),  # a nested list of the right shape is fine
])
def test_second_input_of_the_wrong_shape_is_named(value, message):
    """Not a raw onnxruntime shape error (issue 11, unclear messages)."""
    analyzer = make_lrp(_second_input_model())
    x = RNG.standard_normal((2, 4)).astype(np.float32)
    if message is None:
        assert np.all(np.isfinite(analyzer.analyze(x, inputs={"y": value}).val))
        return
    with pytest.raises(onnxlrp.InputError, match=message):
        analyzer.analyze(x, inputs={"y": value})


# -- non-finite input and results (issue 11, item 5) ------------------------------------------------------
def test_nonfinite_input_is_refused_naming_the_samples():
    analyzer = make_lrp(_two_outputs(), output_name="logits")
    x = np.ones((4, 4), np.float32)
    x[1, 2], x[3, 0] = np.nan, np.inf
    with pytest.raises(onnxlrp.InputError, match=r"input 'x' holds NaN or infinite values \(samples 1, 3\)"):
        analyzer.analyze(x)


def _overflowing_relevance_model():
    """Finite forward, non-finite relevance: h = Relu([x0 - x1, x0 + x1]); y = 3e38 h0 + 0.1 h1. With
    x = (1, 1), h0 = 0 so the forward pass never sees the huge weight, but LRP-0 sends 3e38 / y = inf
    back through it and 0 * inf = NaN lands on h0: layer 2 (the last Gemm) is where it starts."""
    nodes = [helper.make_node("Gemm", ["x", "w1"], ["h"]),
             helper.make_node("Relu", ["h"], ["a"]),
             helper.make_node("Gemm", ["a", "w2"], ["y"])]
    inits = [init("w1", [[1.0, 1.0], [-1.0, 1.0]]), init("w2", [[3e38], [0.1]])]
    return make_model(nodes, [("x", [None, 2])], ["y"], inits)


def test_nonfinite_relevance_names_the_layer_that_first_produced_it():
    analyzer = make_lrp(_overflowing_relevance_model())
    x = np.array([[1.5, 1.0], [1.0, 1.0]], np.float32)  # sample 0: h0 = 0.5, finite; sample 1: NaN
    with pytest.warns(onnxlrp.LRPWarning, match=r"sample 1: the relevance is not finite.*layer 2 '\w+' \(Gemm\) "
                                                r"under ZeroRule\(\) is the first to produce it"):
        expl = analyzer.analyze(x)
    assert expl.extras["nonfinite"]["samples"] == [1]
    assert np.all(np.isfinite(expl.output)) and np.all(np.isfinite(expl.val[0]))
    # said once per analyzer, but every result carries it
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert analyzer.analyze(x).extras["nonfinite"]["samples"] == [1]


def test_forward_overflow_names_the_first_layer_that_overflows():
    analyzer = make_lrp(_two_outputs(), output_name="logits")
    x = np.full((1, 4), 3e38, np.float32)  # finite, but W1's sums overflow float32
    with pytest.warns(onnxlrp.LRPWarning, match=r"sample 0: the model's output is not finite.*layer 0 '\w+' "
                                                r"\(Gemm\) is the first layer whose output is not\)"):
        expl = analyzer.analyze(x)
    assert expl.extras["nonfinite"]["samples"] == [0]


def test_cli_explain_names_the_layer_of_a_nonfinite_result_and_picks_the_output(tmp_path, capsys):
    path = tmp_path / "overflow.onnx"
    onnx.save(_overflowing_relevance_model(), path)
    good, bad = tmp_path / "good.npy", tmp_path / "bad.npy"
    np.save(good, np.array([1.5, 1.0], np.float32))
    np.save(bad, np.array([1.0, 1.0], np.float32))
    code = main(["explain", str(path), str(good), str(bad), "--out", str(tmp_path / "o"), "--json", "-q"],
                standalone_mode=False)
    assert code == 1
    captured = capsys.readouterr()
    rows = {r["name"]: r for r in __import__("json").loads(captured.out)["results"]}
    assert rows["good"]["status"] == "ok"
    assert rows["bad"]["status"] == "error"
    assert "layer 2" in rows["bad"]["error"] and "(Gemm) under EpsilonRule(epsilon=1e-06) is the first to produce it" in rows["bad"]["error"]
    assert "Warning" not in captured.err and "LRPWarning" not in captured.err  # said in the row, once
    assert not (tmp_path / "o" / "bad_heatmap.png").exists()

    two = tmp_path / "two.onnx"
    onnx.save(_two_outputs(), two)
    x = tmp_path / "x.npy"
    np.save(x, RNG.standard_normal(4).astype(np.float32))
    assert main(["explain", str(two), str(x), "--out", str(tmp_path / "t"), "--json", "--output-name", "logits"],
                standalone_mode=False) == 0
    captured = capsys.readouterr()
    assert "explaining output 'logits' of 2" in captured.err
    assert __import__("json").loads(captured.out)["results"][0]["explained"] in (0, 1)
