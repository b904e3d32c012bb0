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


#: Elementwise powers, for the gradient analyzers only: they sit in the branches of gates and statistics
#: (the x^3 of a tanh-GELU, an RMSNorm's rsqrt), where the relevance pass never goes but the gradient does.
#: For LRP they stay unsupported (no layers, so the layer indices of such models do not move).
POWERS = ("Pow", "Sqrt", "Reciprocal")


@register
class ActivationEmitter(Emitter):
    op_types = tuple(a for a in ACTIVATIONS if a != "LRN") + POWERS
    group = "ActivationLayer"
    linear = False
    gradient_only = POWERS

    def data_input_indices(self, node, is_data):
        return [0] if is_data(node.inputs[0]) else []

    def unsupported_reason(self, node, is_data):
        if not is_data(node.inputs[0]):
            return "the data input is not the first input"
        if node.op == "Pow" and const_value(node.inputs[1]) is None:
            return "the exponent is not a constant"
        return None

    def gradient_reason(self, layer):
        if layer.op_type not in _DERIVATIVES:
            return "no gradient (vector-Jacobian product) for this op yet"
        return None

    def vjp(self, ctx, layer, grads_out):
        """g times the activation's derivative at x (of y = f(x))."""
        derivative = _DERIVATIVES[layer.op_type](_Ops(ctx.b), layer.node, layer.inputs[0], layer.outputs[0])
        g = grads_out[0]
        return [g if derivative is None else ctx.b.op("Mul", [g, derivative])] + [None] * (len(layer.inputs) - 1)


class _Ops:
    """Short names for building a derivative: constants in the graph's float type, ops by name."""

    def __init__(self, b):
        self.b = b

    def c(self, value):
        return self.b.const(np.asarray(value, dtype=self.b.dtype))

    def __getattr__(self, op):  # ops.Mul(a, b) -> a Mul node
        return lambda *inputs, **attrs: self.b.op(op, list(inputs), attrs=attrs or None)

    def where(self, cond, a, b):
        return self.b.op("Where", [cond, a, b])

    def mask(self, cond):
        return self.b.op("Cast", [cond], attrs={"to": self.b.onnx_dtype})


def _clip_bounds(node):
    def bound(index, attr):
        if len(node.inputs) > index and node.inputs[index].name:
            value = const_value(node.inputs[index])
            return None if value is None else float(value)
        return node.attrs.get(attr)
    return bound(1, "min"), bound(2, "max")


def _d_clip(o, node, x, y, bounds=None):
    low, high = bounds or _clip_bounds(node)
    inside = None
    for limit, op in ((low, "Greater"), (high, "Less")):
        if limit is not None:
            test = o.b.op(op, [x, o.c(limit)])
            inside = test if inside is None else o.And(inside, test)
    return None if inside is None else o.mask(inside)


def _d_gelu(o, node, x, y):
    if node.attrs.get("approximate", "none") in ("tanh", b"tanh"):
        # y = x/2 (1 + tanh(u)), u = k (x + 0.044715 x^3): y' = (1 + t)/2 + x/2 (1 - t^2) k (1 + 3 0.044715 x^2)
        k = np.sqrt(2 / np.pi)
        x2 = o.Mul(x, x)
        t = o.Tanh(o.Mul(o.Mul(x, o.Add(o.c(1.0), o.Mul(o.c(0.044715), x2))), o.c(k)))
        du = o.Mul(o.c(k), o.Add(o.c(1.0), o.Mul(o.c(3 * 0.044715), x2)))
        return o.Add(o.Mul(o.c(0.5), o.Add(o.c(1.0), t)),
                     o.Mul(o.Mul(o.Mul(o.c(0.5), x), o.Sub(o.c(1.0), o.Mul(t, t))), du))
    # y = x Phi(x): y' = Phi(x) + x phi(x)
    cdf = o.Mul(o.c(0.5), o.Add(o.c(1.0), o.Erf(o.Mul(x, o.c(1 / np.sqrt(2))))))
    pdf = o.Mul(o.c(1 / np.sqrt(2 * np.pi)), o.Exp(o.Mul(o.c(-0.5), o.Mul(x, x))))
    return o.Add(cdf, o.Mul(x, pdf))


