"""Canonization: bring a loaded graph into the form LRP rules are defined on.

- Identity, Dropout and reshapes that keep the shape (tf2onnx's) are dropped; a zero Pad before a Conv
  becomes the Conv's pads (Keras' ZeroPadding2D).
- Softmax/LogSoftmax producing a graph output are stripped (never inside the graph).
- Gemm gets transB=1, alpha=beta=1 (transA becomes a Transpose layer).
- BatchNormalization, and Mul/Div/Add/Sub by per-channel constants (Caffe2-style chains
  Conv -> BatchNorm -> Mul -> Add), are fused into the preceding Conv/ConvTranspose/Gemm/MatMul,
  BatchNorm's epsilon included. A BatchNorm that cannot be fused stays as a NormalizationLayer.
- LayerNormalization is split into the normalization and a Scale (per-feature affine) layer.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ._onnx_utils import const_value, producer
from .emitters import EMITTERS
from .emitters.base import per_channel
from .emitters.norm import batchnorm_affine

_counter = [0]


def _fresh(name):
    _counter[0] += 1
    return f"{name}__lrp{_counter[0]}"


def _set_inputs(node, inputs):
    """Replace a node's inputs (gs keeps tensor->consumer links in sync only through clear/append)."""
    inputs = list(inputs)
    node.inputs.clear()
    node.inputs.extend(inputs)


def _bypass(graph, node, keep):
    """Remove ``node``: its (first) output is replaced by ``keep`` everywhere, graph outputs included."""
    out = node.outputs[0]
    for consumer in list(out.outputs):
        for i, t in enumerate(consumer.inputs):
            if t is out:
                consumer.inputs[i] = keep
    for i, t in enumerate(graph.outputs):
        if t is out:
            keep.dtype = keep.dtype or out.dtype
            graph.outputs[i] = keep
    node.inputs.clear()
    node.outputs.clear()


def _same_shape(a, b):
    """Whether two tensors are known to have the same shape (static sizes after a shared batch axis)."""
    if a.shape is None or b.shape is None or len(a.shape) != len(b.shape) or not len(a.shape):
        return False
    tail_a, tail_b = list(a.shape[1:]), list(b.shape[1:])
    return a.shape[0] == b.shape[0] and tail_a == tail_b and all(isinstance(d, (int, np.integer)) for d in tail_a)


def remove_passthrough(graph) -> None:
    """Drop Identity, inference Dropout, and reshapes that keep the shape: tf2onnx puts a Reshape to
    [-1, C, 1, 1] after every convolution that reaches 1x1, which would keep its BatchNorm from fusing."""
    for node in list(graph.nodes):
        if node.op == "Identity" or (node.op == "Dropout" and not any(o.outputs for o in node.outputs[1:])) or \
                (node.op in ("Reshape", "Flatten", "Squeeze", "Unsqueeze") and node.outputs and
                 _same_shape(node.inputs[0], node.outputs[0])):
            if node.inputs and not isinstance(node.inputs[0], gs.Constant):
                _bypass(graph, node, node.inputs[0])
    graph.cleanup(remove_unused_graph_inputs=False)


_SHAPE_ONLY = ("Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity")


def strip_softmax_outputs(graph) -> list:
    """Strip Softmax/LogSoftmax nodes whose output is a graph output, also through reshapes after them
    (opset < 13 softmax over 4-D tensors converts to Flatten -> Softmax -> Reshape). Never inside the
    graph. Returns the stripped node names."""
    stripped = []
    for i, out in enumerate(list(graph.outputs)):
        node = producer(out)
        while node is not None and node.op in _SHAPE_ONLY and len(node.inputs[0].outputs) == 1:
            node = producer(node.inputs[0])
        if node is None or node.op not in ("Softmax", "LogSoftmax") or len(node.outputs[0].outputs) > 1:
            continue
        logits = node.inputs[0]
        logits.dtype = logits.dtype or out.dtype
        if node.outputs[0] is out:
            graph.outputs[i] = logits
        else:
            _bypass(graph, node, logits)
        stripped.append(node.name or node.op)
    graph.cleanup(remove_unused_graph_inputs=False)
    return stripped


