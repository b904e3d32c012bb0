"""Normalization: a BatchNormalization canonization could not fuse (a per-channel affine layer) and
LayerNormalization (the normalization part, after canonization split off its scale and bias)."""
from __future__ import annotations

import numpy as np

from .._onnx_utils import const_value
from ..rules.base import Params
from ..rules.expr import stabilize
from .base import Emitter, register
from .elementwise import ScaleEmitter


def batchnorm_affine(node):
    """(scale, shift) per channel of an inference-mode BatchNormalization, BatchNorm's epsilon included."""
    gamma, beta, mean, var = (const_value(t).astype(np.float64) for t in node.inputs[1:5])
    eps = node.attrs.get("epsilon", 1e-5)
    scale = gamma / np.sqrt(var + eps)
    return scale, beta - mean * scale


@register
class BatchNormEmitter(ScaleEmitter):
    op_types = ("BatchNormalization",)
    group = "NormalizationLayer"
    absorbs_bias = False

    def unsupported_reason(self, node, is_data):
        if any(const_value(t) is None for t in node.inputs[1:5]):
            return "scale, bias, mean and variance must be constants"
        if node.attrs.get("training_mode", 0) or sum(1 for o in node.outputs if o.outputs) > 1:
            return "training-mode BatchNormalization is not supported"
        return None

    def data_input_indices(self, node, is_data):
        return [0]

    def params(self, layer):
        scale, shift = batchnorm_affine(layer.node)
        rank = len(layer.inputs[0].shape) if layer.inputs[0].shape is not None else 4
        shape = (-1,) + (1,) * (rank - 2)
        dtype = const_value(layer.node.inputs[1]).dtype
        return Params(scale.reshape(shape).astype(dtype), shift.reshape(shape).astype(dtype))


@register
class LayerNormEmitter(Emitter):
    """The normalization y = (x - mean) / std over the trailing axes (scale and bias split off)."""
    op_types = ("LayerNormalization",)
    group = "NormalizationLayer"
    linear = False

    def data_input_indices(self, node, is_data):
        return [0]

    def axes(self, ctx, layer):
        rank = len(ctx.shape(layer.inputs[0]))
        axis = layer.node.attrs.get("axis", -1) % rank
        return list(range(axis, rank))

    def emit_layernorm_rule(self, ctx, layer, relevance_out, epsilon=1e-9):
        """LRP-LN: R_i = a_i (s_i - mean_j s_j), s = R / stabilize(a - mean(a))."""
        b = ctx.b
        x = layer.inputs[0]
        axes = self.axes(ctx, layer)
        count = float(np.prod([ctx.shape(x)[a] for a in axes]))
        inv = b.const(np.asarray(1.0 / count, dtype=b.dtype))

        def mean(v):
            return b.op("Mul", [b.op("ReduceSum", [v, b.i64(axes)], attrs={"keepdims": 1}), inv])

        centered = ctx.sym(b.op("Sub", [x, mean(x)]), x)
        s = b.op("Div", [relevance_out[0], stabilize(centered, epsilon).var])
        return [b.op("Mul", [x, b.op("Sub", [s, mean(s)])])]

    def gradient_reason(self, layer):
        return None

    def vjp(self, ctx, layer, grads_out):
        """y = (x - mean) / std: dx = (g - mean(g) - y mean(g y)) / std, std = sqrt(var + epsilon)."""
        b = ctx.b
        x, y, g = layer.inputs[0], layer.outputs[0], grads_out[0]
        axes = self.axes(ctx, layer)
        inv = b.const(np.asarray(1.0 / float(np.prod([ctx.shape(x)[a] for a in axes])), dtype=b.dtype))

        def mean(v):
            return b.op("Mul", [b.op("ReduceSum", [v, b.i64(axes)], attrs={"keepdims": 1}), inv])

        centered = b.op("Sub", [x, mean(x)])
        var = mean(b.op("Mul", [centered, centered]))
        eps = b.const(np.asarray(layer.node.attrs.get("epsilon", 1e-5), dtype=b.dtype))
        std = b.op("Sqrt", [b.op("Add", [var, eps])])
        inner = b.op("Sub", [b.op("Sub", [g, mean(g)]), b.op("Mul", [y, mean(b.op("Mul", [g, y]))])])
        return [b.op("Div", [inner, std])]
