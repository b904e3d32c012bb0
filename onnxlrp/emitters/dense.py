"""Dense layers: Gemm (canonized to transB=1, alpha=beta=1) and MatMul with a constant weight (+ Add bias)."""
from __future__ import annotations

import numpy as np

from .._onnx_utils import const_value
from ..rules.base import Params
from .attention import BilinearMatMulEmitter
from .base import Emitter, WeightBiasEmitter, register

_BILINEAR = BilinearMatMulEmitter()


@register
class GemmEmitter(WeightBiasEmitter):
    """y = x W^T + b with W of shape (out, in), the layout canonization leaves every Gemm in."""
    op_types = ("Gemm",)
    group = "DenseLayer"
    def layout_reason(self, node):
        a = node.attrs
        if a.get("transA", 0) or not a.get("transB", 0) or a.get("alpha", 1.0) != 1.0 or a.get("beta", 1.0) != 1.0:
            return "Gemm not canonized (run onnxlrp.canonize first)"
        return None

    def params(self, layer):
        weight, bias = self.stored_params(layer.node)
        if bias is not None:
            bias = np.broadcast_to(bias, (weight.shape[0],)).copy()
        return Params(weight, bias)

    def forward(self, ctx, layer, xs, params):
        return ctx.b.op("Gemm", self.operands(ctx, xs[0].var, params), attrs={"transB": 1})

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

    def resolve(self, node, is_data):
        if len(node.inputs) == 2 and all(is_data(t) for t in node.inputs):
            return _BILINEAR  # q kᵀ, probs v: a product of two activations
        return self

    def unsupported_reason(self, node, is_data):
        w = const_value(node.inputs[1])
        if w is None or not is_data(node.inputs[0]):
            return "only x @ W with a constant W, or a product of two data tensors, is supported"
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
        # s Wᵀ as a Gemm with transB on the rows of s: a MatMul would need a transposed copy of W
        b, x = ctx.b, layer.inputs[0]
        weight = b.const(params.weight)
        if len(ctx.shape(x)) == 2:
            return [b.op("Gemm", [s, weight], attrs={"transB": 1})]
        rows = b.op("Reshape", [s, b.i64([-1, params.weight.shape[1]])])
        g = b.op("Gemm", [rows, weight], attrs={"transB": 1})
        tail = ctx._static_tail(x)
        target = b.i64([-1] + tail) if tail is not None else b.op("Shape", [x])
        return [b.op("Reshape", [g, target])]

    def out_channels(self, weight, node):
        return weight.shape[1]

    def fold_affine(self, weight, bias, scale, shift, node):
        b = np.zeros(weight.shape[1]) if bias is None else bias.astype(np.float64)
        return (weight * scale[None, :]).astype(weight.dtype), (b * scale + shift).astype(weight.dtype)
