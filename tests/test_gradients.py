"""Gradient and InputTimesGradient: the emitted gradient graph against torch and TensorFlow autograd on the
committed fixtures, and against float64 central differences on small graphs of every differentiated op
(issue 10, part 2)."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

import onnxlrp
from onnxlrp.precision import cast_floats

from .helpers import F32, init, make_model
from .helpers_fixtures import fixture_path, load_reference

RNG = np.random.default_rng(0)


def _double_forward(model):
    """The model's first output in float64, on onnx's reference evaluator (no kernel gaps)."""
    import onnx_graphsurgeon as gs
    from onnx.reference import ReferenceEvaluator
    graph = gs.import_onnx(model)
    cast_floats(graph)
    proto = gs.export_onnx(graph)
    session = ReferenceEvaluator(proto)
    name = model.graph.input[0].name
    return lambda x: session.run(None, {name: x})[0]


def _float32_forward(model):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    name = model.graph.input[0].name
    return lambda x: session.run(None, {name: x.astype(np.float32)})[0].astype(np.float64)


def directional_check(model, x, selection=0, directions=4, h=1e-5, rtol=1e-6, double=True):
    """v . grad f(x) of the emitted gradient graph equals (f(x + h v) - f(x - h v)) / 2h, in float64 (or,
    with ``double=False``, in float32 with a step and a tolerance to match: onnx's reference Erf is not
    accurate to float64 and onnxruntime has no double Erf)."""
    grad = onnxlrp.Gradient(model, precision="float64" if double else "float32", verbose=False, device="cpu")
    x = np.asarray(x, np.float64)
    g = grad.analyze(x if double else x.astype(F32), np.full(len(x), selection)).val.astype(np.float64)
    f = _double_forward(model) if double else _float32_forward(model)
    rng = np.random.default_rng(1)
    for _ in range(directions):
        v = rng.standard_normal(x.shape)
        fd = (f(x + h * v) - f(x - h * v)).reshape(len(x), -1)[:, selection] / (2 * h)
        analytic = (g * v).reshape(len(x), -1).sum(1)
        np.testing.assert_allclose(analytic, fd, rtol=rtol, atol=rtol * np.abs(fd).max())
    return g


def _mlp_around(op_nodes, hidden=6, n_in=5, inits=(), opset=18):
    """x (N, 5) -> Gemm -> [op_nodes: 'h' -> 'a'] -> Gemm -> y (N, 3)."""
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"])] + list(op_nodes) + \
            [helper.make_node("Gemm", ["a", "w2", "b2"], ["y"])]
    weights = [init("w1", RNG.standard_normal((n_in, hidden))), init("b1", RNG.standard_normal(hidden)),
               init("w2", RNG.standard_normal((hidden, 3))), init("b2", RNG.standard_normal(3))]
    return make_model(nodes, [("x", [None, n_in])], ["y"], weights + list(inits), opset=opset)


n = helper.make_node
ACTIVATIONS = {
    "Relu": [n("Relu", ["h"], ["a"])],
    "LeakyRelu": [n("LeakyRelu", ["h"], ["a"], alpha=0.1)],
    "PRelu": [n("PRelu", ["h", "slope"], ["a"])],
    "ThresholdedRelu": [n("ThresholdedRelu", ["h"], ["a"], alpha=0.3)],
    "Clip": [n("Clip", ["h", "lo", "hi"], ["a"])],
    "Sigmoid": [n("Sigmoid", ["h"], ["a"])],
    "Tanh": [n("Tanh", ["h"], ["a"])],
    "Elu": [n("Elu", ["h"], ["a"], alpha=0.7)],
    "Selu": [n("Selu", ["h"], ["a"])],
    "Celu": [n("Celu", ["h"], ["a"], alpha=1.3)],
    "Softplus": [n("Softplus", ["h"], ["a"])],
    "Softsign": [n("Softsign", ["h"], ["a"])],
    "HardSigmoid": [n("HardSigmoid", ["h"], ["a"], alpha=0.3, beta=0.4)],
    "HardSwish": [n("HardSwish", ["h"], ["a"])],
    "Gelu": [n("Gelu", ["h"], ["a"])],
    "GeluTanh": [n("Gelu", ["h"], ["a"], approximate="tanh")],
    "Erf": [n("Erf", ["h"], ["a"])],
    "Mish": [n("Mish", ["h"], ["a"])],
    # gates x * f(x): SiLU, the Erf-GELU decomposition, x / (1 + |x|)
    "SiLU": [n("Sigmoid", ["h"], ["s"]), n("Mul", ["h", "s"], ["a"])],
    "ErfGelu": [n("Div", ["h", "sqrt2"], ["hs"]), n("Erf", ["hs"], ["e"]), n("Add", ["e", "one"], ["e1"]),
                n("Mul", ["h", "e1"], ["he"]), n("Mul", ["he", "half"], ["a"])],
    "Quotient": [n("Abs", ["h"], ["ab"]), n("Add", ["ab", "one"], ["d"]), n("Div", ["h", "d"], ["a"])]
    if False else [n("Sigmoid", ["h"], ["s"]), n("Add", ["s", "one"], ["d"]), n("Div", ["h", "d"], ["a"])],
    "Pow": [n("Pow", ["h", "three"], ["p3"]), n("Add", ["p3", "h"], ["a"])],
    "RMSNorm": [n("Mul", ["h", "h"], ["sq"]), n("ReduceMean", ["sq", "axis1"], ["ms"], keepdims=1),
                n("Add", ["ms", "half"], ["mse"]), n("Sqrt", ["mse"], ["rms"]), n("Reciprocal", ["rms"], ["inv"]),
                n("Mul", ["h", "inv"], ["a"])],
    "LayerNorm": [n("LayerNormalization", ["h", "ln_scale", "ln_bias"], ["a"], epsilon=1e-3)],
    "Softmax": [n("Softmax", ["h"], ["a"], axis=-1)],
    "Product": [n("Tanh", ["h"], ["t"]), n("Sigmoid", ["h"], ["s2"]), n("Mul", ["t", "s2"], ["p"]),
                n("Add", ["p", "h"], ["a"])],
}
EXTRA = [init("slope", RNG.uniform(0.1, 0.5, 6)), init("lo", np.asarray(-0.5)), init("hi", np.asarray(0.7)),
         init("sqrt2", np.asarray(np.sqrt(2))), init("one", np.asarray(1.0)), init("half", np.asarray(0.5)), init("three", np.asarray(3.0)),
         onnx.numpy_helper.from_array(np.array([1], np.int64), "axis1"),
         init("ln_scale", RNG.standard_normal(6)), init("ln_bias", RNG.standard_normal(6))]


def _used(nodes):
    names = {i for node in nodes for i in node.input}
    return [t for t in EXTRA if t.name in names]


#: ops whose float64 forward has no accurate reference here (see directional_check)
FLOAT32_ONLY = ("Erf", "ErfGelu", "Gelu", "GeluTanh")


@pytest.mark.parametrize("op", sorted(ACTIVATIONS))
def test_derivatives_match_central_differences(op):
    nodes = ACTIVATIONS[op]
    model = _mlp_around(nodes, inits=_used(nodes), opset=20 if op.startswith("Gelu") else 18)
    x = RNG.standard_normal((3, 5))
    if op in FLOAT32_ONLY:
        directional_check(model, x, selection=1, h=1e-2, rtol=2e-3, double=False)
    else:
        directional_check(model, x, selection=1)


# -- against the autograd of the frameworks that made the fixtures --------------------------------------
def rel_l2(a, b):
    a, b = np.asarray(a, np.float64).reshape(len(b), -1), np.asarray(b, np.float64).reshape(len(b), -1)
    return np.sqrt(((a - b) ** 2).sum(1) / (b ** 2).sum(1))


@pytest.mark.parametrize("name", ["mlp", "vgg", "resnet", "mobilenet", "vgg_dynamo", "resnet_dynamo"])
def test_input_times_gradient_equals_torch_autograd(name):
    ref = load_reference(name.replace("_dynamo", ""))
    expl = onnxlrp.InputTimesGradient(fixture_path(name), verbose=False, device="cpu").analyze(
        ref["x"], ref["output_selection"])
    assert expl.analyzer == "InputTimesGradient" and expl.heatmap == "attribution"
    assert np.all(rel_l2(expl.val, ref["grad_x_input"]) < 1e-5)


TF2ONNX = ["densenet121", "efficientnetb0", "keras_cnn", "keras_mlp", "mobilenetv2", "resnet50", "resnet50v2",
           "vgg16", "xception", pytest.param("nasnetmobile", marks=pytest.mark.slow)]


@pytest.mark.parametrize("opset", [13, 17])
@pytest.mark.parametrize("name", TF2ONNX)
def test_input_times_gradient_equals_tensorflow(name, opset):
    """EfficientNet's swish gates and squeeze-excite products, ReLU6, separable convolutions, residual sums:
    per sample within 2e-5 of TensorFlow's float64 gradient x input (measured: 9e-6 on EfficientNet,
    <= 8e-7 on the others; the float32 weights bound it)."""
    from .test_tf2onnx_fixtures import DIR
    r = np.load(DIR / f"{name}_ref.npz")
    expl = onnxlrp.InputTimesGradient(str(DIR / f"{name}_op{opset}.onnx"), verbose=False, device="cpu").analyze(
        r["x"], r["selection"])
    assert np.all(rel_l2(expl.val, r["grad_x_input64"]) < 2e-5)


@pytest.mark.parametrize("name", ["vgg16", "keras_mlp"])
def test_float64_gradient_is_exact_where_the_weights_are(name):
    """The file holds TensorFlow's weights exactly: the float64 graph reproduces TensorFlow's float64
    gradient x input to rounding (measured 6e-16)."""
    from .test_tf2onnx_fixtures import DIR
    r = np.load(DIR / f"{name}_ref.npz")
    expl = onnxlrp.InputTimesGradient(str(DIR / f"{name}_op17.onnx"), verbose=False, device="cpu",
                                      precision="float64").analyze(r["x"].astype(np.float64), r["selection"])
    assert np.all(rel_l2(expl.val, r["grad_x_input64"]) < 1e-12)


def _transformer_files():
    from .test_transformer_fixtures import FILES
    return FILES


@pytest.mark.parametrize("family,name", _transformer_files(), ids=[n for _, n in _transformer_files()])
def test_input_times_gradient_equals_torch_on_transformers(family, name):
    """Softmax, LayerNorm, q kᵀ and probs v products, GELU (Erf and tanh, with its x³), masks: the gradient
    at the word embeddings (text) or the pixels (ViT) equals torch autograd's (measured <= 2e-6)."""
    from .test_transformer_fixtures import DIR, _args, ref
    r = ref(family)
    x, inputs, kw = _args(family)
    expl = onnxlrp.InputTimesGradient(str(DIR / name), verbose=False, device="cpu").analyze(
        x, r["target"], inputs=inputs, **kw)
    assert np.all(rel_l2(expl.val, r["grad_x_input"]) < 1e-5)


