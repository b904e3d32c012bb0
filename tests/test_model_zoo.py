"""The light model-zoo graphs shipped inside the onnx package (Caffe2-era, opset 9, IR 3: weights from
ConstantOfShape, Reshape to literal [1, -1], BatchNorm + Mul + Add chains, Sum merges, LRN) explain
with finite, non-zero relevance of the input's shape."""
import glob
import os

import numpy as np
import onnx
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
#: The AlphaBeta(2, 1) presets are not held to the bound yet: on SqueezeNet and Inception v1 their relevance
#: grows to 1e5 (issue 9 is open on it).
OTHER_PRESETS = ["EpsilonPlus", "EpsilonPlusFlat"]


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
