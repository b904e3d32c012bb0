"""Pooling: MaxPool / GlobalMaxPool (winner takes all through the pool's own Indices output, scattered
back with ScatterElements(reduction="add") so overlapping windows accumulate), AveragePool /
GlobalAveragePool / ReduceMean (linear maps; their transposes spread the cotangent over each window)."""
from __future__ import annotations

import numpy as np

from .._onnx_utils import const_value
from .base import Emitter, register
from .conv import conv_geometry, transpose_pads


def _spatial_kernel(node):
    return list(node.attrs["kernel_shape"])


@register
class MaxPoolEmitter(Emitter):
    op_types = ("MaxPool", "GlobalMaxPool")
    group = "PoolingLayer"

    def unsupported_reason(self, node, is_data):
        if node.attrs.get("storage_order", 0):
            return "storage_order=1 (column-major indices) is not supported"
        return None

    @staticmethod
    def tiling(ctx, layer):
        """(kh, kw) when the 2-D pool tiles its input exactly (kernel == stride, no padding or dilation,
        no ceil_mode remainder), else None. Such pools keep onnxruntime's fast MaxPool (asking for the
        Indices output forces a generic kernel 20x slower) and find winners with ArgMax per window."""
        node = layer.node
        x_shape = ctx.shape(layer.inputs[0])
        kernel = list(node.attrs.get("kernel_shape", []))
        if len(x_shape) != 4 or len(kernel) != 2 or len(node.outputs) > 1 and node.outputs[1].outputs:
            return None
        if list(node.attrs.get("strides", [1, 1])) != kernel or any(node.attrs.get("pads", [0] * 4)) \
                or any(d != 1 for d in node.attrs.get("dilations", [1, 1])) \
                or node.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET", "VALID", b"VALID"):
            return None
        if any(not isinstance(n, int) or n % k for n, k in zip(x_shape[2:], kernel)):
            return None
        return tuple(kernel)

    def prepare(self, ctx, layer):
        node = layer.node
        if node.op == "GlobalMaxPool":  # a MaxPool over the whole (static) spatial extent
            node.op = "MaxPool"
            node.attrs = {"kernel_shape": list(ctx.shape(layer.inputs[0])[2:])}
        layer.extra["tiling"] = self.tiling(ctx, layer)
        if layer.extra["tiling"] is not None:
            return
        if len(node.outputs) < 2 or not node.outputs[1].name:
            indices = ctx.b.variable("maxpool_indices", np.int64)
            node.outputs = [node.outputs[0], indices]
        layer.extra["indices"] = node.outputs[1]

    def forward(self, ctx, layer, xs, params):
        return ctx.b.op("MaxPool", [xs[0].var], attrs=dict(layer.node.attrs))

    def backward(self, ctx, layer, s, params):
        if layer.extra.get("tiling") is not None:
            return [self._tiled_backward(ctx, layer, s)]
        b = ctx.b
        x = layer.inputs[0]
        x_size = int(np.prod(ctx.shape(x)[1:]))
        y_size = int(np.prod(ctx.shape(layer.outputs[0])[1:]))
        # Per sample: MaxPool's indices count over the whole batch, so take them modulo one sample's size;
        # a batch-first scatter keeps the batch axis visible to shape inference (see reshape_like).
        zeros = b.op("Mul", [b.op("Reshape", [x, b.i64([0, x_size])]), b.const(np.asarray(0, dtype=b.dtype))])
        idx = b.op("Mod", [b.op("Reshape", [layer.extra["indices"], b.i64([0, y_size])]), b.i64(x_size)])
        upd = b.op("Reshape", [s, b.i64([0, y_size])])
        grad = b.op("ScatterElements", [zeros, idx, upd], attrs={"axis": 1, "reduction": "add"})
        return [ctx.reshape_like(grad, x, x)]


    @staticmethod
    def _tiled_backward(ctx, layer, s):
        """Each window's cotangent goes to its first maximum (MaxPool's own tie-break): windows become an
        axis and ArgMax picks the winner. Square windows move with SpaceToDepth, whose window order is the
        pool's row-major scan (on VGG16's first pool, 2x64x224x224, SpaceToDepth and DepthToSpace took 62 ms
        where Reshape-Transpose-Reshape twice took 85 ms); others with Reshape-Transpose."""
        b = ctx.b
        kh, kw = layer.extra["tiling"]
        _, c, h, w = ctx.shape(layer.inputs[0])
        ho, wo = h // kh, w // kw
        if kh == kw:
            windows = b.op("Reshape", [b.op("SpaceToDepth", [layer.inputs[0]], attrs={"blocksize": kh}),
                                       b.i64([-1, kh * kw, c, ho, wo])])
            axis = 1
        else:
            windows = b.op("Reshape", [layer.inputs[0], b.i64([-1, c, ho, kh, wo, kw])])
            windows = b.op("Transpose", [windows], attrs={"perm": [0, 1, 2, 4, 3, 5]})
            windows = b.op("Reshape", [windows, b.i64([-1, c, ho, wo, kh * kw])])
            axis = -1
        if b.dtype == np.float32:
            winner = b.op("ArgMax", [windows], attrs={"axis": axis, "keepdims": 0})  # (N, C, H/kh, W/kw)
            return MaxPoolEmitter._spread_by_upsampling(b, winner, s, kh, kw, h, w)
        # float64: onnxruntime has no double Resize; the one-hot is built in window space and moved back
        winner = b.op("ArgMax", [windows], attrs={"axis": axis, "keepdims": 1})
        if kh == kw:
            onehot = b.op("Cast", [b.op("Equal", [b.i64(np.arange(kh * kw).reshape(1, -1, 1, 1, 1)), winner])],
                          attrs={"to": b.onnx_dtype})
            spread = b.op("Mul", [onehot, b.op("Unsqueeze", [s, b.i64([1])])])
            spread = b.op("Reshape", [spread, b.i64([-1, kh * kw * c, ho, wo])])
            return b.op("DepthToSpace", [spread], attrs={"blocksize": kh, "mode": "DCR"})
        # Equal + Cast: onnxruntime's OneHot is 2.5x slower here (and has no float64 values).
        onehot = b.op("Cast", [b.op("Equal", [b.i64(np.arange(kh * kw)), winner])], attrs={"to": b.onnx_dtype})
        spread = b.op("Mul", [onehot, b.op("Unsqueeze", [s, b.i64([-1])])])
        spread = b.op("Reshape", [spread, b.i64([-1, c, ho, wo, kh, kw])])
        spread = b.op("Transpose", [spread], attrs={"perm": [0, 1, 2, 4, 3, 5]})
        return b.op("Reshape", [spread, b.i64([-1, c, h, w])])

    @staticmethod
    def _spread_by_upsampling(b, winner, s, kh, kw, h, w):
        """The cotangent ``s`` (N, C, H/kh, W/kw) at the winners (each window's position in row-major
        order, same shape), in the input's layout (N, C, H, W): winner and s upsampled by nearest-neighbour
        Resize, s kept where a pixel's position in its window is the winner's. Two upsamplings instead of
        the window-space one-hot and DepthToSpace, whose data movement was the slow part: in VGG16's
        EpsilonGammaBox graph DepthToSpace took 22-23 ms of the kernels' 533 at batch 2 and 303 of 4571 at
        batch 16, the Resizes take 3-8 and 37 ms; the relevance is the same bit for bit."""
        scales = b.const(np.asarray([1, 1, kh, kw], np.float32))

        def upsample(t):  # output pixel (i, j) reads (i // kh, j // kw)
            return b.op("Resize", [t, "", scales], attrs={"mode": "nearest", "nearest_mode": "floor",
                                                          "coordinate_transformation_mode": "asymmetric"})

        position = ((np.arange(h)[:, None] % kh) * kw + np.arange(w)[None, :] % kw).astype(np.float32)
        winner = upsample(b.op("Cast", [winner], attrs={"to": b.onnx_dtype}))
        onehot = b.op("Cast", [b.op("Equal", [winner, b.const(position[None, None])])], attrs={"to": b.onnx_dtype})
        return b.op("Mul", [onehot, upsample(s)])


