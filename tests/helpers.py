"""Shared helpers for the analytic / emitter / canonizer / loader tests.

Only numpy, onnx and onnxruntime: models are built with ``onnx.helper`` and every reference is plain numpy
(float64). Import as ``from .helpers import ...`` (tests/ is a package).
"""
from __future__ import annotations

import os

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

import onnxlrp

F32 = np.float32
FLOAT = TensorProto.FLOAT


# -- model construction -----------------------------------------------------------------------------------
def vi(name, shape, dtype=FLOAT):
    """A value info; ``shape`` None = unknown rank, a None entry = dynamic dimension (the batch)."""
    return helper.make_tensor_value_info(name, dtype, shape)


def init(name, value, dtype=F32):
    arr = np.asarray(value)
    if arr.dtype.kind == "f":
        arr = arr.astype(dtype)
    return numpy_helper.from_array(arr, name)


def make_model(nodes, inputs, outputs, inits=(), opset=17, ir_version=None, infer_outputs=True):
    """A model from nodes. ``inputs``: value infos or (name, shape); ``outputs``: value infos, names or
    (name, shape). Output shapes left out are filled in by onnx's shape inference."""
    def as_vi(v):
        if isinstance(v, onnx.ValueInfoProto):
            return v
        if isinstance(v, str):
            return helper.make_tensor_value_info(v, FLOAT, None)
        return vi(*v)

    graph = helper.make_graph(list(nodes), "test", [as_vi(i) for i in inputs], [as_vi(o) for o in outputs],
                              list(inits))
    kw = {} if ir_version is None else {"ir_version": ir_version}
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], **kw)
    if ir_version is None:
        model.ir_version = min(model.ir_version, 8)
    if infer_outputs:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
        known = {v.name: v for v in list(inferred.graph.value_info) + list(inferred.graph.output)}
        for out in model.graph.output:
            if not out.type.tensor_type.HasField("shape") and out.name in known:
                out.CopyFrom(known[out.name])
    onnx.checker.check_model(model)
    return model


def ort_run(model, feeds):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def forward(model, x):
    """The model's first output for input ``x`` (first graph input)."""
    return ort_run(model, {model.graph.input[0].name: np.asarray(x, F32)})[0]


# -- analysis -----------------------------------------------------------------------------------------------
def make_lrp(model, rules=None, **kw):
    kw.setdefault("verbose", False)
    kw.setdefault("device", os.environ.get("ONNXLRP_TEST_DEVICE", "cpu"))  # "cuda" to run these on a GPU
    return onnxlrp.LRP(model, rules, **kw)


def explain(model, x, rules=None, sel=None, check=True, **kw):
    """Run LRP and (by default) validate the emitted relevance graph with onnx's checker."""
    analyzer = make_lrp(model, rules, **kw)
    e = analyzer.analyze(np.asarray(x, F32), sel)
    if check:
        onnx.checker.check_model(analyzer.relevance_model)
    return e


def relevance(model, x, rules=None, sel=None, **kw):
    return explain(model, x, rules, sel, **kw).val.astype(np.float64)


def layer_ops(model):
    """Op types of the layers onnxlrp numbers (after canonization)."""
    return [l.op_type for l in make_lrp(model).layers]


# -- references ---------------------------------------------------------------------------------------------
def stab(z, eps=1e-9):
    """z + eps * sign(z) with sign(0) = +1 (RelevancePropagation.jl's stabilizer)."""
    return z + eps * np.where(z >= 0, 1.0, -1.0)


def pos(a):
    return np.maximum(a, 0)


def neg(a):
    return np.minimum(a, 0)


def affine_jacobian(f, x):
    """Jacobian (outputs x inputs) of an affine numpy function f at (float64) x, by basis vectors."""
    x = np.asarray(x, np.float64)
    f0 = np.asarray(f(np.zeros_like(x)), np.float64)
    cols = []
    for j in range(x.size):
        e = np.zeros(x.size)
        e[j] = 1.0
        cols.append((np.asarray(f(e.reshape(x.shape)), np.float64) - f0).reshape(-1))
    return np.stack(cols, axis=1)


class RecomputeRule(onnxlrp.Rule):
    """LRP-0 that makes the emitter re-evaluate the layer (``emitter.forward``) instead of reusing the
    forward pass's own output: the input is multiplied by one and the parameters are copies. Its
    relevance must equal ZeroRule's, which checks each emitter's forward re-evaluation."""

    def modify_input(self, x):
        return x * 1.0

    def modify_weight(self, weight):
        return weight.copy()

    def modify_bias(self, bias):
        return bias.copy()

    def is_compatible(self, layer):
        return layer.linear