# -- the identity and the emitted graph ---------------------------------------------------------------------
@pytest.mark.parametrize("name", ["vgg", "resnet", "mlp"])
def test_lrp0_equals_input_times_gradient_on_piecewise_linear_nets(name):
    """The audit's identity check needs no framework: LRP-0 (the default rules) seeded with the output's
    value and the emitted gradient graph agree on ReLU/max-pool networks."""
    ref = load_reference(name)
    lrp0 = onnxlrp.LRP(fixture_path(name), verbose=False, device="cpu", normalize_output_relevance=False).analyze(
        ref["x"], ref["output_selection"])
    gxi = onnxlrp.InputTimesGradient(fixture_path(name), verbose=False, device="cpu").analyze(
        ref["x"], ref["output_selection"])
    assert np.all(rel_l2(lrp0.val, gxi.val) < 1e-5)


def test_gradient_graph_runs_in_plain_onnxruntime(tmp_path):
    ref = load_reference("resnet")
    grad = onnxlrp.Gradient(fixture_path("resnet"), verbose=False, device="cpu")
    path = grad.save(tmp_path / "grad.onnx")
    model = onnx.load(path)
    onnx.checker.check_model(model)
    assert model.doc_string.startswith("onnxlrp gradient graph") and "GradientRule()" in model.doc_string
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out, g, sel = session.run(None, {"input": ref["x"], "output_selection": ref["output_selection"],
                                     "normalize_output_relevance": np.array(True)})
    expl = grad.analyze(ref["x"], ref["output_selection"])
    assert expl.analyzer == "Gradient" and expl.heatmap == "sensitivity"
    np.testing.assert_array_equal(g, expl.val)
    np.testing.assert_allclose(g * ref["x"], ref["grad_x_input"], rtol=1e-4, atol=1e-5 * np.abs(ref["grad_x_input"]).max())