def _d_mish(o, node, x, y):
    # y = x tanh(softplus(x)): y' = tanh(sp) + x (1 - tanh(sp)^2) sigmoid(x)
    t = o.Tanh(o.Softplus(x))
    return o.Add(t, o.Mul(o.Mul(x, o.Sub(o.c(1.0), o.Mul(t, t))), o.Sigmoid(x)))


def _d_swish(o, node, x, y):
    alpha = node.attrs.get("alpha", 1.0)  # y = x sigmoid(alpha x): y' = s + alpha x s (1 - s)
    s = o.Sigmoid(o.Mul(x, o.c(alpha)))
    return o.Add(s, o.Mul(o.Mul(o.Mul(x, o.c(alpha)), s), o.Sub(o.c(1.0), s)))


def _d_hardswish(o, node, x, y):
    # y = x min(max(x/6 + 1/2, 0), 1): y' = 0 below -3, 1 above 3, (2x + 3)/6 between
    inner = o.Add(o.Mul(x, o.c(1 / 3)), o.c(0.5))
    return o.where(o.Less(x, o.c(-3.0)), o.c(0.0), o.where(o.Greater(x, o.c(3.0)), o.c(1.0), inner))


def _d_hardsigmoid(o, node, x, y):
    alpha, beta = node.attrs.get("alpha", 0.2), node.attrs.get("beta", 0.5)
    z = o.Add(o.Mul(x, o.c(alpha)), o.c(beta))
    return o.Mul(o.mask(o.And(o.Greater(z, o.c(0.0)), o.Less(z, o.c(1.0)))), o.c(alpha))


#: op type -> (ops, node, x, y) -> dy/dx (None: 1). Kinks take the derivative of the side that
#: onnxruntime's output is computed on for x > 0 (ReLU'(0) = 0, as torch and TensorFlow have it).
_DERIVATIVES = {
    "Relu": lambda o, n, x, y: o.mask(o.Greater(x, o.c(0.0))),
    "LeakyRelu": lambda o, n, x, y: o.where(o.Greater(x, o.c(0.0)), o.c(1.0), o.c(n.attrs.get("alpha", 0.01))),
    "PRelu": lambda o, n, x, y: o.where(o.Greater(x, o.c(0.0)), o.c(1.0), n.inputs[1]),
    "ThresholdedRelu": lambda o, n, x, y: o.mask(o.Greater(x, o.c(n.attrs.get("alpha", 1.0)))),
    "Clip": _d_clip,
    "Relu6": lambda o, n, x, y: _d_clip(o, n, x, y, (0.0, 6.0)),
    "Sigmoid": lambda o, n, x, y: o.Mul(y, o.Sub(o.c(1.0), y)),
    "Tanh": lambda o, n, x, y: o.Sub(o.c(1.0), o.Mul(y, y)),
    "Elu": lambda o, n, x, y: o.where(o.Greater(x, o.c(0.0)), o.c(1.0), o.Add(y, o.c(n.attrs.get("alpha", 1.0)))),
    "Selu": lambda o, n, x, y: o.where(
        o.Greater(x, o.c(0.0)), o.c(n.attrs.get("gamma", 1.05070102214813232421875)),
        o.Add(y, o.c(n.attrs.get("alpha", 1.67326319217681884765625) * n.attrs.get("gamma", 1.05070102214813232421875)))),
    "Celu": lambda o, n, x, y: o.where(o.Greater(x, o.c(0.0)), o.c(1.0),
                                       o.Add(o.Div(y, o.c(n.attrs.get("alpha", 1.0))), o.c(1.0))),
    "Softplus": lambda o, n, x, y: o.Sigmoid(x),
    "Softsign": lambda o, n, x, y: o.Reciprocal(o.Mul(o.Add(o.c(1.0), o.Abs(x)), o.Add(o.c(1.0), o.Abs(x)))),
    "HardSigmoid": _d_hardsigmoid,
    "HardSwish": _d_hardswish,
    "Gelu": _d_gelu,
    "Erf": lambda o, n, x, y: o.Mul(o.c(2 / np.sqrt(np.pi)), o.Exp(o.Neg(o.Mul(x, x)))),
    "Mish": _d_mish,
    "Swish": _d_swish,
    "Sum": lambda o, n, x, y: None,  # a Sum of one tensor
    "Pow": lambda o, n, x, y: _d_pow(o, n, x),
    "Sqrt": lambda o, n, x, y: o.Div(o.c(0.5), y),
    "Reciprocal": lambda o, n, x, y: o.Neg(o.Mul(y, y)),
}


