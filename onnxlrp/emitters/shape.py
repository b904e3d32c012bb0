"""Reshaping ops: relevance is moved, never changed. Each backward is the inverse data movement."""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from .._onnx_utils import const_value
from .base import Emitter, register, unbroadcast


class ReshapingEmitter(Emitter):
    group = "ReshapingLayer"
    linear = False

    def data_input_indices(self, node, is_data):
        return [0]

    def unsupported_reason(self, node, is_data):
        if not is_data(node.inputs[0]):
            return "the data input is not the first input"
        return None

    def gradient_reason(self, layer):
        return None

    def vjp(self, ctx, layer, grads_out):
        # reshapes, transposes, slices, pads, copies and gathers move values without changing them: the
        # relevance pass-through is their transpose already
        return self.pass_through(ctx, layer, grads_out)


@register
class ReshapeEmitter(ReshapingEmitter):
    op_types = ("Flatten", "Reshape", "Squeeze", "Unsqueeze", "Cast", "Identity", "Dropout")

    def unsupported_reason(self, node, is_data):
        if node.op == "Dropout" and len(node.outputs) > 1 and node.outputs[1].outputs:
            return "the dropout mask is used by the graph"
        return super().unsupported_reason(node, is_data)

    def pass_through(self, ctx, layer, relevance_out):
        r = relevance_out[0]
        if r is None:
            return [None]
        if ctx.shape(layer.inputs[0]) == ctx.shape(layer.outputs[0]):
            return [r]
        return [ctx.reshape_like(r, layer.inputs[0], layer.outputs[0])]


@register
class TransposeEmitter(ReshapingEmitter):
    op_types = ("Transpose",)

    def pass_through(self, ctx, layer, relevance_out):
        rank = len(ctx.shape(layer.inputs[0]))
        perm = list(layer.node.attrs.get("perm", list(reversed(range(rank)))))
        inverse = list(np.argsort(perm))
        return [ctx.b.op("Transpose", [relevance_out[0]], attrs={"perm": inverse})]


@register
class ConcatEmitter(ReshapingEmitter):
    op_types = ("Concat",)

    def data_input_indices(self, node, is_data):
        return [i for i, t in enumerate(node.inputs) if is_data(t)]

    def unsupported_reason(self, node, is_data):
        return None

    def pass_through(self, ctx, layer, relevance_out):
        node, b = layer.node, ctx.b
        rank = len(ctx.shape(layer.outputs[0]))
        axis = node.attrs["axis"] % rank
        if axis == 0:
            raise ValueError(f"node '{layer.name}' (Concat) concatenates along the batch axis")
        sizes = [ctx.shape(t)[axis] for t in node.inputs]
        unknown = [i for i, d in enumerate(sizes) if not isinstance(d, (int, np.integer))]
        total = ctx.shape(layer.outputs[0])[axis]
        if len(unknown) == 1 and isinstance(total, (int, np.integer)):
            # e.g. a class token expanded to a run-time shape: its length is what the others leave over
            sizes[unknown[0]] = int(total) - sum(int(d) for i, d in enumerate(sizes) if i != unknown[0])
        elif unknown:
            raise ValueError(f"node '{layer.name}' (Concat) joins inputs of unknown length along axis {axis}")
        parts = b.op("Split", [relevance_out[0], b.i64(sizes)], attrs={"axis": axis}, outputs=len(sizes))
        parts = parts if isinstance(parts, list) else [parts]
        data = {id(t) for t in layer.inputs}
        return [p for t, p in zip(node.inputs, parts) if id(t) in data]


@register
class SplitEmitter(ReshapingEmitter):
    op_types = ("Split",)

    def pass_through(self, ctx, layer, relevance_out):
        b = ctx.b
        rank = len(ctx.shape(layer.inputs[0]))
        axis = layer.node.attrs.get("axis", 0) % rank
        parts = []
        for out, r in zip(layer.outputs, relevance_out):
            if r is None:  # an output no relevance reached: zeros of its shape
                r = b.op("ConstantOfShape", [b.op("Shape", [out])], attrs={"value": gs.Constant("value", np.zeros(1, dtype=b.dtype))})
            parts.append(r)
        return [b.op("Concat", parts, attrs={"axis": axis})]


