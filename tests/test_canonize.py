"""Canonization: BatchNorm (and Caffe2-style affine chains) fused into the linear layer before it, the
canonized model computing exactly what the original did; BatchNorm that cannot be fused kept as a
NormalizationLayer; output Softmax stripped (never one inside the graph); Dropout/Identity dropped;
LayerNormalization split into the normalization and a Scale layer."""
from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

import onnxlrp

from .helpers import F32, forward, init, layer_ops, make_lrp, make_model, ort_run


def _ops(model):
    return [n.op_type for n in model.graph.node]


def _bn(rng, c, prefix="bn"):
    vals = (rng.uniform(0.5, 2.0, c), rng.normal(size=c), rng.normal(size=c), rng.uniform(0.2, 2.0, c))
    names = [f"{prefix}_{k}" for k in ("scale", "bias", "mean", "var")]
    return names, [init(n, v) for n, v in zip(names, vals)]


def _assert_same_function(original, canonized, x, rtol=1e-4, atol=1e-5):
    want = forward(original, x)
    got = forward(canonized, x)
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol)


def _canonized_ops_and_check(model, x):
    canonized = onnxlrp.canonize(model)
    _assert_same_function(model, canonized, x)
    # the analyzer's own forward pass computes the original function too
    e = make_lrp(model).analyze(x)
    np.testing.assert_allclose(e.output, forward(model, x), rtol=1e-4, atol=1e-5)
    return _ops(canonized)


# -- BatchNorm fusion -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("eps", [1e-5, 0.5])
@pytest.mark.parametrize("bias", [True, False])
def test_bn_fused_into_conv(eps, bias):
    rng = np.random.default_rng(0)
    names, bn_inits = _bn(rng, 3)
    w = rng.normal(size=(3, 2, 3, 3)).astype(F32)
    ins = ["x", "W"] + (["B"] if bias else [])
    nodes = [helper.make_node("Conv", ins, ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c"] + names, ["z"], epsilon=eps)]
    inits = [init("W", w)] + ([init("B", rng.normal(size=3))] if bias else []) + bn_inits
    model = make_model(nodes, [("x", [None, 2, 4, 4])], ["z"], inits)
    x = rng.normal(size=(2, 2, 4, 4)).astype(F32)
    assert _canonized_ops_and_check(model, x) == ["Conv"]
    assert layer_ops(model) == ["Conv"]


@pytest.mark.parametrize("trans_b,alpha,beta", [(1, 1.0, 1.0), (0, 0.5, 2.0)])
def test_bn_fused_into_gemm(trans_b, alpha, beta):
    rng = np.random.default_rng(1)
    names, bn_inits = _bn(rng, 3)
    w = rng.normal(size=(3, 4) if trans_b else (4, 3)).astype(F32)
    nodes = [helper.make_node("Gemm", ["x", "W", "C"], ["g"], transB=trans_b, alpha=alpha, beta=beta),
             helper.make_node("BatchNormalization", ["g"] + names, ["z"], epsilon=1e-3)]
    model = make_model(nodes, [("x", [None, 4])], ["z"], [init("W", w), init("C", rng.normal(size=3))] + bn_inits)
    x = rng.normal(size=(3, 4)).astype(F32)
    assert _canonized_ops_and_check(model, x) == ["Gemm"]
    node = onnxlrp.canonize(model).graph.node[0]
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert attrs == {"transB": 1}


@pytest.mark.parametrize("with_bias", [False, True])
def test_bn_fused_into_matmul(with_bias):
    """MatMul (2-D) -> [Add bias] -> BN: fused; the MatMul's bias is an Add of a constant."""
    rng = np.random.default_rng(2)
    names, bn_inits = _bn(rng, 3)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["m"])]
    inits = [init("W", rng.normal(size=(4, 3)))] + bn_inits
    src = "m"
    if with_bias:
        nodes.append(helper.make_node("Add", ["m", "C"], ["mb"]))
        inits.append(init("C", rng.normal(size=3)))
        src = "mb"
    nodes.append(helper.make_node("BatchNormalization", [src] + names, ["z"], epsilon=0.1))
    model = make_model(nodes, [("x", [None, 4])], ["z"], inits)
    x = rng.normal(size=(3, 4)).astype(F32)
    assert _canonized_ops_and_check(model, x) == ["MatMul", "Add"]
    assert layer_ops(model) == ["MatMul"]