def normalize_gemm(graph) -> None:
    for node in graph.nodes:
        if node.op != "Gemm":
            continue
        w = const_value(node.inputs[1])
        if w is None:
            continue
        a = node.attrs
        alpha, beta = float(a.get("alpha", 1.0)), float(a.get("beta", 1.0))
        weight = w if a.get("transB", 0) else w.T
        if alpha != 1.0 or w.dtype.kind != "f":  # x * 1.0 is x: the weight (VGG16's 400 MB) is not copied
            weight = np.multiply(weight, alpha, order="C").astype(w.dtype, copy=False)
        node.inputs[1] = gs.Constant(_fresh(node.inputs[1].name), np.ascontiguousarray(weight))
        if len(node.inputs) > 2 and node.inputs[2].name:
            c = const_value(node.inputs[2])
            if c is not None:
                c = np.asarray(c) * beta
                if c.ndim == 2 and c.shape[0] == 1:
                    c = c[0]
                node.inputs[2] = gs.Constant(_fresh(node.inputs[2].name), c.astype(w.dtype))
        if a.get("transA", 0):
            x = node.inputs[0]
            # Give the new tensor its shape: the rewriter needs static shapes of every layer input and
            # the analyzer only re-runs shape inference when the input shape changes.
            xt = gs.Variable(_fresh(x.name + "_T"), dtype=x.dtype,
                             shape=None if x.shape is None else list(reversed(x.shape)))
            graph.nodes.append(gs.Node("Transpose", name=_fresh("transA"), attrs={"perm": [1, 0]},
                                       inputs=[x], outputs=[xt]))
            node.inputs[0] = xt
        node.attrs = {"transB": 1}
    graph.toposort()


def _affine_of(node, rank, axis, channels):
    """(scale, shift) per channel of a BatchNorm or a Mul/Div/Add/Sub by a constant, else None."""
    if node.op == "BatchNormalization":
        if axis != 1 or any(const_value(t) is None for t in node.inputs[1:5]) or len(
                [o for o in node.outputs if o.outputs]) > 1 or node.attrs.get("training_mode", 0):
            return None
        scale, shift = batchnorm_affine(node)
        if scale.shape[0] != channels:
            return None
        return scale, shift
    if node.op not in ("Mul", "Div", "Add", "Sub") or len(node.inputs) != 2:
        return None
    consts = [const_value(t) for t in node.inputs]
    if sum(c is not None for c in consts) != 1:
        return None
    i = 0 if consts[1] is not None else 1
    vec = per_channel(consts[1 - i], rank, axis, channels)
    if vec is None:
        return None
    vec = vec.astype(np.float64)
    ones, zeros = np.ones(channels), np.zeros(channels)
    if node.op == "Mul":
        return vec, zeros
    if node.op == "Div":
        return (1.0 / vec, zeros) if i == 0 else None
    if node.op == "Add":
        return ones, vec
    return (ones, -vec) if i == 0 else (-ones, vec)


def _linear_params(node):
    w = const_value(node.inputs[1]) if len(node.inputs) > 1 else None
    b = const_value(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2].name else None
    if node.op == "Gemm" and b is not None:
        b = np.broadcast_to(b, (w.shape[0],))
    return w, b


def fuse_affine(graph) -> int:
    """Fold per-channel affine nodes into the linear layer before them. Returns how many were fused."""
    fused, changed = 0, True
    while changed:
        changed = False
        for node in list(graph.nodes):
            if node.op not in ("Conv", "ConvTranspose", "Gemm", "MatMul") or not node.outputs:
                continue
            emitter = EMITTERS[node.op]
            w, b = _linear_params(node)
            if w is None or (node.op == "MatMul" and w.ndim != 2):
                continue
            if node.op == "Gemm" and not node.attrs.get("transB", 0):
                continue
            out = node.outputs[0]
            if len(out.outputs) != 1 or out in graph.outputs or out.shape is None:
                continue
            nxt = out.outputs[0]
            if nxt.inputs[0] is not out and nxt.op in ("BatchNormalization", "Div"):
                continue
            if node.op == "MatMul" and nxt.op == "Add":
                continue  # that Add is the MatMul's bias; later affine nodes merge into it below
            rank = len(out.shape)
            axis = 1 if node.op in ("Conv", "ConvTranspose", "Gemm") else rank - 1
            channels = emitter.out_channels(w, node)
            affine = _affine_of(nxt, rank, axis, channels)
            if affine is None:
                continue
            new_w, new_b = emitter.fold_affine(w, b, affine[0], affine[1], node)
            node.inputs[1] = gs.Constant(_fresh(node.inputs[1].name), np.ascontiguousarray(new_w))
            if node.op == "MatMul":
                # A MatMul's bias is an Add after it: turn the affine node into that Add.
                nxt.op, nxt.attrs = "Add", {}
                _set_inputs(nxt, [out, gs.Constant(_fresh("bias"), new_b)])
                # Merge with an Add of a constant that may follow (MatMul -> Add -> Mul -> ...).
            else:
                bias = gs.Constant(_fresh((node.name or node.op) + "_bias"), new_b)
                if len(node.inputs) > 2:
                    node.inputs[2] = bias
                else:
                    node.inputs.append(bias)
                _bypass(graph, nxt, out)
            fused += 1
            changed = True
        graph.cleanup(remove_unused_graph_inputs=False)
    _merge_matmul_bias_chains(graph)
    return fused