@register
class SliceEmitter(ReshapingEmitter):
    op_types = ("Slice",)

    def _slice(self, node):
        vals = [const_value(t) if t.name else None for t in node.inputs[1:]]
        return vals + [None] * (4 - len(vals))

    def unsupported_reason(self, node, is_data):
        starts, ends, axes, steps = self._slice(node)
        if starts is None or ends is None or (len(node.inputs) > 3 and node.inputs[3].name and axes is None):
            return "starts/ends/axes are not constants"
        if steps is not None and np.any(np.asarray(steps) != 1):
            return "slices with steps other than 1 are not supported"
        return super().unsupported_reason(node, is_data)

    def pass_through(self, ctx, layer, relevance_out):
        b = ctx.b
        shape = ctx.shape(layer.inputs[0])
        out_shape = ctx.shape(layer.outputs[0])
        starts, ends, axes, _ = self._slice(layer.node)
        rank = len(shape)
        axes = list(range(len(starts))) if axes is None else [int(a) % rank for a in axes]
        begin, end = [0] * rank, [0] * rank
        for a, st, en in zip(axes, starts, ends):
            size = shape[a]
            if not isinstance(size, (int, np.integer)):
                # A symbolic axis (the batch, e.g. a Slice without `axes` that lists every axis) can
                # only be kept whole, x[0:INT_MAX]; it needs no padding.
                if int(st) != 0 or int(en) < 2 ** 31 - 1:
                    raise ValueError(f"node '{layer.name}' (Slice) slices the dynamic axis {a} "
                                     f"({int(st)}:{int(en)})")
                continue
            st = int(st) + size if st < 0 else int(st)
            st = min(max(st, 0), size)
            begin[a] = st
            end[a] = size - st - out_shape[a]
        return [b.op("Pad", [relevance_out[0], b.i64(begin + end)], attrs={"mode": "constant"})]


@register
class PadEmitter(ReshapingEmitter):
    op_types = ("Pad",)

    def unsupported_reason(self, node, is_data):
        mode = node.attrs.get("mode", "constant")
        mode = mode.decode() if isinstance(mode, bytes) else mode
        if mode != "constant":
            return f"Pad mode '{mode}' copies values; only constant padding is supported"
        if len(node.inputs) < 2 or const_value(node.inputs[1]) is None:
            return "the pads are not constant"
        if len(node.inputs) > 3 and node.inputs[3].name:
            return "Pad with an axes input is not supported"
        return super().unsupported_reason(node, is_data)

    def pass_through(self, ctx, layer, relevance_out):
        b = ctx.b
        pads = [int(p) for p in const_value(layer.node.inputs[1])]
        rank = len(pads) // 2
        # Cropping the pads again is a negative pad.
        return [b.op("Pad", [relevance_out[0], b.i64([-p for p in pads[:rank]] + [-p for p in pads[rank:]])],
                     attrs={"mode": "constant"})]


@register
class ExpandEmitter(ReshapingEmitter):
    """Expand copies values along broadcast axes: the copies' relevance is summed back onto the source
    (as the gradient of a copy is the sum of its consumers' gradients)."""
    op_types = ("Expand",)

    def pass_through(self, ctx, layer, relevance_out):
        return [unbroadcast(ctx, relevance_out[0], ctx.shape(layer.outputs[0]), ctx.shape(layer.inputs[0]))]


@register
class GatherEmitter(ReshapingEmitter):
    """Gather of data at constant indices (the class token h[:, 0], the q/k/v unbind of a packed
    projection): relevance goes back to the gathered positions, summed where an index repeats."""
    op_types = ("Gather",)

    def unsupported_reason(self, node, is_data):
        if not is_data(node.inputs[0]) or is_data(node.inputs[1]):
            return "only a Gather of data at indices that do not depend on the data is supported"
        if const_value(node.inputs[1]) is None:
            return "the Gather indices are not constants"
        shape = node.inputs[0].shape
        if shape is None:
            return "the gathered tensor has no inferred shape"
        axis = node.attrs.get("axis", 0) % len(shape)
        if not isinstance(shape[axis], (int, np.integer)):
            # the batch axis (or another dynamic one): after a transpose the batch need not be axis 0
            # (nn.MultiheadAttention unbinds q, k, v along a leading axis of 3)
            return f"a Gather along the dynamic axis {axis} ({shape[axis]}) mixes samples"
        return None

    def pass_through(self, ctx, layer, relevance_out):
        b, node = ctx.b, layer.node
        shape = ctx.shape(layer.inputs[0])
        rank = len(shape)
        axis = node.attrs.get("axis", 0) % rank
        size = shape[axis]  # static: unsupported_reason refuses a dynamic axis
        idx = np.asarray(const_value(node.inputs[1])).astype(np.int64)
        idx = np.where(idx < 0, idx + size, idx)
        r = relevance_out[0]
        if idx.ndim == 0:  # one position: put it back with zeros around it
            r = b.op("Unsqueeze", [r, b.i64([axis])])
            pads = [0] * (2 * rank)
            pads[axis], pads[rank + axis] = int(idx), int(size - idx - 1)
            return [b.op("Pad", [r, b.i64(pads)], attrs={"mode": "constant"})]
        # Several positions: contract the index axis with a one-hot matrix (repeats add up).
        if idx.ndim > 1:
            flat_shape = [0 if i == 0 else d for i, d in enumerate(shape[:axis])] + [idx.size] + list(shape[axis + 1:])
            r = b.op("Reshape", [r, b.i64(flat_shape)])
        onehot = (idx.reshape(-1)[:, None] == np.arange(size)[None, :]).astype(b.dtype)
        letters = "abcdefghijlmnopqrtuvwxyz"[:rank]
        lhs = letters[:axis] + "k" + letters[axis + 1:]
        out = letters[:axis] + "s" + letters[axis + 1:]
        return [b.op("Einsum", [r, b.const(onehot)], attrs={"equation": f"{lhs},ks->{out}"})]
