"""Every LRP rule against its formula, written out in numpy (float64), on tiny Gemm and Conv layers.

Conventions (RelevancePropagation.jl): the stabilizer of rules without epsilon is 1e-9 with sign(0) = +1;
ZBox uses the pre-activation z = W a + b; ZPlus/AlphaBeta put the bias on the positive part only
(b+ with W+ a+) and b- in the beta denominator (with W- a+); Flat and WSquare drop the bias and use
inputs of one. A Conv is written as its (out x in) matrix: a transformed kernel (W+, W², ones, ...)
gives the transformed matrix, so one matrix formula serves both layer types.
"""
from __future__ import annotations

import io
import re
import zlib
from dataclasses import dataclass

import numpy as np
import onnx
import pytest
from onnx import helper

import onnxlrp
from onnxlrp import (AlphaBetaRule, Composite, EpsilonRule, FlatRule, GammaRule, GeneralizedGammaRule, GlobalMap,
                     LayerMap, LayerNormRule, PassRule, Rule, RuleCompatibilityError, WSquareRule, ZBoxRule,
                     ZeroRule, ZPlusRule)
from onnxlrp.rules import Params, keep_positive, stabilize
from onnxlrp.rules.base import DEFAULT_STABILIZER
from onnxlrp.rules.expr import Sym

from .helpers import (F32, affine_jacobian, explain, forward, init, make_lrp, make_model, maxpool_jacobian,
                      neg, np_conv, np_conv_transpose, np_maxpool, ort_run, pos, stab)


# -- the formulas ------------------------------------------------------------------------------------------------
# lin(fn): the layer's (out x in) matrix with its weights transformed by fn; b: bias per output (or None);
# a: the layer input (flat); R: relevance at the layer output (flat). Each returns the input relevance.
def ref_zero(lin, b, a, R, eps=1e-9):
    W = lin(lambda w: w)
    z = W @ a + (0 if b is None else b)
    return np.array([sum(W[i, j] * a[j] / stab(z[i], eps) * R[i] for i in range(len(R))) for j in range(len(a))])


def ref_epsilon(lin, b, a, R, eps):
    return ref_zero(lin, b, a, R, eps)


def ref_gamma(lin, b, a, R, gamma):
    Wg = lin(lambda w: w + gamma * pos(w))
    bg = 0 if b is None else b + gamma * pos(b)
    z = Wg @ a + bg
    return a * (Wg.T @ (R / stab(z)))


def ref_wsquare(lin, b, a, R):
    W2 = lin(lambda w: w ** 2)
    return np.array([sum(W2[i, j] / stab(W2[i].sum()) * R[i] for i in range(len(R))) for j in range(len(a))])


def ref_flat(lin, b, a, R):
    ones = lin(np.ones_like)            # 1 where input j feeds output i
    n = ones.sum(axis=1)                # n_i: inputs connected to output i
    return ones.T @ (R / stab(n))


def ref_zplus(lin, b, a, R):
    P, N = lin(pos), lin(neg)
    z = P @ pos(a) + (0 if b is None else pos(b)) + N @ neg(a)
    s = R / stab(z)
    return pos(a) * (P.T @ s) + neg(a) * (N.T @ s)


def ref_alphabeta(lin, b, a, R, alpha, beta):
    P, N = lin(pos), lin(neg)
    z_plus = P @ pos(a) + (0 if b is None else pos(b)) + N @ neg(a)
    z_minus = N @ pos(a) + (0 if b is None else neg(b)) + P @ neg(a)
    s_plus, s_minus = R / stab(z_plus), R / stab(z_minus)
    return alpha * (pos(a) * (P.T @ s_plus) + neg(a) * (N.T @ s_plus)) \
        - beta * (pos(a) * (N.T @ s_minus) + neg(a) * (P.T @ s_minus))


def ref_zbox(lin, b, a, R, low, high):
    W, P, N = lin(lambda w: w), lin(pos), lin(neg)
    bb = np.zeros(W.shape[0]) if b is None else b
    z = (W @ a + bb) - (P @ low + pos(bb)) - (N @ high + neg(bb))
    s = R / stab(z)
    return a * (W.T @ s) - low * (P.T @ s) - high * (N.T @ s)


def ref_generalized_gamma(lin, b, a, R, gamma):
    Wp, Wn = lin(lambda w: w + gamma * pos(w)), lin(lambda w: w + gamma * neg(w))
    bb = np.zeros(Wp.shape[0]) if b is None else b
    z = lin(lambda w: w) @ a + bb                        # the layer's own pre-activation picks the case
    z1 = Wp @ pos(a) + Wn @ neg(a) + (bb + gamma * pos(bb))
    z2 = Wn @ pos(a) + Wp @ neg(a) + (bb + gamma * neg(bb))
    s1 = R * (z > 0) / stab(z1)
    s2 = R * (z < 0) / stab(z2)
    return pos(a) * (Wp.T @ s1) + neg(a) * (Wn.T @ s1) + pos(a) * (Wn.T @ s2) + neg(a) * (Wp.T @ s2)


# -- tiny layers --------------------------------------------------------------------------------------------------
def gemm_layer(rng, n_in=4, n_out=3, bias=True):
    W = rng.normal(size=(n_out, n_in)).astype(F32)
    b = rng.normal(size=n_out).astype(F32) if bias else None
    ins = ["x", "W"] + (["B"] if bias else [])
    model = make_model([helper.make_node("Gemm", ins, ["z"], transB=1)], [("x", [None, n_in])], ["z"],
                       [init("W", W)] + ([init("B", b)] if bias else []))
    Wd = W.astype(np.float64)
    return model, (lambda fn: fn(Wd)), (None if b is None else b.astype(np.float64)), (n_in,)


def conv_layer(rng, shape=(2, 4, 4), w_shape=(2, 2, 3, 3), bias=True, **attrs):
    w = rng.normal(size=w_shape).astype(F32)
    b = rng.normal(size=w_shape[0]).astype(F32) if bias else None
    ins = ["x", "W"] + (["B"] if bias else [])
    model = make_model([helper.make_node("Conv", ins, ["z"], **attrs)], [("x", [None, *shape])], ["z"],
                       [init("W", w)] + ([init("B", b)] if bias else []))
    x0 = np.zeros(shape)
    conv = lambda t, k: np_conv(t[None], k, None, attrs.get("strides"), attrs.get("pads"),  # noqa: E731
                                attrs.get("dilations"), attrs.get("group", 1))[0]
    out_hw = conv(x0, w).shape[1:]
    lin = lambda fn: affine_jacobian(lambda t: conv(t, fn(w.astype(np.float64))), x0)  # noqa: E731
    bvec = None if b is None else np.repeat(b.astype(np.float64), int(np.prod(out_hw)))
    return model, lin, bvec, shape