def _merge_matmul_bias_chains(graph):
    """MatMul -> Add(c1) -> Add(c2) / Mul(c) chains: fold the later affine node into the first Add."""
    changed = True
    while changed:
        changed = False
        for node in list(graph.nodes):
            if node.op != "MatMul" or const_value(node.inputs[1]) is None or len(node.outputs[0].outputs) != 1:
                continue
            add = node.outputs[0].outputs[0]
            if add.op != "Add" or node.outputs[0] in graph.outputs:
                continue
            consts = [const_value(t) for t in add.inputs]
            if sum(c is not None for c in consts) != 1 or add.outputs[0] in graph.outputs:
                continue
            if len(add.outputs[0].outputs) != 1 or add.outputs[0].shape is None:
                continue
            w = const_value(node.inputs[1])
            bias = next(c for c in consts if c is not None)
            channels = w.shape[1]
            rank = len(add.outputs[0].shape)
            bvec = per_channel(bias, rank, rank - 1, channels)
            affine = _affine_of(add.outputs[0].outputs[0], rank, rank - 1, channels)
            if bvec is None or affine is None:
                continue
            nxt = add.outputs[0].outputs[0]
            scale, shift = affine
            node.inputs[1] = gs.Constant(_fresh(node.inputs[1].name), (w * scale[None, :]).astype(w.dtype))
            _set_inputs(add, [node.outputs[0], gs.Constant(_fresh("bias"), (bvec * scale + shift).astype(w.dtype))])
            _bypass(graph, nxt, add.outputs[0])
            changed = True
        graph.cleanup(remove_unused_graph_inputs=False)


def _reduce_mean_axes(node, rank):
    from .emitters.pool import reduce_axes
    if node is None or node.op != "ReduceMean" or not node.attrs.get("keepdims", 1):
        return None
    if len(node.inputs) > 1 and node.inputs[1].name and const_value(node.inputs[1]) is None:
        return None
    return reduce_axes(node, rank)


def fuse_decomposed_layernorm(graph) -> int:
    """Pre-opset-17 exports spell LayerNorm out: (x - mean(x)) / sqrt(mean((x - mean(x))^2) + eps).
    Replace that pattern with one LayerNormalization node (its scale/bias Mul/Add stay and become the
    Scale layer)."""
    count = 0
    for div in list(graph.nodes):
        if div.op != "Div" or len(div.inputs) != 2:
            continue
        centered, std = div.inputs
        sub, sqrt = producer(centered), producer(std)
        if sub is None or sqrt is None or sub.op != "Sub" or sqrt.op != "Sqrt":
            continue
        x, mean = sub.inputs
        rank = len(x.shape) if x.shape is not None else None
        if rank is None or producer(mean) is None or producer(mean).inputs[0] is not x:
            continue
        axes = _reduce_mean_axes(producer(mean), rank)
        add = producer(sqrt.inputs[0])
        if axes is None or add is None or add.op != "Add":
            continue
        eps_values = [const_value(t) for t in add.inputs]
        var_in = [t for t, c in zip(add.inputs, eps_values) if c is None]
        eps = [c for c in eps_values if c is not None]
        if len(var_in) != 1 or len(eps) != 1 or np.size(eps[0]) != 1:
            continue
        var = producer(var_in[0])
        if _reduce_mean_axes(var, rank) != axes:
            continue
        square = producer(var.inputs[0])
        if square is None or not (
                (square.op == "Pow" and square.inputs[0] is centered and np.all(const_value(square.inputs[1]) == 2))
                or (square.op == "Mul" and square.inputs[0] is centered and square.inputs[1] is centered)):
            continue
        if axes != list(range(axes[0], rank)) or x.shape is None or any(
                not isinstance(d, int) for d in x.shape[axes[0]:]):
            continue
        dtype = np.dtype(x.dtype or np.float32)
        ones = gs.Constant(_fresh("ln_ones"), np.ones(x.shape[axes[0]:], dtype=dtype))
        out = div.outputs[0]
        div.outputs.clear()
        graph.nodes.append(gs.Node("LayerNormalization", name=_fresh("layernorm"), inputs=[x, ones], outputs=[out],
                                   attrs={"axis": axes[0], "epsilon": float(np.asarray(eps[0]).reshape(()))}))
        count += 1
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    return count


