"""Elementwise ops: activations (pass relevance through), sums of tensors (merges, e.g. residual adds),
affine maps by constants (Mul/Div/Add/Sub by a constant: Scale layers) and gates (x * f(x), e.g. SiLU
or the Erf-GELU pattern: relevance goes to x)."""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from .._onnx_utils import const_value
from ..rules.base import Params
from .attention import ElementwiseProductEmitter, RuntimeScaleEmitter
from .base import Emitter, register, unbroadcast

ACTIVATIONS = ("Relu", "LeakyRelu", "PRelu", "Clip", "Sigmoid", "Tanh", "Elu", "Selu", "Celu", "Softplus",
               "Softsign", "HardSigmoid", "HardSwish", "Gelu", "Erf", "Mish", "ThresholdedRelu", "Swish",
               "LRN", "Relu6")


@register
class ActivationEmitter(Emitter):
    op_types = tuple(a for a in ACTIVATIONS if a != "LRN")
    group = "ActivationLayer"
    linear = False

    def data_input_indices(self, node, is_data):
        return [0] if is_data(node.inputs[0]) else []

    def unsupported_reason(self, node, is_data):
        if not is_data(node.inputs[0]):
            return "the data input is not the first input"
        return None


@register
class LRNEmitter(ActivationEmitter):
    """Local response normalization: shape-preserving, relevance passes through."""
    op_types = ("LRN",)
    group = "NormalizationLayer"


class PassFallbackEmitter(ActivationEmitter):
    """Used for unsupported nodes when checks are skipped: relevance of the output goes to the first
    data input as it is (reshaped when sizes agree)."""
    op_types = ()
    group = "ActivationLayer"

    def data_input_indices(self, node, is_data):
        return [i for i, t in enumerate(node.inputs) if is_data(t)][:1]

    def pass_through(self, ctx, layer, relevance_out):
        r = relevance_out[0]
        if r is None:
            return [None]
        return [ctx.reshape_like(r, layer.inputs[0], layer.outputs[0])]


FALLBACK_PASS = PassFallbackEmitter()


def _split_const(node):
    """(data index, constant value) of a binary node with exactly one constant operand, else (None, None)."""
    consts = [const_value(t) for t in node.inputs]
    if len(node.inputs) == 2 and sum(c is not None for c in consts) == 1:
        i = 0 if consts[1] is not None else 1
        return i, consts[1 - i]
    return None, None


class MergeEmitter(Emitter):
    """Add/Sum/Sub of several data tensors: z = sum_i c_i x_i, relevance split by contribution."""
    op_types = ()
    group = "MergeLayer"

    def signs(self, node):
        return [1.0, -1.0] if node.op == "Sub" else [1.0] * len(node.inputs)

    def data_input_indices(self, node, is_data):
        return list(range(len(node.inputs)))

    def unsupported_reason(self, node, is_data):
        # Operands computed from another graph input (not the explained one) are allowed: like a bias
        # they absorb their share of the relevance (no layer consumes it).
        if any(const_value(t) is not None for t in node.inputs):
            return "mixes data tensors and constants in a way onnxlrp does not split"
        return None

    def forward(self, ctx, layer, xs, params):
        if layer.node.op == "Sub":
            return ctx.b.op("Sub", [xs[0].var, xs[1].var])
        return ctx.b.op("Sum", [x.var for x in xs])

    def backward(self, ctx, layer, s, params):
        out_shape = ctx.shape(layer.outputs[0])
        grads = []
        for x, sign in zip(layer.inputs, self.signs(layer.node)):
            g = unbroadcast(ctx, s, out_shape, ctx.shape(x))
            grads.append(ctx.b.op("Neg", [g]) if sign < 0 else g)
        return grads

    def pass_through(self, ctx, layer, relevance_out):
        raise ValueError(f"PassRule cannot split relevance over the {len(layer.inputs)} inputs of "
                         f"node '{layer.name}' ({layer.op_type}); use ZeroRule or EpsilonRule")


class ScaleEmitter(Emitter):
    """x * w + b with constants w, b (Mul/Div/Add/Sub by a constant; an Add of a constant right after a
    Mul is its bias). Parameters are the broadcastable constants themselves."""
    op_types = ()
    group = "ScaleLayer"
    absorbs_bias = True

    def data_input_indices(self, node, is_data):
        return [i for i, t in enumerate(node.inputs) if is_data(t)]

    def bias_fits(self, node, add):
        return node.op in ("Mul", "Div")

    def params(self, layer):
        node = layer.node
        i, c = _split_const(node)
        dtype = c.dtype
        c = c.astype(np.float64)
        if node.op == "Mul":
            weight, bias = c, None
        elif node.op == "Div":
            weight, bias = 1.0 / c, None
        elif node.op == "Add":
            weight, bias = np.ones((), dtype=np.float64), c
        else:  # Sub: x - c or c - x
            weight, bias = (np.ones(()), -c) if i == 0 else (-np.ones(()), c)
        if len(layer.nodes) > 1:
            extra = _split_const(layer.nodes[1])[1].astype(np.float64)
            bias = extra if bias is None else bias * weight + extra
        return Params(np.asarray(weight, dtype=dtype), None if bias is None else np.asarray(bias, dtype=dtype))

    def unsupported_reason(self, node, is_data):
        i, c = _split_const(node)
        if i is None:
            return "expected one data and one constant operand"
        if node.op == "Div" and i == 1:
            return "division of a constant by data is not linear"
        return None

    def forward(self, ctx, layer, xs, params):
        b = ctx.b
        y = b.op("Mul", [xs[0].var, b.const(params.weight)])
        if params.bias is not None:
            y = b.op("Add", [y, b.const(params.bias)])
        return y

    def backward(self, ctx, layer, s, params):
        g = ctx.b.op("Mul", [s, ctx.b.const(params.weight)])
        return [unbroadcast(ctx, g, ctx.shape(layer.outputs[0]), ctx.shape(layer.inputs[0]))]


