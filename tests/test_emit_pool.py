"""Pooling emitters against numpy: MaxPool / GlobalMaxPool (winner takes all, relevance accumulates at
winners shared by overlapping windows), AveragePool / GlobalAveragePool / ReduceMean (linear maps, their
transposes spread the cotangent over each window with the right divisor)."""
from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

import onnxlrp

from .helpers import (F32, affine_jacobian, check_adjoint, check_grad_times_input, explain, forward, init,
                      make_lrp, make_model, maxpool_jacobian, np_avgpool, np_maxpool, same_pads, stab)

MAXPOOL_CASES = {
    "2x2_stride2": ((2, 4, 6), {"kernel_shape": [2, 2], "strides": [2, 2]}),
    # tiling pools: square windows go through SpaceToDepth, others through Reshape + Transpose
    "3x3_tiles": ((3, 6, 9), {"kernel_shape": [3, 3], "strides": [3, 3]}),
    "1x2_tiles": ((3, 4, 6), {"kernel_shape": [1, 2], "strides": [1, 2]}),
    "3x3_stride2_pad1_overlap": ((2, 7, 7), {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}),
    "3x3_stride1": ((1, 5, 5), {"kernel_shape": [3, 3]}),
    "asym_pads": ((2, 5, 6), {"kernel_shape": [3, 2], "strides": [1, 2], "pads": [2, 0, 0, 1]}),
    "ceil_mode": ((2, 6, 6), {"kernel_shape": [3, 3], "strides": [2, 2], "ceil_mode": 1}),
    # the last ceil_mode window along W would start in the right padding: onnxruntime drops it
    "ceil_mode_pads": ((1, 7, 8), {"kernel_shape": [3, 3], "strides": [2, 3], "pads": [1, 1, 1, 1],
                                   "ceil_mode": 1}),
    "dilation": ((1, 7, 7), {"kernel_shape": [2, 2], "dilations": [2, 2], "strides": [2, 1]}),
    "unread_rows": ((1, 7, 7), {"kernel_shape": [2, 2], "strides": [3, 3]}),
    "same_upper": ((2, 5, 5), {"kernel_shape": [3, 3], "strides": [2, 2], "auto_pad": "SAME_UPPER"}),
}


def _maxpool_ref(shape, attrs, out_spatial):
    pads = attrs.get("pads", [0, 0, 0, 0])
    if attrs.get("auto_pad") == "SAME_UPPER":
        pads = same_pads(shape[1:], attrs["kernel_shape"], attrs.get("strides", [1, 1]), [1, 1], "SAME_UPPER")

    def ref(t):
        return np_maxpool(t, attrs["kernel_shape"], out_spatial, attrs.get("strides"), pads, attrs.get("dilations"))

    return ref


@pytest.mark.parametrize("name", list(MAXPOOL_CASES))
def test_maxpool_jacobian(name):
    shape, attrs = MAXPOOL_CASES[name]
    rng = np.random.default_rng(0)
    model = make_model([helper.make_node("MaxPool", ["x"], ["z"], **attrs)], [("x", [None, *shape])], ["z"])
    x = rng.normal(size=shape).astype(F32)
    y = forward(model, x[None])
    ref = _maxpool_ref(shape, attrs, y.shape[2:])
    want, arg = ref(x[None])
    np.testing.assert_allclose(y, want, rtol=1e-6)
    check_grad_times_input(model, x, maxpool_jacobian(arg[0], shape))


