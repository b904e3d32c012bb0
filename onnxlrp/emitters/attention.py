"""The layers of attention: products of two activations, the softmax, and masks.

- MatMul / Einsum of two data tensors (q kᵀ, probs v): ``AttentionLayer``.
- Mul of two data tensors that is not a gate x·f(x) (SwiGLU, squeeze-excite): ``ProductLayer``.
- Softmax inside the graph: ``SoftmaxLayer``.
- Where(mask, data, fill) and products with a tensor computed from another input: ``MaskLayer``.

The rules of products (UniformRule, CPRule in onnxlrp.rules.attention) need each operand's cotangent:
``operand_grads(ctx, layer, s, wanted)`` is the vector-Jacobian product of z = f(a, b) for a cotangent s,
one tensor per operand (None where not wanted), each shaped like its operand.
"""
from __future__ import annotations

import numpy as np

from .base import Emitter, register, unbroadcast

#: Ops a tensor may pass through between a softmax and the product that uses it (CP-LRP).
_MOVING_OPS = ("Reshape", "Transpose", "Cast", "Dropout", "Identity", "Squeeze", "Unsqueeze", "Where", "Expand")


def _swap_last(ctx, var, rank):
    perm = list(range(rank - 2)) + [rank - 1, rank - 2]
    return ctx.b.op("Transpose", [var], attrs={"perm": perm})


class ProductEmitter(Emitter):
    """z = f(a, b), linear in each operand: the base of bilinear layers."""
    group = "AttentionLayer"
    linear = False

    def data_input_indices(self, node, is_data):
        return [0, 1]

    def operand_grads(self, ctx, layer, s, wanted):
        raise NotImplementedError

    def gradient_reason(self, layer):
        return None

    def vjp(self, ctx, layer, grads_out):
        return self.operand_grads(ctx, layer, grads_out[0], [True] * len(layer.inputs))

    def comes_from_softmax(self, layer, i):
        """Whether operand ``i`` is a softmax's output (through reshapes, transposes, masks)."""
        tensor = layer.node.inputs[i]
        for _ in range(16):
            node = tensor.inputs[0] if tensor.inputs else None
            if node is None or node.op not in ("Softmax",) + _MOVING_OPS:
                return False
            if node.op == "Softmax":
                return True
            if node.op == "Where":  # follow the selected value that is computed, not the fill constant
                computed = [t for t in node.inputs[1:] if t.inputs]
                if not computed:
                    return False
                tensor = computed[0]
            else:
                tensor = node.inputs[0]
        return False


class BilinearMatMulEmitter(ProductEmitter):
    """MatMul of two data tensors (registered for no op type: MatMulEmitter hands these over)."""
    op_types = ()

    def unsupported_reason(self, node, is_data):
        for t in node.inputs:
            if t.shape is None or len(t.shape) < 2:
                return "a MatMul of two data tensors needs operands of known rank >= 2"
        return None

    def operand_grads(self, ctx, layer, s, wanted):
        b = ctx.b
        a_t, b_t = layer.node.inputs
        out_shape = ctx.shape(layer.outputs[0])
        grads = [None, None]
        if wanted[0]:  # dL/da = s bᵀ
            g = b.op("MatMul", [s, _swap_last(ctx, b_t, len(ctx.shape(b_t)))])
            grads[0] = unbroadcast(ctx, g, out_shape[:-1] + (ctx.shape(a_t)[-1],), ctx.shape(a_t))
        if wanted[1]:  # dL/db = aᵀ s
            g = b.op("MatMul", [_swap_last(ctx, a_t, len(ctx.shape(a_t))), s])
            grads[1] = unbroadcast(ctx, g, out_shape[:-2] + (ctx.shape(b_t)[-2], out_shape[-1]), ctx.shape(b_t))
        return grads


def _einsum_parts(equation):
    eq = equation.decode() if isinstance(equation, bytes) else equation
    eq = eq.replace(" ", "")
    if "->" not in eq:
        return None
    lhs, out = eq.split("->")
    terms = lhs.split(",")
    return (terms, out) if len(terms) == 2 else None


@register
class EinsumEmitter(ProductEmitter):
    """Einsum of two data tensors, e.g. "bhqd,bhkd->bhqk"."""
    op_types = ("Einsum",)

    def unsupported_reason(self, node, is_data):
        parts = _einsum_parts(node.attrs.get("equation", ""))
        if parts is None or len(node.inputs) != 2:
            return "only Einsum of two operands with an explicit output ('ab,bc->ac') is supported"
        if not all(is_data(t) for t in node.inputs):
            return "Einsum with a constant operand is not supported (only products of two data tensors)"
        (x, y), out = parts
        for own, other in ((x, y), (y, x)):
            if "." in own or len(set(own)) != len(own) or any(c not in out and c not in other for c in own):
                return "the Einsum equation has ellipses, diagonals or axes summed within one operand"
        return None

    def operand_grads(self, ctx, layer, s, wanted):
        (x, y), out = _einsum_parts(layer.node.attrs["equation"])
        a_t, b_t = layer.node.inputs
        grads = [None, None]
        if wanted[0]:
            grads[0] = ctx.b.op("Einsum", [s, b_t], attrs={"equation": f"{out},{y}->{x}"})
        if wanted[1]:
            grads[1] = ctx.b.op("Einsum", [a_t, s], attrs={"equation": f"{x},{out}->{y}"})
        return grads


