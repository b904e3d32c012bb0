"""The loader: old opsets and IR versions, constant-computed weights, legacy shape arithmetic, fixed-batch
reshapes, several inputs, external data (inside the model folder only), and clear errors for files that
are not models and for graphs with unsupported nodes."""
from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxlrp

from .helpers import (F32, affine_jacobian, explain, forward, init, make_lrp, make_model, np_conv, ort_run, stab,
                      vi)

n = helper.make_node


def _model(nodes, inputs, outputs, inits=(), opset=17, ir_version=None):
    if ir_version is None:
        ir_version = helper.find_min_ir_version_for([helper.make_opsetid("", opset)])
    return make_model(nodes, inputs, outputs, inits, opset=opset, ir_version=ir_version)


# -- opset 9 exports ----------------------------------------------------------------------------------------------
def test_opset9_constant_weights_and_unsqueeze():
    """Weights held by Constant nodes, a zero bias from ConstantOfShape, an Unsqueeze of a constant (the
    bias row) and one of data: constant folding makes them parameters of one Gemm layer."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=(3, 4)).astype(F32)
    b = rng.normal(size=3).astype(F32)
    nodes = [n("Constant", [], ["W"], value=numpy_helper.from_array(w)),
             n("Constant", [], ["b"], value=numpy_helper.from_array(b)),
             n("Unsqueeze", ["b"], ["b_row"], axes=[0]),
             n("Constant", [], ["shp"], value=numpy_helper.from_array(np.array([1, 3], np.int64))),
             n("ConstantOfShape", ["shp"], ["zeros"], value=numpy_helper.from_array(np.array([0.0], F32))),
             n("Add", ["b_row", "zeros"], ["bias"]),
             n("Gemm", ["x", "W", "bias"], ["g"], transB=1),
             n("Unsqueeze", ["g"], ["z3"], axes=[2]),
             n("Flatten", ["z3"], ["z"], axis=1)]
    model = _model(nodes, [("x", [None, 4])], [("z", [None, 3])], opset=9)
    lrp = make_lrp(model)
    assert [l.op_type for l in lrp.layers] == ["Gemm", "Unsqueeze", "Flatten"]
    x = rng.normal(size=(2, 4)).astype(F32)
    e = lrp.analyze(x, [0, 2])
    z = x @ w.T + b
    np.testing.assert_allclose(e.output, z, rtol=1e-5, atol=1e-6)
    for i, k in enumerate([0, 2]):
        np.testing.assert_allclose(e.val[i], x[i] * w[k] / stab(z[i, k]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(forward(model, x), z, rtol=1e-5, atol=1e-6)


def test_legacy_flatten_through_shape_arithmetic():
    """Old exporters flatten with Shape -> Gather -> Unsqueeze -> Concat([n, -1]) -> Reshape."""
    rng = np.random.default_rng(1)
    w, v = rng.normal(size=(2, 1, 2, 2)).astype(F32), rng.normal(size=(3, 8)).astype(F32)
    nodes = [n("Conv", ["x", "W"], ["c"]), n("Shape", ["c"], ["s"]), n("Gather", ["s", "i0"], ["nb"], axis=0),
             n("Unsqueeze", ["nb"], ["nbu"], axes=[0]), n("Concat", ["nbu", "m1"], ["target"], axis=0),
             n("Reshape", ["c", "target"], ["f"]), n("Gemm", ["f", "V", "C"], ["z"], transB=1)]
    inits = [init("W", w), init("i0", np.array(0, np.int64)), init("m1", np.array([-1], np.int64)),
             init("V", v), init("C", np.zeros(3))]
    model = _model(nodes, [("x", [None, 1, 3, 3])], [("z", [None, 3])], inits, opset=9)
    lrp = make_lrp(model)
    assert [l.op_type for l in lrp.layers] == ["Conv", "Reshape", "Gemm"]
    x = rng.normal(size=(3, 1, 3, 3)).astype(F32)
    e = lrp.analyze(x, 1, )
    conv = lambda t: np_conv(t[None], w)[0]  # noqa: E731
    for i in range(3):
        c = conv(x[i]).reshape(-1)
        z = v @ c
        s = v[1] * c / stab(z[1]) / stab(c)
        expected = x[i].reshape(-1) * (affine_jacobian(conv, x[i]).T @ s)
        np.testing.assert_allclose(e.val[i].reshape(-1), expected, rtol=1e-4, atol=1e-6)


# -- opsets ---------------------------------------------------------------------------------------------------------
def _opset_model(opset, rng):
    """x (N, 2, 4) -> Split(axis 1) -> Squeeze(axis 1) each -> Sub -> Gemm -> Relu -> Unsqueeze(2)
    -> ReduceMean(axis 2, keepdims 0) -> Gemm -> Softmax. Every axes argument in the form of `opset`."""
    w1, w2 = rng.normal(size=(5, 4)).astype(F32), rng.normal(size=(3, 5)).astype(F32)
    b1, b2 = rng.normal(size=5).astype(F32), rng.normal(size=3).astype(F32)
    inits = [init("W1", w1), init("B1", b1), init("W2", w2), init("B2", b2)]
    nodes = []
    if opset < 13:
        nodes.append(n("Split", ["x"], ["p", "q"], axis=1, split=[1, 1]))
        nodes += [n("Squeeze", ["p"], ["p2"], axes=[1]), n("Squeeze", ["q"], ["q2"], axes=[1])]
    else:
        if opset >= 18:
            nodes.append(n("Split", ["x"], ["p", "q"], axis=1, num_outputs=2))
        else:
            nodes.append(n("Split", ["x", "sp"], ["p", "q"], axis=1))
            inits.append(init("sp", np.array([1, 1], np.int64)))
        inits.append(init("ax1", np.array([1], np.int64)))
        nodes += [n("Squeeze", ["p", "ax1"], ["p2"]), n("Squeeze", ["q", "ax1"], ["q2"])]
    nodes += [n("Sub", ["p2", "q2"], ["d"]), n("Gemm", ["d", "W1", "B1"], ["h"], transB=1), n("Relu", ["h"], ["r"])]
    if opset < 13:
        nodes.append(n("Unsqueeze", ["r"], ["u"], axes=[2]))
    else:
        inits.append(init("ax2", np.array([2], np.int64)))
        nodes.append(n("Unsqueeze", ["r", "ax2"], ["u"]))
    if opset < 18:
        nodes.append(n("ReduceMean", ["u"], ["m"], axes=[2], keepdims=0))
    else:
        nodes.append(n("ReduceMean", ["u", "ax2"], ["m"], keepdims=0))
    nodes += [n("Gemm", ["m", "W2", "B2"], ["logits"], transB=1), n("Softmax", ["logits"], ["z"], axis=1)]
    model = _model(nodes, [("x", [None, 2, 4])], [("z", [None, 3])], inits, opset=opset)

    def logits(t):
        h = (t[0] - t[1]) @ w1.T.astype(np.float64) + b1
        return np.maximum(h, 0) @ w2.T.astype(np.float64) + b2, h

    return model, logits, (w1.astype(np.float64), w2.astype(np.float64))


@pytest.mark.parametrize("opset", [9, 11, 13, 17, 18, 21])
def test_opsets(opset):
    rng = np.random.default_rng(2)
    model, logits, (w1, w2) = _opset_model(opset, rng)
    x = rng.normal(size=(3, 2, 4)).astype(F32)
    want = np.stack([logits(t)[0] for t in x.astype(np.float64)])
    e = explain(model, x, normalize_output_relevance=False)
    np.testing.assert_allclose(e.output, want, rtol=1e-4, atol=1e-5)  # softmax stripped
    np.testing.assert_array_equal(e.output_selection, want.argmax(axis=1))
    for i, k in enumerate(e.output_selection):
        h = logits(x[i].astype(np.float64))[1]
        g_d = w1.T @ ((h > 0) * w2[k])               # gradient w.r.t. d = x[0] - x[1]
        np.testing.assert_allclose(e.val[i], x[i] * np.stack([g_d, -g_d]), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("opset", [11, 13])
def test_softmax_axis_semantics(opset):
    """A 3-D output softmax: before opset 13 axis=1 normalizes over the flattened trailing dims, from
    13 on over axis 1 only. Either way it is stripped and the logits are explained."""
    rng = np.random.default_rng(3)
    w = rng.normal(size=(4, 6)).astype(F32)
    nodes = [n("MatMul", ["x", "W"], ["l"]), n("Softmax", ["l"], ["z"], axis=1)]
    model = _model(nodes, [("x", [None, 2, 4])], [("z", [None, 2, 6])], [init("W", w)], opset=opset)
    x = rng.normal(size=(2, 2, 4)).astype(F32)
    l = x @ w
    y = forward(model, x)
    if opset < 13:
        np.testing.assert_allclose(y.reshape(2, -1).sum(axis=1), 1.0, rtol=1e-5)
    else:
        np.testing.assert_allclose(y.sum(axis=1), 1.0, rtol=1e-5)
    e = explain(model, x, sel=[0, 7])
    np.testing.assert_allclose(e.output, l, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(e.val[1][1], x[1][1] * w[:, 1] / stab(l[1, 1, 1]), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(e.val[1][0], 0.0, atol=1e-7)


def test_opset22_ceil_mode_pool():
    """From opset 22 onnx's shape inference drops a ceil_mode window that starts in the padding too."""
    nodes = [n("MaxPool", ["x"], ["p"], kernel_shape=[3, 3], strides=[2, 3], pads=[1, 1, 1, 1], ceil_mode=1),
             n("Flatten", ["p"], ["z"])]
    model = _model(nodes, [("x", [None, 1, 7, 8])], [("z", [None, 12])], opset=22)
    x = np.random.default_rng(4).normal(size=(2, 1, 7, 8)).astype(F32)
    e = explain(model, x, sel=[0, 11])
    np.testing.assert_allclose(e.output, forward(model, x), rtol=1e-6)
    assert np.allclose(e.val.reshape(2, -1).sum(axis=1), 1.0)