def _window_counts(size, out, k, s, d, pb, pe):
    """Per output position along one axis: (cells inside the input, cells inside the padded input)."""
    starts = np.arange(out) * s - pb
    pos = starts[:, None] + np.arange(k)[None, :] * d
    inside = ((pos >= 0) & (pos < size)).sum(1)
    padded = ((pos >= -pb) & (pos < size + pe)).sum(1)
    return inside, padded


@register
class AveragePoolEmitter(Emitter):
    op_types = ("AveragePool",)
    group = "PoolingLayer"

    def _geometry(self, ctx, layer):
        x_shape, y_shape = ctx.shape(layer.inputs[0]), ctx.shape(layer.outputs[0])
        kernel = _spatial_kernel(layer.node)
        strides, dilations, begin, end = conv_geometry(layer.node, x_shape[2:], kernel)
        return x_shape, y_shape, kernel, strides, dilations, begin, end

    def forward(self, ctx, layer, xs, params):
        return ctx.b.op("AveragePool", [xs[0].var], attrs=dict(layer.node.attrs))

    def backward(self, ctx, layer, s, params):
        b = ctx.b
        x_shape, y_shape, kernel, strides, dilations, begin, end = self._geometry(ctx, layer)
        include_pad = layer.node.attrs.get("count_include_pad", 0)
        divisor = np.ones((), dtype=np.float64)
        for axis, (size, out, k, st, d, pb, pe) in enumerate(
                zip(x_shape[2:], y_shape[2:], kernel, strides, dilations, begin, end)):
            inside, padded = _window_counts(size, out, k, st, d, pb, pe)
            per_axis = padded if include_pad else inside
            divisor = np.multiply.outer(divisor, np.maximum(per_axis, 1))
        channels = x_shape[1]
        scaled = b.op("Mul", [s, b.const((1.0 / divisor)[None, None].astype(b.dtype))])
        ones = np.ones((channels, 1) + tuple(kernel), dtype=b.dtype)
        pads, output_padding = transpose_pads(x_shape[2:], y_shape[2:], kernel, strides, dilations, begin)
        return [b.op("ConvTranspose", [scaled, b.const(ones)], attrs={
            "strides": strides, "dilations": dilations, "pads": pads, "output_padding": output_padding,
            "group": channels})]


