"""Gemm / MatMul emitters: relevance through the exact transpose of the dense map (numpy references).

Gemm is canonized to y = x W^T + b (transB=1, alpha=beta=1; transA becomes a Transpose layer), so every
attribute combination is checked end to end; MatMul takes a following Add of a constant as its bias and
works on inputs of any rank.
"""
from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

from .helpers import (F32, affine_jacobian, check_adjoint, check_grad_times_input, explain, forward, init,
                      layer_ops, make_model, stab)


def _gemm_case(trans_a, trans_b, alpha, beta, bias_shape, seed=0):
    rng = np.random.default_rng(seed)
    n_in, n_out = 4, 3
    w = rng.normal(size=(n_out, n_in) if trans_b else (n_in, n_out)).astype(F32)
    c = rng.normal(size=bias_shape).astype(F32) if bias_shape is not None else None
    attrs = {"transA": trans_a, "transB": trans_b, "alpha": alpha, "beta": beta}
    ins = ["xa", "W"] + (["C"] if c is not None else [])
    nodes, x_shape = [helper.make_node("Gemm", ins, ["z"], **attrs)], [None, n_in]
    if trans_a:  # A = x^T: feed Gemm with a transposed copy of the data (batch becomes the column axis)
        nodes.insert(0, helper.make_node("Transpose", ["x"], ["xa"], perm=[1, 0]))
    else:
        nodes[0].input[0] = "x"
    inits = [init("W", w)] + ([init("C", c)] if c is not None else [])
    w_eff = (w if trans_b else w.T).astype(np.float64)  # (out, in)

    def f(t):
        y = alpha * t @ w_eff.T
        return y + beta * c if c is not None else y

    return rng, nodes, inits, x_shape, f, w_eff


GEMM_CASES = [(tb, a, be, bs) for tb in (0, 1)
              for a, be, bs in ((1.0, 1.0, (3,)), (0.5, 2.0, (1, 3)), (1.5, 0.25, None), (2.0, -1.0, (1,)))]


@pytest.mark.parametrize("trans_b,alpha,beta,bias_shape", GEMM_CASES)
def test_gemm_attributes(trans_b, alpha, beta, bias_shape):
    rng, nodes, inits, x_shape, f, _ = _gemm_case(0, trans_b, alpha, beta, bias_shape)
    model = make_model(nodes, [("x", x_shape)], ["z"], inits)
    x = rng.normal(size=4).astype(F32)
    np.testing.assert_allclose(forward(model, x[None]), f(x[None]), rtol=1e-5, atol=1e-5)
    check_grad_times_input(model, x, affine_jacobian(f, x))
    # the canonized Gemm is one DenseLayer
    assert layer_ops(model) == ["Gemm"]


@pytest.mark.parametrize("trans_b,alpha,beta", [(0, 1.0, 1.0), (1, 0.5, 2.0)])
def test_gemm_trans_a(trans_b, alpha, beta):
    """Gemm(transA=1) fed with x^T: canonization turns transA into a Transpose layer of its own (it
    needs a static shape for the relevance graph); both Transposes pass relevance (their pair is the
    identity)."""
    rng, nodes, inits, x_shape, f, _ = _gemm_case(1, trans_b, alpha, beta, (3,), seed=2)
    model = make_model(nodes, [("x", x_shape)], ["z"], inits)
    assert layer_ops(model) == ["Transpose", "Transpose", "Gemm"]
    x = rng.normal(size=4).astype(F32)
    np.testing.assert_allclose(forward(model, x[None]), f(x[None]), rtol=1e-5, atol=1e-5)
    check_grad_times_input(model, x, affine_jacobian(f, x))


@pytest.mark.parametrize("trans_b,alpha,beta", [(0, 1.0, 1.0), (1, 2.0, 0.5), (0, -0.5, 3.0)])
def test_gemm_adjoint_readout(trans_b, alpha, beta):
    rng, nodes, inits, _, f, _ = _gemm_case(0, trans_b, alpha, beta, (3,), seed=4)
    x = rng.normal(size=(3, 4)).astype(F32)
    check_adjoint(nodes, inits, x, "z", f, rng)