@pytest.mark.parametrize("name", ["3x3_stride2_pad1_overlap", "3x3_stride1", "ceil_mode_pads", "dilation"])
def test_maxpool_shared_winners_accumulate(name):
    """A readout over every pooled output: a cell that wins several overlapping windows gets the sum of
    their relevance (ScatterElements with reduction='add')."""
    shape, attrs = MAXPOOL_CASES[name]
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2,) + shape).astype(F32)
    node = helper.make_node("MaxPool", ["x"], ["z"], **attrs)
    y = forward(make_model([node], [("x", [None, *shape])], ["z"]), x)
    ref = _maxpool_ref(shape, attrs, y.shape[2:])
    wins = [np.bincount(ref(x[n:n + 1])[1][0, 0].ravel()).max() for n in range(2)]
    assert max(wins) > 1, "the case should have a cell that wins several windows"
    check_adjoint([node], [], x, "z", lambda t: ref(t)[0], rng,
                  jac_fn=lambda xn: maxpool_jacobian(ref(xn[None])[1][0], shape))


@pytest.mark.parametrize("precision", ["float32", "float64"])
@pytest.mark.parametrize("name", ["2x2_stride2", "3x3_tiles", "1x2_tiles"])
def test_tiled_maxpool_ties_go_to_the_first_maximum(name, precision):
    """Windows with several equal maxima (a flat image region gives them): each window's cotangent goes to
    the first in the pool's row-major scan, as MaxPool's Indices and PyTorch's gradient choose, never to
    several. float32 upsamples the winner into the input's layout, float64 builds the one-hot in window
    space (onnxruntime has no double Resize)."""
    shape, attrs = MAXPOOL_CASES[name]
    rng = np.random.default_rng(4)
    x = rng.integers(1, 3, size=shape).astype(F32)  # 1s and 2s: most windows tie
    model = make_model([helper.make_node("MaxPool", ["x"], ["z"], **attrs)], [("x", [None, *shape])], ["z"])
    y = forward(model, x[None])
    _, arg = _maxpool_ref(shape, attrs, y.shape[2:])(x[None])
    jac = maxpool_jacobian(arg[0], shape)
    k = jac.shape[0]
    e = explain(model, np.repeat(x[None], k, axis=0), sel=np.arange(k), normalize_output_relevance=False,
                precision=precision)
    expected = x.astype(np.float64)[None] * jac.reshape((k,) + x.shape)
    np.testing.assert_array_equal(np.asarray(e.val, np.float64), expected)


def test_maxpool_shared_winner_by_hand():
    """One channel, 1x3 input [0, 5, 1], windows of 2 with stride 1: 5 wins both windows."""
    model = make_model([helper.make_node("MaxPool", ["x"], ["p"], kernel_shape=[1, 2]),
                        helper.make_node("ReduceSum", ["p"], ["z"], keepdims=0, axes=[2, 3])],
                       [("x", [None, 1, 1, 3])], ["z"], opset=11)
    x = np.array([[[[0.5, 5.0, 1.0]]]], F32)
    # ReduceSum is not a layer onnxlrp knows; go through a Gemm readout instead.
    nodes = [helper.make_node("MaxPool", ["x"], ["p"], kernel_shape=[1, 2]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "W"], ["z"], transB=1)]
    model = make_model(nodes, [("x", [None, 1, 1, 3])], ["z"], [init("W", [[1.0, 1.0]])])
    r = explain(model, x, sel=0).val
    np.testing.assert_allclose(r.ravel(), [0.0, 1.0, 0.0], atol=1e-6)
    r = explain(model, x, sel=0, normalize_output_relevance=False).val
    np.testing.assert_allclose(r.ravel(), [0.0, 10.0, 0.0], atol=1e-5)


def test_global_maxpool():
    rng = np.random.default_rng(2)
    shape = (3, 4, 5)
    model = make_model([helper.make_node("GlobalMaxPool", ["x"], ["z"])], [("x", [None, *shape])], ["z"])
    x = rng.normal(size=shape).astype(F32)
    want, arg = np_maxpool(x[None], [4, 5], [1, 1])
    np.testing.assert_allclose(forward(model, x[None]), want, rtol=1e-6)
    check_grad_times_input(model, x, maxpool_jacobian(arg[0], shape))