@register
class GlobalAveragePoolEmitter(Emitter):
    op_types = ("GlobalAveragePool",)
    group = "PoolingLayer"

    def forward(self, ctx, layer, xs, params):
        return ctx.b.op("GlobalAveragePool", [xs[0].var])

    def backward(self, ctx, layer, s, params):
        b = ctx.b
        x = layer.inputs[0]
        count = int(np.prod(ctx.shape(x)[2:]))
        spread = ctx.expand_like(s, x)
        return [b.op("Mul", [spread, b.const(np.asarray(1.0 / count, dtype=b.dtype))])]


def reduce_axes(node, rank):
    axes = node.attrs.get("axes")
    if axes is None and len(node.inputs) > 1 and node.inputs[1].name:
        axes = const_value(node.inputs[1])
    if axes is None:
        return list(range(rank))
    return sorted(int(a) % rank for a in np.atleast_1d(axes))


@register
class ReduceMeanEmitter(Emitter):
    """ReduceMean / ReduceSum over any axes but the batch (e.g. a spatial mean in place of
    GlobalAveragePool, the sum pooling of masked token embeddings)."""
    op_types = ("ReduceMean", "ReduceSum")
    group = "PoolingLayer"

    def _scale(self, ctx, layer):
        """1/count for a mean, 1 for a sum."""
        if layer.node.op == "ReduceSum":
            return 1.0
        shape = ctx.shape(layer.inputs[0])
        return 1.0 / int(np.prod([shape[a] for a in reduce_axes(layer.node, len(shape))]))

    def unsupported_reason(self, node, is_data):
        if len(node.inputs) > 1 and node.inputs[1].name and const_value(node.inputs[1]) is None:
            return "the axes are not constant"
        if node.attrs.get("noop_with_empty_axes", 0):
            return "noop_with_empty_axes is not supported"
        return None

    def data_input_indices(self, node, is_data):
        return [0]

    def forward(self, ctx, layer, xs, params):
        b = ctx.b
        axes = reduce_axes(layer.node, len(ctx.shape(layer.inputs[0])))
        keep = layer.node.attrs.get("keepdims", 1)
        total = b.op("ReduceSum", [xs[0].var, b.i64(axes)], attrs={"keepdims": keep})
        scale = self._scale(ctx, layer)
        return total if scale == 1.0 else b.op("Mul", [total, b.const(np.asarray(scale, dtype=b.dtype))])

    def backward(self, ctx, layer, s, params):
        b = ctx.b
        x = layer.inputs[0]
        shape = ctx.shape(x)
        axes = reduce_axes(layer.node, len(shape))
        if 0 in axes:
            raise ValueError(f"node '{layer.name}' ({layer.op_type}) reduces over the batch axis")
        if not layer.node.attrs.get("keepdims", 1):
            s = b.op("Unsqueeze", [s, b.i64(axes)])
        spread = ctx.expand_like(s, x)
        scale = self._scale(ctx, layer)
        return [spread if scale == 1.0 else b.op("Mul", [spread, b.const(np.asarray(scale, dtype=b.dtype))])]