def _d_pow(o, node, x):
    p = np.asarray(const_value(node.inputs[1]), dtype=np.float64)
    if np.all(p == 1):
        return None
    if np.all(p == 2):
        return o.Mul(x, o.c(2.0))
    return o.Mul(o.c(p), o.Pow(x, o.c(p - 1)))


@register
class LRNEmitter(ActivationEmitter):
    """Local response normalization: shape-preserving, relevance passes through."""
    op_types = ("LRN",)
    group = "NormalizationLayer"

    def gradient_reason(self, layer):
        return None

    def vjp(self, ctx, layer, grads_out):
        """y = x d^-beta, d = bias + alpha/size * (window sum over channels of x^2):
        dx = g d^-beta - (2 alpha beta / size) x * (transposed window sum of g x d^(-beta - 1))."""
        o, node = _Ops(ctx.b), layer.node
        x, g = layer.inputs[0], grads_out[0]
        size = int(node.attrs["size"])
        alpha, beta, bias = node.attrs.get("alpha", 1e-4), node.attrs.get("beta", 0.75), node.attrs.get("bias", 1.0)
        lo, hi = (size - 1) // 2, size - 1 - (size - 1) // 2  # the channels before and after c in c's window
        d = o.Add(o.c(bias), o.Mul(o.c(alpha / size), _channel_window_sum(ctx, o.Mul(x, x), x, lo, hi)))
        u = o.Mul(o.Mul(g, x), o.Pow(d, o.c(-beta - 1.0)))
        back = _channel_window_sum(ctx, u, x, hi, lo)  # the transpose: the window mirrored
        return [o.Sub(o.Mul(g, o.Pow(d, o.c(-beta))), o.Mul(o.Mul(x, back), o.c(2 * alpha * beta / size)))]


def _channel_window_sum(ctx, var, like, before, after):
    """Sum over channels c - before .. c + after (clipped at the edges) of a (N, C, ...) tensor: a Conv of
    ones over the channel axis of (N, 1, C, rest)."""
    b = ctx.b
    shape = ctx.shape(like)
    rest = int(np.prod(shape[2:])) if len(shape) > 2 else 1
    flat = b.op("Reshape", [var, b.i64([0, 1, shape[1], rest])])
    ones = b.const(np.ones((1, 1, before + after + 1, 1), dtype=b.dtype))
    summed = b.op("Conv", [flat, ones], attrs={"pads": [before, 0, after, 0]})
    return ctx.reshape_like(summed, like, like)


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

    def gradient_reason(self, layer):
        return None

    def vjp(self, ctx, layer, grads_out):
        """The product (or quotient) rule on every operand that is an input of the layer: in a gradient
        analyzer the gate f(x) is one too, so its own branch gets its share and adds up at x."""
        b, node, g = ctx.b, layer.node, grads_out[0]
        out_shape = ctx.shape(layer.outputs[0])
        a, c = node.inputs
        grads = []
        for t in layer.inputs:
            if node.op == "Mul":
                d = b.op("Mul", [g, c if t is a else a])
            elif t is a:  # a / c
                d = b.op("Div", [g, c])
            else:  # -g a / c^2
                d = b.op("Neg", [b.op("Div", [b.op("Mul", [g, a]), b.op("Mul", [c, c])])])
            grads.append(unbroadcast(ctx, d, out_shape, ctx.shape(t)))
        return grads


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