def conv_transpose_layer(rng, shape=(2, 3, 3), w_shape=(2, 2, 3, 3), **attrs):
    w = rng.normal(size=w_shape).astype(F32)
    b = rng.normal(size=w_shape[1] * attrs.get("group", 1)).astype(F32)
    model = make_model([helper.make_node("ConvTranspose", ["x", "W", "B"], ["z"], **attrs)],
                       [("x", [None, *shape])], ["z"], [init("W", w), init("B", b)])
    x0 = np.zeros(shape)
    convt = lambda t, k: np_conv_transpose(t[None], k, None, attrs.get("strides"), attrs.get("pads"),  # noqa: E731
                                           None, attrs.get("group", 1), attrs.get("output_padding"))[0]
    out_hw = convt(x0, w).shape[1:]
    lin = lambda fn: affine_jacobian(lambda t: convt(t, fn(w.astype(np.float64))), x0)  # noqa: E731
    return model, lin, np.repeat(b.astype(np.float64), int(np.prod(out_hw))), shape


def matmul_layer(rng, n_in=4, n_out=3):
    w, b = rng.normal(size=(n_in, n_out)).astype(F32), rng.normal(size=n_out).astype(F32)
    model = make_model([helper.make_node("MatMul", ["x", "W"], ["m"]), helper.make_node("Add", ["m", "B"], ["z"])],
                       [("x", [None, n_in])], ["z"], [init("W", w), init("B", b)])
    return model, (lambda fn: fn(w.astype(np.float64)).T), b.astype(np.float64), (n_in,)


def scale_layer(rng, shape=(3, 2)):
    """Mul by a per-row constant then Add of one: a ScaleLayer whose matrix is diagonal."""
    c, d = rng.normal(size=(shape[0], 1)).astype(F32), rng.normal(size=(shape[0], 1)).astype(F32)
    model = make_model([helper.make_node("Mul", ["x", "C"], ["m"]), helper.make_node("Add", ["m", "D"], ["z"])],
                       [("x", [None, *shape])], ["z"], [init("C", c), init("D", d)])
    full_c = np.broadcast_to(c.astype(np.float64), shape).reshape(-1)
    lin = lambda fn: np.diag(fn(full_c))  # noqa: E731
    return model, lin, np.broadcast_to(d.astype(np.float64), shape).reshape(-1).copy(), shape


LAYERS = {
    "gemm": lambda rng: gemm_layer(rng),
    "gemm_nobias": lambda rng: gemm_layer(rng, bias=False),
    "conv": lambda rng: conv_layer(rng, pads=[1, 0, 0, 1]),
    "conv_stride_groups": lambda rng: conv_layer(rng, shape=(2, 5, 5), w_shape=(4, 1, 2, 2), strides=[2, 2],
                                                 group=2, pads=[1, 1, 0, 0]),
    "conv_transpose": lambda rng: conv_transpose_layer(rng, strides=[2, 2], pads=[1, 0, 0, 1],
                                                       output_padding=[1, 0]),
    "matmul": lambda rng: matmul_layer(rng),
    "scale": lambda rng: scale_layer(rng),
}

RULES = {
    "ZeroRule": (ZeroRule(), lambda *a: ref_zero(*a)),
    "EpsilonRule": (EpsilonRule(0.3), lambda *a: ref_epsilon(*a, eps=0.3)),
    "EpsilonRule_default": (EpsilonRule(), lambda *a: ref_epsilon(*a, eps=1e-6)),
    "GammaRule": (GammaRule(0.5), lambda *a: ref_gamma(*a, gamma=0.5)),
    "GammaRule_default": (GammaRule(), lambda *a: ref_gamma(*a, gamma=0.25)),
    "WSquareRule": (WSquareRule(), ref_wsquare),
    "FlatRule": (FlatRule(), ref_flat),
    "ZPlusRule": (ZPlusRule(), ref_zplus),
    "AlphaBetaRule_2_1": (AlphaBetaRule(2.0, 1.0), lambda *a: ref_alphabeta(*a, alpha=2.0, beta=1.0)),
    "AlphaBetaRule_1_0": (AlphaBetaRule(1.0, 0.0), lambda *a: ref_alphabeta(*a, alpha=1.0, beta=0.0)),
    "AlphaBetaRule_3_2": (AlphaBetaRule(3.0, 2.0), lambda *a: ref_alphabeta(*a, alpha=3.0, beta=2.0)),
    "ZBoxRule_scalar": (ZBoxRule(-2.0, 2.5), lambda lin, b, a, R: ref_zbox(lin, b, a, R, -2.0 + 0 * a, 2.5 + 0 * a)),
    "GeneralizedGammaRule": (GeneralizedGammaRule(0.5), lambda *a: ref_generalized_gamma(*a, gamma=0.5)),
    "GeneralizedGammaRule_default": (GeneralizedGammaRule(), lambda *a: ref_generalized_gamma(*a, gamma=0.25)),
}


def _check_rule(model, lin, b, in_shape, rule, ref, x, sel, rtol=2e-4):
    e = explain(model, x, [rule], sel=sel)
    k_out = lin(lambda w: w).shape[0]
    for n, k in enumerate(sel):
        R = np.zeros(k_out)
        R[k] = 1.0
        expected = ref(lin, b, x[n].reshape(-1).astype(np.float64), R)
        scale = max(1.0, np.abs(expected).max())
        np.testing.assert_allclose(e.val[n].reshape(-1), expected, rtol=rtol, atol=1e-5 * scale,
                                   err_msg=f"{rule!r}, sample {n}, output {k}")
    return e


