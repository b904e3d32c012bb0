"""Elementwise emitters: merges (Add/Sum/Sub of data tensors, with broadcasting), scale layers
(Mul/Div/Add/Sub by a constant) and gates (x * Sigmoid(x), the Erf-GELU pattern), against numpy."""
from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

import onnxlrp

from .helpers import (F32, affine_jacobian, check_adjoint, check_grad_times_input, explain, forward, init,
                      layer_ops, make_lrp, make_model, np_conv, stab)


def _two_branch(op, rng, n_branches=2):
    """x -> Gemm_i(x) (i < n_branches) -> op(all branches)."""
    ws = [rng.normal(size=(3, 4)).astype(F32) for _ in range(n_branches)]
    bs = [rng.normal(size=3).astype(F32) for _ in range(n_branches)]
    nodes = [helper.make_node("Gemm", ["x", f"W{i}", f"B{i}"], [f"h{i}"], transB=1) for i in range(n_branches)]
    nodes.append(helper.make_node(op, [f"h{i}" for i in range(n_branches)], ["z"]))
    inits = [init(f"W{i}", w) for i, w in enumerate(ws)] + [init(f"B{i}", b) for i, b in enumerate(bs)]
    branches = [lambda t, w=w, b=b: t @ w.T.astype(np.float64) + b for w, b in zip(ws, bs)]
    return nodes, inits, branches


@pytest.mark.parametrize("op,n", [("Add", 2), ("Sub", 2), ("Sum", 2), ("Sum", 3)])
def test_merge_of_data_tensors(op, n):
    rng = np.random.default_rng(0)
    nodes, inits, branches = _two_branch(op, rng, n)
    sign = [1.0, -1.0] if op == "Sub" else [1.0] * n

    def f(t):
        return sum(s * g(t) for s, g in zip(sign, branches))

    model = make_model(nodes, [("x", [None, 4])], ["z"], inits)
    assert layer_ops(model)[-1] == op
    x = rng.normal(size=4).astype(F32)
    np.testing.assert_allclose(forward(model, x[None]), f(x[None]), rtol=1e-5, atol=1e-5)
    check_grad_times_input(model, x, affine_jacobian(f, x))


def test_merge_zero_rule_split_by_contribution():
    """ZeroRule on Add(a, b): R_a = a / (a + b) R, R_b = b / (a + b) R (by hand, identity branches)."""
    nodes = [helper.make_node("Mul", ["x", "c1"], ["a"]), helper.make_node("Mul", ["x", "c2"], ["b"]),
             helper.make_node("Add", ["a", "b"], ["z"])]
    model = make_model(nodes, [("x", [None, 2])], ["z"], [init("c1", [1.0, 2.0]), init("c2", [3.0, -1.0])])
    x = np.array([[1.0, 1.0]], F32)
    r = explain(model, x, sel=1).val  # z = [4, 1]; output 1: a = 2, b = -1
    # both Scale layers (ZeroRule) pass their share back unchanged: R_x = R_a + R_b = 2/1 + (-1)/1 = 1
    np.testing.assert_allclose(r[0], [0.0, 1.0], atol=1e-6)
    # relevance arriving at each layer's output: Add gets the seed, the Mul branches their shares
    e = make_lrp(model, layer_relevances=True).analyze(x, 1)
    per_layer = e.extras["layerwise_relevances"]
    np.testing.assert_allclose(per_layer[2][0], [0.0, 1.0], atol=1e-6)
    np.testing.assert_allclose(per_layer[0][0], [0.0, 2.0], atol=1e-6)
    np.testing.assert_allclose(per_layer[1][0], [0.0, -1.0], atol=1e-6)


