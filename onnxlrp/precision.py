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

PRECISIONS = {"float32": np.float32, "float64": np.float64}
_FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16,
                onnx.TensorProto.DOUBLE)


def check_precision(precision):
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    return np.dtype(PRECISIONS[precision])


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

class _Ops:
    """Adds nodes to ``graph`` with fresh names (the relevance builder's idiom, without its dtype)."""

    def __init__(self, graph, prefix):
        self.graph, self.prefix, self.n = graph, prefix, 0

    def __call__(self, op, inputs, attrs=None):
        self.n += 1
        out = gs.Variable(f"{self.prefix}/{op.lower()}_{self.n}")
        self.graph.nodes.append(gs.Node(op, name=f"{self.prefix}/{op}_{self.n}", attrs=attrs or {},
                                        inputs=list(inputs), outputs=[out]))
        return out

    def const(self, values, dtype=np.int64):
        self.n += 1
        return gs.Constant(f"{self.prefix}/const_{self.n}", np.ascontiguousarray(np.asarray(values, dtype=dtype)))


def _static_spatial(tensor):
    shape = tensor.shape
    if shape is None or len(shape) < 3 or not all(isinstance(d, (int, np.integer)) and d > 0 for d in shape[1:]):
        return None
    return [int(d) for d in shape[2:]]


def _pad_spatial(ops, x, begin, end):
    """Zero-pad (or crop, where a pad is negative) the spatial axes of an (N, C, ...) tensor."""
    n = len(begin)
    if any(p < 0 for p in begin + end):
        sizes = _static_spatial(x)
        starts = [max(-p, 0) for p in begin]
        ends = [s - max(-p, 0) for s, p in zip(sizes, end)]
        x = ops("Slice", [x, ops.const(starts), ops.const(ends), ops.const(list(range(2, 2 + n)))])
        begin, end = [max(p, 0) for p in begin], [max(p, 0) for p in end]
    if any(begin + end):
        x = ops("Pad", [x, ops.const([0, 0] + list(begin) + [0, 0] + list(end))])
    return x