def check_grad_times_input(model, x, jac, rtol=2e-4, atol=2e-5, rules=None, recompute=True):
    """LRP-0 (default rules: ZeroRule on linear layers, PassRule elsewhere) seeded with the output value
    equals gradient x input for every output at once: the batch holds one copy of ``x`` (one sample,
    without the batch axis) per output, each explaining another output. ``jac``: (outputs, inputs).
    With ``recompute`` the same holds with RecomputeRule on every linear layer."""
    x = np.asarray(x, F32)
    k = jac.shape[0]
    batch = np.repeat(x[None], k, axis=0)
    expected = x.astype(np.float64)[None] * jac.reshape((k,) + x.shape)
    scale = max(1.0, float(np.abs(expected).max()))
    variants = [rules]
    if recompute and rules is None and any(l.linear for l in make_lrp(model).layers):
        variants.append(onnxlrp.Composite(onnxlrp.GlobalMap(RecomputeRule())))
    for variant in variants:
        e = explain(model, batch, variant, sel=np.arange(k), normalize_output_relevance=False)
        np.testing.assert_allclose(e.val, expected, rtol=rtol, atol=atol * scale, err_msg=repr(variant))
    return e


def with_readout(nodes, inits, out_name, n_features, rng, bias=3.0):
    """Append Flatten -> Gemm(1 output, weight v, bias ``bias``): y = v . flatten(out) + bias.
    LRP-0 seeded with y then gives x * J^T v at the input: the full adjoint, accumulation included."""
    v = rng.normal(size=(1, n_features)).astype(F32)
    nodes = list(nodes) + [helper.make_node("Flatten", [out_name], ["__flat"], axis=1),
                           helper.make_node("Gemm", ["__flat", "__v", "__c"], ["y"], transB=1)]
    inits = list(inits) + [init("__v", v), init("__c", np.array([bias]))]
    return nodes, inits, v[0].astype(np.float64)


def check_adjoint(model_nodes, inits, x, out_name, f_np, rng, opset=17, jac_fn=None):
    """The layer output ``out_name`` (= f_np(x)) gets a readout y = v . out + c; LRP-0 seeded with y must
    equal x * J^T v per sample (J: the affine Jacobian of f_np, or ``jac_fn(x_sample)``)."""
    x = np.asarray(x, F32)
    y0 = f_np(x.astype(np.float64))
    nodes, inits2, v = with_readout(model_nodes, inits, out_name, y0[0].size, rng)
    model = make_model(nodes, [("x", [None] + list(x.shape[1:]))], [("y", [None, 1])], inits2, opset=opset)
    e = explain(model, x, sel=0, normalize_output_relevance=False)
    np.testing.assert_allclose(e.output[:, 0], y0.reshape(len(x), -1) @ v + 3.0, rtol=1e-4, atol=1e-4)
    expected = np.zeros_like(x, dtype=np.float64)
    for n in range(x.shape[0]):
        xn = x[n].astype(np.float64)
        jac = jac_fn(xn) if jac_fn is not None else affine_jacobian(lambda t: f_np(t[None])[0], xn)
        expected[n] = xn * (jac.T @ v).reshape(x.shape[1:])
    np.testing.assert_allclose(e.val, expected, rtol=2e-4, atol=2e-5 * max(1.0, np.abs(expected).max()))
    return e