def test_merge_with_broadcasting():
    """Add(a (N,2,3), b (N,1,3)): b's relevance is summed over the broadcast axis."""
    rng = np.random.default_rng(1)
    c = rng.normal(size=(1, 2, 3)).astype(F32)
    nodes = [helper.make_node("Mul", ["x", "C"], ["a"]),
             helper.make_node("ReduceMean", ["x"], ["b"], axes=[1], keepdims=1),
             helper.make_node("Add", ["a", "b"], ["z"])]
    f = lambda t: t * c + t.mean(axis=-2, keepdims=True)  # noqa: E731
    model = make_model(nodes, [("x", [None, 2, 3])], ["z"], [init("C", c)], opset=13)
    x = rng.normal(size=(2, 3)).astype(F32)
    np.testing.assert_allclose(forward(model, x[None]), f(x[None]), rtol=1e-5, atol=1e-6)
    check_grad_times_input(model, x, affine_jacobian(lambda t: f(t[None])[0], x))
    check_adjoint(nodes, [init("C", c)], rng.normal(size=(2, 2, 3)).astype(F32), "z", f, rng, opset=13)


def test_merge_pass_rule_is_refused():
    rng = np.random.default_rng(2)
    nodes, inits, _ = _two_branch("Add", rng)
    model = make_model(nodes, [("x", [None, 4])], ["z"], inits)
    rules = [onnxlrp.ZeroRule(), onnxlrp.ZeroRule(), onnxlrp.PassRule()]
    with pytest.raises(ValueError, match="PassRule cannot split"):
        make_lrp(model, rules)


def test_residual_block():
    """x -> Gemm -> Relu -> Gemm -> Add(x) : a skip connection; LRP-0 = gradient x input."""
    rng = np.random.default_rng(3)
    w1, w2 = rng.normal(size=(4, 4)).astype(F32), rng.normal(size=(4, 4)).astype(F32)
    b1 = rng.normal(size=4).astype(F32)
    nodes = [helper.make_node("Gemm", ["x", "W1", "B1"], ["h"], transB=1), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Gemm", ["r", "W2"], ["g"], transB=1), helper.make_node("Add", ["g", "x"], ["z"])]
    model = make_model(nodes, [("x", [None, 4])], ["z"], [init("W1", w1), init("B1", b1), init("W2", w2)])
    x = rng.normal(size=4).astype(F32)
    h = x @ w1.T.astype(np.float64) + b1
    jac = w2.astype(np.float64) @ np.diag((h > 0).astype(float)) @ w1 + np.eye(4)
    check_grad_times_input(model, x, jac)


# -- Scale layers (Mul/Div/Add/Sub by a constant) --------------------------------------------------------------
SCALE_CASES = {
    # name: (nodes builder args) -> (op, const, data first?)
    "mul_scalar": ("Mul", np.array(2.5), True),
    "mul_per_channel": ("Mul", np.array([[[0.5]], [[-2.0]], [[3.0]]]), True),
    "mul_full": ("Mul", "full", False),
    "div_scalar": ("Div", np.array(4.0), True),
    "div_per_channel": ("Div", np.array([[[0.5]], [[-2.0]], [[3.0]]]), True),
    "add_const": ("Add", np.array([[[1.0]], [[2.0]], [[-3.0]]]), False),
    "sub_const": ("Sub", np.array(0.75), True),
    "const_minus_x": ("Sub", np.array([[[1.0]], [[2.0]], [[-3.0]]]), False),
}


@pytest.mark.parametrize("name", list(SCALE_CASES))
def test_scale_layer(name):
    rng = np.random.default_rng(4)
    op, c, data_first = SCALE_CASES[name]
    if isinstance(c, str):
        c = rng.normal(size=(3, 2, 2))
    c = np.asarray(c, F32)
    ins = ["x", "C"] if data_first else ["C", "x"]
    node = helper.make_node(op, ins, ["z"])
    fn = {"Mul": np.multiply, "Div": np.divide, "Add": np.add, "Sub": np.subtract}[op]
    f = (lambda t: fn(t, c.astype(np.float64))) if data_first else (lambda t: fn(c.astype(np.float64), t))
    model = make_model([node], [("x", [None, 3, 2, 2])], ["z"], [init("C", c)])
    assert make_lrp(model).layers[0].group == "ScaleLayer"
    x = rng.normal(size=(3, 2, 2)).astype(F32)
    np.testing.assert_allclose(forward(model, x[None]), f(x[None]), rtol=1e-5, atol=1e-6)
    check_grad_times_input(model, x, affine_jacobian(lambda t: f(t[None])[0], x))
    check_adjoint([node], [init("C", c)], rng.normal(size=(2, 3, 2, 2)).astype(F32), "z", f, rng)


def test_scale_with_bias_is_one_layer():
    """Mul(c) then Add(d) (not after a linear layer, so nothing to fuse into): one ScaleLayer with bias."""
    rng = np.random.default_rng(5)
    c, d = rng.normal(size=(2, 1)).astype(F32), rng.normal(size=(2, 1)).astype(F32)
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Mul", ["r", "C"], ["m"]),
             helper.make_node("Add", ["m", "D"], ["z"])]
    model = make_model(nodes, [("x", [None, 2, 3])], ["z"], [init("C", c), init("D", d)])
    assert layer_ops(model) == ["Relu", "Mul"]
    x = rng.normal(size=(2, 3)).astype(F32)
    r = explain(model, x[None], sel=4).val
    z = np.maximum(x, 0) * c + d
    expected = np.zeros((2, 3))
    expected[1, 1] = np.maximum(x, 0)[1, 1] * c[1, 0] / stab(z[1, 1])
    np.testing.assert_allclose(r[0], expected, rtol=1e-5, atol=1e-7)


