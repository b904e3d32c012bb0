"""Normalization emitters: an unfused BatchNormalization (a per-channel affine NormalizationLayer) and
LayerNormalization (LRP-LN on the normalization, the split-off scale/bias a ScaleLayer), vs numpy."""
from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

import onnxlrp

from .helpers import (F32, affine_jacobian, check_adjoint, check_grad_times_input, explain, forward, init,
                      make_lrp, make_model, np_conv, stab)


def _bn_params(rng, c):
    return (rng.uniform(0.5, 2.0, c).astype(F32), rng.normal(size=c).astype(F32), rng.normal(size=c).astype(F32),
            rng.uniform(0.5, 2.0, c).astype(F32))


def _bn_np(t, gamma, beta, mean, var, eps):
    shape = (-1,) + (1,) * (t.ndim - 2)
    scale = gamma.astype(np.float64) / np.sqrt(var.astype(np.float64) + eps)
    return (t - mean.reshape(shape)) * scale.reshape(shape) + beta.reshape(shape)


@pytest.mark.parametrize("eps", [1e-5, 0.3])
def test_batchnorm_after_concat(eps):
    """Conv_a, Conv_b -> Concat -> BatchNorm: the BN cannot be fused and stays a NormalizationLayer whose
    backward is the per-channel scale (epsilon included)."""
    rng = np.random.default_rng(0)
    wa, wb = rng.normal(size=(2, 2, 2, 2)).astype(F32), rng.normal(size=(1, 2, 2, 2)).astype(F32)
    bn = _bn_params(rng, 3)
    nodes = [helper.make_node("Conv", ["x", "Wa"], ["a"]), helper.make_node("Conv", ["x", "Wb"], ["b"]),
             helper.make_node("Concat", ["a", "b"], ["c"], axis=1),
             helper.make_node("BatchNormalization", ["c", "g", "be", "m", "v"], ["z"], epsilon=eps)]
    inits = [init("Wa", wa), init("Wb", wb)] + [init(n, p) for n, p in zip(("g", "be", "m", "v"), bn)]
    model = make_model(nodes, [("x", [None, 2, 3, 3])], ["z"], inits)
    lrp = make_lrp(model)
    assert [(l.op_type, l.group) for l in lrp.layers] == [
        ("Conv", "ConvLayer"), ("Conv", "ConvLayer"), ("Concat", "ReshapingLayer"),
        ("BatchNormalization", "NormalizationLayer")]

    def f(t):
        return _bn_np(np.concatenate([np_conv(t, wa), np_conv(t, wb)], axis=1), *bn, eps)

    x = rng.normal(size=(2, 3, 3)).astype(F32)
    np.testing.assert_allclose(forward(model, x[None]), f(x[None]), rtol=1e-4, atol=1e-5)
    check_grad_times_input(model, x, affine_jacobian(lambda t: f(t[None])[0], x))
    check_adjoint(nodes, inits, rng.normal(size=(2, 2, 3, 3)).astype(F32), "z", f, rng)


def test_batchnorm_zero_rule_formula():
    """ZeroRule on a lone BN (first layer): R = x * s / (x * s + t) R_out, s = g / sqrt(v + eps)."""
    rng = np.random.default_rng(1)
    bn = _bn_params(rng, 2)
    node = helper.make_node("BatchNormalization", ["x", "g", "be", "m", "v"], ["z"], epsilon=0.01)
    model = make_model([node], [("x", [None, 2, 2])], ["z"], [init(n, p) for n, p in zip(("g", "be", "m", "v"), bn)])
    x = rng.normal(size=(1, 2, 2)).astype(F32)
    z = _bn_np(x.astype(np.float64), *bn, 0.01)
    scale = bn[0] / np.sqrt(bn[3].astype(np.float64) + 0.01)
    r = explain(model, x, sel=3).val
    expected = np.zeros((2, 2))
    expected[1, 1] = x[0, 1, 1] * scale[1] / stab(z[0, 1, 1])
    np.testing.assert_allclose(r[0], expected, rtol=1e-5, atol=1e-7)
    # PassRule (the composites' choice for NormalizationLayer) hands the relevance on unchanged
    r = explain(model, x, [onnxlrp.PassRule()], sel=3).val
    np.testing.assert_allclose(r[0], np.eye(1, 4, 3).reshape(2, 2), atol=1e-7)


# -- LayerNormalization ------------------------------------------------------------------------------------------
def _ln_model(shape, axis, eps, rng, affine=True):
    d_shape = tuple(shape)[axis % (len(shape) + 1) - 1:]  # axis counts the batch axis
    gamma = rng.uniform(0.5, 1.5, d_shape).astype(F32) if affine else np.ones(d_shape, F32)
    beta = rng.normal(size=d_shape).astype(F32) if affine else None
    ins = ["x", "gamma"] + (["beta"] if beta is not None else [])
    node = helper.make_node("LayerNormalization", ins, ["z"], axis=axis, epsilon=eps)
    inits = [init("gamma", gamma)] + ([init("beta", beta)] if beta is not None else [])
    model = make_model([node], [("x", [None, *shape])], ["z"], inits, opset=17)
    return model, gamma.astype(np.float64), None if beta is None else beta.astype(np.float64)


def _ln_np(x, axes, eps):
    mu = x.mean(axis=axes, keepdims=True)
    var = ((x - mu) ** 2).mean(axis=axes, keepdims=True)
    return (x - mu) / np.sqrt(var + eps), mu