def test_gemm_zero_rule_formula():
    """ZeroRule on one Gemm: R_j = sum_i W_ij a_j / z_i R_i with the selected output seeded 1."""
    rng, nodes, inits, x_shape, f, w_eff = _gemm_case(0, 0, 2.0, 0.5, (3,), seed=7)
    model = make_model(nodes, [("x", x_shape)], ["z"], inits)
    x = rng.normal(size=(2, 4)).astype(F32)
    r = explain(model, x, sel=[1, 2]).val
    z = f(x.astype(np.float64))
    for n, k in enumerate([1, 2]):
        expected = x[n] * 2.0 * w_eff[k] / stab(z[n, k])
        np.testing.assert_allclose(r[n], expected, rtol=1e-4, atol=1e-6)


# -- MatMul ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bias", [None, "vector", "row", "scalar"])
def test_matmul_bias(bias):
    rng = np.random.default_rng(8)
    w = rng.normal(size=(5, 3)).astype(F32)
    consts = {"vector": rng.normal(size=3), "row": rng.normal(size=(1, 3)), "scalar": np.array(0.7)}
    nodes = [helper.make_node("MatMul", ["x", "W"], ["m" if bias else "z"])]
    inits = [init("W", w)]
    if bias:
        c = consts[bias].astype(F32)
        nodes.append(helper.make_node("Add", ["m", "C"], ["z"]))
        inits.append(init("C", c))
    model = make_model(nodes, [("x", [None, 5])], ["z"], inits)
    assert layer_ops(model) == ["MatMul"]  # the Add of a constant is the MatMul's bias
    x = rng.normal(size=5).astype(F32)
    f = lambda t: t @ w.astype(np.float64) + (c.astype(np.float64).reshape(-1) if bias else 0)  # noqa: E731
    np.testing.assert_allclose(forward(model, x[None]), f(x[None]), rtol=1e-5, atol=1e-5)
    check_grad_times_input(model, x, affine_jacobian(f, x))


def test_matmul_bias_on_left():
    """Add(C, MatMul(x, W)): the constant as the first operand is still the bias."""
    rng = np.random.default_rng(9)
    w, c = rng.normal(size=(4, 3)).astype(F32), rng.normal(size=3).astype(F32)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["m"]), helper.make_node("Add", ["C", "m"], ["z"])]
    model = make_model(nodes, [("x", [None, 4])], ["z"], [init("W", w), init("C", c)])
    x = rng.normal(size=4).astype(F32)
    f = lambda t: t @ w.astype(np.float64) + c  # noqa: E731
    check_grad_times_input(model, x, affine_jacobian(f, x))


def test_matmul_3d_input():
    """x of shape (N, T, D) @ W (D, E) + b: a token-wise dense layer (e.g. a transformer projection)."""
    rng = np.random.default_rng(10)
    w, c = rng.normal(size=(4, 3)).astype(F32), rng.normal(size=3).astype(F32)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["m"]), helper.make_node("Add", ["m", "C"], ["z"])]
    model = make_model(nodes, [("x", [None, 2, 4])], ["z"], [init("W", w), init("C", c)])
    x = rng.normal(size=(2, 4)).astype(F32)
    f = lambda t: t @ w.astype(np.float64) + c  # noqa: E731
    np.testing.assert_allclose(forward(model, x[None]), f(x[None]), rtol=1e-5, atol=1e-5)
    check_grad_times_input(model, x, affine_jacobian(f, x))
    xb = rng.normal(size=(2, 2, 4)).astype(F32)
    check_adjoint(nodes, [init("W", w), init("C", c)], xb, "z", f, rng)


def test_matmul_4d_input_no_bias():
    rng = np.random.default_rng(11)
    w = rng.normal(size=(3, 2)).astype(F32)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["z"])]
    x = rng.normal(size=(2, 2, 3, 3)).astype(F32)
    check_adjoint(nodes, [init("W", w)], x, "z", lambda t: t @ w.astype(np.float64), rng)


def test_matmul_weight_first_is_unsupported():
    """W @ x (constant on the left) is not a dense layer onnxlrp knows: a clear error, not a wrong answer."""
    import onnxlrp
    w = np.ones((3, 3), F32)
    model = make_model([helper.make_node("MatMul", ["W", "x"], ["z"])], [("x", [None, 3, 2])], ["z"],
                       [init("W", w)])
    with pytest.raises(onnxlrp.UnsupportedModelError, match="MatMul"):
        onnxlrp.LRP(model, verbose=False)
