"""The light model-zoo graphs shipped inside the onnx package (Caffe2-era, opset 9, IR 3: weights from
ConstantOfShape, Reshape to literal [1, -1], BatchNorm + Mul + Add chains, Sum merges, LRN) explain
with finite, non-zero relevance of the input's shape."""
import glob
import os

import warnings

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

import onnxlrp

LIGHT = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light")
MODELS = sorted(os.path.basename(p) for p in glob.glob(os.path.join(LIGHT, "light_*.onnx")))
EXPLOSION = 1e3


def test_all_nine_zoo_graphs_are_present():
    assert len(MODELS) == 9, MODELS


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_zoo_graph_explains(name):
    analyzer = onnxlrp.LRP(os.path.join(LIGHT, name), onnxlrp.EpsilonGammaBox(-3.0, 3.0), verbose=False)
    x = np.random.default_rng(0).standard_normal((2, 3, 224, 224)).astype(np.float32)
    expl = analyzer.analyze(x)
    assert expl.val.shape == x.shape
    assert np.all(np.isfinite(expl.val))
    assert np.all(np.abs(expl.val).reshape(2, -1).sum(1) > 0)
    # no explosion: with the seed 1, sum |R| stays below 1e3 (the plain Gamma rule once gave 1e31)
    assert np.all(np.abs(expl.val).reshape(2, -1).sum(1) < EXPLOSION)
    onnx.checker.check_model(analyzer.relevance_model)


#: The heaviest graphs (vgg19, zfnet512, resnet50) are left to the EpsilonGammaBox test above: every
#: preset on them would add minutes to the suite.
LIGHTER = [m for m in MODELS if not any(k in m for k in ("vgg19", "zfnet512", "resnet50"))]
#: The AlphaBeta(2, 1) presets are held to the bound on the zoo's structures with signed weights below: the
#: light graphs' weights are one positive constant, on which AlphaBeta doubles the relevance at every layer
#: by its definition (test_alphabeta_on_constant_weights_warns_with_the_reason).
OTHER_PRESETS = ["EpsilonPlus", "EpsilonPlusFlat"]
ALPHABETA = ["EpsilonAlpha2Beta1", "EpsilonAlpha2Beta1Flat"]
HEAVY = pytest.mark.skipif(not os.environ.get("ONNXLRP_HEAVY_TESTS"), reason="minutes: set ONNXLRP_HEAVY_TESTS=1")


@pytest.mark.slow
@pytest.mark.parametrize("preset", OTHER_PRESETS)
@pytest.mark.parametrize("name", LIGHTER)
def test_no_preset_explodes_on_the_zoo(name, preset):
    """sum |R| < 1e3 with the seed 1."""
    analyzer = onnxlrp.LRP(os.path.join(LIGHT, name), onnxlrp.PRESETS[preset](), verbose=False)
    x = np.random.default_rng(1).standard_normal((1, 3, 224, 224)).astype(np.float32)
    val = analyzer.analyze(x).val
    assert np.all(np.isfinite(val)) and np.abs(val).sum() > 0
    assert np.abs(val).sum() < EXPLOSION


def _signed_weights(name, seed=0):
    """The zoo graph with He-normal signed weights (and small signed biases) on every Conv/Gemm in place of
    the light file's positive constant, as trained weights are: the structure and the exporter's quirks
    stay, only the values change."""
    from onnxlrp.loading import load_model
    graph = load_model(os.path.join(LIGHT, name)).graph
    rng = np.random.default_rng(seed)
    for node in graph.nodes:
        if node.op in ("Conv", "Gemm") and isinstance(node.inputs[1], gs.Constant):
            w = node.inputs[1].values
            fan_in = w[0].size if node.op == "Conv" else w.shape[-1 if node.attrs.get("transB") else 0]
            node.inputs[1].values = (rng.standard_normal(w.shape) * np.sqrt(2 / fan_in)).astype(np.float32)
            if len(node.inputs) > 2 and isinstance(node.inputs[2], gs.Constant):
                b = node.inputs[2].values
                node.inputs[2].values = (0.01 * rng.standard_normal(b.shape)).astype(np.float32)
    return gs.export_onnx(graph)


@pytest.mark.slow
@pytest.mark.parametrize("preset", ALPHABETA)
@pytest.mark.parametrize("name", ["light_squeezenet.onnx", "light_inception_v1.onnx",
                                  pytest.param("light_resnet50.onnx", marks=HEAVY),
                                  pytest.param("light_vgg19.onnx", marks=HEAVY)])
def test_alphabeta_presets_stay_bounded_on_zoo_structures(name, preset):
    """The four graphs where the constant weights make AlphaBeta explode: with signed weights sum |R| < 1e3
    (measured: 1.0 to 2.7 on all nine graphs, both presets)."""
    analyzer = onnxlrp.LRP(_signed_weights(name), onnxlrp.PRESETS[preset](), verbose=False)
    x = np.random.default_rng(1).standard_normal((1, 3, 224, 224)).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error", onnxlrp.LRPWarning)  # and no explosion warning
        val = analyzer.analyze(x).val
    assert np.all(np.isfinite(val)) and np.abs(val).sum() > 0
    assert np.abs(val).sum() < EXPLOSION


@pytest.mark.slow
def test_alphabeta_on_constant_weights_warns_with_the_reason():
    """With every weight one positive constant, no neuron after the first ReLU has a negative part, so
    AlphaBeta(2, 1) passes back alpha = 2 times the relevance at each of SqueezeNet's layers (Zennit computes
    the same): not bounded, so the user is told why, naming AlphaBetaRule rather than a denominator."""
    analyzer = onnxlrp.LRP(os.path.join(LIGHT, "light_squeezenet.onnx"), onnxlrp.EpsilonAlpha2Beta1(), verbose=False)
    x = np.random.default_rng(1).standard_normal((1, 3, 224, 224)).astype(np.float32)
    with pytest.warns(onnxlrp.LRPWarning, match=r"relevance explodes.*AlphaBetaRule\(alpha=2.0, beta=1.0\) passes "
                                                r"back .*AlphaBetaRule passes back alpha = 2 times .*empty negative "
                                                r"part.*ZPlusRule"):
        val = analyzer.analyze(x).val
    assert np.abs(val).sum() > EXPLOSION
