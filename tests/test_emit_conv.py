"""Conv / ConvTranspose emitters: the relevance backward uses the exact transpose of the forward map.

Each case is a one-layer model. Two checks, both against a numpy Conv in float64:
- every output at once: LRP-0 seeded with the output value equals gradient x input (x * J[k]) for each
  output k (one batch row per output), so the whole Jacobian transpose is compared;
- a readout y = v . conv(x) + c: LRP-0 gives x * conv^T(v), the adjoint of the conv applied to a dense
  cotangent (every output at once, overlapping windows accumulate).
"""
from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

from .helpers import (F32, affine_jacobian, check_adjoint, check_grad_times_input, forward, init, make_model,
                     np_conv, np_conv_transpose, same_pads)

CONV_CASES = {
    # name: (input (C, H, W), weight shape, attrs)
    "plain_3x3": ((2, 5, 5), (3, 2, 3, 3), {}),
    "pads_symmetric": ((2, 5, 5), (3, 2, 3, 3), {"pads": [1, 1, 1, 1]}),
    "pads_asymmetric": ((2, 5, 6), (2, 2, 3, 2), {"pads": [0, 2, 1, 0]}),
    "stride2": ((2, 7, 7), (3, 2, 3, 3), {"strides": [2, 2], "pads": [1, 1, 1, 1]}),
    "stride_unread_rows": ((1, 8, 7), (2, 1, 3, 3), {"strides": [3, 2]}),  # last rows/cols never read
    "stride_kernel_2_unread": ((1, 6, 6), (2, 1, 2, 2), {"strides": [4, 4]}),
    "dilation2": ((2, 7, 7), (2, 2, 3, 3), {"dilations": [2, 2]}),
    "dilation_stride_pad": ((2, 9, 8), (2, 2, 3, 2), {"dilations": [2, 3], "strides": [2, 1],
                                                      "pads": [2, 1, 1, 2]}),
    "groups2": ((4, 5, 5), (6, 2, 3, 3), {"group": 2, "pads": [1, 1, 1, 1]}),
    "depthwise": ((3, 6, 6), (3, 1, 3, 3), {"group": 3, "pads": [1, 1, 1, 1], "strides": [2, 2]}),
    "depthwise_multiplier": ((2, 5, 5), (4, 1, 3, 3), {"group": 2}),
    "kernel_1x1": ((3, 4, 4), (2, 3, 1, 1), {}),
    "same_upper": ((2, 6, 5), (2, 2, 3, 2), {"auto_pad": "SAME_UPPER", "strides": [2, 2]}),
    "same_lower": ((2, 6, 5), (2, 2, 3, 2), {"auto_pad": "SAME_LOWER", "strides": [2, 2]}),
    "same_upper_even_kernel": ((1, 5, 5), (2, 1, 4, 4), {"auto_pad": "SAME_UPPER"}),
    "same_lower_even_kernel": ((1, 5, 5), (2, 1, 4, 4), {"auto_pad": "SAME_LOWER"}),
    "valid": ((2, 6, 7), (2, 2, 3, 3), {"auto_pad": "VALID", "strides": [2, 2]}),
    "pads_wider_than_kernel": ((1, 4, 4), (2, 1, 2, 2), {"pads": [2, 0, 3, 1]}),
    "dilation_depthwise_stride1": ((2, 6, 6), (2, 1, 3, 3), {"dilations": [2, 1], "group": 2, "pads": [2, 1, 2, 1]}),
    # strided transposes: ResNet's first layer, even kernels, stride 3, groups, a kernel below the stride
    "stride2_7x7_pad3": ((3, 11, 12), (4, 3, 7, 7), {"strides": [2, 2], "pads": [3, 3, 3, 3]}),
    "stride2_even_kernel": ((2, 8, 7), (3, 2, 4, 4), {"strides": [2, 2], "pads": [1, 1, 1, 1]}),
    "stride3_asym_pads": ((2, 10, 9), (2, 2, 3, 3), {"strides": [3, 3], "pads": [0, 1, 2, 0]}),
    "stride2_groups2": ((4, 7, 6), (4, 2, 3, 3), {"group": 2, "strides": [2, 2], "pads": [1, 0, 0, 1]}),
    "stride2_kernel_1x1": ((2, 6, 7), (3, 2, 1, 1), {"strides": [2, 2]}),
}