def _window_slices(ops, x, padded, kernel, strides, dilations):
    """One strided Slice of the padded (N, C, ...) input per kernel offset (row-major), and the output size."""
    n = len(kernel)
    out = [(p - (k - 1) * d - 1) // s + 1 for p, k, s, d in zip(padded, kernel, strides, dilations)]
    axes, steps = ops.const(list(range(2, 2 + n))), ops.const(strides)
    slices = []
    for offset in itertools.product(*(range(k) for k in kernel)):
        starts = [o * d for o, d in zip(offset, dilations)]
        ends = [st + (o - 1) * s + 1 for st, o, s in zip(starts, out, strides)]
        slices.append(ops("Slice", [x, ops.const(starts), ops.const(ends), axes, steps]))
    return slices, out


def _conv(ops, x, weight, bias, in_spatial, strides, dilations, begin, end, group):
    """Conv as a sum over kernel offsets of one batched MatMul each (weight a numpy array (M, C/g, k...)).
    One im2col MatMul would hold all k*k shifted copies of the input at once (11 GB on the zoo's VGG19);
    summing per offset holds one."""
    m, cg = weight.shape[:2]
    kernel = list(weight.shape[2:])
    x = _pad_spatial(ops, x, list(begin), list(end))
    padded = [s + b + e for s, b, e in zip(in_spatial, begin, end)]
    slices, out = _window_slices(ops, x, padded, kernel, strides, dilations)
    p = int(np.prod(out))
    taps = weight.reshape(group, m // group, cg, -1)  # (g, M/g, C/g, kk), kernel offsets row-major
    terms = []
    for k, window in enumerate(slices):
        cols = ops("Reshape", [window, ops.const([0, group, cg, p])])
        terms.append(ops("MatMul", [ops.const(np.ascontiguousarray(taps[..., k]), weight.dtype), cols]))
    y = terms[0] if len(terms) == 1 else ops("Sum", terms)  # (N, g, M/g, P)
    y = ops("Reshape", [y, ops.const([0, m] + out)])
    if bias is not None:
        y = ops("Add", [y, ops.const(bias.reshape([m] + [1] * len(out)), bias.dtype)])
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


def _lower_conv(ops, node):
    operands = _conv_operands(node)
    if operands is None:
        return None
    x, w, bias, spatial = operands
    strides, dilations, begin, end = conv_geometry(node, spatial, w.shape[2:])
    return _conv(ops, x, w, bias, spatial, strides, dilations, begin, end, int(node.attrs.get("group", 1)))


def _lower_conv_transpose(ops, node):
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
        x = ops("Unsqueeze", [x, ops.const([a + 1])])
        widths = [0] * (2 * rank)
        widths[rank + a + 1] = s - 1
        x = ops("Pad", [x, ops.const(widths)])
        target = [0, 0] + [size * s if j == axis else size for j, size in enumerate(sizes)]
        x = ops("Reshape", [x, ops.const(target)])
        x = ops("Slice", [x, ops.const([0]), ops.const([(sizes[axis] - 1) * s + 1]), ops.const([a])])
        sizes[axis] = (sizes[axis] - 1) * s + 1
    begin = [d * (k - 1) - p for d, k, p in zip(dilations, kernel, pads[:n])]
    end = [d * (k - 1) - p + extra for d, k, p, extra in zip(dilations, kernel, pads[n:], output_padding)]
    # the (C_in, C_out/g, k...) weight read as a Conv weight is transposed and flipped by the same helper
    return _conv(ops, x, flipped_transposed_weight(w, group), bias, sizes, [1] * n, dilations, begin, end, group)


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


def _lower_average_pool(ops, node):
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
    xp = _pad_spatial(ops, x, list(begin), [e + x_ for e, x_ in zip(end, extra)])
    padded = [s + b + e + x_ for s, b, e, x_ in zip(spatial, begin, end, extra)]
    slices, _ = _window_slices(ops, xp, padded, kernel, strides, dilations)
    total = slices[0] if len(slices) == 1 else ops("Sum", slices)
    dtype = np.dtype(x.dtype or np.float64)
    return ops("Mul", [total, ops.const((1.0 / counts)[None, None], dtype)])


def _lower_global_average_pool(ops, node):
    x = node.inputs[0]
    spatial = _static_spatial(x)
    if spatial is None:
        return None
    total = ops("ReduceSum", [x, ops.const(list(range(2, 2 + len(spatial))))], {"keepdims": 1})
    return ops("Mul", [total, ops.const(1.0 / np.prod(spatial), np.dtype(x.dtype or np.float64))])


def _lower_lrn(ops, node):
    """y = x / (bias + alpha/size * sum of x^2 over a window of channels) ** beta."""
    x = node.inputs[0]
    if x.shape is None or not isinstance(x.shape[1], (int, np.integer)):
        return None
    size = int(node.attrs["size"])
    alpha, beta, bias = (float(node.attrs.get(k, v)) for k, v in (("alpha", 1e-4), ("beta", 0.75), ("bias", 1.0)))
    dtype = np.dtype(x.dtype or np.float64)
    channels, rank = int(x.shape[1]), len(x.shape)
    square = ops("Mul", [x, x])
    lo, hi = (size - 1) // 2, size - 1 - (size - 1) // 2
    padded = ops("Pad", [square, ops.const([0, lo] + [0] * (rank - 2) + [0, hi] + [0] * (rank - 2))])
    window = [ops("Slice", [padded, ops.const([i]), ops.const([i + channels]), ops.const([1])]) for i in range(size)]
    total = window[0] if size == 1 else ops("Sum", window)
    scaled = ops("Add", [ops("Mul", [total, ops.const(alpha / size, dtype)]), ops.const(bias, dtype)])
    return ops("Div", [x, ops("Pow", [scaled, ops.const(beta, dtype)])])


LOWERINGS = {"Conv": _lower_conv, "ConvTranspose": _lower_conv_transpose, "AveragePool": _lower_average_pool,
             "GlobalAveragePool": _lower_global_average_pool, "LRN": _lower_lrn}


def lower_double_ops(graph: gs.Graph):
    """Rewrite the nodes of a double graph that onnxruntime's CPU provider has no kernel for (``LOWERINGS``)
    into ops it has (in place); a node the lowering cannot take (a weight computed at run time, dynamic
    sizes) is left as it is. Returns the op types left without a lowering."""
    if not any(node.op in LOWERINGS for node in graph.nodes):
        return set()
    _infer_shapes(graph, "the float64 relevance graph")  # the emitted tensors' sizes, for the slices
    left = set()
    for index, node in enumerate(list(graph.nodes)):
        lower = LOWERINGS.get(node.op)
        if lower is None:
            continue
        ops = _Ops(graph, f"lrp/double/{index}")
        result = lower(ops, node)
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