@pytest.mark.parametrize("shape,axis", [((3, 4), -1), ((2, 3, 2), 1), ((2, 3, 2), -2), ((5,), -1)])
def test_layernorm_rule(shape, axis):
    """LayerNormRule on the normalization (R_i = a_i (s_i - mean_j s_j), s = R / (a - mean a)) and the
    ZeroRule on the split-off Scale layer (y = n * gamma + beta)."""
    rng = np.random.default_rng(2)
    model, gamma, beta = _ln_model(shape, axis, 1e-5, rng)
    lrp = make_lrp(model, [onnxlrp.LayerNormRule(), onnxlrp.ZeroRule()])
    assert [(l.op_type, l.group) for l in lrp.layers] == [("LayerNormalization", "NormalizationLayer"),
                                                          ("Mul", "ScaleLayer")]
    x = rng.normal(size=(2,) + shape).astype(F32)
    sel = [1, int(np.prod(shape)) - 1]
    e = lrp.analyze(x, sel)
    axes = tuple(range(axis % (len(shape) + 1), 1 + len(shape)))
    xd = x.astype(np.float64)
    n, mu = _ln_np(xd, axes, 1e-5)
    y = n * gamma + beta
    np.testing.assert_allclose(e.output, y, rtol=1e-4, atol=1e-5)
    for i, k in enumerate(sel):
        r_y = np.zeros(shape)
        r_y.flat[k] = 1.0
        r_n = n[i] * gamma * r_y / stab(y[i])                       # ZeroRule on the Scale layer
        c = xd[i] - mu[i]
        s = r_n / stab(c)
        expected = xd[i] * (s - s.mean(axis=tuple(a - 1 for a in axes), keepdims=True))  # LRP-LN
        np.testing.assert_allclose(e.val[i], expected, rtol=1e-4, atol=1e-6)


def test_layernorm_rule_conserves_per_group():
    """LRP-LN is conservative: the relevance summed over each normalized group equals the relevance
    that arrived at that group (here with PassRule on the scale)."""
    rng = np.random.default_rng(3)
    model, _, _ = _ln_model((3, 4), -1, 1e-5, rng)
    x = rng.normal(size=(1, 3, 4)).astype(F32)
    r = explain(model, x, [onnxlrp.LayerNormRule(), onnxlrp.PassRule()], sel=6).val
    np.testing.assert_allclose(r[0].sum(axis=-1), [0.0, 1.0, 0.0], atol=1e-5)


def test_layernorm_without_affine_is_one_layer():
    rng = np.random.default_rng(4)
    model, _, _ = _ln_model((4,), -1, 1e-5, rng, affine=False)
    lrp = make_lrp(model, [onnxlrp.LayerNormRule()])
    assert [l.op_type for l in lrp.layers] == ["LayerNormalization"]
    x = rng.normal(size=(1, 4)).astype(F32)
    r = lrp.analyze(x, 2).val[0].astype(np.float64)
    c = x[0] - x[0].mean()
    s = np.eye(4)[2] / stab(c.astype(np.float64))
    np.testing.assert_allclose(r, x[0] * (s - s.mean()), rtol=1e-4, atol=1e-6)


def test_layernorm_rule_only_fits_layernorm():
    rng = np.random.default_rng(5)
    model, _, _ = _ln_model((4,), -1, 1e-5, rng)
    with pytest.raises(onnxlrp.RuleCompatibilityError, match="LayerNormRule"):
        make_lrp(model, [onnxlrp.LayerNormRule(), onnxlrp.LayerNormRule()])
    with pytest.raises(onnxlrp.RuleCompatibilityError, match="ZeroRule"):
        make_lrp(model, [onnxlrp.ZeroRule(), onnxlrp.ZeroRule()])


def test_decomposed_layernorm_gets_the_layernorm_rule():
    """Pre-opset-17 exports spell LayerNorm out; canonization rebuilds one LayerNormalization."""
    rng = np.random.default_rng(6)
    gamma, beta = rng.uniform(0.5, 1.5, 4).astype(F32), rng.normal(size=4).astype(F32)
    n = helper.make_node
    nodes = [n("ReduceMean", ["x"], ["mu"], axes=[-1]), n("Sub", ["x", "mu"], ["c"]),
             n("Pow", ["c", "two"], ["sq"]), n("ReduceMean", ["sq"], ["var"], axes=[-1]),
             n("Add", ["var", "eps"], ["ve"]), n("Sqrt", ["ve"], ["sd"]), n("Div", ["c", "sd"], ["nrm"]),
             n("Mul", ["nrm", "gamma"], ["sc"]), n("Add", ["sc", "beta"], ["z"])]
    inits = [init("two", 2.0), init("eps", 1e-5), init("gamma", gamma), init("beta", beta)]
    model = make_model(nodes, [("x", [None, 3, 4])], ["z"], inits, opset=13)
    lrp = make_lrp(model, onnxlrp.Composite(onnxlrp.GlobalTypeMap({"LayerNormalization": onnxlrp.LayerNormRule()})))
    assert [l.op_type for l in lrp.layers] == ["LayerNormalization", "Mul"]
    x = rng.normal(size=(1, 3, 4)).astype(F32)
    e = lrp.analyze(x, 5)
    xd = x.astype(np.float64)
    nrm, mu = _ln_np(xd, (2,), 1e-5)
    y = nrm * gamma + beta
    np.testing.assert_allclose(e.output, y, rtol=1e-4, atol=1e-5)
    r_y = np.zeros((3, 4))
    r_y.flat[5] = 1.0
    s = (nrm[0] * gamma * r_y / stab(y[0])) / stab(xd[0] - mu[0])
    np.testing.assert_allclose(e.val[0], xd[0] * (s - s.mean(axis=-1, keepdims=True)), rtol=1e-4, atol=1e-6)
