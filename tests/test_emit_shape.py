"""Reshaping emitters move relevance and never change it: each backward is the inverse data movement.

Every case is a data-movement function f (numpy) whose Jacobian J is a 0/1 matrix; with PassRule (the
default on reshaping layers) the relevance of output k seeded with its value y_k lands at the input cell
it came from: R = x * J[k] (= J^T (y_k e_k)). Cells no output reads get none.
"""
from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

import onnxlrp

from .helpers import (F32, affine_jacobian, check_grad_times_input, explain, forward, init, layer_ops,
                      make_lrp, make_model, stab)

SHAPE = (2, 3, 4)


def _i64(name, values):
    return init(name, np.asarray(values, np.int64))


def _case(name):
    """(nodes, inits, opset, numpy f on one sample (C, H, W) -> output sample)."""
    n = helper.make_node
    cases = {
        "flatten": ([n("Flatten", ["x"], ["z"], axis=1)], [], 13, lambda t: t.reshape(-1)),
        "flatten_axis2": ([n("Flatten", ["x"], ["f"], axis=2), n("Reshape", ["f", "s"], ["z"])],
                          [_i64("s", [-1, 24])], 13, lambda t: t.reshape(-1)),
        "reshape": ([n("Reshape", ["x", "s"], ["z"])], [_i64("s", [0, 4, 6])], 13, lambda t: t.reshape(4, 6)),
        "reshape_minus1": ([n("Reshape", ["x", "s"], ["z"])], [_i64("s", [-1, 3, 8])], 13,
                           lambda t: t.reshape(3, 8)),
        "transpose": ([n("Transpose", ["x"], ["z"], perm=[0, 2, 3, 1])], [], 13, lambda t: t.transpose(1, 2, 0)),
        "transpose_then_flatten": ([n("Transpose", ["x"], ["t"], perm=[0, 3, 1, 2]), n("Flatten", ["t"], ["z"])],
                                   [], 13, lambda t: t.transpose(2, 0, 1).reshape(-1)),
        "unsqueeze_squeeze_opset11": ([n("Unsqueeze", ["x"], ["u"], axes=[2]), n("Squeeze", ["u"], ["z"], axes=[2])],
                                      [], 11, lambda t: t),
        "unsqueeze_opset13": ([n("Unsqueeze", ["x", "ax"], ["z"])], [_i64("ax", [1, -1])], 13,
                              lambda t: t[None, ..., None]),
        "squeeze_opset13": ([n("Unsqueeze", ["x", "ax"], ["u"]), n("Transpose", ["u"], ["t"], perm=[0, 2, 1, 3, 4]),
                             n("Squeeze", ["t", "ax2"], ["z"])], [_i64("ax", [1]), _i64("ax2", [2])], 13,
                            lambda t: t),
        "concat_parts_permuted": ([n("Split", ["x", "sp"], ["p0", "p1", "p2"], axis=3),
                                   n("Concat", ["p2", "p0", "p1"], ["z"], axis=3)],
                                  [_i64("sp", [1, 2, 1])], 13, lambda t: np.concatenate(
                                      [t[..., 3:], t[..., :1], t[..., 1:3]], axis=-1)),
        "split_attr_opset11": ([n("Split", ["x"], ["p0", "p1"], axis=2, split=[1, 2]),
                                n("Concat", ["p1", "p0"], ["z"], axis=2)], [], 11,
                               lambda t: np.concatenate([t[:, 1:], t[:, :1]], axis=1)),
        "split_num_outputs_opset18": ([n("Split", ["x"], ["p0", "p1"], axis=3, num_outputs=2),
                                       n("Concat", ["p1", "p0"], ["z"], axis=-1)], [], 18,
                                      lambda t: np.concatenate([t[..., 2:], t[..., :2]], axis=-1)),
        "split_unused_output": ([n("Split", ["x", "sp"], ["z", "p1"], axis=2)], [_i64("sp", [2, 1])], 13,
                                lambda t: t[:, :2]),
        "concat_duplicate": ([n("Transpose", ["x"], ["t"], perm=[0, 1, 3, 2]),
                              n("Flatten", ["x"], ["f1"]), n("Flatten", ["t"], ["f2"]),
                              n("Concat", ["f1", "f2"], ["z"], axis=1)], [], 13,
                             lambda t: np.concatenate([t.reshape(-1), t.transpose(0, 2, 1).reshape(-1)])),
        "slice": ([n("Slice", ["x", "st", "en", "ax"], ["z"])],
                  [_i64("st", [1, 0]), _i64("en", [3, -1]), _i64("ax", [2, 3])], 13, lambda t: t[:, 1:3, 0:3]),
        "slice_negative_start_no_axes": ([n("Slice", ["x", "st", "en"], ["z"])],
                                         [_i64("st", [0, 1, -2]), _i64("en", [2 ** 63 - 1, 100, 100])], 13,
                                         lambda t: t[1:, -2:]),
        "slice_then_pad": ([n("Slice", ["x", "st", "en", "ax"], ["s"]), n("Pad", ["s", "pads"], ["z"])],
                           [_i64("st", [1]), _i64("en", [4]), _i64("ax", [3]),
                            _i64("pads", [0, 1, 0, 2, 0, 0, 1, 0])], 13,
                           lambda t: np.pad(t[..., 1:], [(1, 0), (0, 1), (2, 0)])),
        "pad_constant_value": ([n("Pad", ["x", "pads", "cv"], ["z"])],
                               [_i64("pads", [0, 0, 1, 1, 0, 0, 2, 0]), init("cv", np.array(0.5))], 13,
                               lambda t: np.pad(t, [(0, 0), (1, 2), (1, 0)], constant_values=0.5)),
        "pad_negative_crops": ([n("Pad", ["x", "pads"], ["z"])], [_i64("pads", [0, 0, -1, 1, 0, 0, 0, -2])], 13,
                               lambda t: np.pad(t[:, 1:, :-2], [(0, 0), (0, 0), (1, 0)])),
        "pad_attribute_opset9": ([n("Pad", ["x"], ["z"], pads=[0, 1, 0, 0, 0, 0, 2, 1], mode="constant")], [], 9,
                                 lambda t: np.pad(t, [(1, 0), (0, 2), (0, 1)])),
        "pad_opset11": ([n("Pad", ["x", "pads"], ["z"])], [_i64("pads", [0, 1, 0, 0, 0, 0, 1, 1])], 11,
                        lambda t: np.pad(t, [(1, 0), (0, 1), (0, 1)])),
    }
    return cases[name]