# -- batch and IR ------------------------------------------------------------------------------------------------------
def test_fixed_batch_one_reshape_explained_with_batch_three():
    """A Caffe2-era export: input batch fixed at 1 and Reshape to a literal [1, -1]."""
    rng = np.random.default_rng(5)
    w, v = rng.normal(size=(2, 1, 2, 2)).astype(F32), rng.normal(size=(3, 8)).astype(F32)
    nodes = [n("Conv", ["x", "W"], ["c"]), n("Reshape", ["c", "shape"], ["f"]), n("Gemm", ["f", "V"], ["z"], transB=1)]
    model = _model(nodes, [("x", [1, 1, 3, 3])], [("z", [1, 3])],
                   [init("W", w), init("shape", np.array([1, -1], np.int64)), init("V", v)], opset=11)
    lrp = make_lrp(model)
    x = rng.normal(size=(3, 1, 3, 3)).astype(F32)
    batch = lrp.analyze(x, [0, 1, 2])
    assert batch.val.shape == (3, 1, 3, 3) and batch.output.shape == (3, 3)
    for i in range(3):
        np.testing.assert_allclose(batch.output[i], forward(model, x[i:i + 1])[0], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(batch.val[i], lrp.analyze(x[i:i + 1], i).val[0], rtol=1e-5, atol=1e-7)


def test_old_ir_initializers_listed_as_inputs():
    rng = np.random.default_rng(6)
    w, b = rng.normal(size=(3, 4)).astype(F32), rng.normal(size=3).astype(F32)
    graph = helper.make_graph([n("Gemm", ["x", "W", "B"], ["z"], transB=1)], "old",
                              [vi("x", [None, 4]), vi("W", [3, 4]), vi("B", [3])], [vi("z", [None, 3])],
                              [init("W", w), init("B", b)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 8)], ir_version=3)
    onnx.checker.check_model(model)
    lrp = make_lrp(model)
    assert lrp.data_input == "x" and lrp.other_inputs == []
    x = rng.normal(size=(2, 4)).astype(F32)
    e = lrp.analyze(x, 1)
    z = x @ w.T + b
    np.testing.assert_allclose(e.val, x * w[1] / stab(z[:, 1:2]), rtol=1e-5, atol=1e-6)