#: Ops with parameters: a branch through one of them is a computation of its own (squeeze-excite), not
#: an activation or a statistic of the signal.
_PARAMETRIC = ("Conv", "ConvTranspose", "Gemm", "MatMul", "Einsum")


def _depends_only_on(tensor, source, limit=64):
    """Whether ``tensor`` is computed from ``source`` alone (through any number of parameter-free nodes)."""
    stack, seen = [tensor], set()
    while stack:
        t = stack.pop()
        if t is source or isinstance(t, gs.Constant) or t.name in seen:
            continue
        seen.add(t.name)
        if not t.inputs or len(seen) > limit or t.inputs[0].op in _PARAMETRIC:
            return False
        stack.extend(t.inputs[0].inputs)
    return True


def _scale_chain(tensor, depth=4):
    """``tensor`` and the tensors it is a constant multiple of (0.5 * x in the tanh-GELU)."""
    chain = [tensor]
    for _ in range(depth):
        node = tensor.inputs[0] if tensor.inputs else None
        if node is None or node.op not in ("Mul", "Div"):
            break
        i, _ = _split_const(node)
        if i is None or (node.op == "Div" and i == 1):  # c / x is no multiple of x
            break
        tensor = node.inputs[i]
        chain.append(tensor)
    return chain


def gate_signal(node):
    """The operand index of the signal x in a gate x * f(x) (or x / f(x)): f is computed from x (or from a
    tensor x is a constant multiple of) by parameter-free ops. None when the node is no gate."""
    a, b = node.inputs[0], node.inputs[1]
    orders = ((0, a, b),) if node.op == "Div" else ((0, a, b), (1, b, a))
    for i, signal, gate in orders:
        if any(_depends_only_on(gate, t) for t in _scale_chain(signal)):
            return i
    return None


def is_gate(node):
    return len(node.inputs) == 2 and gate_signal(node) is not None


class GateEmitter(ActivationEmitter):
    """x * g(x) (SiLU, Erf- and tanh-GELU, HardSwish decompositions, RMSNorm's x * rsqrt(mean(x²))): an
    elementwise activation or a normalization by a statistic of x. Relevance passes to x (the identity
    rule), the gate gets none."""
    op_types = ()
    group = "ActivationLayer"

    def unsupported_reason(self, node, is_data):
        if gate_signal(node) is None:
            return "a product of two data tensors that is not a gate x * f(x)"
        return None

    def data_input_indices(self, node, is_data):
        return [gate_signal(node)]


_MERGE, _SCALE, _GATE, _IDENTITY = MergeEmitter(), ScaleEmitter(), GateEmitter(), ActivationEmitter()
_PRODUCT, _RUNTIME_SCALE = ElementwiseProductEmitter(), RuntimeScaleEmitter()


@register
class ArithmeticEmitter(Emitter):
    """Dispatches Add/Sub/Mul/Div/Sum to merge, scale or gate by which operands are data."""
    op_types = ("Add", "Sub", "Mul", "Div", "Sum")
    group = "MergeLayer"

    def resolve(self, node, is_data):
        n_data = sum(1 for t in node.inputs if is_data(t))
        if n_data == len(node.inputs) and node.op in ("Add", "Sub", "Sum"):
            return _MERGE
        if node.op in ("Add", "Sub", "Sum") and len(node.inputs) > 1 and \
                all(const_value(t) is None for t in node.inputs):
            # A sum with a tensor computed from another graph input (a model with several inputs,
            # explaining one): a merge in which the other operand acts like a bias.
            return _MERGE
        if node.op in ("Mul", "Div") and n_data == 2:
            if is_gate(node):
                return _GATE
            return _PRODUCT if node.op == "Mul" else _UNSUPPORTED_ARITH
        if node.op == "Sum" and len(node.inputs) == 1:
            return _IDENTITY
        if n_data == 1 and len(node.inputs) == 2 and node.op in ("Mul", "Div") and \
                all(const_value(t) is None for t in node.inputs):
            return _RUNTIME_SCALE  # scaled by a tensor computed from another input (a float mask)
        if n_data == 1 and len(node.inputs) == 2 and node.op in ("Add", "Sub", "Mul", "Div"):
            return _SCALE
        return _UNSUPPORTED_ARITH


class _UnsupportedArithmetic(Emitter):
    def unsupported_reason(self, node, is_data):
        return "this combination of data and constant operands is not supported"


_UNSUPPORTED_ARITH = _UnsupportedArithmetic()