CASES = ["flatten", "flatten_axis2", "reshape", "reshape_minus1", "transpose", "transpose_then_flatten",
         "unsqueeze_squeeze_opset11", "unsqueeze_opset13", "squeeze_opset13", "concat_parts_permuted",
         "split_attr_opset11", "split_num_outputs_opset18", "split_unused_output", "concat_duplicate", "slice",
         "slice_negative_start_no_axes", "slice_then_pad", "pad_constant_value", "pad_negative_crops",
         "pad_attribute_opset9", "pad_opset11"]


@pytest.mark.parametrize("name", CASES)
def test_data_movement(name):
    nodes, inits, opset, f = _case(name)
    model = make_model(nodes, [("x", [None, *SHAPE])], ["z"], inits, opset=opset)
    assert all(l.group == "ReshapingLayer" for l in make_lrp(model).layers)
    x = np.random.default_rng(0).normal(size=SHAPE).astype(F32)
    np.testing.assert_allclose(forward(model, x[None])[0], f(x))
    jac = affine_jacobian(f, x) if "constant_value" not in name else affine_jacobian(lambda t: f(t) - f(0 * t), x)
    check_grad_times_input(model, x, jac)


def test_pad_relevance_of_padded_outputs_is_dropped():
    """A padded output (constant 0.5) explained: no input cell receives relevance."""
    nodes, inits, opset, f = _case("pad_constant_value")
    model = make_model(nodes, [("x", [None, *SHAPE])], ["z"], inits, opset=opset)
    x = np.ones((1,) + SHAPE, F32)
    r = explain(model, x, sel=0).val  # output 0 lies in the padding
    assert np.all(r == 0)