def split_layernorm(graph) -> int:
    """LayerNormalization(x, scale, bias) -> LayerNormalization(x, 1, 0) then Mul(scale) + Add(bias)."""
    count = 0
    for node in list(graph.nodes):
        if node.op != "LayerNormalization" or const_value(node.inputs[1]) is None:
            continue
        scale = const_value(node.inputs[1])
        bias = const_value(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2].name else None
        if np.all(scale == 1) and (bias is None or np.all(bias == 0)):
            continue
        out = node.outputs[0]
        normalized = gs.Variable(_fresh(out.name + "_normalized"), dtype=out.dtype, shape=out.shape)
        node.outputs[0] = normalized
        _set_inputs(node, [node.inputs[0], gs.Constant(_fresh("ln_ones"), np.ones_like(scale))])
        if bias is None:
            graph.nodes.append(gs.Node("Mul", name=_fresh((node.name or "ln") + "_scale"),
                                       inputs=[normalized, gs.Constant(_fresh("ln_scale"), scale)], outputs=[out]))
        else:
            scaled = gs.Variable(_fresh(out.name + "_scaled"), dtype=out.dtype, shape=out.shape)
            graph.nodes.append(gs.Node("Mul", name=_fresh((node.name or "ln") + "_scale"),
                                       inputs=[normalized, gs.Constant(_fresh("ln_scale"), scale)],
                                       outputs=[scaled]))
            graph.nodes.append(gs.Node("Add", name=_fresh((node.name or "ln") + "_bias"),
                                       inputs=[scaled, gs.Constant(_fresh("ln_bias"), bias)], outputs=[out]))
        count += 1
    graph.toposort()
    return count


def _zero_spatial_pads(node, rank):
    """(begin, end) spatial pads of a constant-zero Pad on an (N, C, ...) tensor, or None."""
    if node.attrs.get("mode", "constant") not in ("constant", b"constant"):
        return None
    pads = const_value(node.inputs[1]) if len(node.inputs) > 1 else None  # an input from opset 11 (loaded >= 17)
    if pads is None or len(pads) != 2 * rank or np.any(pads < 0):
        return None
    if len(node.inputs) > 2 and node.inputs[2].name:
        value = const_value(node.inputs[2])
        if value is None or np.any(value != 0):
            return None
    if len(node.inputs) > 3 and node.inputs[3].name:  # axes (opset 18)
        return None
    pads = [int(p) for p in pads]
    if any(pads[:2]) or any(pads[rank:rank + 2]):
        return None  # pads on the batch or channel axis
    return pads[2:rank], pads[rank + 2:]


def fuse_pad_into_conv(graph) -> int:
    """Zero Pad -> Conv becomes one Conv with those pads (Keras' ZeroPadding2D, tf2onnx's explicit Pad):
    rules that act on the convolution's input then see it as in PyTorch exports (ZBox pads its bounds with
    zeros, as the convolution pads its input)."""
    fused = 0
    for node in list(graph.nodes):
        if node.op != "Conv" or node.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET"):
            continue
        pad = producer(node.inputs[0])
        if pad is None or pad.op != "Pad" or len(pad.outputs[0].outputs) != 1 or pad.outputs[0] in graph.outputs:
            continue
        x = pad.inputs[0]
        if x.shape is None:
            continue
        found = _zero_spatial_pads(pad, len(x.shape))
        if found is None:
            continue
        n = len(x.shape) - 2
        own = list(node.attrs.get("pads", [0] * (2 * n)))
        begin, end = found
        node.attrs["pads"] = [a + b for a, b in zip(own, list(begin) + list(end))]
        node.inputs[0] = x
        pad.outputs[0].inputs.clear()
        fused += 1
    graph.cleanup(remove_unused_graph_inputs=False)
    return fused


def canonize_graph(graph, strip_softmax=True) -> dict:
    """Canonize a loaded gs graph in place. Returns a summary of what changed."""
    remove_passthrough(graph)
    fuse_pad_into_conv(graph)
    stripped = strip_softmax_outputs(graph) if strip_softmax else []
    normalize_gemm(graph)
    fused = fuse_affine(graph)
    decomposed = fuse_decomposed_layernorm(graph)
    split = split_layernorm(graph)
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    return {"stripped_softmax": stripped, "fused_affine": fused, "fused_layernorm_patterns": decomposed,
            "split_layernorm": split}