def test_maxpool_with_indices_output_used_by_graph_output():
    """A MaxPool that already has an Indices output keeps it (the relevance graph reuses it)."""
    rng = np.random.default_rng(3)
    node = helper.make_node("MaxPool", ["x"], ["z", "idx"], kernel_shape=[2, 2], strides=[2, 2])
    model = make_model([node], [("x", [None, 1, 4, 4])], ["z"])
    x = rng.normal(size=(1, 4, 4)).astype(F32)
    want, arg = np_maxpool(x[None], [2, 2], [2, 2], [2, 2])
    check_grad_times_input(model, x, maxpool_jacobian(arg[0], (1, 4, 4)))


# -- AveragePool -----------------------------------------------------------------------------------------------
AVGPOOL_CASES = {
    "2x2_stride2": ((2, 4, 4), {"kernel_shape": [2, 2], "strides": [2, 2]}),
    "3x3_pad1_exclude": ((2, 5, 5), {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "count_include_pad": 0}),
    "3x3_pad1_include": ((2, 5, 5), {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "count_include_pad": 1}),
    "3x3_s2_pad1_overlap_include": ((1, 6, 7), {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1],
                                                "count_include_pad": 1}),
    "asym_pads_exclude": ((1, 5, 6), {"kernel_shape": [3, 2], "strides": [2, 1], "pads": [2, 0, 0, 1]}),
    "asym_pads_include": ((1, 5, 6), {"kernel_shape": [3, 2], "strides": [2, 1], "pads": [2, 0, 0, 1],
                                      "count_include_pad": 1}),
    "ceil_mode": ((2, 5, 5), {"kernel_shape": [2, 2], "strides": [2, 2], "ceil_mode": 1}),
    "ceil_mode_pads_include": ((1, 6, 6), {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1],
                                           "ceil_mode": 1, "count_include_pad": 1}),
    "ceil_mode_pads_exclude": ((1, 6, 6), {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1],
                                           "ceil_mode": 1, "count_include_pad": 0}),
    "unread_rows": ((1, 7, 7), {"kernel_shape": [2, 2], "strides": [3, 3]}),
    "same_upper_exclude": ((1, 5, 6), {"kernel_shape": [3, 2], "strides": [2, 2], "auto_pad": "SAME_UPPER"}),
    "same_lower_include": ((1, 5, 6), {"kernel_shape": [3, 2], "strides": [2, 2], "auto_pad": "SAME_LOWER",
                                       "count_include_pad": 1}),
    # onnxruntime drops a ceil_mode window that would start in the right padding (onnx's shape
    # inference before opset 22 keeps it): the loader rewrites these pools with explicit pads.
    "ceil_mode_dropped_window_exclude": ((1, 7, 8), {"kernel_shape": [3, 3], "strides": [2, 3],
                                                     "pads": [1, 1, 1, 1], "ceil_mode": 1}),
    "ceil_mode_dropped_window_include": ((1, 7, 8), {"kernel_shape": [3, 3], "strides": [2, 3],
                                                     "pads": [1, 1, 1, 1], "ceil_mode": 1,
                                                     "count_include_pad": 1}),
}


@pytest.mark.parametrize("name", list(AVGPOOL_CASES))
def test_avgpool(name):
    shape, attrs = AVGPOOL_CASES[name]
    rng = np.random.default_rng(4)
    node = helper.make_node("AveragePool", ["x"], ["z"], **attrs)
    model = make_model([node], [("x", [None, *shape])], ["z"])
    x = rng.normal(size=shape).astype(F32)
    y = forward(model, x[None])

    pads = attrs.get("pads")
    if attrs.get("auto_pad", "NOTSET").startswith("SAME"):
        pads = same_pads(shape[1:], attrs["kernel_shape"], attrs["strides"], [1, 1], attrs["auto_pad"])

    def f(t):
        return np_avgpool(t, attrs["kernel_shape"], y.shape[2:], attrs.get("strides"), pads,
                          attrs.get("count_include_pad", 0))

    np.testing.assert_allclose(y, f(x[None]), rtol=1e-5, atol=1e-6)
    check_grad_times_input(model, x, affine_jacobian(lambda t: f(t[None])[0], x))
    check_adjoint([node], [], rng.normal(size=(2,) + shape).astype(F32), "z", f, rng)