def test_an_op_without_a_derivative_is_refused_not_passed_through():
    """LRP passes relevance through a registered activation; the gradient needs its derivative."""
    from onnxlrp.emitters import EMITTERS
    saved = dict(EMITTERS)
    try:
        onnxlrp.LRP_CONFIG.register_activation("Neg")
        model = _mlp_around([n("Neg", ["h"], ["a"])])
        onnxlrp.LRP(model, verbose=False)  # fine for LRP
        with pytest.raises(onnxlrp.UnsupportedModelError, match=r"node '\w*' \(op type Neg\): no gradient"):
            onnxlrp.Gradient(model, verbose=False)
        with pytest.raises(onnxlrp.UnsupportedModelError, match="no gradient"):
            onnxlrp.Gradient(model, verbose=False, skip_checks=True)
    finally:
        EMITTERS.clear()
        EMITTERS.update(saved)


def test_gradient_takes_no_rules():
    with pytest.raises(TypeError, match="takes no rules"):
        onnxlrp.Gradient(fixture_path("mlp"), onnxlrp.EpsilonPlus(), verbose=False)


# -- SmoothGrad and Integrated Gradients: one run per batch -------------------------------------------------
def _count_runs(monkeypatch, analyzer):
    calls = []
    run = type(analyzer)._run_bound
    monkeypatch.setattr(type(analyzer), "_run_bound", staticmethod(lambda *a, **k: calls.append(1) or run(*a, **k)))
    return calls