def test_div_constant_by_data_is_unsupported():
    model = make_model([helper.make_node("Div", ["C", "x"], ["z"])], [("x", [None, 2])], ["z"],
                       [init("C", [1.0, 2.0])])
    with pytest.raises(onnxlrp.UnsupportedModelError, match="not linear"):
        make_lrp(model)


# -- gates ----------------------------------------------------------------------------------------------------
def _gate_model(kind, rng):
    """x -> Conv -> gate -> Flatten -> Gemm; returns the model and numpy pieces."""
    w = rng.normal(size=(2, 1, 2, 2)).astype(F32)
    cb = rng.normal(size=2).astype(F32)
    v = rng.normal(size=(3, 2 * 2 * 2)).astype(F32)
    vb = rng.normal(size=3).astype(F32)
    nodes = [helper.make_node("Conv", ["x", "W", "CB"], ["z"])]
    if kind == "silu":
        nodes += [helper.make_node("Sigmoid", ["z"], ["s"]), helper.make_node("Mul", ["z", "s"], ["g"])]
        act = lambda t: t / (1 + np.exp(-t))  # noqa: E731
    elif kind == "silu_reversed":
        nodes += [helper.make_node("Sigmoid", ["z"], ["s"]), helper.make_node("Mul", ["s", "z"], ["g"])]
        act = lambda t: t / (1 + np.exp(-t))  # noqa: E731
    else:  # Erf-GELU as exported by torch: x * 0.5 * (1 + erf(x / sqrt 2))
        from math import erf
        nodes += [helper.make_node("Div", ["z", "sqrt2"], ["d"]), helper.make_node("Erf", ["d"], ["e"]),
                  helper.make_node("Add", ["e", "one"], ["p"]), helper.make_node("Mul", ["z", "p"], ["m"]),
                  helper.make_node("Mul", ["m", "half"], ["g"])]
        act = np.vectorize(lambda t: t * 0.5 * (1 + erf(t / np.sqrt(2))))
    nodes += [helper.make_node("Flatten", ["g"], ["f"]), helper.make_node("Gemm", ["f", "V", "VB"], ["y"], transB=1)]
    inits = [init("W", w), init("CB", cb), init("V", v), init("VB", vb), init("sqrt2", np.sqrt(2.0)),
             init("one", 1.0), init("half", 0.5)]
    if kind != "gelu":
        inits = inits[:4]
    model = make_model(nodes, [("x", [None, 1, 3, 3])], ["y"], inits)
    conv = lambda t: np_conv(t, w, cb)  # noqa: E731
    return model, conv, act, v.astype(np.float64), vb