def test_avgpool_dilations_opset19():
    """AveragePool got dilations in opset 19."""
    rng = np.random.default_rng(7)
    node = helper.make_node("AveragePool", ["x"], ["z"], kernel_shape=[2, 2], dilations=[2, 2], pads=[1, 1, 1, 1],
                            count_include_pad=1)
    model = make_model([node], [("x", [None, 1, 5, 5])], ["z"], opset=19)
    x = rng.normal(size=(1, 5, 5)).astype(F32)
    # onnxruntime's own forward pass on basis vectors is the (linear) map
    jac = np.stack([forward(model, e.reshape(1, 1, 5, 5)).ravel() for e in np.eye(25)], axis=1)
    assert jac.shape == (25, 25) and np.count_nonzero(jac.sum(axis=1)) == 25
    check_grad_times_input(model, x, jac)


def test_global_average_pool():
    rng = np.random.default_rng(5)
    shape = (3, 2, 5)
    model = make_model([helper.make_node("GlobalAveragePool", ["x"], ["z"])], [("x", [None, *shape])], ["z"])
    x = rng.normal(size=shape).astype(F32)
    f = lambda t: t.mean(axis=(-2, -1), keepdims=True)  # noqa: E731
    np.testing.assert_allclose(forward(model, x[None]), f(x[None]), rtol=1e-5)
    check_grad_times_input(model, x, affine_jacobian(lambda t: f(t[None])[0], x))


def test_avgpool_zero_rule_formula():
    """ZeroRule on a 2x2 average pool: R_j = a_j / (4 z_i) R_i for the cells j of the selected window."""
    x = np.array([[[[1.0, 2.0], [3.0, -2.0]]]], F32)
    model = make_model([helper.make_node("AveragePool", ["x"], ["p"], kernel_shape=[2, 2]),
                        helper.make_node("Flatten", ["p"], ["z"])], [("x", [None, 1, 2, 2])], ["z"])
    r = explain(model, x, sel=0).val
    z = x.mean()
    np.testing.assert_allclose(r[0, 0], x[0, 0] / 4 / stab(z), rtol=1e-6)
    np.testing.assert_allclose(r.sum(), 1.0, rtol=1e-6)


# -- ReduceMean ------------------------------------------------------------------------------------------------
REDUCE_CASES = [
    # (opset, axes, keepdims)
    (13, [2, 3], 1), (13, [2, 3], 0), (13, [-1], 0), (13, [1], 1), (13, None, None),
    (18, [2, 3], 1), (18, [2, 3], 0), (18, [-2], 1), (18, [1, 3], 0),
]


@pytest.mark.parametrize("opset,axes,keepdims", REDUCE_CASES)
def test_reduce_mean(opset, axes, keepdims):
    """ReduceMean with axes as an attribute (opset 13) or as an input (opset 18), keepdims 0 and 1."""
    rng = np.random.default_rng(6)
    shape = (3, 2, 4)
    attrs = {} if keepdims is None else {"keepdims": keepdims}
    inputs, inits = ["x"], []
    if axes is not None:
        if opset >= 18:
            inputs.append("axes")
            inits.append(init("axes", np.array(axes, np.int64)))
        else:
            attrs["axes"] = axes
    else:
        axes = [1, 2, 3]  # spatial + channel: no batch reduction (the default of all axes is the batch too)
        attrs["axes"] = axes
    node = helper.make_node("ReduceMean", inputs, ["z"], **attrs)
    model = make_model([node], [("x", [None, *shape])], ["z"], inits, opset=opset)
    keep = bool(attrs.get("keepdims", 1))
    f = lambda t: t.mean(axis=tuple(axes), keepdims=keep)  # noqa: E731
    x = rng.normal(size=shape).astype(F32)
    np.testing.assert_allclose(forward(model, x[None]), f(x[None]), rtol=1e-5, atol=1e-6)
    check_grad_times_input(model, x, affine_jacobian(lambda t: f(t[None])[0], x))
    check_adjoint([node], inits, rng.normal(size=(2,) + shape).astype(F32), "z", f, rng, opset=opset)