def _explicit_pads(in_spatial, w_shape, attrs):
    nd = len(in_spatial)
    strides = attrs.get("strides", [1] * nd)
    dilations = attrs.get("dilations", [1] * nd)
    mode = attrs.get("auto_pad", "NOTSET")
    if mode in ("SAME_UPPER", "SAME_LOWER"):
        return same_pads(in_spatial, w_shape[2:], strides, dilations, mode)
    if mode == "VALID":
        return [0] * (2 * nd)
    return attrs.get("pads", [0] * (2 * nd))


def _conv_case(name, bias=True, seed=0):
    shape, w_shape, attrs = CONV_CASES[name]
    rng = np.random.default_rng(seed)
    w = rng.normal(size=w_shape).astype(F32)
    b = rng.normal(size=w_shape[0]).astype(F32) if bias else None
    pads = _explicit_pads(shape[1:], w_shape, attrs)

    def f(t):
        return np_conv(t, w, b, attrs.get("strides"), pads, attrs.get("dilations"), attrs.get("group", 1))

    ins = ["x", "W"] + (["B"] if bias else [])
    node = helper.make_node("Conv", ins, ["z"], **attrs)
    inits = [init("W", w)] + ([init("B", b)] if bias else [])
    return rng, shape, node, inits, f


@pytest.mark.parametrize("name", list(CONV_CASES))
def test_conv_jacobian(name):
    rng, shape, node, inits, f = _conv_case(name)
    model = make_model([node], [("x", [None, *shape])], ["z"], inits)
    x = rng.normal(size=shape).astype(F32)
    np.testing.assert_allclose(forward(model, x[None]), f(x[None]), rtol=1e-4, atol=1e-4)
    jac = affine_jacobian(lambda t: f(t[None])[0], x)
    check_grad_times_input(model, x, jac)


@pytest.mark.parametrize("name", list(CONV_CASES))
def test_conv_adjoint_readout(name):
    rng, shape, node, inits, f = _conv_case(name, bias=(name != "valid"), seed=1)
    x = rng.normal(size=(2,) + shape).astype(F32)
    check_adjoint([node], inits, x, "z", f, rng)


def test_conv1d_and_conv3d():
    rng = np.random.default_rng(3)
    for shape, w_shape, attrs in (((2, 9), (3, 2, 3), {"strides": [2], "pads": [1, 2]}),
                                  ((1, 4, 3, 5), (2, 1, 2, 2, 3), {"pads": [1, 0, 1, 0, 1, 1]})):
        w = rng.normal(size=w_shape).astype(F32)
        node = helper.make_node("Conv", ["x", "W"], ["z"], **attrs)
        x = rng.normal(size=(2,) + shape).astype(F32)
        check_adjoint([node], [init("W", w)], x, "z",
                      lambda t: np_conv(t, w, None, attrs.get("strides"), attrs["pads"]), rng)


# -- ConvTranspose -------------------------------------------------------------------------------------------
CONVT_CASES = {
    # name: (input (C, H, W), weight (C, M/group, kH, kW), attrs)
    "plain": ((2, 4, 4), (2, 3, 3, 3), {}),
    "stride2": ((2, 3, 4), (2, 2, 3, 3), {"strides": [2, 2]}),
    "stride2_pads": ((2, 4, 4), (2, 2, 3, 3), {"strides": [2, 2], "pads": [1, 1, 1, 1]}),
    "stride2_output_padding": ((2, 3, 3), (2, 2, 3, 3), {"strides": [2, 2], "pads": [1, 1, 1, 1],
                                                         "output_padding": [1, 1]}),
    "stride3_output_padding_asym": ((1, 3, 4), (1, 2, 2, 3), {"strides": [3, 2], "pads": [0, 1, 1, 0],
                                                              "output_padding": [2, 1]}),
    "dilation": ((2, 3, 3), (2, 1, 3, 2), {"dilations": [2, 2], "pads": [1, 0, 0, 1]}),
    "groups2": ((4, 3, 3), (4, 1, 3, 3), {"group": 2, "strides": [2, 2], "pads": [1, 1, 1, 1],
                                          "output_padding": [1, 0]}),
    "depthwise": ((3, 3, 3), (3, 1, 2, 2), {"group": 3, "strides": [2, 2]}),
}


