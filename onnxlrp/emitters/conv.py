"""Conv and ConvTranspose: forward with (modified) weights, backward with the transposed op.

The transpose of a Conv is a ConvTranspose with explicit pads and output_padding (never auto_pad or
output_shape, which onnxruntime's CUDA and CPU kernels treat differently); the transpose of a
ConvTranspose is a Conv with the same weights.
"""
from __future__ import annotations

import math

import numpy as np

from ..rules.base import Params
from .base import WeightBiasEmitter, register


def conv_geometry(node, in_spatial, kernel, out_spatial=None):
    """Explicit (strides, dilations, pads_begin, pads_end) of a Conv/pool node for a static input size."""
    n = len(kernel)
    strides = list(node.attrs.get("strides", [1] * n))
    dilations = list(node.attrs.get("dilations", [1] * n))
    pads = list(node.attrs.get("pads", [0] * (2 * n)))
    auto_pad = node.attrs.get("auto_pad", "NOTSET")
    if isinstance(auto_pad, bytes):
        auto_pad = auto_pad.decode()
    begin, end = pads[:n], pads[n:]
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        begin, end = [], []
        for size, k, s, d in zip(in_spatial, kernel, strides, dilations):
            out = -(-size // s)
            total = max(0, (out - 1) * s + (k - 1) * d + 1 - size)
            small, large = total // 2, total - total // 2
            begin.append(small if auto_pad == "SAME_UPPER" else large)
            end.append(large if auto_pad == "SAME_UPPER" else small)
    elif auto_pad == "VALID":
        begin, end = [0] * n, [0] * n
    return strides, dilations, begin, end


def transpose_pads(in_spatial, out_spatial, kernel, strides, dilations, begin):
    """pads and output_padding of the ConvTranspose that maps an output-sized cotangent back onto an
    input of size in_spatial (windows that ran past the input are cropped, rows no window read get 0)."""
    pads_end, output_padding = [], []
    for size, out, k, s, d, pb in zip(in_spatial, out_spatial, kernel, strides, dilations, begin):
        total = s * (out - 1) + (k - 1) * d + 1 - pb - size
        pads_end.append(max(total, 0))
        output_padding.append(max(-total, 0))
    return list(begin) + pads_end, output_padding


def flipped_transposed_weight(weight, group):
    """(M, C/g, k...) Conv weight -> (C, M/g, k...) weight of the Conv that computes its transpose."""
    m, cg = weight.shape[:2]
    spatial = weight.shape[2:]
    mg, k = m // group, math.prod(spatial)
    # Flipping every spatial axis reverses the flattened kernel. The channel axes are swapped tile by tile:
    # numpy's one strided copy of a large weight misses the cache on every row (2-4x slower).
    src = weight.reshape(group, mg, cg, k)[..., ::-1]
    out = np.empty((group, cg, mg, k), weight.dtype)
    for c0 in range(0, cg, _TILE):
        for m0 in range(0, mg, _TILE):
            out[:, c0:c0 + _TILE, m0:m0 + _TILE] = src[:, m0:m0 + _TILE, c0:c0 + _TILE].swapaxes(1, 2)
    return out.reshape((cg * group, mg) + spatial)


#: channels per side of the tiles flipped_transposed_weight copies
_TILE = 64


@register
class ConvEmitter(WeightBiasEmitter):
    op_types = ("Conv",)
    group = "ConvLayer"

    def params(self, layer):
        return Params(*self.stored_params(layer.node))

    def geometry(self, ctx, layer):
        x_shape = ctx.shape(layer.inputs[0])
        y_shape = ctx.shape(layer.outputs[0])
        kernel = list(layer.params.weight.shape[2:])
        strides, dilations, begin, end = conv_geometry(layer.node, x_shape[2:], kernel)
        return x_shape, y_shape, kernel, strides, dilations, begin, end

    def forward(self, ctx, layer, xs, params):
        _, _, kernel, strides, dilations, begin, end = self.geometry(ctx, layer)
        return ctx.b.op("Conv", self.operands(ctx, xs[0].var, params), attrs={"strides": strides, "dilations": dilations, "pads": begin + end,
                                               "group": layer.node.attrs.get("group", 1)})

    def backward_terms(self, ctx, layer, s, params_list):
        """Several weight sets on one cotangent (ZBox, ZPlus, AlphaBeta) as one convolution with their
        output channels stacked, then split: one pass over s instead of one per term."""
        group = layer.node.attrs.get("group", 1)
        if len(params_list) < 2 or group != 1 or any(p is None for p in params_list):
            return super().backward_terms(ctx, layer, s, params_list)
        stacked = Params(np.concatenate([p.weight for p in params_list], axis=self.stack_axis))
        channels = [p.weight.shape[self.stack_axis] for p in params_list]
        grad = self.backward(ctx, layer, s, stacked)[0]
        parts = ctx.b.op("Split", [grad, ctx.b.i64(channels)], attrs={"axis": 1}, outputs=len(channels))
        return [[part] for part in parts]

    #: the weight axis that indexes the layer's input channels (the transpose's output channels)
    stack_axis = 1

    def backward(self, ctx, layer, s, params):
        x_shape, y_shape, kernel, strides, dilations, begin, end = self.geometry(ctx, layer)
        group = layer.node.attrs.get("group", 1)
        full = [d * (k - 1) for k, d in zip(kernel, dilations)]
        if all(st == 1 for st in strides) and all(0 <= p <= f for p, f in zip(begin + end, full + full)):
            # Stride 1: the transpose is itself a convolution with the kernel flipped and its channel
            # axes swapped; onnxruntime's Conv kernels run it up to 2x faster than ConvTranspose.
            flipped = ctx.b.const(flipped_transposed_weight(params.weight, group))
            pads = [f - p for f, p in zip(full, begin)] + [f - p for f, p in zip(full, end)]
            return [ctx.b.op("Conv", [s, flipped], attrs={"dilations": dilations, "pads": pads, "group": group})]
        pads, output_padding = transpose_pads(x_shape[2:], y_shape[2:], kernel, strides, dilations, begin)
        grad = ctx.b.op("ConvTranspose", [s, ctx.b.const(params.weight)],
                        attrs={"strides": strides, "dilations": dilations, "pads": pads,
                               "output_padding": output_padding, "group": layer.node.attrs.get("group", 1)})
        return [grad]

    # -- used by canonization: fold a per-output-channel affine map into weight and bias --------------
    def fold_affine(self, weight, bias, scale, shift, node):
        shape = [-1] + [1] * (weight.ndim - 1)
        new_w = weight * scale.reshape(shape).astype(weight.dtype)
        b = np.zeros(weight.shape[0], dtype=np.float64) if bias is None else bias.astype(np.float64)
        return new_w.astype(weight.dtype), (b * scale + shift).astype(weight.dtype)

    def out_channels(self, weight, node):
        return weight.shape[0]


@register
class ConvTransposeEmitter(ConvEmitter):
    op_types = ("ConvTranspose",)
    stack_axis = 0  # its transpose is a Conv whose output channels are the weight's first axis

    def geometry(self, ctx, layer):
        # Roles swap: the layer's output is the transpose's "input" side.
        x_shape = ctx.shape(layer.inputs[0])
        y_shape = ctx.shape(layer.outputs[0])
        node = layer.node
        kernel = list(layer.params.weight.shape[2:])
        n = len(kernel)
        strides = list(node.attrs.get("strides", [1] * n))
        dilations = list(node.attrs.get("dilations", [1] * n))
        pads = node.attrs.get("pads")
        # output_shape overrides explicit pads (ONNX and onnxruntime ignore them then).
        if pads is None or "output_shape" in node.attrs or \
                node.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET"):
            # Derive the cropping from the shapes shape inference gave us.
            totals = [s * (i - 1) + (k - 1) * d + 1 - o for i, o, k, s, d in
                      zip(x_shape[2:], y_shape[2:], kernel, strides, dilations)]
            auto_pad = node.attrs.get("auto_pad", "NOTSET")
            # ONNX: only SAME_UPPER puts the smaller half of the padding first; SAME_LOWER and an
            # explicit output_shape (auto_pad NOTSET) put the larger half first.
            upper = auto_pad in ("SAME_UPPER", b"SAME_UPPER")
            begin = [max(t, 0) // 2 if upper else max(t, 0) - max(t, 0) // 2 for t in totals]
            end = [max(t, 0) - bgn for t, bgn in zip(totals, begin)]
        else:
            begin, end = list(pads[:n]), list(pads[n:])
        return x_shape, y_shape, kernel, strides, dilations, begin, end

    def forward(self, ctx, layer, xs, params):
        x_shape, y_shape, kernel, strides, dilations, begin, end = self.geometry(ctx, layer)
        inputs = self.operands(ctx, xs[0].var, params)
        # The output_padding that gives the layer's own output size with these pads (the node's own
        # attribute does not apply to pads derived from auto_pad/output_shape).
        output_padding = [o - (s * (i - 1) + (k - 1) * d + 1 - b - e) for i, o, k, s, d, b, e in
                          zip(x_shape[2:], y_shape[2:], kernel, strides, dilations, begin, end)]
        return ctx.b.op("ConvTranspose", inputs, attrs={
            "strides": strides, "dilations": dilations, "pads": begin + end,
            "output_padding": output_padding, "group": layer.node.attrs.get("group", 1)})

    def backward(self, ctx, layer, s, params):
        _, _, _, strides, dilations, begin, end = self.geometry(ctx, layer)
        # Output cells that only output_padding created see no input: the Conv's end pads cover them.
        return [ctx.b.op("Conv", [s, ctx.b.const(params.weight)],
                         attrs={"strides": strides, "dilations": dilations, "pads": begin + end,
                                "group": layer.node.attrs.get("group", 1)})]

    def out_channels(self, weight, node):
        return weight.shape[1] * node.attrs.get("group", 1)

    def fold_affine(self, weight, bias, scale, shift, node):
        g = node.attrs.get("group", 1)
        cin, cout_g = weight.shape[0], weight.shape[1]
        w = weight.reshape((g, cin // g, cout_g) + weight.shape[2:])
        s = scale.reshape((g, 1, cout_g) + (1,) * (weight.ndim - 2))
        new_w = (w * s).reshape(weight.shape)
        b = np.zeros(cout_g * g, dtype=np.float64) if bias is None else bias.astype(np.float64)
        return new_w.astype(weight.dtype), (b * scale + shift).astype(weight.dtype)


