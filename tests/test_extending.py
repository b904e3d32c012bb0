"""LRP_CONFIG: teaching onnxlrp new ops without touching its source."""
import numpy as np
import pytest
from onnx import helper

import onnxlrp
from onnxlrp.emitters import EMITTERS, Emitter

from .helpers import F32, init, make_lrp, make_model


@pytest.fixture
def restore_emitters():
    saved = dict(EMITTERS)
    yield
    EMITTERS.clear()
    EMITTERS.update(saved)


def _neg_net(rng, op="Neg"):
    nodes = [helper.make_node("Gemm", ["x", "W"], ["h"], transB=1), helper.make_node(op, ["h"], ["a"]),
             helper.make_node("Gemm", ["a", "V"], ["z"], transB=1)]
    return make_model(nodes, [("x", [None, 3])], ["z"],
                      [init("W", rng.normal(size=(4, 3))), init("V", rng.normal(size=(2, 4)))])


def test_unknown_op_is_listed_then_registered_as_activation(restore_emitters):
    model = _neg_net(np.random.default_rng(0))
    assert not onnxlrp.LRP_CONFIG.supports_layer("Neg")
    with pytest.raises(onnxlrp.UnsupportedModelError, match=r"op type Neg.*\n.*register_emitter"):
        make_lrp(model)
    onnxlrp.LRP_CONFIG.register_activation("Neg")
    assert onnxlrp.LRP_CONFIG.supports_activation("Neg")
    lrp = make_lrp(model)
    assert [l.group for l in lrp.layers] == ["DenseLayer", "ActivationLayer", "DenseLayer"]
    assert np.isfinite(lrp.analyze(np.ones((2, 3), F32)).val).all()


def test_registered_emitter_is_used(restore_emitters):
    """A linear elementwise op given forward/backward gets real rules: Neg as y = -x."""
    class NegEmitter(Emitter):
        op_types = ("Neg",)
        group = "ScaleLayer"

        def forward(self, ctx, layer, xs, params):
            return ctx.b.op("Neg", [xs[0].var])

        def backward(self, ctx, layer, s, params):
            return [ctx.b.op("Neg", [s])]

    onnxlrp.LRP_CONFIG.register_emitter(NegEmitter)
    rng = np.random.default_rng(1)
    model = _neg_net(rng)
    lrp = make_lrp(model, [onnxlrp.ZeroRule(), onnxlrp.ZeroRule(), onnxlrp.ZeroRule()])
    x = rng.normal(size=(2, 3)).astype(F32)
    # Without biases LRP-0 conserves relevance through every layer, the negation included.
    expl = lrp.analyze(x)
    np.testing.assert_allclose(expl.val.sum(1), 1.0, rtol=1e-4)


def test_skip_checks_passes_relevance_through_unknown_ops():
    model = _neg_net(np.random.default_rng(2))
    lrp = make_lrp(model, skip_checks=True)
    assert lrp.layers[1].op_type == "Neg" and np.isfinite(lrp.analyze(np.ones((1, 3), F32)).val).all()
