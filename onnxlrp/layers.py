"""Layers: every node left after canonization that touches data, numbered in topological order."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from ._onnx_utils import const_value
from .emitters import EMITTERS
from .emitters.elementwise import gate_signal
from .errors import UnsupportedModelError

#: Ops whose outputs never carry relevance (shape arithmetic).
NON_DATA_OPS = {"Shape", "Size"}


@dataclass
class Layer:
    index: int
    name: str
    op_type: str
    group: str
    nodes: list                     # forward nodes of this layer (main node first, then a fused bias Add)
    inputs: list                    # data input tensors (relevance flows to these)
    outputs: list                   # output tensors (relevance arrives here)
    emitter: object
    params: object = None           # rules.Params or None
    extra: dict = field(default_factory=dict)

    @property
    def node(self):
        return self.nodes[0]

    @property
    def linear(self) -> bool:
        return bool(self.emitter.linear)

    def shape_str(self) -> str:
        def fmt(t):
            return "(" + ", ".join(str(d) for d in (t.shape or [])) + ")" if t.shape is not None else "?"
        ins = ", ".join(fmt(t) for t in self.inputs)
        outs = ", ".join(fmt(t) for t in self.outputs)
        return f"{ins} -> {outs}"

    def __repr__(self):
        return f"Layer({self.index}, {self.name!r}, {self.op_type})"


#: Ops whose output is non-negative when every data input is.
_KEEPS_SIGN = ("MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "Reshape", "Flatten", "Transpose",
               "Squeeze", "Unsqueeze", "Concat", "Identity", "Dropout")


def _clip_min(node):
    """A Clip's lower bound (an input from opset 11 on, an attribute before), or None."""
    low = const_value(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1].name else node.attrs.get("min")
    return None if low is None else float(np.min(low))


def _nonnegative(tensor, depth=8) -> bool:
    """Whether ``tensor`` is >= 0 by construction: a ReLU's (or a Clip at min >= 0's) output, through
    pooling, reshapes and concatenations."""
    node = tensor.inputs[0] if tensor.inputs else None
    if node is None or depth == 0:
        return False
    if node.op == "Relu":
        return True
    if node.op == "Clip":
        low = _clip_min(node)
        return low is not None and low >= 0
    if node.op in _KEEPS_SIGN:
        data = [t for t in node.inputs[:1 if node.op != "Concat" else None] if not isinstance(t, gs.Constant)]
        return bool(data) and all(_nonnegative(t, depth - 1) for t in data)
    return False


def _zero_below_zero(node) -> bool:
    """A ReLU or Clip(0, ...): its output is 0 wherever its input is <= 0."""
    if node.op == "Relu":
        return True
    if node.op == "Clip":
        return _clip_min(node) == 0
    return False


def data_tensors(graph: gs.Graph, data_input: str) -> set:
    """Names of tensors that depend on the data input through data flow."""
    data = {data_input}
    for node in graph.nodes:
        if node.op in NON_DATA_OPS:
            continue
        if any(t.name in data for t in node.inputs if not isinstance(t, gs.Constant)):
            data.update(t.name for t in node.outputs)
    return data


def _fused_bias(node, emitter):
    """An Add of a constant that only follows ``node`` and that its emitter takes as bias."""
    if not getattr(emitter, "absorbs_bias", False) or len(node.outputs[0].outputs) != 1:
        return None
    nxt = node.outputs[0].outputs[0]
    if nxt.op != "Add":
        return None
    consts = [const_value(t) for t in nxt.inputs]
    if sum(c is not None for c in consts) != 1:
        return None
    return nxt if emitter.bias_fits(node, nxt) else None