# -- numpy layers ------------------------------------------------------------------------------------------
def same_pads(in_spatial, kernel, strides, dilations, mode):
    """Explicit begin+end pads of auto_pad SAME_UPPER / SAME_LOWER (ONNX's definition)."""
    begin, end = [], []
    for size, k, s, d in zip(in_spatial, kernel, strides, dilations):
        out = -(-size // s)
        total = max(0, (out - 1) * s + (k - 1) * d + 1 - size)
        lo, hi = total // 2, total - total // 2
        if mode == "SAME_UPPER":
            begin.append(lo), end.append(hi)
        else:
            begin.append(hi), end.append(lo)
    return begin + end


def np_conv(x, w, b=None, strides=None, pads=None, dilations=None, group=1):
    """ONNX Conv (cross-correlation) in float64. x (N, C, *S), w (M, C/group, *K), pads begin+end."""
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    nd = x.ndim - 2
    strides = list(strides or [1] * nd)
    dilations = list(dilations or [1] * nd)
    pads = list(pads or [0] * (2 * nd))
    xp = np.pad(x, [(0, 0), (0, 0)] + [(pads[i], pads[i + nd]) for i in range(nd)])
    kernel = w.shape[2:]
    out = [(xp.shape[2 + i] - (kernel[i] - 1) * dilations[i] - 1) // strides[i] + 1 for i in range(nd)]
    n, c = x.shape[:2]
    m = w.shape[0]
    cg, mg = c // group, m // group
    y = np.zeros((n, m) + tuple(out))
    for kidx in np.ndindex(*kernel):
        sl = tuple(slice(kidx[i] * dilations[i], kidx[i] * dilations[i] + (out[i] - 1) * strides[i] + 1, strides[i])
                   for i in range(nd))
        patch = xp[(slice(None), slice(None)) + sl]
        for g in range(group):
            wk = w[(slice(g * mg, (g + 1) * mg), slice(None)) + kidx]
            y[:, g * mg:(g + 1) * mg] += np.einsum("nc...,mc->nm...", patch[:, g * cg:(g + 1) * cg], wk)
    if b is not None:
        y += np.asarray(b, np.float64).reshape((1, -1) + (1,) * nd)
    return y


def np_conv_transpose(x, w, b=None, strides=None, pads=None, dilations=None, group=1, output_padding=None):
    """ONNX ConvTranspose in float64. x (N, C, *S), w (C, M/group, *K), pads begin+end."""
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    nd = x.ndim - 2
    strides = list(strides or [1] * nd)
    dilations = list(dilations or [1] * nd)
    pads = list(pads or [0] * (2 * nd))
    output_padding = list(output_padding or [0] * nd)
    n, c = x.shape[:2]
    spatial = x.shape[2:]
    kernel = w.shape[2:]
    cin_g, cout_g = c // group, w.shape[1]
    full = [(spatial[i] - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 + output_padding[i] for i in range(nd)]
    y = np.zeros((n, cout_g * group) + tuple(full))
    for kidx in np.ndindex(*kernel):
        sl = tuple(slice(kidx[i] * dilations[i], kidx[i] * dilations[i] + (spatial[i] - 1) * strides[i] + 1,
                         strides[i]) for i in range(nd))
        for g in range(group):
            wk = w[(slice(g * cin_g, (g + 1) * cin_g), slice(None)) + kidx]
            contrib = np.einsum("nc...,cm->nm...", x[:, g * cin_g:(g + 1) * cin_g], wk)
            y[(slice(None), slice(g * cout_g, (g + 1) * cout_g)) + sl] += contrib
    crop = tuple(slice(pads[i], full[i] - pads[i + nd]) for i in range(nd))
    y = y[(slice(None), slice(None)) + crop]
    if b is not None:
        y = y + np.asarray(b, np.float64).reshape((1, -1) + (1,) * nd)
    return y


def _windows(size, out, k, s, d, pb):
    """Cell positions (out, k) of each pooling window along one axis (may lie outside [0, size))."""
    return (np.arange(out) * s - pb)[:, None] + np.arange(k)[None, :] * d


def np_maxpool(x, kernel, out_spatial, strides=None, pads=None, dilations=None):
    """2-D MaxPool in float64 for a given output size (so ceil_mode is the caller's business).
    Returns (y, jac) with jac the (outputs x inputs) Jacobian of one sample (winner takes all)."""
    x = np.asarray(x, np.float64)
    n, c, h, w = x.shape
    strides = strides or [1, 1]
    dilations = dilations or [1, 1]
    pads = pads or [0, 0, 0, 0]
    oh, ow = out_spatial
    rows = _windows(h, oh, kernel[0], strides[0], dilations[0], pads[0])
    cols = _windows(w, ow, kernel[1], strides[1], dilations[1], pads[1])
    y = np.full((n, c, oh, ow), -np.inf)
    arg = np.zeros((n, c, oh, ow), dtype=np.int64)
    for i in range(oh):
        for j in range(ow):
            for r in rows[i]:
                for q in cols[j]:
                    if 0 <= r < h and 0 <= q < w:
                        v = x[:, :, r, q]
                        better = v > y[:, :, i, j]
                        y[:, :, i, j] = np.where(better, v, y[:, :, i, j])
                        arg[:, :, i, j] = np.where(better, r * w + q, arg[:, :, i, j])
    return y, arg


def maxpool_jacobian(arg_one_sample, in_shape):
    """Jacobian of one sample's MaxPool from its winner indices (per channel flat h*w)."""
    c, oh, ow = arg_one_sample.shape
    hw = int(np.prod(in_shape[1:]))
    jac = np.zeros((c * oh * ow, c * hw))
    for ch in range(c):
        for i in range(oh):
            for j in range(ow):
                jac[(ch * oh + i) * ow + j, ch * hw + arg_one_sample[ch, i, j]] = 1.0
    return jac


def np_avgpool(x, kernel, out_spatial, strides=None, pads=None, count_include_pad=0):
    """2-D AveragePool in float64 for a given output size (onnxruntime's divisor: cells inside the
    input, or inside the padded input when count_include_pad=1)."""
    x = np.asarray(x, np.float64)
    n, c, h, w = x.shape
    strides = strides or [1, 1]
    pads = pads or [0, 0, 0, 0]
    oh, ow = out_spatial
    rows = _windows(h, oh, kernel[0], strides[0], 1, pads[0])
    cols = _windows(w, ow, kernel[1], strides[1], 1, pads[1])
    y = np.zeros((n, c, oh, ow))
    for i in range(oh):
        for j in range(ow):
            rin = [r for r in rows[i] if 0 <= r < h]
            qin = [q for q in cols[j] if 0 <= q < w]
            if count_include_pad:
                count = sum(1 for r in rows[i] if -pads[0] <= r < h + pads[2]) * \
                    sum(1 for q in cols[j] if -pads[1] <= q < w + pads[3])
            else:
                count = len(rin) * len(qin)
            total = x[:, :, rin][:, :, :, qin].sum(axis=(2, 3)) if rin and qin else 0.0
            y[:, :, i, j] = total / max(count, 1)
    return y
