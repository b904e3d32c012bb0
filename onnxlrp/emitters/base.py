"""Emitter base class and the one registry table of op emitters.

An emitter knows, for one ONNX op family, how a layer of that op
- exposes its parameters to rules (``params``),
- is evaluated again under modified inputs/parameters (``forward``),
- maps an output cotangent back onto its inputs (``backward``: the transpose of its linear map),
- passes relevance through unchanged (``pass_through``, for PassRule),
- maps an output cotangent through its true derivative (``vjp``, for the gradient analyzers): a linear
  layer's ``backward`` with its own parameters unless the emitter overrides it.

To support a new op, write an emitter and decorate it with ``@register``; nothing else changes.
"""
from __future__ import annotations

import numpy as np

from .._onnx_utils import const_value

#: op type -> emitter instance. Fill it with @register.
EMITTERS: dict = {}

GROUPS = ("ConvLayer", "DenseLayer", "PoolingLayer", "DropoutLayer", "ReshapingLayer", "NormalizationLayer",
          "ActivationLayer", "MergeLayer", "ScaleLayer", "AttentionLayer", "ProductLayer", "SoftmaxLayer",
          "MaskLayer")


def register(cls):
    """Class decorator: register an emitter instance for each of ``cls.op_types``."""
    instance = cls()
    for op in cls.op_types:
        EMITTERS[op] = instance
    return cls


class Emitter:
    op_types: tuple = ()
    group: str = ""
    #: whether forward/backward exist (rules other than PassRule need them)
    linear: bool = True

    def unsupported_reason(self, layer, graph_info) -> str | None:
        """Why this node cannot be handled (None when it can)."""
        return None

    def data_input_indices(self, node, is_data) -> list:
        return [i for i, t in enumerate(node.inputs) if is_data(t)]

    def params(self, layer):
        return None

    def prepare(self, ctx, layer):
        """Adjust the forward node before emission (e.g. ask MaxPool for its indices)."""

    def forward(self, ctx, layer, xs, params):
        raise NotImplementedError(f"{type(self).__name__} cannot re-evaluate {layer.op_type}")

    def backward(self, ctx, layer, s, params):
        raise NotImplementedError(f"{type(self).__name__} has no transpose for {layer.op_type}")

    def backward_terms(self, ctx, layer, s, params_list):
        """Transposes of several parameter sets applied to the same cotangent (a rule's terms); emitters
        may batch them into one op."""
        return [self.backward(ctx, layer, s, params) for params in params_list]

    def pass_through(self, ctx, layer, relevance_out):
        """Default: elementwise layers pass relevance through as it is."""
        return [relevance_out[0]] + [None] * (len(layer.inputs) - 1)

    def gradient_reason(self, layer) -> str | None:
        """Why ``vjp`` cannot differentiate this layer (None when it can)."""
        return None if self.linear else "no gradient (vector-Jacobian product) for this op yet"

    def vjp(self, ctx, layer, grads_out):
        """The vector-Jacobian product: output cotangents (one per output, None where none arrives) mapped
        onto ``layer.inputs`` through the layer's true derivative. Linear layers: their transpose."""
        if not self.linear:
            raise NotImplementedError(f"{type(self).__name__} has no vector-Jacobian product for {layer.op_type}")
        return self.backward(ctx, layer, grads_out[0], layer.params)


class WeightBiasEmitter(Emitter):
    """Layers op(x, W[, b]) with the data in input 0 and constant weight and optional bias (Conv, Gemm)."""

    def unsupported_reason(self, node, is_data):
        if len(node.inputs) < 2 or const_value(node.inputs[1]) is None:
            return "the weight is not a constant (only constant-weight layers are supported)"
        if len(node.inputs) > 2 and node.inputs[2].name and const_value(node.inputs[2]) is None:
            return "the bias is not a constant"
        if not is_data(node.inputs[0]):
            return "the data input is not the first input"
        return self.layout_reason(node)

    def layout_reason(self, node):
        return None

    def data_input_indices(self, node, is_data):
        return [0]

    def stored_params(self, node):
        weight = const_value(node.inputs[1])
        bias = const_value(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2].name else None
        return weight, bias

    def operands(self, ctx, x, params):
        """[x, W, b] (b left out when the layer has none) for re-evaluating the layer."""
        inputs = [x, ctx.b.const(params.weight)]
        if params.bias is not None:
            inputs.append(ctx.b.const(params.bias))
        return inputs


def per_channel(value, rank, axis, channels):
    """A constant that only varies along ``axis`` as a (channels,) vector, else None."""
    c = np.asarray(value)
    if c.ndim > rank:
        return None
    c = c.reshape((1,) * (rank - c.ndim) + c.shape)
    if any(d != 1 for i, d in enumerate(c.shape) if i != axis) or c.shape[axis] not in (1, channels):
        return None
    return np.broadcast_to(c.reshape(-1), (channels,)).copy()


def constant_input(node, index):
    return const_value(node.inputs[index]) if len(node.inputs) > index else None


def unbroadcast(ctx, var, from_shape, to_shape):
    """Sum ``var`` (of full shape from_shape, batch first) down to to_shape, undoing broadcasting."""
    from_shape, to_shape = tuple(from_shape), tuple(to_shape)
    if from_shape == to_shape:
        return var
    b = ctx.b
    pad = len(from_shape) - len(to_shape)
    padded = (1,) * pad + to_shape
    axes = [i for i, (f, t) in enumerate(zip(from_shape, padded)) if t == 1 and f != 1]
    if axes:
        var = b.op("ReduceSum", [var, b.i64(axes)], attrs={"keepdims": 1})
    if pad:
        var = b.op("Reshape", [var, b.i64([0 if d == "batch" else d for d in to_shape])])
    return var
