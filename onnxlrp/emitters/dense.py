"""Dense layers: Gemm (canonized to transB=1, alpha=beta=1) and MatMul with a constant weight (+ Add bias)."""
from __future__ import annotations

import numpy as np

from .._onnx_utils import const_value
from ..rules.base import Params
from .base import Emitter, register


@register
class GemmEmitter(Emitter):
    """y = x W^T + b with W of shape (out, in), the layout canonization leaves every Gemm in."""
    op_types = ("Gemm",)
    group = "DenseLayer"
    out_axis = 0

    def unsupported_reason(self, node, is_data):
        if const_value(node.inputs[1]) is None:
            return "the weight (input B) is not a constant"
        if len(node.inputs) > 2 and node.inputs[2].name and const_value(node.inputs[2]) is None:
            return "the bias (input C) is not a constant"
        if not is_data(node.inputs[0]):
            return "the data input is not input A"
        a = node.attrs
        if a.get("transA", 0) or not a.get("transB", 0) or a.get("alpha", 1.0) != 1.0 or a.get("beta", 1.0) != 1.0:
            return "Gemm not canonized (run onnxlrp.canonize first)"
        return None

    def data_input_indices(self, node, is_data):
        return [0]

    def params(self, layer):
        node = layer.node
        bias = const_value(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2].name else None
        if bias is not None:
            bias = np.broadcast_to(bias, (const_value(node.inputs[1]).shape[0],)).copy()
        return Params(const_value(node.inputs[1]), bias)

    def forward(self, ctx, layer, xs, params):
        inputs = [xs[0].var, ctx.b.const(params.weight)]
        if params.bias is not None:
            inputs.append(ctx.b.const(params.bias))
        return ctx.b.op("Gemm", inputs, attrs={"transB": 1})

    def backward(self, ctx, layer, s, params):
        return [ctx.b.op("MatMul", [s, ctx.b.const(params.weight)])]

    def out_channels(self, weight, node):
        return weight.shape[0]

    def fold_affine(self, weight, bias, scale, shift, node):
        b = np.zeros(weight.shape[0]) if bias is None else bias.astype(np.float64)
        return (weight * scale[:, None]).astype(weight.dtype), (b * scale + shift).astype(weight.dtype)


@register
class MatMulEmitter(Emitter):
    """y = x @ W (+ b) for x of any rank and a constant W of shape (in, out); a following Add of a
    constant per-output vector is the layer's bias."""
    op_types = ("MatMul",)
    group = "DenseLayer"
    absorbs_bias = True

    def unsupported_reason(self, node, is_data):
        w = const_value(node.inputs[1])
        if w is None or not is_data(node.inputs[0]):
            return "only x @ W with a constant W is a layer (a product of two data tensors is not supported)"
        if w.ndim != 2:
            return f"the constant weight has rank {w.ndim}, expected 2"
        return None

    def data_input_indices(self, node, is_data):
        return [0]

    def bias_fits(self, node, add):
        w = const_value(node.inputs[1])
        c = next(const_value(t) for t in add.inputs if const_value(t) is not None)
        return c.size in (1, w.shape[1]) and (c.ndim == 0 or c.shape[-1] in (1, w.shape[1])) \
            and all(d == 1 for d in c.shape[:-1])

    def params(self, layer):
        w = const_value(layer.node.inputs[1])
        bias = None
        if len(layer.nodes) > 1:
            c = next(const_value(t) for t in layer.nodes[1].inputs if const_value(t) is not None)
            bias = np.broadcast_to(c.reshape(-1), (w.shape[1],)).astype(w.dtype)
        return Params(w, bias)

    def forward(self, ctx, layer, xs, params):
        y = ctx.b.op("MatMul", [xs[0].var, ctx.b.const(params.weight)])
        if params.bias is not None:
            y = ctx.b.op("Add", [y, ctx.b.const(params.bias)])
        return y

    def backward(self, ctx, layer, s, params):
        return [ctx.b.op("MatMul", [s, ctx.b.const(np.ascontiguousarray(params.weight.T))])]

    def out_channels(self, weight, node):
        return weight.shape[1]

    def fold_affine(self, weight, bias, scale, shift, node):
        b = np.zeros(weight.shape[1]) if bias is None else bias.astype(np.float64)
        return (weight * scale[None, :]).astype(weight.dtype), (b * scale + shift).astype(weight.dtype)