def test_smoothgrad_averages_the_gradient_over_noisy_copies_in_one_run(monkeypatch):
    ref = load_reference("resnet")
    x = ref["x"][:2]
    sg = onnxlrp.SmoothGrad(fixture_path("resnet"), n=8, std=0.3, seed=5, verbose=False, device="cpu")
    calls = _count_runs(monkeypatch, sg)
    expl = sg.analyze(x)
    assert len(calls) == 1 and expl.analyzer == "SmoothGrad" and expl.heatmap == "sensitivity"
    assert "groups of 9 rows (the input, then its noisy copies)" in sg.relevance_model.doc_string
    grad = onnxlrp.Gradient(fixture_path("resnet"), verbose=False, device="cpu")
    clean = grad.analyze(x)
    np.testing.assert_array_equal(expl.output_selection, clean.output_selection)  # the clean input's class
    np.testing.assert_allclose(expl.output, clean.output, rtol=1e-6)
    noise = 0.3 * np.random.default_rng(5).standard_normal((2, 8) + x.shape[1:])  # as SmoothGrad draws it
    for i in range(2):
        noisy = (x[i][None] + noise[i]).astype(F32)
        expected = grad.analyze(noisy, np.full(8, clean.output_selection[i])).val.mean(0)
        np.testing.assert_allclose(expl.val[i], expected, rtol=1e-4, atol=1e-6 * np.abs(expected).max())