@pytest.mark.parametrize("kind", ["silu", "silu_reversed", "gelu"])
def test_gate_passes_relevance_to_the_signal(kind):
    """Relevance through x * g(x) goes to x unchanged; the gate branch gets none. Then ZeroRule on the
    Conv: R_x = x * conv^T(R_z / z)."""
    rng = np.random.default_rng(6)
    model, conv, act, v, vb = _gate_model(kind, rng)
    x = rng.normal(size=(1, 3, 3)).astype(F32)
    z = conv(x[None])[0]
    a = act(z).reshape(-1)
    y = v @ a + vb
    np.testing.assert_allclose(forward(model, x[None])[0], y, rtol=1e-4, atol=1e-5)
    k = 1
    r_g = a * v[k] / stab(y[k])          # ZeroRule on the Gemm, seed 1
    r_z = r_g.reshape(z.shape)           # the gate passes relevance to its signal input
    jac = affine_jacobian(lambda t: conv(t[None])[0], x)
    expected = x.reshape(-1) * (jac.T @ (r_z / stab(z)).reshape(-1))
    r = explain(model, x[None], sel=k).val
    np.testing.assert_allclose(r[0].reshape(-1), expected, rtol=1e-4, atol=1e-6)
    ops = layer_ops(model)
    assert "Mul" in ops and "Conv" in ops


def test_product_of_two_branches_is_a_product_layer():
    """Mul of two unrelated data tensors is a ProductLayer: the uniform rule gives half of the relevance
    to each operand, then LRP-0 through each Gemm."""
    rng = np.random.default_rng(12)
    w1, w2 = rng.normal(size=(3, 2)).astype(F32), rng.normal(size=(3, 2)).astype(F32)
    nodes = [helper.make_node("Gemm", ["x", "W1"], ["a"], transB=1), helper.make_node("Gemm", ["x", "W2"], ["b"], transB=1),
             helper.make_node("Mul", ["a", "b"], ["z"], name="bilinear")]
    model = make_model(nodes, [("x", [None, 2])], ["z"], [init("W1", w1), init("W2", w2)])
    analyzer = make_lrp(model)
    assert [l.group for l in analyzer.layers] == ["DenseLayer", "DenseLayer", "ProductLayer"]
    x = rng.normal(size=(1, 2)).astype(F32)
    a, b = x[0].astype(np.float64) @ w1.T, x[0].astype(np.float64) @ w2.T
    r = explain(model, x, sel=1).val[0]
    half = 0.5  # the seed is 1 at output 1; each operand gets half of it
    expected = x[0] * w1[1] * half / stab(a[1]) + x[0] * w2[1] * half / stab(b[1])
    np.testing.assert_allclose(r, expected, rtol=1e-5)


@pytest.mark.parametrize("op", ["Relu", "LeakyRelu", "Sigmoid", "Tanh", "Elu", "Softplus", "HardSigmoid", "Clip"])
def test_activation_passes_relevance(op):
    """Activations pass relevance unchanged (PassRule is their default)."""
    rng = np.random.default_rng(7)
    w = rng.normal(size=(3, 4)).astype(F32)
    nodes = [helper.make_node(op, ["x"], ["a"]), helper.make_node("Gemm", ["a", "W"], ["z"], transB=1)]
    model = make_model(nodes, [("x", [None, 4])], ["z"], [init("W", w)])
    x = rng.normal(size=(1, 4)).astype(F32)
    a = forward(make_model(nodes[:1], [("x", [None, 4])], ["a"]), x)[0].astype(np.float64)
    z = a @ w.T
    r = explain(model, x, sel=2).val
    np.testing.assert_allclose(r[0], a * w[2] / stab(z[2]), rtol=1e-4, atol=1e-6)
