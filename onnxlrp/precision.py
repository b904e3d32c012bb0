"""float64 relevance graphs: every float tensor in double, so that rounding can be told apart from rules.

In float32, deep networks move pre-activations across ReLU kinks and max-pool near-ties by rounding alone,
and LRP-0 = gradient x input then holds only to ~1e-3. ``LRP(..., precision="float64")`` casts the loaded
graph to double before it is canonized (BatchNorm fusion and the rules' modified weights are then computed
in double too) and emits the relevance graph in double.

onnxruntime's CPU provider has no double kernels for Conv, ConvTranspose, AveragePool, GlobalAveragePool
and LRN. ``lower_double_ops`` rewrites those nodes into ops it does have in double (Pad, Slice, Concat,
MatMul, ReduceSum, Pow), exactly: a convolution becomes a sum over kernel offsets of a strided Slice times
that offset's weights (one batched MatMul each). What still has no kernel (Erf, Resize, ...) runs on onnx's reference evaluator instead,
which is slow and meant for verification.
"""
from __future__ import annotations

import itertools

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ._onnx_utils import const_value
from .emitters.conv import conv_geometry, flipped_transposed_weight
from .loading import _infer_shapes
from .rewriter import Builder

from .interface import PRECISIONS, check_precision  # noqa: E402,F401
_FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16,
                onnx.TensorProto.DOUBLE)


def _is_float(dtype):
    try:
        return dtype is not None and np.dtype(dtype).kind == "f"
    except TypeError:
        return False


def cast_floats(graph: gs.Graph, dtype=np.float64):
    """Every float tensor, constant and Cast/ConstantOfShape target of ``graph`` in ``dtype`` (in place).
    Constants get new arrays: a graph copied from another one keeps sharing nothing it changes."""
    dtype = np.dtype(dtype)
    onnx_type = onnx.helper.np_dtype_to_tensor_dtype(dtype)
    for tensor in graph.tensors().values():
        if isinstance(tensor, gs.Constant):
            values = np.asarray(tensor.values)
            if values.dtype.kind == "f" and values.dtype != dtype:
                tensor.values = values.astype(dtype)
        elif _is_float(tensor.dtype):
            tensor.dtype = dtype
    for node in graph.nodes:
        if node.op == "Cast" and node.attrs.get("to") in _FLOAT_TYPES:
            node.attrs["to"] = onnx_type
        for key, value in list(node.attrs.items()):
            if isinstance(value, gs.Constant):
                values = np.asarray(value.values)
                if values.dtype.kind == "f":
                    node.attrs[key] = gs.Constant(value.name, values.astype(dtype))
            elif isinstance(value, gs.Graph):
                cast_floats(value, dtype)
    return graph


# -- lowering of ops without double kernels -----------------------------------------------------------------

def _static_spatial(tensor):
    shape = tensor.shape
    if shape is None or len(shape) < 3 or not all(isinstance(d, (int, np.integer)) and d > 0 for d in shape[1:]):
        return None
    return [int(d) for d in shape[2:]]


def _pad_spatial(b, x, begin, end):
    """Zero-pad (or crop, where a pad is negative) the spatial axes of an (N, C, ...) tensor."""
    n = len(begin)
    if any(p < 0 for p in begin + end):
        sizes = _static_spatial(x)
        starts = [max(-p, 0) for p in begin]
        ends = [s - max(-p, 0) for s, p in zip(sizes, end)]
        x = b.op("Slice", [x, b.i64(starts), b.i64(ends), b.i64(list(range(2, 2 + n)))])
        begin, end = [max(p, 0) for p in begin], [max(p, 0) for p in end]
    if any(begin + end):
        x = b.op("Pad", [x, b.i64([0, 0] + list(begin) + [0, 0] + list(end))])
    return x