def test_legacy_opset8_classifier():
    """An old-IR opset-8 classifier: Conv -> BatchNorm(spatial) -> Relu -> MaxPool -> Reshape([1, -1])
    -> Gemm -> Softmax with batch 1 fixed and initializers listed as inputs; explained with batch 3."""
    rng = np.random.default_rng(10)
    nodes = [n("Conv", ["x", "W", "B"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             n("BatchNormalization", ["c", "g", "b", "m", "v"], ["bn"], epsilon=1e-3, spatial=1),
             n("Relu", ["bn"], ["r"]), n("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
             n("Reshape", ["p", "shape"], ["f"]), n("Gemm", ["f", "V", "C"], ["l"], transB=1),
             n("Softmax", ["l"], ["z"])]
    inits = [init("W", rng.normal(size=(3, 2, 3, 3))), init("B", rng.normal(size=3)),
             init("g", rng.uniform(0.5, 2, 3)), init("b", rng.normal(size=3)), init("m", rng.normal(size=3)),
             init("v", rng.uniform(0.5, 2, 3)), init("shape", np.array([1, -1], np.int64)),
             init("V", rng.normal(size=(4, 12))), init("C", rng.normal(size=4))]
    inputs = [vi("x", [1, 2, 4, 4])] + [vi(i.name, list(i.dims), i.data_type) for i in inits]
    graph = helper.make_graph(nodes, "legacy", inputs, [vi("z", [1, 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 8)], ir_version=3)
    onnx.checker.check_model(model)
    lrp = make_lrp(model)
    assert [l.op_type for l in lrp.layers] == ["Conv", "Relu", "MaxPool", "Reshape", "Gemm"]  # BN fused
    x = rng.normal(size=(3, 2, 4, 4)).astype(F32)
    e = lrp.analyze(x)
    for i in range(3):
        probs = forward(model, x[i:i + 1])[0]
        logits = e.output[i].astype(np.float64)
        np.testing.assert_allclose(np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum(), probs,
                                   rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(e.val[i], lrp.analyze(x[i:i + 1], int(e.output_selection[i])).val[0],
                                   rtol=1e-5, atol=1e-7)


# -- several inputs ------------------------------------------------------------------------------------------------------
def _two_input_model(merge):
    w1 = np.array([[1.0, 0.0], [0.0, 2.0]], F32)
    w2 = np.array([[1.0, 1.0], [1.0, -1.0]], F32)
    if merge == "Concat":
        nodes = [n("Gemm", ["x", "W1"], ["a"], transB=1), n("Concat", ["a", "y"], ["c"], axis=1),
                 n("Gemm", ["c", "V"], ["z"], transB=1)]
        inits = [init("W1", w1), init("V", np.array([[1.0, 1.0, 1.0, 2.0]]))]
    else:
        nodes = [n("Gemm", ["x", "W1"], ["a"], transB=1), n("Gemm", ["y", "W2"], ["b"], transB=1),
                 n("Add", ["a", "b"], ["z"])]
        inits = [init("W1", w1), init("W2", w2)]
    return _model(nodes, [("x", [None, 2]), ("y", [None, 2])], ["z"], inits)


@pytest.mark.parametrize("merge", ["Concat", "Add"])
def test_several_inputs(merge):
    model = _two_input_model(merge)
    x, y = np.array([[1.0, 2.0]], F32), np.array([[3.0, -1.0]], F32)
    lrp_x = make_lrp(model)                    # the first data input by default
    assert lrp_x.data_input == "x" and lrp_x.other_inputs == ["y"]
    with pytest.raises(onnxlrp.InputError, match=r"another input 'y'.*inputs=\{'y': array\}"):
        lrp_x.analyze(x, 0)
    ex = lrp_x.analyze(x, 0, inputs={"y": y})
    lrp_y = make_lrp(model, input_name="y")
    assert lrp_y.other_inputs == ["x"]
    with pytest.raises(onnxlrp.InputError, match="'x'"):
        lrp_y.analyze(y, 0)
    ey = lrp_y.analyze(y, 0, inputs={"x": x})
    np.testing.assert_allclose(ex.output, ey.output)
    if merge == "Concat":
        # z = a0 + a1 + y0 + 2 y1 = 1 + 4 + 3 - 2 = 6; ZeroRule through the last Gemm then the first
        np.testing.assert_allclose(ex.val[0], [1 / 6, 4 / 6], rtol=1e-6)
        np.testing.assert_allclose(ey.val[0], [3 / 6, -2 / 6], rtol=1e-6)
    else:
        # z0 = a0 + b0 = 1 + 2 = 3: each branch keeps its share, the other input's acting like a bias
        np.testing.assert_allclose(ex.val[0], [1 / 3, 0.0], rtol=1e-6)
        np.testing.assert_allclose(ey.val[0], [3 / 3, -1 / 3], rtol=1e-6)


def test_unknown_input_name():
    with pytest.raises(onnxlrp.ModelLoadError, match=r"no data input named 'nope'.*\['x', 'y'\]"):
        make_lrp(_two_input_model("Concat"), input_name="nope")


# -- files and external data ------------------------------------------------------------------------------------------
def _gemm_model(seed=7):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(3, 40)).astype(F32)
    return _model([n("Gemm", ["x", "W"], ["z"], transB=1)], [("x", [None, 40])], ["z"], [init("W", w)]), w


def test_external_data_inside_the_model_folder(tmp_path):
    model, w = _gemm_model()
    folder = tmp_path / "m"
    (folder / "weights").mkdir(parents=True)
    path = folder / "model.onnx"
    copy = onnx.ModelProto()
    copy.CopyFrom(model)  # save_model turns the proto's tensors into external references in place
    onnx.save_model(copy, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="weights/w.bin", size_threshold=0)
    assert (folder / "weights" / "w.bin").exists()
    x = np.random.default_rng(8).normal(size=(2, 40)).astype(F32)
    from_path = make_lrp(path).analyze(x, 1)
    from_proto = make_lrp(model).analyze(x, 1)
    np.testing.assert_allclose(from_path.val, from_proto.val)
    np.testing.assert_allclose(from_path.output, x @ w.T, rtol=1e-5, atol=1e-5)
    # a proto whose tensors point at external data cannot be resolved without its path
    with pytest.raises(onnxlrp.ModelLoadError, match="external data"):
        make_lrp(onnx.load(str(path), load_external_data=False))


def _with_external_location(tmp_path, location):
    model, _ = _gemm_model()
    folder = tmp_path / "inner"
    folder.mkdir(exist_ok=True)
    path = folder / "model.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, location="w.bin", size_threshold=0)
    data = (folder / "w.bin").read_bytes()
    target = (folder / location) if not os.path.isabs(location) else location
    with open(target, "wb") as f:
        f.write(data)
    proto = onnx.load(str(path), load_external_data=False)
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save_model(proto, str(path))
    return path


@pytest.mark.parametrize("where", ["parent", "absolute", "nested_escape"])
def test_external_data_outside_the_folder_is_refused(tmp_path, where):
    location = {"parent": "../x.bin", "absolute": str(tmp_path / "abs.bin"),
                "nested_escape": "sub/../../y.bin"}[where]
    if where == "nested_escape":
        (tmp_path / "inner").mkdir()
        (tmp_path / "inner" / "sub").mkdir()
    path = _with_external_location(tmp_path, location)
    with pytest.raises(onnxlrp.ModelLoadError, match="outside") as info:
        make_lrp(path)
    assert str(path) in str(info.value)


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="needs symlinks")
def test_external_data_symlink_leaving_the_folder_is_refused(tmp_path):
    path = _with_external_location(tmp_path, "link.bin")
    outside = tmp_path / "outside.bin"
    os.replace(path.parent / "link.bin", outside)
    os.symlink(outside, path.parent / "link.bin")
    with pytest.raises(onnxlrp.ModelLoadError, match="outside"):
        make_lrp(path)


def test_missing_external_data_file(tmp_path):
    model, _ = _gemm_model()
    path = tmp_path / "model.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, location="w.bin", size_threshold=0)
    os.remove(tmp_path / "w.bin")
    with pytest.raises(onnxlrp.ModelLoadError, match="w.bin.*missing"):
        make_lrp(path)


def test_not_an_onnx_file(tmp_path):
    path = tmp_path / "notes.onnx"
    path.write_bytes(b"this is not a protobuf \x00\xff\xfe model at all" * 10)
    with pytest.raises(onnxlrp.ModelLoadError) as info:
        make_lrp(path)
    assert str(path) in str(info.value)
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    with pytest.raises(onnxlrp.ModelLoadError, match="empty.onnx"):
        make_lrp(empty)


def test_missing_file_and_folder(tmp_path):
    missing = tmp_path / "nope.onnx"
    with pytest.raises(onnxlrp.ModelLoadError, match="nope.onnx: no such file"):
        make_lrp(missing)
    with pytest.raises(onnxlrp.ModelLoadError, match="is a folder"):
        make_lrp(tmp_path)
    with pytest.raises(onnxlrp.ModelLoadError, match="expected a path or an onnx.ModelProto"):
        make_lrp(12345)


def test_model_that_fails_the_checker():
    graph = helper.make_graph([n("Gemm", ["x", "W"], ["z"], transB=1)], "bad", [vi("x", [None, 2])],
                              [vi("z", [None, 2])])  # W is neither an input nor an initializer
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    with pytest.raises(onnxlrp.ModelLoadError, match="checker"):
        make_lrp(model)


def test_integer_input_is_refused():
    graph = helper.make_graph([n("Cast", ["x"], ["z"], to=TensorProto.FLOAT)], "int",
                              [vi("x", [None, 2], TensorProto.INT64)], [vi("z", [None, 2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    with pytest.raises(onnxlrp.ModelLoadError, match="floating-point"):
        make_lrp(model)


# -- unsupported graphs -------------------------------------------------------------------------------------------------
def test_every_unsupported_node_is_listed():
    rng = np.random.default_rng(9)
    nodes = [n("Gemm", ["x", "W1"], ["h"], transB=1, name="dense1"),
             n("Cos", ["h"], ["p"], name="cosine"),
             n("Gemm", ["x", "W2"], ["g"], transB=1, name="dense2"),
             n("Div", ["p", "g"], ["m"], name="data_division"),
             n("Sin", ["m"], ["s"], name="sine"),
             n("Gemm", ["s", "W3"], ["z"], transB=1, name="head")]
    inits = [init("W1", rng.normal(size=(3, 4))), init("W2", rng.normal(size=(3, 4))), init("W3", rng.normal(size=(2, 3)))]
    model = _model(nodes, [("x", [None, 4])], ["z"], inits)
    with pytest.raises(onnxlrp.UnsupportedModelError) as info:
        make_lrp(model)
    msg = str(info.value)
    assert msg.startswith("3 node(s) are not supported")
    for name, op in (("cosine", "Cos"), ("data_division", "Div"), ("sine", "Sin")):
        assert f"node '{name}' (op type {op})" in msg
    assert sorted(op for _, op, _ in info.value.nodes) == ["Cos", "Div", "Sin"]
    assert "skip_checks=True" in msg
    # skip_checks: unsupported nodes pass relevance through, the analysis runs
    e = make_lrp(model, skip_checks=True).analyze(rng.normal(size=(2, 4)).astype(F32))
    assert e.val.shape == (2, 4) and np.all(np.isfinite(e.val))


def test_show_layer_indices_and_lrp_rules_on_a_path(tmp_path):
    model, _ = _gemm_model()
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    import io
    buf = io.StringIO()
    layers = onnxlrp.show_layer_indices(str(path), file=buf)
    assert [l.op_type for l in layers] == ["Gemm"] and "Gemm" in buf.getvalue()
    assert onnxlrp.lrp_rules(str(path)) == [onnxlrp.ZeroRule()]
    assert ort_run(onnxlrp.canonize(str(path)), {"x": np.ones((1, 40), F32)})[0].shape == (1, 3)


def test_nhwc_input_as_tf2onnx_writes_it():
    """tf2onnx-style graphs take NHWC input and transpose it for the Conv: the relevance comes back in
    NHWC and equals the NCHW model's relevance transposed."""
    rng = np.random.default_rng(31)
    w = rng.normal(size=(4, 3, 3, 3))
    v = rng.normal(size=(5, 4))
    tail = [helper.make_node("Conv", ["xc", "W"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["r"]),
            helper.make_node("GlobalAveragePool", ["r"], ["g"]), helper.make_node("Flatten", ["g"], ["f"]),
            helper.make_node("Gemm", ["f", "V"], ["z"], transB=1)]
    inits = [init("W", w), init("V", v)]
    nhwc = make_model([helper.make_node("Transpose", ["x"], ["xc"], perm=[0, 3, 1, 2])] + tail,
                      [("x", [None, 6, 6, 3])], ["z"], inits)
    nchw = make_model([helper.make_node("Identity", ["x"], ["xc"])] + tail, [("x", [None, 3, 6, 6])], ["z"], inits)
    x = rng.normal(size=(2, 6, 6, 3)).astype(np.float32)
    got = onnxlrp.LRP(nhwc, onnxlrp.EpsilonGammaBox(-3.0, 3.0), verbose=False).analyze(x).val
    want = onnxlrp.LRP(nchw, onnxlrp.EpsilonGammaBox(-3.0, 3.0), verbose=False).analyze(x.transpose(0, 3, 1, 2)).val
    assert got.shape == x.shape
    np.testing.assert_allclose(got, want.transpose(0, 2, 3, 1), rtol=1e-5, atol=1e-7)