def test_reduce_mean_over_the_batch_is_refused():
    model = make_model([helper.make_node("ReduceMean", ["x"], ["z"], axes=[0, 1], keepdims=1)],
                       [("x", [None, 3])], ["z"], opset=13)
    with pytest.raises(ValueError, match="batch axis"):
        explain(model, np.ones((2, 3), F32))


def test_ceil_mode_pools_with_dynamic_spatial_size():
    """Spatial size only known at analyze time: the relevance graph is emitted per input size, with the
    ceil_mode windows onnxruntime keeps (7x8: the last window along W starts in the padding)."""
    rng = np.random.default_rng(8)
    nodes = [helper.make_node("MaxPool", ["x"], ["p"], kernel_shape=[3, 3], strides=[2, 3], pads=[1, 1, 1, 1],
                              ceil_mode=1),
             helper.make_node("AveragePool", ["p"], ["q"], kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1),
             helper.make_node("GlobalAveragePool", ["q"], ["g"]), helper.make_node("Flatten", ["g"], ["z"])]
    model = make_model(nodes, [("x", [None, 2, None, None])], [("z", [None, 2])])
    lrp = make_lrp(model)
    for hw in ((7, 8), (6, 6), (9, 5)):
        x = rng.normal(size=(2, 2) + hw).astype(F32)
        e = lrp.analyze(x, [0, 1])
        np.testing.assert_allclose(e.output, forward(model, x), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(e.val.reshape(2, -1).sum(axis=1), 1.0, rtol=1e-4)
        assert np.all(e.val[0, 1] == 0) and np.all(e.val[1, 0] == 0)


@pytest.mark.parametrize("pads", [[0, 0, 0, 0], [0, 0, 1, 1]])
def test_maxpool_ties_go_to_the_first_maximum(pads):
    """Tiling pools (kernel == stride, no pads) find winners with ArgMax, padded ones through MaxPool's
    Indices: both give a tied window's relevance to its first maximum, as MaxPool itself picks it."""
    x = np.array([[[[5, 5, 1, 2], [1, 0, 7, 7], [3, 3, 3, 3], [0, 3, 3, 0]]]], dtype=np.float32)
    x = np.concatenate([x, x[..., ::-1]], axis=1)  # a second channel, mirrored: other winners
    nodes = [helper.make_node("MaxPool", ["x"], ["p"], kernel_shape=[2, 2], strides=[2, 2], pads=pads),
             helper.make_node("Flatten", ["p"], ["z"])]
    model = make_model(nodes, [("x", [None, 2, 4, 4])], ["z"])
    lrp = make_lrp(model, [onnxlrp.ZeroRule(), onnxlrp.PassRule()])
    # output -> (channel, first maximum of its window, row-major)
    first = {0: (0, 0, 0), 1: (0, 1, 2), 2: (0, 2, 0), 3: (0, 2, 2),
             4: (1, 1, 0), 5: (1, 0, 2), 6: (1, 2, 0), 7: (1, 2, 2)}
    for window, (c, i, j) in first.items():
        r = lrp.analyze(x, output_selection=window).val[0]
        expected = np.zeros((2, 4, 4), np.float32)
        expected[c, i, j] = 1.0
        np.testing.assert_allclose(r, expected, atol=1e-6)