def test_bn_over_tokens_after_3d_matmul_is_not_fused():
    """(N, T, D) @ W -> BN normalizes axis 1 (T), not the MatMul's output features: no fusion."""
    rng = np.random.default_rng(3)
    names, bn_inits = _bn(rng, 2)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["m"]),
             helper.make_node("BatchNormalization", ["m"] + names, ["z"])]
    model = make_model(nodes, [("x", [None, 2, 4])], ["z"], [init("W", rng.normal(size=(4, 3)))] + bn_inits)
    x = rng.normal(size=(2, 2, 4)).astype(F32)
    assert _canonized_ops_and_check(model, x) == ["MatMul", "BatchNormalization"]


@pytest.mark.parametrize("group", [1, 2])
def test_bn_fused_into_conv_transpose(group):
    rng = np.random.default_rng(4)
    names, bn_inits = _bn(rng, 4)
    w = rng.normal(size=(2, 4 // group, 3, 3)).astype(F32)
    nodes = [helper.make_node("ConvTranspose", ["x", "W", "B"], ["c"], strides=[2, 2], pads=[1, 1, 1, 1],
                              output_padding=[1, 1], group=group),
             helper.make_node("BatchNormalization", ["c"] + names, ["z"], epsilon=0.01)]
    model = make_model(nodes, [("x", [None, 2, 3, 3])], ["z"], [init("W", w), init("B", rng.normal(size=4))] + bn_inits)
    x = rng.normal(size=(2, 2, 3, 3)).astype(F32)
    assert _canonized_ops_and_check(model, x) == ["ConvTranspose"]


def test_caffe2_chain_fully_fused():
    """Conv -> BatchNorm -> Mul(per-channel const) -> Add(per-channel const) -> Relu: one Conv + Relu."""
    rng = np.random.default_rng(5)
    names, bn_inits = _bn(rng, 3)
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["c"]),
             helper.make_node("BatchNormalization", ["c"] + names, ["b"], epsilon=1e-5),
             helper.make_node("Mul", ["b", "S"], ["m"]), helper.make_node("Add", ["m", "T"], ["a"]),
             helper.make_node("Relu", ["a"], ["z"])]
    inits = [init("W", rng.normal(size=(3, 2, 2, 2))), init("B", rng.normal(size=3)),
             init("S", rng.uniform(0.5, 2, (1, 3, 1, 1))), init("T", rng.normal(size=(3, 1, 1)))] + bn_inits
    model = make_model(nodes, [("x", [None, 2, 4, 4])], ["z"], inits)
    x = rng.normal(size=(2, 2, 4, 4)).astype(F32)
    assert _canonized_ops_and_check(model, x) == ["Conv", "Relu"]
    assert layer_ops(model) == ["Conv", "Relu"]


def test_matmul_3d_affine_chain_fused():
    """(N, T, D) @ W -> Add(b) -> Mul(per-feature c) -> Add(d): one MatMul with its bias Add."""
    rng = np.random.default_rng(19)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["m"]), helper.make_node("Add", ["m", "b"], ["a"]),
             helper.make_node("Mul", ["a", "c"], ["s"]), helper.make_node("Add", ["s", "d"], ["z"])]
    inits = [init("W", rng.normal(size=(4, 3))), init("b", rng.normal(size=3)),
             init("c", rng.normal(size=(1, 1, 3))), init("d", rng.normal(size=3))]
    model = make_model(nodes, [("x", [None, 2, 4])], ["z"], inits)
    assert _canonized_ops_and_check(model, rng.normal(size=(2, 2, 4)).astype(F32)) == ["MatMul", "Add"]
    assert layer_ops(model) == ["MatMul"]