def build_layers(graph: gs.Graph, data_input: str, strict=True, gradient=False) -> list:
    """Number the data-carrying nodes of a canonized graph (``data_input`` names the tensor relevance is
    reported at). Raises UnsupportedModelError listing every unsupported node that relevance reaches (with
    strict=False they pass relevance through unchanged instead). Unsupported nodes that relevance never
    reaches (a gate's branch such as the Pow of a tanh-GELU or an RMSNorm's statistics, or nodes that feed
    only other graph outputs) are not layers.

    ``gradient=True`` (the gradient analyzers): every floating-point data operand of a node is a layer
    input, since the derivative flows into a gate's branch and a statistic's too, and a node whose emitter
    cannot differentiate it is unsupported."""
    graph.toposort()
    strict = strict or gradient  # an op passed through unchanged would give a wrong derivative silently
    data = data_tensors(graph, data_input)

    def is_data(t):
        return not isinstance(t, gs.Constant) and t.name in data

    candidates, absorbed = [], set()
    for node in graph.nodes:
        if id(node) in absorbed or node.op in NON_DATA_OPS:
            continue
        if not any(is_data(t) for t in node.inputs):
            continue
        emitter = EMITTERS.get(node.op)
        if emitter is not None and hasattr(emitter, "resolve"):
            emitter = emitter.resolve(node, is_data)
        if emitter is not None and not gradient and node.op in getattr(emitter, "gradient_only", ()):
            emitter = None  # differentiated by the gradient analyzers only
        reason = "no emitter for this op type" if emitter is None else emitter.unsupported_reason(node, is_data)
        nodes = [node]
        if not reason:
            bias = _fused_bias(node, emitter)
            if bias is not None:
                nodes.append(bias)
                absorbed.add(id(bias))
            idx = emitter.data_input_indices(node, is_data)
            if gradient:
                idx = [i for i, t in enumerate(node.inputs) if is_data(t) and _is_float_tensor(t)
                       and (i in idx or not _index_input(node, i))]
        else:
            idx = [i for i, t in enumerate(node.inputs) if is_data(t)]
        candidates.append((nodes, emitter, reason, idx))

    # Which candidates relevance reaches, walking back from the explained output.
    relevant = {graph.outputs[0].name} if graph.outputs else set()
    reached = [False] * len(candidates)
    for k in range(len(candidates) - 1, -1, -1):
        nodes, _, _, idx = candidates[k]
        if any(t.name in relevant for t in nodes[-1].outputs):
            reached[k] = True
            relevant.update(nodes[0].inputs[i].name for i in idx)

    layers, unsupported = [], []
    for (nodes, emitter, reason, idx), hit in zip(candidates, reached):
        node = nodes[0]
        if reason:
            if not hit:
                continue
            unsupported.append((node.name, node.op, reason))
            if strict:
                continue
            from .emitters.elementwise import FALLBACK_PASS
            emitter = FALLBACK_PASS
            idx = emitter.data_input_indices(node, is_data)
        layer = Layer(index=len(layers), name=node.name or f"{node.op}_{len(layers)}", op_type=node.op,
                      group=emitter.group, nodes=nodes, inputs=[node.inputs[i] for i in idx],
                      outputs=list(nodes[-1].outputs), emitter=emitter)
        layer.params = emitter.params(layer)
        if gradient and not reason and emitter.gradient_reason(layer):
            unsupported.append((node.name, node.op, emitter.gradient_reason(layer)))
            continue
        # The signal of a gate (the 0.5 x of a tanh-GELU) is inside a pattern onnxruntime fuses into one
        # kernel; its FastGeluFusion (1.31) drops the tensor even when the relevance pass reads it, so rules
        # compute their own copy of such an output instead of reusing it.
        consumers = layer.outputs[0].outputs
        layer.extra["interior"] = bool(consumers) and all(
            c.op == "Mul" and len(c.inputs) == 2 and gate_signal(c) is not None and
            c.inputs[gate_signal(c)] is layer.outputs[0] for c in consumers)
        layer.extra["nonnegative_input"] = bool(layer.inputs) and all(_nonnegative(t) for t in layer.inputs)
        layer.extra["relu_output"] = bool(consumers) and all(_zero_below_zero(c) for c in consumers) and \
            layer.outputs[0] not in graph.outputs
        layers.append(layer)
    if unsupported and strict:
        raise UnsupportedModelError(unsupported_message(unsupported), unsupported)
    return layers


def _is_float_tensor(tensor) -> bool:
    """Whether a derivative can flow into ``tensor`` (bool masks and integer indices take none)."""
    return tensor.dtype is None or np.issubdtype(np.dtype(tensor.dtype), np.floating)


def _index_input(node, i) -> bool:
    """Operands that select rather than carry values (Where's condition, Gather's indices)."""
    return (node.op == "Where" and i == 0) or (node.op in ("Gather", "GatherElements", "GatherND") and i == 1)


def unsupported_message(unsupported) -> str:
    lines = [f"{len(unsupported)} node(s) are not supported by onnxlrp:"]
    for name, op, reason in unsupported:
        lines.append(f"  - node '{name}' (op type {op}): {reason}")
    lines.append("To extend onnxlrp, register an emitter for the op type "
                 "(see onnxlrp.LRP_CONFIG.register_emitter and onnxlrp/emitters/), or pass "
                 "skip_checks=True to treat unsupported nodes as pass-through (relevance passes unchanged; "
                 "only correct for shape-preserving elementwise ops).")
    return "\n".join(lines)