def _convt_case(name, seed=0, bias=True):
    shape, w_shape, attrs = CONVT_CASES[name]
    rng = np.random.default_rng(seed)
    w = rng.normal(size=w_shape).astype(F32)
    g = attrs.get("group", 1)
    b = rng.normal(size=w_shape[1] * g).astype(F32) if bias else None

    def f(t):
        return np_conv_transpose(t, w, b, attrs.get("strides"), attrs.get("pads"), attrs.get("dilations"), g,
                                 attrs.get("output_padding"))

    node = helper.make_node("ConvTranspose", ["x", "W"] + (["B"] if bias else []), ["z"], **attrs)
    inits = [init("W", w)] + ([init("B", b)] if bias else [])
    return rng, shape, node, inits, f


@pytest.mark.parametrize("name", list(CONVT_CASES))
def test_conv_transpose_jacobian(name):
    rng, shape, node, inits, f = _convt_case(name)
    model = make_model([node], [("x", [None, *shape])], ["z"], inits)
    x = rng.normal(size=shape).astype(F32)
    np.testing.assert_allclose(forward(model, x[None]), f(x[None]), rtol=1e-4, atol=1e-4)
    jac = affine_jacobian(lambda t: f(t[None])[0], x)
    check_grad_times_input(model, x, jac)


@pytest.mark.parametrize("name", list(CONVT_CASES))
def test_conv_transpose_adjoint_readout(name):
    rng, shape, node, inits, f = _convt_case(name, seed=1, bias=False)
    x = rng.normal(size=(2,) + shape).astype(F32)
    check_adjoint([node], inits, x, "z", f, rng)


CONVT_IMPLICIT = {
    # name: (attrs, explicit pads, output_padding) — ONNX: total = s (in - 1) + op + (k - 1) d + 1 - out;
    # SAME_UPPER puts total // 2 first, SAME_LOWER and output_shape (auto_pad NOTSET) total - total // 2.
    "same_upper": ({"auto_pad": "SAME_UPPER"}, [0, 0, 1, 1], None),
    "same_lower": ({"auto_pad": "SAME_LOWER"}, [1, 1, 0, 0], None),
    "output_shape_odd_total": ({"output_shape": [6, 6]}, [1, 1, 0, 0], None),
    "output_shape_mixed": ({"output_shape": [5, 6]}, [1, 1, 1, 0], None),
    "output_shape_larger": ({"output_shape": [8, 7]}, [0, 0, 0, 0], [1, 0]),
    "output_shape_ignores_pads": ({"output_shape": [6, 6], "pads": [0, 0, 1, 1]}, [1, 1, 0, 0], None),
}


@pytest.mark.parametrize("name", list(CONVT_IMPLICIT))
def test_conv_transpose_implicit_padding(name):
    """ConvTranspose whose cropping comes from auto_pad or output_shape (derived from the shapes)."""
    attrs, pads, output_padding = CONVT_IMPLICIT[name]
    rng = np.random.default_rng(5)
    w = rng.normal(size=(2, 2, 3, 3)).astype(F32)
    node = helper.make_node("ConvTranspose", ["x", "W"], ["z"], strides=[2, 2], **attrs)
    model = make_model([node], [("x", [None, 2, 3, 3])], ["z"], [init("W", w)])
    x = rng.normal(size=(2, 3, 3)).astype(F32)
    f = lambda t: np_conv_transpose(t, w, None, [2, 2], pads, output_padding=output_padding)  # noqa: E731
    np.testing.assert_allclose(forward(model, x[None]), f(x[None]), rtol=1e-4, atol=1e-4)
    check_grad_times_input(model, x, affine_jacobian(lambda t: f(t[None])[0], x))
    check_adjoint([node], [init("W", w)], rng.normal(size=(2, 2, 3, 3)).astype(F32), "z", f, rng)