def test_affine_chain_with_div_and_sub_fused():
    """Gemm -> Div(c) -> Sub(d) -> Mul(e): all per-feature, all fused into the Gemm."""
    rng = np.random.default_rng(6)
    nodes = [helper.make_node("Gemm", ["x", "W"], ["g"], transB=1), helper.make_node("Div", ["g", "c"], ["d"]),
             helper.make_node("Sub", ["d", "e"], ["s"]), helper.make_node("Mul", ["s", "f"], ["z"])]
    inits = [init("W", rng.normal(size=(3, 4))), init("c", rng.uniform(1, 2, 3)), init("e", rng.normal(size=3)),
             init("f", np.float32(1.5))]
    model = make_model(nodes, [("x", [None, 4])], ["z"], inits)
    assert _canonized_ops_and_check(model, rng.normal(size=(2, 4)).astype(F32)) == ["Gemm"]


def test_spatially_varying_mul_is_not_fused():
    """A Mul by a constant that varies over space is not per-channel: it stays a Scale layer."""
    rng = np.random.default_rng(7)
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"]), helper.make_node("Mul", ["c", "S"], ["z"])]
    model = make_model(nodes, [("x", [None, 1, 3, 3])], ["z"],
                       [init("W", rng.normal(size=(2, 1, 2, 2))), init("S", rng.normal(size=(1, 1, 2, 2)))])
    assert _canonized_ops_and_check(model, rng.normal(size=(2, 1, 3, 3)).astype(F32)) == ["Conv", "Mul"]
    assert [l.group for l in make_lrp(model).layers] == ["ConvLayer", "ScaleLayer"]


# -- BatchNorm that stays ------------------------------------------------------------------------------------------
def _check_bn_stays(model, x):
    ops = _canonized_ops_and_check(model, x)
    assert "BatchNormalization" in ops
    lrp = make_lrp(model)
    bn = [l for l in lrp.layers if l.op_type == "BatchNormalization"]
    assert len(bn) == 1 and bn[0].group == "NormalizationLayer"
    return ops


def test_bn_after_concat_stays():
    rng = np.random.default_rng(8)
    names, bn_inits = _bn(rng, 4)
    nodes = [helper.make_node("Conv", ["x", "W1"], ["a"]), helper.make_node("Conv", ["x", "W2"], ["b"]),
             helper.make_node("Concat", ["a", "b"], ["c"], axis=1),
             helper.make_node("BatchNormalization", ["c"] + names, ["z"])]
    inits = [init("W1", rng.normal(size=(2, 2, 1, 1))), init("W2", rng.normal(size=(2, 2, 1, 1)))] + bn_inits
    model = make_model(nodes, [("x", [None, 2, 3, 3])], ["z"], inits)
    _check_bn_stays(model, rng.normal(size=(2, 2, 3, 3)).astype(F32))


def test_bn_after_pooling_stays():
    rng = np.random.default_rng(9)
    names, bn_inits = _bn(rng, 2)
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"]),
             helper.make_node("MaxPool", ["c"], ["p"], kernel_shape=[2, 2]),
             helper.make_node("BatchNormalization", ["p"] + names, ["z"])]
    model = make_model(nodes, [("x", [None, 1, 4, 4])], ["z"], [init("W", rng.normal(size=(2, 1, 2, 2)))] + bn_inits)
    assert _check_bn_stays(model, rng.normal(size=(2, 1, 4, 4)).astype(F32)) == ["Conv", "MaxPool",
                                                                                 "BatchNormalization"]