class ElementwiseProductEmitter(ProductEmitter):
    """Mul of two data tensors that is not a gate x·f(x): z = a ⊙ b (dispatched by ArithmeticEmitter)."""
    op_types = ()
    group = "ProductLayer"

    def operand_grads(self, ctx, layer, s, wanted):
        out_shape = ctx.shape(layer.outputs[0])
        grads = []
        for i, want in enumerate(wanted):
            other = layer.node.inputs[1 - i]
            grads.append(unbroadcast(ctx, ctx.b.op("Mul", [s, other]), out_shape, ctx.shape(layer.node.inputs[i]))
                         if want else None)
        return grads

    def gate_operands(self, layer):
        """Operands that are the output of an activation (the gate of a gated unit: CP-LRP holds it)."""
        from .elementwise import ACTIVATIONS, is_gate
        gates = []
        for t in layer.node.inputs:
            node = t.inputs[0] if t.inputs else None
            gates.append(node is not None and (node.op in ACTIVATIONS or (node.op == "Mul" and is_gate(node))))
        return gates


@register
class SoftmaxEmitter(Emitter):
    """Softmax inside the graph (a softmax producing the graph output is stripped by canonization)."""
    op_types = ("Softmax",)
    group = "SoftmaxLayer"
    linear = False

    def data_input_indices(self, node, is_data):
        return [0]

    def emit_softmax_rule(self, ctx, layer, relevance_out):
        """AttnLRP (Prop. 3.1): R_in = x ⊙ (R - s ⊙ Σ_j R_j) over the softmax axis. Masked scores hold
        -3.4e38 or -inf with s = 0 there: x is taken as 0 where it is infinite, so no NaN appears and
        masked positions get exactly 0."""
        b = ctx.b
        x, s = layer.inputs[0], layer.outputs[0]
        rank = len(ctx.shape(x))
        axis = layer.node.attrs.get("axis", -1) % rank
        r = relevance_out[0]
        total = b.op("ReduceSum", [r, b.i64([axis])], attrs={"keepdims": 1})
        inner = b.op("Sub", [r, b.op("Mul", [s, total])])
        finite_x = b.op("Where", [b.op("IsInf", [x]), b.const(np.asarray(0, b.dtype)), x])
        return [b.op("Mul", [finite_x, inner])]

    def gradient_reason(self, layer):
        return None

    def vjp(self, ctx, layer, grads_out):
        """s ⊙ (g - Σ_j g_j s_j) over the softmax axis."""
        b, s, g = ctx.b, layer.outputs[0], grads_out[0]
        axis = layer.node.attrs.get("axis", -1) % len(ctx.shape(s))
        total = b.op("ReduceSum", [b.op("Mul", [g, s]), b.i64([axis])], attrs={"keepdims": 1})
        return [b.op("Mul", [s, b.op("Sub", [g, total])])]


@register
class WhereEmitter(Emitter):
    """Where(condition, a, b) selecting between data and a fill value (attention masks): relevance goes to
    the operand that was selected; the condition gets none."""
    op_types = ("Where",)
    group = "MaskLayer"
    linear = False

    def data_input_indices(self, node, is_data):
        return [i for i in (1, 2) if is_data(node.inputs[i])]

    def pass_through(self, ctx, layer, relevance_out):
        b, node = ctx.b, layer.node
        r = relevance_out[0]
        zero = b.const(np.asarray(0, b.dtype))
        out_shape = ctx.shape(layer.outputs[0])
        result = []
        for i in self.data_input_indices(node, lambda t: any(t is x for x in layer.inputs)):
            branch = [r, zero] if i == 1 else [zero, r]
            selected = b.op("Where", [node.inputs[0]] + branch)
            result.append(unbroadcast(ctx, selected, out_shape, ctx.shape(node.inputs[i])))
        return result

    def gradient_reason(self, layer):
        return None

    def vjp(self, ctx, layer, grads_out):
        return self.pass_through(ctx, layer, grads_out)  # the selected operand's derivative is 1, the other's 0


class RuntimeScaleEmitter(Emitter):
    """x * m or x / m with m computed from another graph input (a float attention mask): linear in x with
    no bias, so LRP-0 passes the relevance through (dispatched by ArithmeticEmitter)."""
    op_types = ()
    group = "MaskLayer"
    linear = False

    def data_input_indices(self, node, is_data):
        return [i for i, t in enumerate(node.inputs) if is_data(t)]

    def unsupported_reason(self, node, is_data):
        if node.op == "Div" and is_data(node.inputs[1]):
            return "division by data is not linear"
        return None

    def pass_through(self, ctx, layer, relevance_out):
        return [unbroadcast(ctx, relevance_out[0], ctx.shape(layer.outputs[0]), ctx.shape(layer.inputs[0]))]

    def gradient_reason(self, layer):
        return None

    def vjp(self, ctx, layer, grads_out):
        """g * m or g / m for x * m, x / m (m, from another input, is held)."""
        node, b = layer.node, ctx.b
        i = next(k for k, t in enumerate(node.inputs) if t is layer.inputs[0])
        g = b.op(node.op if node.op == "Div" else "Mul", [grads_out[0], node.inputs[1 - i]])
        return [unbroadcast(ctx, g, ctx.shape(layer.outputs[0]), ctx.shape(layer.inputs[0]))]
