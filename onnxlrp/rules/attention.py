"""The rules of AttnLRP (Achtibat et al., ICML 2024) and CP-LRP (Ali et al., ICML 2022) for the layers
of attention: products of two activations and the softmax. Linear layers, LayerNorm and elementwise
activations use the rules of onnxlrp.rules.builtin (LRP-0, LayerNormRule, PassRule = the identity rule).

Both rules are ordinary Rules: ``modify_denominator`` stabilizes z of a product as for any rule.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .base import DEFAULT_STABILIZER, Rule
from .expr import stabilize

#: The stabilizer of AttnLRP's and CP-LRP's rules. LXT's efficient rules multiply gradients and divide
#: nowhere; in the LRP form every relevance is a multiple of the value it is divided by, so only exact
#: zeros need a guard, and RelevancePropagation.jl's 1e-9 would bend relevance wherever |z| < ~1e-6
#: (an embedding sum of 1e-9 halved it in a BERT-base check).
GRADIENT_STABILIZER = 1e-30


@dataclass(eq=False, repr=False)
class SoftmaxRule(Rule):
    """AttnLRP's softmax rule (Prop. 3.1): R_in = x ⊙ (R_out - s ⊙ Σ_j R_out_j), with s the softmax output
    and x its input (the relevance that a first-order Taylor expansion at x gives; conservative up to the
    share a bias-free softmax absorbs). Masked scores (-inf or -3.4e38) get exactly 0."""

    def is_compatible(self, layer):
        return hasattr(layer.emitter, "emit_softmax_rule")

    def emit(self, ctx, layer, relevance_out):
        return layer.emitter.emit_softmax_rule(ctx, layer, relevance_out)


@dataclass(eq=False, repr=False)
class UniformRule(Rule):
    """AttnLRP's uniform rule for a product of two activations z = f(a, b) that is linear in each
    (q kᵀ, probs v, a ⊙ b; Prop. 3.2/3.3): the z-rule on each operand with the other held constant,
    half of the relevance to each: R_a = ½ a ⊙ ∂z/∂aᵀ (R / z), R_b = ½ b ⊙ ∂z/∂bᵀ (R / z).
    ``epsilon`` stabilizes z."""
    epsilon: float = DEFAULT_STABILIZER

    def modify_denominator(self, z):
        return stabilize(z, self.epsilon)

    def is_compatible(self, layer):
        return hasattr(layer.emitter, "operand_grads")

    def shares(self, layer):
        """The part of the relevance each operand gets (they add up to 1)."""
        n = len(layer.inputs)
        return [1.0 / n] * n

    def emit(self, ctx, layer, relevance_out):
        b = ctx.b
        shares = self.shares(layer)
        z = layer.outputs[0]
        s = b.op("Div", [relevance_out[0], self.modify_denominator(ctx.sym(z, z)).var])
        nonzero = {w for w in shares if w != 0}
        common = nonzero.pop() if len(nonzero) == 1 else 1.0
        if common != 1.0:  # one share for every operand: scale the cotangent once, not each product
            s = b.op("Mul", [s, b.const(np.asarray(common, dtype=b.dtype))])
        grads = layer.emitter.operand_grads(ctx, layer, s, [w != 0 for w in shares])
        result = []
        for x, g, w in zip(layer.inputs, grads, shares):
            if w == 0 or g is None:
                result.append(None)  # no relevance: the operand's branch is not propagated at all
                continue
            r = b.op("Mul", [x, g])
            w = w / common
            result.append(r if w == 1 else b.op("Mul", [r, b.const(np.asarray(w, dtype=b.dtype))]))
        return result


@dataclass(eq=False, repr=False)
class CPRule(UniformRule):
    """CP-LRP (Ali et al. 2022; LXT's ``cp_wrap_attention_forward``): attention probabilities are held
    constant, so all relevance of probs v goes to v and none flows into q and k. On a gated product
    (act(g) ⊙ u, LXT's ``cp_gated_mlp_forward``) the gate is held constant. A product with neither (q kᵀ
    when reached through another rule) splits uniformly."""

    def shares(self, layer):
        n = len(layer.inputs)
        held = [layer.emitter.comes_from_softmax(layer, i) for i in range(n)]
        if not any(held) and hasattr(layer.emitter, "gate_operands"):
            held = layer.emitter.gate_operands(layer)
        free = n - sum(held)
        if free in (0, n):
            return [1.0 / n] * n
        return [0.0 if h else 1.0 / free for h in held]