@pytest.mark.parametrize("layer", list(LAYERS))
@pytest.mark.parametrize("rule_name", list(RULES))
def test_rule_formula(rule_name, layer):
    rng = np.random.default_rng(zlib.crc32(f"{rule_name}/{layer}".encode()))  # stable across runs
    model, lin, b, in_shape = LAYERS[layer](rng)
    rule, ref = RULES[rule_name]
    x = rng.normal(size=(3,) + in_shape).astype(F32)
    k_out = lin(lambda w: w).shape[0]
    _check_rule(model, lin, b, in_shape, rule, ref, x, [0, k_out // 2, k_out - 1])


# -- hand-computed cases -------------------------------------------------------------------------------------------
def _tiny_gemm(W, b=None):
    W = np.asarray(W, F32)
    ins = ["x", "W"] + (["B"] if b is not None else [])
    inits = [init("W", W)] + ([init("B", np.asarray(b, F32))] if b is not None else [])
    return make_model([helper.make_node("Gemm", ins, ["z"], transB=1)], [("x", [None, W.shape[1]])], ["z"], inits)


def test_zero_rule_by_hand():
    """W = [[1, 2], [3, -1]], b = [0.5, 0], a = [1, 2]: z_0 = 5.5, R = [1/5.5, 4/5.5]."""
    model = _tiny_gemm([[1, 2], [3, -1]], [0.5, 0])
    r = explain(model, [[1, 2]], [ZeroRule()], sel=0).val[0]
    np.testing.assert_allclose(r, [1 / 5.5, 4 / 5.5], rtol=1e-6)
    r = explain(model, [[1, 2]], [ZeroRule()], sel=1).val[0]   # z_1 = 1: R = [3, -2]
    np.testing.assert_allclose(r, [3.0, -2.0], rtol=1e-6)


def test_epsilon_rule_by_hand():
    """z_1 = 1 with epsilon 1: denominator 2; z = -1 with epsilon 1: denominator -2."""
    model = _tiny_gemm([[1, 2], [3, -1]], [0.5, 0])
    r = explain(model, [[1, 2]], [EpsilonRule(1.0)], sel=1).val[0]
    np.testing.assert_allclose(r, [1.5, -1.0], rtol=1e-6)
    r = explain(model, [[-1, 2]], [EpsilonRule(1.0)], sel=1).val[0]  # z_1 = -3 - 2 = -5: denominator -6
    np.testing.assert_allclose(r, [-3 / -6, -2 / -6], rtol=1e-6)


def test_gamma_rule_by_hand():
    """gamma = 1: W' = [[2, -1]], b' = 2*1 = 2, a = [1, 1]: z = 3, R = [2/3, -1/3]."""
    model = _tiny_gemm([[1, -1]], [1.0])
    r = explain(model, [[1, 1]], [GammaRule(1.0)], sel=0).val[0]
    np.testing.assert_allclose(r, [2 / 3, -1 / 3], rtol=1e-6)


def test_wsquare_and_flat_by_hand():
    """W = [[1, -2, 0]]: WSquare R = [1, 4, 0]/5 for any input; Flat R = [1, 1, 1]/3 (bias ignored)."""
    model = _tiny_gemm([[1, -2, 0]], [7.0])
    for x in ([[1, 2, 3]], [[-5, 0, 0.5]]):
        np.testing.assert_allclose(explain(model, x, [WSquareRule()], sel=0).val[0], [0.2, 0.8, 0.0], rtol=1e-6)
        np.testing.assert_allclose(explain(model, x, [FlatRule()], sel=0).val[0], [1 / 3] * 3, rtol=1e-6)


def test_flat_rule_counts_connections_of_a_padded_conv():
    """Flat on a 3x3 conv with padding 1 over a 3x3 input: the corner output sees 4 inputs, so each of
    those gets 1/4."""
    rng = np.random.default_rng(0)
    model, lin, b, shape = conv_layer(rng, shape=(1, 3, 3), w_shape=(1, 1, 3, 3), pads=[1, 1, 1, 1])
    r = explain(model, np.ones((1,) + shape, F32), [FlatRule()], sel=0).val[0, 0]
    np.testing.assert_allclose(r, [[0.25, 0.25, 0], [0.25, 0.25, 0], [0, 0, 0]], atol=1e-7)


def test_zplus_bias_only_on_positive_part():
    """W = [[2, -1]], b = [-1], a = [1, -3]: z+ = W+ a+ + b+ + W- a- = 2 + 0 + 3 = 5 (b- is ignored);
    R = [2/5, 3/5]; with b = [+1]: z+ = 6."""
    r = explain(_tiny_gemm([[2, -1]], [-1.0]), [[1, -3]], [ZPlusRule()], sel=0).val[0]
    np.testing.assert_allclose(r, [2 / 5, 3 / 5], rtol=1e-6)
    r = explain(_tiny_gemm([[2, -1]], [1.0]), [[1, -3]], [ZPlusRule()], sel=0).val[0]
    np.testing.assert_allclose(r, [2 / 6, 3 / 6], rtol=1e-6)


def test_alphabeta_by_hand():
    """W = [[2, -1, 1]], b = [-0.5], a = [1, 2, -1]: positive part z+ = 2 (b- dropped); negative part
    z- = W- a+ + b- + W+ a- = -2 - 0.5 - 1 = -3.5.  alpha=2, beta=1:
    R = 2 * [2, 0, 0] / 2 - 1 * [0, -2, -1] / -3.5."""
    r = explain(_tiny_gemm([[2, -1, 1]], [-0.5]), [[1, 2, -1]], [AlphaBetaRule(2.0, 1.0)], sel=0).val[0]
    expected = 2 * np.array([2, 0, 0]) / 2 - np.array([0, -2, -1]) / -3.5
    np.testing.assert_allclose(r, expected, rtol=1e-6)


def test_alphabeta_1_0_equals_zplus():
    rng = np.random.default_rng(1)
    model, *_ = gemm_layer(rng)
    x = rng.normal(size=(2, 4)).astype(F32)
    r1 = explain(model, x, [AlphaBetaRule(1.0, 0.0)], sel=[0, 2]).val
    r2 = explain(model, x, [ZPlusRule()], sel=[0, 2]).val
    np.testing.assert_allclose(r1, r2, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("alpha,beta,match", [(1.0, 1.0, "must equal 1"), (2.0, 0.5, "must equal 1"),
                                              (-1.0, -2.0, ">= 0"), (0.5, -0.5, ">= 0")])
def test_alphabeta_validation(alpha, beta, match):
    with pytest.raises(ValueError, match=match):
        AlphaBetaRule(alpha, beta)


def test_zbox_by_hand():
    """W = [[1, -2]], b = [0.5], a = [1, 1], l = 0, h = 1: z = Wa + b - (W+ l + b+) - (W- h + b-)
    = -0.5 - 0.5 - (-2) = 1; R = a W - l W+ - h W- = [1, -2] - [0, -2] = [1, 0]."""
    r = explain(_tiny_gemm([[1, -2]], [0.5]), [[1, 1]], [ZBoxRule(0.0, 1.0)], sel=0).val[0]
    np.testing.assert_allclose(r, [1.0, 0.0], rtol=1e-6, atol=1e-7)


def test_zbox_uses_the_pre_activation():
    """A layer followed by ReLU with a negative pre-activation: ZBox still divides by z = Wa + b - ...
    (not by relu(z))."""
    W, b, x = np.array([[1.0, 1.0]]), np.array([-5.0]), np.array([[1.0, 1.0]], F32)
    model = make_model([helper.make_node("Gemm", ["x", "W", "B"], ["h"], transB=1),
                        helper.make_node("Relu", ["h"], ["z"])], [("x", [None, 2])], ["z"],
                       [init("W", W), init("B", b)])
    r = explain(model, x, [ZBoxRule(-1.0, 1.0), PassRule()], sel=0).val[0]
    # z = -3 - (-1 - 1 + 0) - (0 + (-5)) = 4; R = (a - l) W+ / z = [2, 2] / 4
    np.testing.assert_allclose(r, [0.5, 0.5], rtol=1e-6)


@pytest.mark.parametrize("kind", ["scalar", "per_channel", "per_element"])
def test_zbox_bounds_on_conv(kind):
    rng = np.random.default_rng(2)
    shape = (3, 4, 5)
    model, lin, b, _ = conv_layer(rng, shape=shape, w_shape=(2, 3, 3, 3), pads=[1, 1, 1, 1], strides=[2, 1])
    if kind == "scalar":
        low, high = -1.5, 2.0
        lo_full, hi_full = np.full(shape, low), np.full(shape, high)
    elif kind == "per_channel":
        low, high = np.array([-1.0, -2.0, 0.0]), np.array([1.0, 3.0, 0.5])
        lo_full, hi_full = np.broadcast_to(low[:, None, None], shape), np.broadcast_to(high[:, None, None], shape)
    else:
        low = rng.uniform(-3, -1, shape)
        high = rng.uniform(1, 3, shape)
        lo_full, hi_full = low, high
    x = rng.uniform(-1, 1, (2,) + shape).astype(F32)
    _check_rule(model, lin, b, shape, ZBoxRule(low, high),
                lambda lin_, b_, a, R: ref_zbox(lin_, b_, a, R, lo_full.reshape(-1), hi_full.reshape(-1)),
                x, [0, 17])


def test_zbox_per_element_bounds_on_gemm():
    rng = np.random.default_rng(3)
    model, lin, b, shape = gemm_layer(rng)
    low, high = rng.uniform(-3, -1, 4), rng.uniform(1, 3, 4)
    x = rng.normal(size=(2, 4)).astype(F32)
    _check_rule(model, lin, b, shape, ZBoxRule(low, high),
                lambda lin_, b_, a, R: ref_zbox(lin_, b_, a, R, low, high), x, [0, 2])


def test_zbox_bad_bounds_shape():
    rng = np.random.default_rng(4)
    model, *_ = conv_layer(rng, shape=(3, 4, 5), w_shape=(2, 3, 3, 3))
    with pytest.raises(ValueError, match="per channel: expected 3 values"):
        make_lrp(model, [ZBoxRule(np.zeros(7), np.ones(7))])
    with pytest.raises(ValueError, match="does not broadcast"):
        make_lrp(model, [ZBoxRule(np.zeros((2, 4, 5)), np.ones((2, 4, 5)))])


def test_zbox_one_dimensional_bounds_are_per_channel_even_when_channels_equal_width():
    """A (3, 4, 3) input: a 1-D bound of length 3 means one value per channel, not per column."""
    rng = np.random.default_rng(5)
    model, *_ = conv_layer(rng, shape=(3, 4, 3), w_shape=(2, 3, 3, 3))
    low, high = np.array([-1.0, -2.0, 0.0]), np.array([1.0, 3.0, 0.5])
    x = rng.standard_normal((1, 3, 4, 3)).astype(np.float32)
    per_channel = make_lrp(model, [ZBoxRule(low, high)]).analyze(x).val
    full = make_lrp(model, [ZBoxRule(np.broadcast_to(low[:, None, None], (3, 4, 3)),
                                     np.broadcast_to(high[:, None, None], (3, 4, 3)))]).analyze(x).val
    # Per channel, these bounds fold into the weights; as full arrays they cannot: same values, other rounding.
    np.testing.assert_allclose(per_channel, full, rtol=1e-5, atol=1e-6 * np.abs(full).max())


def test_generalized_gamma_by_hand():
    """gamma = 1, W = [[1, -1]], b = [0], a = [2, -1]: z = 3 > 0, so the positive case only:
    W' = W + W+ = [2, -1] on a+, W'' = W + W- = [1, -2] on a-: z1 = 4 + 2 = 6; R = [4, 2] / 6."""
    r = explain(_tiny_gemm([[1, -1]], [0.0]), [[2, -1]], [GeneralizedGammaRule(1.0)], sel=0).val[0]
    np.testing.assert_allclose(r, [4 / 6, 2 / 6], rtol=1e-6)
    # a = [-2, 1]: z = -3 < 0, negative case: W'' = [1, -2] on a+ (-2), W' = [2, -1] on a- (-4): z2 = -6
    r = explain(_tiny_gemm([[1, -1]], [0.0]), [[-2, 1]], [GeneralizedGammaRule(1.0)], sel=0).val[0]
    np.testing.assert_allclose(r, [-4 / -6, -2 / -6], rtol=1e-6)


# (float64: the reference's stabilizer is float32's 1e-9, the graph's 1.9e-18: they differ by 1e-9 / |z|)
@pytest.mark.parametrize("precision,rtol", [("float32", 2e-4), ("float64", 1e-8)])
@pytest.mark.parametrize("after_relu", [True, False])
def test_generalized_gamma_needs_one_modified_forward_pass(after_relu, precision, rtol):
    """The negative group's pre-activation is (2 + g) z - z+: one modified convolution (two on a+ and a-
    where the input has negative values), not two (four), and the formula's relevance, on inputs after a
    ReLU and on signed ones, in both precisions."""
    rng = np.random.default_rng(7 + after_relu)
    conv, lin, b, shape = conv_layer(rng, shape=(3, 5, 5), w_shape=(4, 3, 3, 3), pads=[1, 1, 1, 1])
    nodes = list(conv.graph.node)
    if after_relu:
        nodes = [helper.make_node("Relu", ["x"], ["a"])] + nodes
        nodes[1].input[0] = "a"
    model = make_model(nodes, [("x", [None, *shape])], ["z"], list(conv.graph.initializer))
    x = rng.normal(size=(3,) + shape).astype(F32)
    analyzer = make_lrp(model, [PassRule()] * after_relu + [GeneralizedGammaRule(0.5)], precision=precision)
    e = analyzer.analyze(x, [0, 40, 99])
    assert analyzer.layers[-1].extra["nonnegative_input"] is after_relu
    if precision == "float32":  # (in float64 the convolutions are lowered: onnxruntime has no double Conv)
        convs = [n for n in analyzer.relevance_model.graph.node if n.op_type == "Conv"]
        # the layer's own, one modified forward per input sign, and the two groups' transposes
        assert len(convs) == 1 + (1 if after_relu else 2) + 2
        # a+ and a- once for both groups' terms and forward passes, and the two stabilizers' steps
        clips = [n for n in analyzer.relevance_model.graph.node if n.op_type == "Clip"]
        assert len(clips) == (0 if after_relu else 2) + 2
    a = np.maximum(x, 0) if after_relu else x
    for n, k in enumerate([0, 40, 99]):
        R = np.eye(100)[k]
        expected = ref_generalized_gamma(lin, b, a[n].reshape(-1).astype(np.float64), R, gamma=0.5)
        np.testing.assert_allclose(e.val[n].reshape(-1), expected, rtol=rtol,
                                   atol=rtol * np.abs(expected).max(), err_msg=f"sample {n}, output {k}")


def test_epsilon_rule_on_parameter_free_layers():
    """Epsilon on an average pool (R_j = a_j / 4 / (z + eps sign z)) and on a merge (R_a = a / (a + b + eps))."""
    x = np.array([[[[1.0, 2.0], [3.0, -2.0]]]], F32)
    pool = make_model([helper.make_node("AveragePool", ["x"], ["p"], kernel_shape=[2, 2]),
                       helper.make_node("Flatten", ["p"], ["z"])], [("x", [None, 1, 2, 2])], ["z"])
    r = explain(pool, x, [EpsilonRule(0.5), PassRule()], sel=0).val[0, 0]
    np.testing.assert_allclose(r, x[0, 0] / 4 / (1.0 + 0.5), rtol=1e-6)
    merge = make_model([helper.make_node("Mul", ["x", "c"], ["a"]), helper.make_node("Add", ["a", "x"], ["z"])],
                       [("x", [None, 2])], ["z"], [init("c", [2.0, -3.0])])
    r = explain(merge, [[1.0, 1.0]], [ZeroRule(), EpsilonRule(1.0)], sel=1).val[0]
    # z_1 = -3 + 1 = -2, denominator -3: R_a = -3 / -3 = 1 (back through the Scale layer unchanged),
    # R_x (direct) = 1 / -3
    np.testing.assert_allclose(r, [0.0, 1.0 - 1.0 / 3.0], rtol=1e-6)
    with pytest.raises(RuleCompatibilityError, match="AveragePool"):
        make_lrp(pool, [GammaRule(), PassRule()])


def test_pass_rule_on_a_reshape():
    model = make_model([helper.make_node("Flatten", ["x"], ["z"])], [("x", [None, 2, 2])], ["z"])
    r = explain(model, [[[1, 2], [3, 4]]], [PassRule()], sel=2).val[0]
    np.testing.assert_allclose(r, [[0, 0], [1, 0]])


def test_layernorm_rule_by_hand():
    """x = [1, 2, 6]: centered c = [-2, -1, 3]; explaining output 2 (R = e_2 through the split-off Scale
    with PassRule): s = [0, 0, 1/3], R = x * (s - mean(s)) = [1, 2, 6] * ([0, 0, 1/3] - 1/9)."""
    node = helper.make_node("LayerNormalization", ["x", "g", "b"], ["z"], axis=-1)
    model = make_model([node], [("x", [None, 3])], ["z"], [init("g", [1.0, 2.0, 0.5]), init("b", [0.0, 1.0, 0.0])])
    r = explain(model, [[1, 2, 6]], [LayerNormRule(), PassRule()], sel=2).val[0]
    np.testing.assert_allclose(r, np.array([1, 2, 6]) * (np.array([0, 0, 1 / 3]) - 1 / 9), rtol=1e-5)


# -- the stabilizer ------------------------------------------------------------------------------------------------
def test_stabilizer_sign_of_zero_is_plus():
    """z = 0 exactly (W = [[1, -1]], a = [1, 1]): the denominator is +epsilon (sign(0) = +1)."""
    model = _tiny_gemm([[1, -1]])
    r = explain(model, [[1, 1]], [EpsilonRule(0.1)], sel=0).val[0]
    np.testing.assert_allclose(r, [10.0, -10.0], rtol=1e-5)
    r = explain(model, [[1, 1]], [ZeroRule()], sel=0).val[0]        # default stabilizer 1e-9
    np.testing.assert_allclose(r, [1e9, -1e9], rtol=1e-5)
    # the same zero reached through the bias
    r = explain(_tiny_gemm([[2.0]], [-2.0]), [[1]], [EpsilonRule(0.5)], sel=0).val[0]
    np.testing.assert_allclose(r, [4.0], rtol=1e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("epsilon", [1e-9, DEFAULT_STABILIZER, 1e-6, 0.25])
def test_emitted_stabilizer_is_the_formula_bit_for_bit(epsilon, dtype):
    """The emitted z + eps sign(z) (a Clip step for small eps, Less + Cast above 2^-23) equals
    (z + eps) - 2 eps [z < 0] in numpy bit for bit, at zeros of both signs, subnormals, +-eps and infinities."""
    import onnx_graphsurgeon as gs
    from onnxlrp._onnx_utils import export_model
    from onnxlrp.rewriter import Builder
    info = np.finfo(dtype)
    eps = epsilon.for_dtype(dtype) if hasattr(epsilon, "for_dtype") else float(epsilon)
    edges = [0.0, -0.0, info.smallest_subnormal, info.smallest_normal, eps, 2 * eps, 0.5, 1.0, 3.0, info.max,
             np.inf, eps / 3, 1e-30]
    z = np.array(edges + [-v for v in edges] + list(np.random.default_rng(0).normal(size=50) * 1e-8),
                 dtype=dtype)[None]
    graph = gs.Graph(inputs=[gs.Variable("z", dtype=dtype, shape=list(z.shape))])
    out = stabilize(Sym(Builder(graph, dtype), graph.inputs[0], z.shape[1:]), epsilon).var
    out.dtype, out.shape = dtype, list(z.shape)
    graph.outputs = [out]
    model = export_model(graph, 17)
    got = ort_run(model, {"z": z})[0]
    e = dtype(eps)
    want = (z + e) - dtype(2) * e * (z < 0)
    differ = got.view(np.uint8).reshape(got.size, -1) != want.view(np.uint8).reshape(want.size, -1)
    assert got.dtype == dtype and not differ.any(), (z.ravel()[differ.any(1)], got.ravel()[differ.any(1)])
    uses_clip = any(n.op_type == "Clip" for n in model.graph.node)
    assert uses_clip == (eps <= float(info.smallest_subnormal) * 2.0 ** (info.maxexp - 2))


def test_stabilize_helper_on_numpy():
    z = np.array([-1.0, 0.0, 2.0])
    np.testing.assert_allclose(stabilize(z, 0.5), [-1.5, 0.5, 2.5])


# -- custom rules ------------------------------------------------------------------------------------------------
class ShiftedInputRule(Rule):
    """A user rule built from the hooks: a' = a / 2 + 1, W' = 2 W + 0.1, bias dropped, epsilon 0.25,
    only on Gemm layers."""

    def modify_input(self, x):
        return x * 0.5 + 1.0

    def modify_denominator(self, z):
        return stabilize(z, 0.25)

    def modify_weight(self, weight):
        return 2.0 * weight + 0.1

    def modify_bias(self, bias):
        return np.zeros_like(bias)

    def is_compatible(self, layer):
        return layer.op_type == "Gemm"


@dataclass(eq=False, repr=False)
class SquaredParamsRule(Rule):
    """modify_parameters acts on weight and bias alike; the inputs keep their positive part."""
    power: float = 2.0

    def modify_parameters(self, param):
        return np.sign(param) * np.abs(param) ** self.power

    def modify_input(self, x):
        return keep_positive(x)


class AbsLayerRule(Rule):
    """modify_layer overrides the whole parameter transform (modify_weight/bias are not called)."""

    def modify_layer(self, layer):
        p = layer.params
        return Params(np.abs(p.weight), None if p.bias is None else -np.abs(p.bias))

    def modify_weight(self, weight):
        raise AssertionError("modify_layer replaces modify_weight")


def _generic_ref(a_mod, W, b, R, eps):
    z = W @ a_mod + (0 if b is None else b)
    return a_mod * (W.T @ (R / stab(z, eps)))


def test_custom_rule_hooks_on_gemm():
    rng = np.random.default_rng(5)
    model, lin, b, _ = gemm_layer(rng)
    W = lin(lambda w: w)
    x = rng.normal(size=(2, 4)).astype(F32)
    e = explain(model, x, [ShiftedInputRule()], sel=[0, 2])
    for n, k in enumerate([0, 2]):
        R = np.eye(3)[k]
        expected = _generic_ref(x[n] * 0.5 + 1.0, 2.0 * W + 0.1, 0.0 * b, R, 0.25)
        np.testing.assert_allclose(e.val[n], expected, rtol=1e-5, atol=1e-6)


def test_custom_rule_modify_parameters_on_conv():
    rng = np.random.default_rng(6)
    model, lin, b, shape = conv_layer(rng, shape=(1, 3, 3), w_shape=(2, 1, 2, 2))
    x = rng.normal(size=(1,) + shape).astype(F32)
    e = explain(model, x, [SquaredParamsRule(3.0)], sel=[5])
    f = lambda p: np.sign(p) * np.abs(p) ** 3.0  # noqa: E731
    R = np.eye(8)[5]
    expected = _generic_ref(pos(x[0].reshape(-1)), lin(f), f(b), R, 1e-9)
    np.testing.assert_allclose(e.val[0].reshape(-1), expected, rtol=1e-4, atol=1e-6)


def test_custom_rule_modify_layer():
    rng = np.random.default_rng(7)
    model, lin, b, _ = gemm_layer(rng)
    x = rng.normal(size=(1, 4)).astype(F32)
    e = explain(model, x, [AbsLayerRule()], sel=1)
    expected = _generic_ref(x[0].astype(np.float64), np.abs(lin(lambda w: w)), -np.abs(b), np.eye(3)[1], 1e-9)
    np.testing.assert_allclose(e.val[0], expected, rtol=1e-5, atol=1e-6)


def test_custom_rule_hooks_work_on_numpy_too():
    rule = ShiftedInputRule()
    np.testing.assert_allclose(rule.modify_input(np.array([2.0, -2.0])), [2.0, 0.0])
    np.testing.assert_allclose(rule.modify_denominator(np.array([0.0, -1.0])), [0.25, -1.25])


def _mlp(rng, sizes=(4, 5, 3), bias=True, name_prefix=""):
    nodes, inits, prev = [], [], "x"
    Ws, bs = [], []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        W = rng.normal(size=(n_out, n_in)).astype(F32)
        b = rng.normal(size=n_out).astype(F32) if bias else np.zeros(n_out, F32)
        out = "z" if i == len(sizes) - 2 else f"h{i}"
        nodes.append(helper.make_node("Gemm", [prev, f"W{i}", f"B{i}"], [out], transB=1, name=f"{name_prefix}dense{i}"))
        inits += [init(f"W{i}", W), init(f"B{i}", b)]
        if out != "z":
            nodes.append(helper.make_node("Relu", [out], [f"a{i}"], name=f"{name_prefix}relu{i}"))
            prev = f"a{i}"
        Ws.append(W.astype(np.float64)), bs.append(b.astype(np.float64))
    return make_model(nodes, [("x", [None, sizes[0]])], ["z"], inits), Ws, bs


def test_incompatible_custom_rule_names_layer_and_rule():
    rng = np.random.default_rng(8)
    model, *_ = _mlp(rng)
    # ShiftedInputRule only fits Gemm: on the Relu (layer 1, 'relu0') it must be refused
    with pytest.raises(RuleCompatibilityError) as info:
        make_lrp(model, [ZeroRule(), ShiftedInputRule(), ZeroRule()])
    msg = str(info.value)
    assert "ShiftedInputRule" in msg and "relu0" in msg and "1" in msg
    with pytest.raises(RuleCompatibilityError, match="relu0"):
        make_lrp(model, Composite(LayerMap(1, ShiftedInputRule())))
    with pytest.raises(RuleCompatibilityError, match=r"SquaredParamsRule\(power=2.0\).*relu0"):
        make_lrp(model, Composite(LayerMap("relu0", SquaredParamsRule())))
    # a rule with parameter hooks on a layer without parameters
    with pytest.raises(RuleCompatibilityError, match="GammaRule.*relu0.*no parameters"):
        make_lrp(model, [ZeroRule(), GammaRule(), ZeroRule()])
    with pytest.raises(RuleCompatibilityError, match="ZeroRule"):
        make_lrp(model, [ZeroRule(), ZeroRule(), ZeroRule()])
    # GlobalMap skips the layers a rule does not fit
    lrp = make_lrp(model, Composite(GlobalMap(ShiftedInputRule())))
    assert [type(r).__name__ for r in lrp.rules] == ["ShiftedInputRule", "PassRule", "ShiftedInputRule"]


def test_wrong_number_of_rules():
    rng = np.random.default_rng(9)
    model, *_ = _mlp(rng)
    with pytest.raises(onnxlrp.LRPError, match="3 layers"):
        make_lrp(model, [ZeroRule()])


# -- identities -------------------------------------------------------------------------------------------------
def _mlp_grad(Ws, bs, x, k):
    """Gradient of output k of the ReLU MLP at x, by hand."""
    acts, masks = x, []
    for W, b in zip(Ws[:-1], bs[:-1]):
        h = W @ acts + b
        masks.append((h > 0).astype(float))
        acts = np.maximum(h, 0)
    g = Ws[-1][k]
    for W, m in zip(reversed(Ws[:-1]), reversed(masks)):
        g = W.T @ (m * g)
    y = Ws[-1] @ acts + bs[-1]
    return g, y


@pytest.mark.parametrize("bias", [True, False])
def test_lrp0_equals_gradient_times_input_mlp(bias):
    rng = np.random.default_rng(10)
    model, Ws, bs = _mlp(rng, (5, 6, 4, 3), bias=bias)
    x = rng.normal(size=(4, 5)).astype(F32)
    sel = [0, 1, 2, 1]
    r = explain(model, x, sel=sel, normalize_output_relevance=False).val
    rn = explain(model, x, sel=sel).val
    for n, k in enumerate(sel):
        g, y = _mlp_grad(Ws, bs, x[n].astype(np.float64), k)
        np.testing.assert_allclose(r[n], x[n] * g, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(rn[n], x[n] * g / y[k], rtol=1e-4, atol=1e-5)


def _conv_net(rng, bias=True):
    """Conv -> Relu -> MaxPool(3x3, s2, p1) -> Conv -> Relu -> GlobalAveragePool -> Flatten -> Gemm."""
    w1, w2 = rng.normal(size=(3, 2, 3, 3)).astype(F32), rng.normal(size=(4, 3, 2, 2)).astype(F32)
    v = rng.normal(size=(3, 4)).astype(F32)
    b1, b2, bv = (rng.normal(size=n).astype(F32) * bias for n in (3, 4, 3))
    n = helper.make_node
    nodes = [n("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]), n("Relu", ["c1"], ["r1"]),
             n("MaxPool", ["r1"], ["p1"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
             n("Conv", ["p1", "w2", "b2"], ["c2"]), n("Relu", ["c2"], ["r2"]),
             n("GlobalAveragePool", ["r2"], ["g"]), n("Flatten", ["g"], ["f"]),
             n("Gemm", ["f", "v", "bv"], ["z"], transB=1)]
    inits = [init(k, a) for k, a in (("w1", w1), ("b1", b1), ("w2", w2), ("b2", b2), ("v", v), ("bv", bv))]
    model = make_model(nodes, [("x", [None, 2, 6, 6])], ["z"], inits)

    def grad(x, k):
        """Gradient of output k by the chain rule over each layer's (local) Jacobian."""
        c1 = np_conv(x[None], w1, b1, pads=[1, 1, 1, 1])[0]
        j1 = affine_jacobian(lambda t: np_conv(t[None], w1, pads=[1, 1, 1, 1])[0], x)
        r1 = np.maximum(c1, 0)
        p1, arg = np_maxpool(r1[None], [3, 3], [3, 3], [2, 2], [1, 1, 1, 1])
        jp = maxpool_jacobian(arg[0], r1.shape)
        c2 = np_conv(p1, w2, b2)[0]
        j2 = affine_jacobian(lambda t: np_conv(t[None], w2)[0], p1[0])
        jg = np.kron(np.eye(4), np.full((1, c2[0].size), 1.0 / c2[0].size))
        g = v[k].astype(np.float64) @ jg @ np.diag((c2 > 0).ravel() * 1.0) @ j2 @ jp \
            @ np.diag((c1 > 0).ravel() * 1.0) @ j1
        return g.reshape(x.shape)

    return model, grad


def test_lrp0_equals_gradient_times_input_conv_net():
    rng = np.random.default_rng(11)
    model, grad = _conv_net(rng)
    x = rng.normal(size=(2, 2, 6, 6)).astype(F32)
    e = explain(model, x, sel=[0, 2], normalize_output_relevance=False)
    for n, k in enumerate([0, 2]):
        np.testing.assert_allclose(e.val[n], x[n] * grad(x[n].astype(np.float64), k), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("rule", [ZeroRule(), ZPlusRule()], ids=["ZeroRule", "ZPlusRule"])
def test_conservation_without_bias(rule):
    """With zero biases the input relevance sums to the selected output (seeded with its value) and to
    1 (seeded with 1). (ZPlus conserves where its denominators W+ a+ + W- a- are nonzero: each sample's
    top output of positive inputs.)"""
    rng = np.random.default_rng(12)
    model, *_ = _mlp(rng, (5, 6, 4, 3), bias=False)
    x = rng.uniform(0, 1, size=(3, 5)).astype(F32)
    for m in (model, _conv_net(rng, bias=False)[0]):
        xx = x if m is model else rng.uniform(0, 1, size=(3, 2, 6, 6)).astype(F32)
        comp = Composite(GlobalMap(rule))
        e = explain(m, xx, comp, normalize_output_relevance=False)
        y = e.output[np.arange(3), e.output_selection]
        assert np.all(y > 0)
        np.testing.assert_allclose(e.val.reshape(3, -1).sum(axis=1), y, rtol=1e-4, atol=1e-5)
        e = explain(m, xx, comp)
        np.testing.assert_allclose(e.val.reshape(3, -1).sum(axis=1), 1.0, rtol=1e-4)


def test_batch_equals_samples_one_by_one():
    rng = np.random.default_rng(13)
    model, _ = _conv_net(rng)
    x = rng.normal(size=(4, 2, 6, 6)).astype(F32)
    comp = onnxlrp.EpsilonPlus()
    lrp = make_lrp(model, comp)
    batch = lrp.analyze(x)
    for n in range(4):
        one = lrp.analyze(x[n:n + 1])
        np.testing.assert_allclose(batch.val[n], one.val[0], rtol=1e-5, atol=1e-7)
        assert batch.output_selection[n] == one.output_selection[0]


# -- output selection and seeding ---------------------------------------------------------------------------------
def test_output_selection_semantics():
    rng = np.random.default_rng(14)
    model, Ws, bs = _mlp(rng, (4, 5, 3))
    x = rng.normal(size=(3, 4)).astype(F32)
    lrp = make_lrp(model)
    y = forward(model, x)
    e = lrp.analyze(x)  # None: each sample's top output
    np.testing.assert_array_equal(e.output_selection, y.argmax(axis=1))
    np.testing.assert_allclose(e.output, y, rtol=1e-6)
    e_int = lrp.analyze(x, 2)
    np.testing.assert_array_equal(e_int.output_selection, [2, 2, 2])
    e_seq = lrp.analyze(x, [2, 0, 1])
    np.testing.assert_array_equal(e_seq.output_selection, [2, 0, 1])
    e_np = lrp.analyze(x, np.array([2, 0, 1], np.int32))
    np.testing.assert_allclose(e_np.val, e_seq.val)
    for n, k in enumerate([2, 0, 1]):
        np.testing.assert_allclose(e_seq.val[n], lrp.analyze(x[n:n + 1], k).val[0], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(e_int.val[n], lrp.analyze(x[n:n + 1], 2).val[0], rtol=1e-5, atol=1e-7)
    top = lrp.analyze(x, list(y.argmax(axis=1)))
    np.testing.assert_allclose(top.val, e.val)


@pytest.mark.parametrize("sel,match", [(3, "out of range"), (-2, "out of range"), ([0, 5, 1], "out of range"),
                                       ([0, 1], "2 entries for a batch of 3"), (1.5, "integers")])
def test_output_selection_errors(sel, match):
    rng = np.random.default_rng(15)
    model, *_ = _mlp(rng, (4, 5, 3))
    lrp = make_lrp(model)
    with pytest.raises(onnxlrp.InputError, match=match):
        lrp.analyze(rng.normal(size=(3, 4)).astype(F32), sel)


def test_unnormalized_seed_is_the_output_value():
    rng = np.random.default_rng(16)
    model, *_ = _mlp(rng, (4, 5, 3))
    x = rng.normal(size=(3, 4)).astype(F32)
    sel = [0, 1, 2]
    for rule in (ZeroRule(), EpsilonRule(0.01), ZPlusRule()):
        comp = Composite(GlobalMap(rule))
        e1 = explain(model, x, comp, sel=sel)
        e2 = explain(model, x, comp, sel=sel, normalize_output_relevance=False)
        y = e2.output[np.arange(3), sel]
        np.testing.assert_allclose(e2.val, e1.val * y[:, None], rtol=1e-5, atol=1e-6)


# -- every emitted graph is valid ONNX ---------------------------------------------------------------------------
ALL_RULE_INSTANCES = [ZeroRule(), EpsilonRule(), GammaRule(), WSquareRule(), FlatRule(), ZPlusRule(),
                      AlphaBetaRule(), ZBoxRule(-3.0, 3.0), GeneralizedGammaRule(), ShiftedInputRule()]


@pytest.mark.parametrize("rule", ALL_RULE_INSTANCES, ids=lambda r: type(r).__name__)
def test_emitted_graph_passes_full_check(rule):
    rng = np.random.default_rng(17)
    model, _ = _conv_net(rng)
    comp = Composite(GlobalMap(rule)) if not isinstance(rule, ShiftedInputRule) else Composite(LayerMap(7, rule))
    lrp = make_lrp(model, comp)
    onnx.checker.check_model(lrp.relevance_model, full_check=True)
    e = lrp.analyze(rng.normal(size=(2, 2, 6, 6)).astype(F32))
    assert np.all(np.isfinite(e.val))


def test_layer_indices_listing():
    rng = np.random.default_rng(18)
    model, *_ = _mlp(rng)
    out = io.StringIO()
    layers = onnxlrp.show_layer_indices(model, file=out)
    text = out.getvalue()
    assert [l.op_type for l in layers] == ["Gemm", "Relu", "Gemm"]
    assert "dense0" in text and "relu0" in text and "ZeroRule()" in text and "PassRule()" in text


@pytest.mark.parametrize("bounds", ["scalar", "per_channel", "per_element"])
def test_zbox_folds_constant_bounds_into_one_transpose(bounds):
    """Scalar and per-channel bounds fold into the weight (l W+ + h W-): the backward is one convolution
    over two stacked terms (2 x 3 output channels) instead of three; per-element bounds keep three."""
    rng = np.random.default_rng(6)
    model, lin, b, shape = conv_layer(rng, shape=(3, 5, 5), w_shape=(4, 3, 3, 3), pads=[1, 1, 1, 1])
    low, high = {"scalar": (-1.0, 2.0), "per_channel": (np.array([-1.0, -2.0, 0.0]), np.array([1.0, 3.0, 0.5])),
                 "per_element": (rng.uniform(-3, -1, shape), rng.uniform(1, 3, shape))}[bounds]
    x = rng.uniform(-1, 1, (2,) + shape).astype(F32)
    lo_full, hi_full = (np.broadcast_to(np.reshape(v, (-1, 1, 1)) if np.ndim(v) == 1 else v, shape) for v in (low, high))
    _check_rule(model, lin, b, shape, ZBoxRule(low, high),
                lambda lin_, b_, a, R: ref_zbox(lin_, b_, a, R, lo_full.reshape(-1), hi_full.reshape(-1)), x, [0, 40])
    analyzer = make_lrp(model, [ZBoxRule(low, high)])
    analyzer.analyze(x)
    g = analyzer.relevance_model.graph
    inits = {t.name: t for t in g.initializer}
    transposes = [n for n in g.node if n.name.startswith("lrp/") and n.op_type in ("Conv", "ConvTranspose")
                  and inits.get(n.input[1]) is not None and inits[n.input[1]].dims[1 if n.op_type == "Conv" else 0] == 4]
    assert len(transposes) == 1
    stacked = inits[transposes[0].input[1]].dims[0 if transposes[0].op_type == "Conv" else 1]
    assert stacked == (9 if bounds == "per_element" else 6), stacked


def test_exploding_relevance_is_reported_once_naming_the_layer():
    """The plain Gamma rule's denominator z + gamma (W+ a + b+) is 0 here: LRP says so, naming the layer,
    once per analyzer, instead of returning 1e9 silently. The generalized rule does not explode."""
    import warnings as _w
    nodes = [helper.make_node("Gemm", ["x", "W1"], ["h"], transB=1, name="first"),
             helper.make_node("Gemm", ["h", "W2"], ["y"], transB=1, name="crossing")]
    model = make_model(nodes, [("x", [None, 2])], [("y", [None, 1])],
                       [init("W1", np.eye(2)), init("W2", np.array([[1.0, -1.25]]))])
    x = np.array([[1.0, 1.0]], F32)  # z = -0.25, z + 0.25 W+ a = 0
    analyzer = make_lrp(model, [onnxlrp.ZeroRule(), onnxlrp.GammaRule(0.25)])
    with pytest.warns(onnxlrp.LRPWarning, match=r"layer 1 'crossing' \(Gemm\) under GammaRule"):
        e = analyzer.analyze(x, 0)
    assert np.abs(e.val).sum() > 1e3
    with _w.catch_warnings():
        _w.simplefilter("error")
        analyzer.analyze(x, 0)  # said once
        stable = make_lrp(model, [onnxlrp.ZeroRule(), onnxlrp.GeneralizedGammaRule(0.25)]).analyze(x, 0)
    assert np.abs(stable.val).sum() < 10



@pytest.mark.parametrize("make, message", [
    (lambda: onnxlrp.EpsilonRule(-1), "EpsilonRule: epsilon must be a finite number >= 0, got -1"),
    (lambda: onnxlrp.EpsilonRule(float("nan")), "epsilon must be a finite number >= 0, got nan"),
    (lambda: onnxlrp.GammaRule(-5), "GammaRule: gamma must be a finite number >= 0, got -5"),
    (lambda: onnxlrp.GeneralizedGammaRule(float("inf")), "gamma must be a finite number >= 0"),
    (lambda: onnxlrp.AlphaBetaRule(float("nan"), 1.0), "alpha must be a finite number >= 0"),
    (lambda: onnxlrp.EpsilonGammaBox(3, -3), "ZBoxRule: low must be below high"),
    (lambda: onnxlrp.ZBoxRule(float("nan"), 3), "low and high must be finite"),
    (lambda: onnxlrp.ZBoxRule(np.zeros(3), np.ones(2)), "same shape"),
    (lambda: onnxlrp.EpsilonPlus(epsilon=-1e-6), "epsilon must be a finite number >= 0"),
])
def test_rule_parameters_are_checked_when_made(make, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        make()


def test_cli_names_a_bad_rule_parameter_in_one_line(tmp_path):
    from tests.test_cli import EXAMPLE, invoke
    from tests.helpers_fixtures import fixture_path
    r = invoke("explain", fixture_path("vgg"), EXAMPLE, "--composite", "EpsilonGammaBox", "--low", "nan",
               "--high", "3", "--out", tmp_path / "o")
    assert r.exit_code == 2 and "low and high must be finite" in r.stderr
    assert "RuntimeWarning" not in r.stderr and not (tmp_path / "o").exists()