def test_preactivation_block_bn_stays():
    """Pre-activation ResNet: the block input (a residual sum) -> BN -> Relu -> Conv; and a Conv whose
    output also feeds the skip connection cannot absorb the BN after it."""
    rng = np.random.default_rng(10)
    n1, bn1 = _bn(rng, 2, "bn1")
    nodes = [helper.make_node("Conv", ["x", "W0"], ["c0"], pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["c0", "x"], ["s"]),                        # residual sum
             helper.make_node("BatchNormalization", ["s"] + n1, ["b1"]),          # block start
             helper.make_node("Relu", ["b1"], ["r1"]),
             helper.make_node("Conv", ["r1", "W1"], ["z"], pads=[1, 1, 1, 1])]
    inits = [init("W0", rng.normal(size=(2, 2, 3, 3))), init("W1", rng.normal(size=(2, 2, 3, 3)))] + bn1
    model = make_model(nodes, [("x", [None, 2, 3, 3])], ["z"], inits)
    _check_bn_stays(model, rng.normal(size=(2, 2, 3, 3)).astype(F32))

    n2, bn2 = _bn(rng, 2, "bn2")
    nodes = [helper.make_node("Conv", ["x", "W0"], ["c0"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c0"] + n2, ["b"]),
             helper.make_node("Add", ["b", "c0"], ["z"])]                      # c0 has two consumers
    model = make_model(nodes, [("x", [None, 2, 3, 3])], ["z"], [init("W0", rng.normal(size=(2, 2, 3, 3)))] + bn2)
    _check_bn_stays(model, rng.normal(size=(2, 2, 3, 3)).astype(F32))


def test_bn_on_the_model_output_of_a_conv_is_fused():
    """The BN's output is the graph output: fusion keeps the output name working."""
    rng = np.random.default_rng(11)
    names, bn_inits = _bn(rng, 2)
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"]), helper.make_node("BatchNormalization", ["c"] + names, ["z"])]
    model = make_model(nodes, [("x", [None, 1, 3, 3])], ["z"], [init("W", rng.normal(size=(2, 1, 2, 2)))] + bn_inits)
    canonized = onnxlrp.canonize(model)
    assert _ops(canonized) == ["Conv"]
    assert [o.name for o in canonized.graph.output] == ["z"] or len(canonized.graph.output) == 1
    _assert_same_function(model, canonized, rng.normal(size=(2, 1, 3, 3)).astype(F32))


# -- Softmax -------------------------------------------------------------------------------------------------------
def _dense_softmax(rng, op="Softmax", opset=13):
    nodes = [helper.make_node("Gemm", ["x", "W", "B"], ["logits"], transB=1), helper.make_node(op, ["logits"], ["z"])]
    inits = [init("W", rng.normal(size=(3, 4))), init("B", rng.normal(size=3))]
    return make_model(nodes, [("x", [None, 4])], ["z"], inits, opset=opset), inits


@pytest.mark.parametrize("op", ["Softmax", "LogSoftmax"])
def test_output_softmax_stripped(op):
    rng = np.random.default_rng(12)
    model, inits = _dense_softmax(rng, op)
    x = rng.normal(size=(2, 4)).astype(F32)
    logits = forward(make_model(model.graph.node[:1], [("x", [None, 4])], ["logits"], inits), x)
    for stripped in (onnxlrp.canonize(model), onnxlrp.strip_softmax(model)):
        assert _ops(stripped) == ["Gemm"]
        np.testing.assert_allclose(forward(stripped, x), logits, rtol=1e-5, atol=1e-6)
    e = make_lrp(model).analyze(x)
    np.testing.assert_allclose(e.output, logits, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(e.output_selection, logits.argmax(axis=1))


def test_flatten_softmax_reshape_stripped():
    """Opset < 13 softmax over a 4-D tensor is exported as Flatten -> Softmax -> Reshape."""
    rng = np.random.default_rng(13)
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"]), helper.make_node("Flatten", ["c"], ["f"]),
             helper.make_node("Softmax", ["f"], ["s"], axis=1), helper.make_node("Shape", ["c"], ["shp"]),
             helper.make_node("Reshape", ["s", "shp"], ["z"])]
    model = make_model(nodes, [("x", [None, 1, 3, 3])], [("z", [None, 2, 2, 2])],
                       [init("W", rng.normal(size=(2, 1, 2, 2)))], opset=11)
    x = rng.normal(size=(2, 1, 3, 3)).astype(F32)
    conv_only = make_model(nodes[:1], [("x", [None, 1, 3, 3])], ["c"], list(model.graph.initializer), opset=11)
    logits = forward(conv_only, x)
    canonized = onnxlrp.canonize(model)
    assert "Softmax" not in _ops(canonized)
    np.testing.assert_allclose(forward(canonized, x).reshape(2, -1), logits.reshape(2, -1), rtol=1e-5, atol=1e-6)
    e = make_lrp(model).analyze(x)
    np.testing.assert_allclose(e.output.reshape(2, -1), logits.reshape(2, -1), rtol=1e-5, atol=1e-6)


def test_softmax_inside_the_graph_is_kept_as_a_softmax_layer():
    rng = np.random.default_rng(14)
    nodes = [helper.make_node("Gemm", ["x", "W1"], ["h"], transB=1),
             helper.make_node("Softmax", ["h"], ["p"], axis=1, name="inner_softmax"),
             helper.make_node("Gemm", ["p", "W2"], ["z"], transB=1)]
    model = make_model(nodes, [("x", [None, 4])], ["z"],
                       [init("W1", rng.normal(size=(3, 4))), init("W2", rng.normal(size=(2, 3)))])
    assert _ops(onnxlrp.canonize(model)) == ["Gemm", "Softmax", "Gemm"]
    assert _ops(onnxlrp.strip_softmax(model)) == ["Gemm", "Softmax", "Gemm"]
    layers = make_lrp(model).layers
    assert [(l.op_type, l.group) for l in layers] == [("Gemm", "DenseLayer"), ("Softmax", "SoftmaxLayer"),
                                                      ("Gemm", "DenseLayer")]


def test_softmax_output_also_used_inside_is_kept():
    """A softmax whose output is both a graph output and feeds another node is not stripped."""
    rng = np.random.default_rng(15)
    nodes = [helper.make_node("Gemm", ["x", "W1"], ["h"], transB=1), helper.make_node("Softmax", ["h"], ["z"]),
             helper.make_node("Gemm", ["z", "W2"], ["y2"], transB=1)]
    model = make_model(nodes, [("x", [None, 4])], ["z", "y2"],
                       [init("W1", rng.normal(size=(3, 4))), init("W2", rng.normal(size=(2, 3)))])
    assert "Softmax" in _ops(onnxlrp.canonize(model))


# -- Dropout / Identity ----------------------------------------------------------------------------------------------
def test_dropout_and_identity_dropped():
    rng = np.random.default_rng(16)
    nodes = [helper.make_node("Identity", ["x"], ["i"]), helper.make_node("Gemm", ["i", "W1"], ["h"], transB=1),
             helper.make_node("Dropout", ["h"], ["d"]), helper.make_node("Relu", ["d"], ["r"]),
             helper.make_node("Dropout", ["r", "ratio"], ["d2", "mask"]),
             helper.make_node("Gemm", ["d2", "W2"], ["g"], transB=1), helper.make_node("Identity", ["g"], ["z"])]
    model = make_model(nodes, [("x", [None, 4])], ["z"],
                       [init("W1", rng.normal(size=(3, 4))), init("W2", rng.normal(size=(2, 3))),
                        init("ratio", np.float32(0.5))], opset=13)
    x = rng.normal(size=(2, 4)).astype(F32)
    assert _canonized_ops_and_check(model, x) == ["Gemm", "Relu", "Gemm"]
    assert layer_ops(model) == ["Gemm", "Relu", "Gemm"]


def test_shape_keeping_reshape_dropped_so_bn_fuses():
    """tf2onnx reshapes a 1x1 convolution's output to [-1, C, 1, 1] before its BatchNorm."""
    rng = np.random.default_rng(17)
    names, bn_inits = _bn(rng, 3)
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"]), helper.make_node("Reshape", ["c", "shape"], ["r"]),
             helper.make_node("BatchNormalization", ["r"] + names, ["b"]), helper.make_node("Relu", ["b"], ["y"]),
             helper.make_node("Reshape", ["y", "flat"], ["z"])]
    model = make_model(nodes, [("x", [None, 2, 1, 1])], ["z"],
                       [init("W", rng.normal(size=(3, 2, 1, 1))), init("shape", np.array([-1, 3, 1, 1], np.int64)),
                        init("flat", np.array([-1, 3], np.int64))] + bn_inits)
    x = rng.normal(size=(2, 2, 1, 1)).astype(F32)
    assert _canonized_ops_and_check(model, x) == ["Conv", "Relu", "Reshape"]  # the flattening one stays


@pytest.mark.parametrize("pads", [[0, 0, 1, 1, 0, 0, 1, 1], [0, 0, 0, 1, 0, 0, 2, 0]])
def test_zero_pad_before_conv_becomes_its_pads(pads):
    rng = np.random.default_rng(18)
    nodes = [helper.make_node("Pad", ["x", "pads"], ["p"]),
             helper.make_node("Conv", ["p", "W"], ["z"], pads=[1, 0, 0, 1], strides=[2, 1])]
    model = make_model(nodes, [("x", [None, 2, 5, 5])], ["z"],
                       [init("pads", np.array(pads, np.int64)), init("W", rng.normal(size=(3, 2, 3, 3)))])
    x = rng.normal(size=(2, 2, 5, 5)).astype(F32)
    assert _canonized_ops_and_check(model, x) == ["Conv"]


@pytest.mark.parametrize("case", ["value", "channels", "reflect"])
def test_other_pads_before_conv_stay(case):
    rng = np.random.default_rng(19)
    pads = [0, 1, 1, 1, 0, 0, 1, 1] if case == "channels" else [0, 0, 1, 1, 0, 0, 1, 1]
    inputs = ["x", "pads"] + (["value"] if case == "value" else [])
    nodes = [helper.make_node("Pad", inputs, ["p"], mode="reflect" if case == "reflect" else "constant"),
             helper.make_node("Conv", ["p", "W"], ["z"])]
    inits = [init("pads", np.array(pads, np.int64)), init("W", rng.normal(size=(3, 3 if case == "channels" else 2, 3, 3))),
             init("value", np.float32(0.5))]
    model = make_model(nodes, [("x", [None, 2, 5, 5])], ["z"], inits if case == "value" else inits[:2])
    x = rng.normal(size=(2, 2, 5, 5)).astype(F32)
    if case == "reflect":  # canonization keeps it; the engine refuses non-constant Pad (no emitter)
        canonized = onnxlrp.canonize(model)
        _assert_same_function(model, canonized, x)
        assert _ops(canonized) == ["Pad", "Conv"]
    else:
        assert _canonized_ops_and_check(model, x) == ["Pad", "Conv"]


# -- LayerNormalization ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("with_bias", [True, False])
def test_layernorm_split_into_norm_and_scale(with_bias):
    rng = np.random.default_rng(17)
    ins = ["x", "g"] + (["b"] if with_bias else [])
    nodes = [helper.make_node("LayerNormalization", ins, ["z"], axis=-1, epsilon=1e-3)]
    inits = [init("g", rng.uniform(0.5, 1.5, 4))] + ([init("b", rng.normal(size=4))] if with_bias else [])
    model = make_model(nodes, [("x", [None, 3, 4])], ["z"], inits, opset=17)
    x = rng.normal(size=(2, 3, 4)).astype(F32)
    ops = _canonized_ops_and_check(model, x)
    assert ops == (["LayerNormalization", "Mul", "Add"] if with_bias else ["LayerNormalization", "Mul"])
    canonized = onnxlrp.canonize(model)
    ln = canonized.graph.node[0]
    consts = {i.name: i for i in canonized.graph.initializer}
    from onnx import numpy_helper
    assert np.all(numpy_helper.to_array(consts[ln.input[1]]) == 1) and len(ln.input) == 2
    lrp = make_lrp(model)
    assert [(l.op_type, l.group) for l in lrp.layers] == [("LayerNormalization", "NormalizationLayer"),
                                                          ("Mul", "ScaleLayer")]
    assert lrp.layers[1].params.bias is not None or not with_bias


def test_layernorm_without_affine_is_not_split():
    node = helper.make_node("LayerNormalization", ["x", "g"], ["z"], axis=-1)
    model = make_model([node], [("x", [None, 4])], ["z"], [init("g", np.ones(4))], opset=17)
    assert _ops(onnxlrp.canonize(model)) == ["LayerNormalization"]


def test_canonize_is_idempotent():
    rng = np.random.default_rng(18)
    names, bn_inits = _bn(rng, 3)
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"]),
             helper.make_node("BatchNormalization", ["c"] + names, ["b"]), helper.make_node("Relu", ["b"], ["r"]),
             helper.make_node("Flatten", ["r"], ["f"]), helper.make_node("Gemm", ["f", "V"], ["l"], transB=1),
             helper.make_node("Softmax", ["l"], ["z"])]
    model = make_model(nodes, [("x", [None, 2, 3, 3])], ["z"],
                       [init("W", rng.normal(size=(3, 2, 2, 2))), init("V", rng.normal(size=(2, 12)))] + bn_inits)
    once = onnxlrp.canonize(model)
    twice = onnxlrp.canonize(once)
    assert _ops(once) == _ops(twice) == ["Conv", "Relu", "Flatten", "Gemm"]
    x = rng.normal(size=(2, 2, 3, 3)).astype(F32)
    np.testing.assert_allclose(ort_run(twice, {"x": x})[0], ort_run(once, {"x": x})[0], rtol=1e-6)


