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
    onnx.checker.check_model(analyzer.relevance_model)