def _window_slices(b, x, padded, kernel, strides, dilations):
    """One strided Slice of the padded (N, C, ...) input per kernel offset (row-major), and the output size."""
    n = len(kernel)
    out = [(p - (k - 1) * d - 1) // s + 1 for p, k, s, d in zip(padded, kernel, strides, dilations)]
    axes, steps = b.i64(list(range(2, 2 + n))), b.i64(strides)
    slices = []
    for offset in itertools.product(*(range(k) for k in kernel)):
        starts = [o * d for o, d in zip(offset, dilations)]
        ends = [st + (o - 1) * s + 1 for st, o, s in zip(starts, out, strides)]
        slices.append(b.op("Slice", [x, b.i64(starts), b.i64(ends), axes, steps]))
    return slices, out


def _conv(b, x, weight, bias, in_spatial, strides, dilations, begin, end, group):
    """Conv as a sum over kernel offsets of one batched MatMul each (weight a numpy array (M, C/g, k...)).
    One im2col MatMul would hold all k*k shifted copies of the input at once (11 GB on the zoo's VGG19);
    summing per offset holds one."""
    m, cg = weight.shape[:2]
    kernel = list(weight.shape[2:])
    x = _pad_spatial(b, x, list(begin), list(end))
    padded = [s + b + e for s, b, e in zip(in_spatial, begin, end)]
    slices, out = _window_slices(b, x, padded, kernel, strides, dilations)
    p = int(np.prod(out))
    taps = weight.reshape(group, m // group, cg, -1)  # (g, M/g, C/g, kk), kernel offsets row-major
    terms = []
    for k, window in enumerate(slices):
        cols = b.op("Reshape", [window, b.i64([0, group, cg, p])])
        terms.append(b.op("MatMul", [b.const(taps[..., k]), cols]))
    y = terms[0] if len(terms) == 1 else b.op("Sum", terms)  # (N, g, M/g, P)
    y = b.op("Reshape", [y, b.i64([0, m] + out)])
    if bias is not None:
        y = b.op("Add", [y, b.const(bias.reshape([m] + [1] * len(out)))])
    return y


def _conv_operands(node):
    """(x, weight, bias, static spatial size) of a Conv/ConvTranspose whose weight and bias are constants
    and whose input size is known, else None (the node then keeps its op)."""
    x, w = node.inputs[0], const_value(node.inputs[1])
    has_bias = len(node.inputs) > 2 and node.inputs[2].name
    bias = const_value(node.inputs[2]) if has_bias else None
    spatial = _static_spatial(x)
    if w is None or spatial is None or (has_bias and bias is None):
        return None
    return x, w, bias, spatial


def _lower_conv(b, node):
    operands = _conv_operands(node)
    if operands is None:
        return None
    x, w, bias, spatial = operands
    strides, dilations, begin, end = conv_geometry(node, spatial, w.shape[2:])
    return _conv(b, x, w, bias, spatial, strides, dilations, begin, end, int(node.attrs.get("group", 1)))


def _lower_conv_transpose(b, node):
    """ConvTranspose = Conv of the zero-interleaved input with the flipped, transposed kernel."""
    operands = _conv_operands(node)
    if operands is None or "output_shape" in node.attrs or \
            node.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET"):
        return None
    x, w, bias, spatial = operands
    n = len(spatial)
    kernel = list(w.shape[2:])
    group = int(node.attrs.get("group", 1))
    strides = list(node.attrs.get("strides", [1] * n))
    dilations = list(node.attrs.get("dilations", [1] * n))
    pads = list(node.attrs.get("pads", [0] * (2 * n)))
    output_padding = list(node.attrs.get("output_padding", [0] * n))
    sizes = list(spatial)
    for axis, s in enumerate(strides):
        if s == 1:
            continue
        a, rank = 2 + axis, n + 3  # (.., H, ..) -> (.., H, s, ..), zeros after each row -> (.., Hs, ..) -> (H-1)s+1
        x = b.op("Unsqueeze", [x, b.i64([a + 1])])
        widths = [0] * (2 * rank)
        widths[rank + a + 1] = s - 1
        x = b.op("Pad", [x, b.i64(widths)])
        target = [0, 0] + [size * s if j == axis else size for j, size in enumerate(sizes)]
        x = b.op("Reshape", [x, b.i64(target)])
        x = b.op("Slice", [x, b.i64([0]), b.i64([(sizes[axis] - 1) * s + 1]), b.i64([a])])
        sizes[axis] = (sizes[axis] - 1) * s + 1
    begin = [d * (k - 1) - p for d, k, p in zip(dilations, kernel, pads[:n])]
    end = [d * (k - 1) - p + extra for d, k, p, extra in zip(dilations, kernel, pads[n:], output_padding)]
    # the (C_in, C_out/g, k...) weight read as a Conv weight is transposed and flipped by the same helper
    return _conv(b, x, flipped_transposed_weight(w, group), bias, sizes, [1] * n, dilations, begin, end, group)


def _window_counts(in_spatial, kernel, strides, dilations, begin, end, include_pad, extra_end):
    """How many elements each pooling window averages over (numpy, for a static input size)."""
    ones = np.pad(np.ones(in_spatial), [(b, e) for b, e in zip(begin, end)], constant_values=float(include_pad))
    ones = np.pad(ones, [(0, x) for x in extra_end])
    padded = ones.shape
    out = [(p - (k - 1) * d - 1) // s + 1 for p, k, s, d in zip(padded, kernel, strides, dilations)]
    counts = np.zeros(out)
    for offset in itertools.product(*(range(k) for k in kernel)):
        index = tuple(slice(o * d, o * d + (n - 1) * s + 1, s) for o, d, n, s in zip(offset, dilations, out, strides))
        counts += ones[index]
    return counts


def _lower_average_pool(b, node):
    x = node.inputs[0]
    spatial = _static_spatial(x)
    if spatial is None:
        return None
    kernel = list(node.attrs["kernel_shape"])
    strides, dilations, begin, end = conv_geometry(node, spatial, kernel)
    extra = [0] * len(kernel)
    if node.attrs.get("ceil_mode", 0):
        # ceil mode adds windows that start inside the (padded) input; the part past it counts for nothing
        for i, (size, k, s, d) in enumerate(zip(spatial, kernel, strides, dilations)):
            span = size + begin[i] + end[i] - (k - 1) * d - 1
            out = -(-span // s) + 1
            if (out - 1) * s >= size + begin[i]:
                out -= 1
            extra[i] = max(0, (out - 1) * s + (k - 1) * d + 1 - (size + begin[i] + end[i]))
    include_pad = bool(node.attrs.get("count_include_pad", 0))
    counts = _window_counts(spatial, kernel, strides, dilations, begin, end, include_pad, extra)
    xp = _pad_spatial(b, x, list(begin), [e + x_ for e, x_ in zip(end, extra)])
    padded = [s + b + e + x_ for s, b, e, x_ in zip(spatial, begin, end, extra)]
    slices, _ = _window_slices(b, xp, padded, kernel, strides, dilations)
    total = slices[0] if len(slices) == 1 else b.op("Sum", slices)
    return b.op("Mul", [total, b.const((1.0 / counts)[None, None])])


def _lower_global_average_pool(b, node):
    x = node.inputs[0]
    spatial = _static_spatial(x)
    if spatial is None:
        return None
    total = b.op("ReduceSum", [x, b.i64(list(range(2, 2 + len(spatial))))], {"keepdims": 1})
    return b.op("Mul", [total, b.const(np.asarray(1.0 / np.prod(spatial)))])


def _lower_lrn(b, node):
    """y = x / (bias + alpha/size * sum of x^2 over a window of channels) ** beta."""
    x = node.inputs[0]
    if x.shape is None or not isinstance(x.shape[1], (int, np.integer)):
        return None
    size = int(node.attrs["size"])
    alpha, beta, bias = (float(node.attrs.get(k, v)) for k, v in (("alpha", 1e-4), ("beta", 0.75), ("bias", 1.0)))
    channels, rank = int(x.shape[1]), len(x.shape)
    square = b.op("Mul", [x, x])
    lo, hi = (size - 1) // 2, size - 1 - (size - 1) // 2
    padded = b.op("Pad", [square, b.i64([0, lo] + [0] * (rank - 2) + [0, hi] + [0] * (rank - 2))])
    window = [b.op("Slice", [padded, b.i64([i]), b.i64([i + channels]), b.i64([1])]) for i in range(size)]
    total = window[0] if size == 1 else b.op("Sum", window)
    scaled = b.op("Add", [b.op("Mul", [total, b.const(np.asarray(alpha / size))]), b.const(np.asarray(bias))])
    return b.op("Div", [x, b.op("Pow", [scaled, b.const(np.asarray(beta))])])


LOWERINGS = {"Conv": _lower_conv, "ConvTranspose": _lower_conv_transpose, "AveragePool": _lower_average_pool,
             "GlobalAveragePool": _lower_global_average_pool, "LRN": _lower_lrn}


def lower_double_ops(graph: gs.Graph):
    """Rewrite the nodes of a double graph that onnxruntime's CPU provider has no kernel for (``LOWERINGS``)
    into ops it has (in place); a node the lowering cannot take (a weight computed at run time, dynamic
    sizes) is left as it is. Returns the op types left without a lowering."""
    if not any(node.op in LOWERINGS for node in graph.nodes):
        return set()
    _infer_shapes(graph, "the float64 relevance graph")  # the emitted tensors' sizes, for the slices
    b = Builder(graph, np.float64, prefix="lrp/double")
    left = set()
    for index, node in enumerate(list(graph.nodes)):
        lower = LOWERINGS.get(node.op)
        if lower is None:
            continue
        result = lower(b, node)
        if result is None:
            left.add(node.op)
            continue
        out = node.outputs[0]
        node.outputs.clear()
        graph.nodes.append(gs.Node("Identity", name=f"lrp/double/{index}/out", inputs=[result], outputs=[out]))
    graph.cleanup().toposort()
    return left


class ReferenceSession:
    """onnx's reference evaluator behind the part of the InferenceSession API the analyzer uses: the
    fallback for double graphs that still hold an op onnxruntime has no double kernel for (slow)."""

    def __init__(self, model: onnx.ModelProto):
        from onnx.reference import ReferenceEvaluator
        self._evaluator = ReferenceEvaluator(model)
        self._outputs = list(model.graph.output)

    def get_outputs(self):
        return self._outputs

    @staticmethod
    def get_providers():
        return ["onnx.reference"]

    def run(self, names, feeds):
        return self._evaluator.run(names, feeds)