def test_smoothgrad_without_noise_is_the_gradient():
    ref = load_reference("vgg")
    sg = onnxlrp.SmoothGrad(fixture_path("vgg"), n=3, std=0.0, verbose=False, device="cpu").analyze(ref["x"])
    g = onnxlrp.Gradient(fixture_path("vgg"), verbose=False, device="cpu").analyze(ref["x"])
    np.testing.assert_allclose(sg.val, g.val, rtol=1e-5, atol=1e-7)


def test_integrated_gradients_is_exact_on_a_linear_model_and_complete_on_a_relu_net(monkeypatch):
    w, b = RNG.standard_normal((5, 3)), RNG.standard_normal(3)
    linear = make_model([n("Gemm", ["x", "w", "b"], ["y"])], [("x", [None, 5])], ["y"], [init("w", w), init("b", b)])
    x = RNG.standard_normal((4, 5)).astype(F32)
    ig = onnxlrp.IntegratedGradients(linear, n=4, verbose=False, device="cpu")
    calls = _count_runs(monkeypatch, ig)
    expl = ig.analyze(x, 1)
    assert len(calls) == 1 and expl.analyzer == "IntegratedGradients"
    np.testing.assert_allclose(expl.val, x * w[:, 1].astype(F32), rtol=1e-5)
    # completeness on the MLP fixture: sum IG = f(x) - f(baseline) for the explained output
    ref = load_reference("mlp")
    x = ref["x"]
    base = np.full_like(x, 0.1)
    expl = onnxlrp.IntegratedGradients(fixture_path("mlp"), n=512, baseline=base, verbose=False,
                                       device="cpu").analyze(x)
    f = onnxlrp.Gradient(fixture_path("mlp"), verbose=False, device="cpu")
    k = expl.output_selection
    gap = f.analyze(x, k).output[np.arange(len(x)), k] - f.analyze(base, k).output[np.arange(len(x)), k]
    np.testing.assert_allclose(expl.val.sum(1), gap, rtol=2e-2, atol=1e-3 * np.abs(gap).max())


def test_integrated_gradients_equals_the_path_average_of_the_gradient():
    ref = load_reference("resnet")
    x = ref["x"][:1]
    expl = onnxlrp.IntegratedGradients(fixture_path("resnet"), n=5, verbose=False, device="cpu").analyze(x)
    grad = onnxlrp.Gradient(fixture_path("resnet"), verbose=False, device="cpu")
    k = grad.analyze(x).output_selection
    np.testing.assert_array_equal(expl.output_selection, k)  # chosen at x itself, not along the path
    path = np.linspace(0, 1, 5, dtype=F32)[:, None, None, None] * x
    expected = x[0] * grad.analyze(path, np.full(5, k[0])).val.mean(0)
    np.testing.assert_allclose(expl.val[0], expected, rtol=1e-4, atol=1e-6 * np.abs(expected).max())


def test_augmented_analyzers_refuse_what_they_cannot_do():
    with pytest.raises(ValueError, match="n must be >= 1"):
        onnxlrp.SmoothGrad(fixture_path("mlp"), n=0, verbose=False)
    with pytest.raises(ValueError, match="n must be >= 2"):
        onnxlrp.IntegratedGradients(fixture_path("mlp"), n=1, verbose=False)
    ig = onnxlrp.IntegratedGradients(fixture_path("mlp"), n=3, baseline=np.zeros(7), verbose=False)
    with pytest.raises(ValueError, match="baseline's shape"):
        ig.analyze(load_reference("mlp")["x"])
    from .test_transformer_fixtures import DIR
    sg = onnxlrp.SmoothGrad(str(DIR / "bert_legacy17.onnx"), n=2, verbose=False)
    with pytest.raises(ValueError, match="token ids take none"):
        sg.analyze(np.zeros((1, 5), np.int64))