def _decomposed_layernorm_model(rng, square_op="Pow"):
    """x -> Gemm -> (y - mean(y)) / sqrt(mean((y - mean(y))^2) + eps) * g + b -> Relu -> Gemm, as PyTorch's
    exporter spells nn.LayerNorm below opset 17."""
    square = (helper.make_node("Pow", ["d", "two"], ["sq"]) if square_op == "Pow"
              else helper.make_node("Mul", ["d", "d"], ["sq"]))
    nodes = [helper.make_node("Gemm", ["x", "W1", "b1"], ["y"], transB=1),
             helper.make_node("ReduceMean", ["y"], ["m"], axes=[-1]),
             helper.make_node("Sub", ["y", "m"], ["d"]), square,
             helper.make_node("ReduceMean", ["sq"], ["v"], axes=[-1]),
             helper.make_node("Add", ["v", "eps"], ["ve"]), helper.make_node("Sqrt", ["ve"], ["sd"]),
             helper.make_node("Div", ["d", "sd"], ["n"]), helper.make_node("Mul", ["n", "g"], ["s"]),
             helper.make_node("Add", ["s", "b"], ["a"]), helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node("Gemm", ["r", "W2"], ["z"], transB=1)]
    inits = [init("W1", rng.normal(size=(6, 4))), init("b1", rng.normal(size=6)), init("two", np.float32(2)),
             init("eps", np.float32(1e-5)), init("g", rng.uniform(0.5, 1.5, 6)), init("b", rng.normal(size=6) * 0.1),
             init("W2", rng.normal(size=(3, 6)))]
    return make_model(nodes, [("x", [None, 4])], ["z"], inits, opset=13)