def test_conv_flatten_dense():
    """The classic head: Conv -> Relu -> Flatten -> Gemm, LRP-0 = gradient x input."""
    rng = np.random.default_rng(1)
    w = rng.normal(size=(2, 2, 2, 2)).astype(F32)
    v = rng.normal(size=(3, 2 * 2 * 3)).astype(F32)
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"]), helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Flatten", ["r"], ["f"]), helper.make_node("Gemm", ["f", "V"], ["z"], transB=1)]
    model = make_model(nodes, [("x", [None, 2, 3, 4])], ["z"], [init("W", w), init("V", v)])
    from .helpers import np_conv
    x = rng.normal(size=(2, 3, 4)).astype(F32)
    conv_j = affine_jacobian(lambda t: np_conv(t[None], w)[0], x)
    c = np_conv(x[None], w)[0].reshape(-1)
    jac = v.astype(np.float64) @ np.diag((c > 0).astype(float)) @ conv_j
    check_grad_times_input(model, x, jac)


def test_concat_of_two_branches_with_rules():
    """Concat of a Gemm branch and the input itself: relevance is split back by position."""
    w = np.array([[1.0, 2.0], [0.5, -1.0]], F32)
    nodes = [helper.make_node("Gemm", ["x", "W"], ["h"], transB=1), helper.make_node("Concat", ["h", "x"], ["z"], axis=1)]
    model = make_model(nodes, [("x", [None, 2])], ["z"], [init("W", w)])
    x = np.array([[1.0, 3.0]], F32)
    h = x[0] @ w.T
    r = explain(model, x, sel=1).val[0]           # explain h[1] = 0.5 - 3 = -2.5
    np.testing.assert_allclose(r, x[0] * w[1] / stab(h[1]), rtol=1e-6)
    r = explain(model, x, sel=3).val[0]           # explain the copy of x[1]
    np.testing.assert_allclose(r, [0.0, 1.0])


def test_slice_of_the_batch_axis_is_refused():
    model = make_model([helper.make_node("Slice", ["x", "st", "en"], ["z"])], [("x", [None, 3])], ["z"],
                       [_i64("st", [0, 1]), _i64("en", [1, 3])], opset=13)
    with pytest.raises(ValueError, match="dynamic axis 0"):
        make_lrp(model)


@pytest.mark.parametrize("what", ["slice_step", "pad_reflect"])
def test_unsupported_data_movement(what):
    n = helper.make_node
    if what == "slice_step":
        nodes = [n("Slice", ["x", "st", "en", "ax", "sp"], ["z"])]
        inits = [_i64("st", [0]), _i64("en", [4]), _i64("ax", [3]), _i64("sp", [2])]
        reason = "steps"
    elif what == "pad_reflect":
        nodes = [n("Pad", ["x", "pads"], ["z"], mode="reflect")]
        inits = [_i64("pads", [0, 0, 1, 1, 0, 0, 1, 1])]
        reason = "reflect"
    model = make_model(nodes, [("x", [None, *SHAPE])], ["z"], inits, opset=13)
    with pytest.raises(onnxlrp.UnsupportedModelError, match=reason):
        make_lrp(model)


def test_concat_along_batch_is_refused():
    model = make_model([helper.make_node("Concat", ["x", "x"], ["z"], axis=0)], [("x", [None, 3])], ["z"])
    with pytest.raises((ValueError, onnxlrp.LRPError), match="batch"):
        make_lrp(model)


def test_layer_listing_of_reshapes():
    nodes, inits, opset, _ = _case("transpose_then_flatten")
    model = make_model(nodes, [("x", [None, *SHAPE])], ["z"], inits, opset=opset)
    assert layer_ops(model) == ["Transpose", "Flatten"]


@pytest.mark.parametrize("model", ["mlp", "vgg", "resnet", "mobilenet"])
def test_relevance_graph_reshapes_to_static_shapes(model):
    """With static shapes past the batch axis, no relevance reshape takes its target from a Shape node:
    Reshape(r, Shape(x)) hides the shape from onnxruntime's shape inference, and its NCHWc layout pass
    then moves every elementwise op between two convolutions back to NCHW (about a third more layout
    conversions on ResNet50)."""
    from .helpers_fixtures import fixture_path, load_reference

    analyzer = onnxlrp.LRP(fixture_path(model), onnxlrp.EpsilonGammaBox(-3.0, 3.0), verbose=False)
    analyzer.analyze(load_reference(model)["x"][:1])
    ops = [n.op_type for n in analyzer.relevance_model.graph.node]
    assert "Shape" not in ops, [n.name for n in analyzer.relevance_model.graph.node if n.op_type == "Shape"]