@pytest.mark.parametrize("square_op", ["Pow", "Mul"])
def test_decomposed_layernorm_becomes_one_layernorm_and_scale(square_op):
    rng = np.random.default_rng(19)
    model = _decomposed_layernorm_model(rng, square_op)
    x = rng.normal(size=(5, 4)).astype(F32)
    assert _canonized_ops_and_check(model, x) == ["Gemm", "LayerNormalization", "Mul", "Add", "Relu", "Gemm"]
    lrp = make_lrp(model, onnxlrp.EpsilonPlus())
    assert [type(r).__name__ for r in lrp.rules] == ["EpsilonRule", "LayerNormRule", "EpsilonRule", "PassRule",
                                                      "EpsilonRule"]
    # Same relevance as the model written with the LayerNormalization op itself (opset 17).
    inits = {t.name: t for t in model.graph.initializer}
    native = make_model(
        [helper.make_node("Gemm", ["x", "W1", "b1"], ["y"], transB=1),
         helper.make_node("LayerNormalization", ["y", "g", "b"], ["a"], axis=-1, epsilon=1e-5),
         helper.make_node("Relu", ["a"], ["r"]), helper.make_node("Gemm", ["r", "W2"], ["z"], transB=1)],
        [("x", [None, 4])], ["z"], [inits[n] for n in ("W1", "b1", "g", "b", "W2")], opset=17)
    expected = make_lrp(native, onnxlrp.EpsilonPlus()).analyze(x).val
    np.testing.assert_allclose(lrp.analyze(x).val, expected, rtol=1e-4, atol=1e-6)
