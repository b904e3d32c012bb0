"""The eleven rules of RelevancePropagation.jl, each a few lines of data and numpy transforms."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .base import (DEFAULT_ALPHA, DEFAULT_BETA, DEFAULT_EPSILON, DEFAULT_GAMMA, DEFAULT_STABILIZER, Group,
                   Params, Rule, Term, with_params)
from .expr import keep_negative, keep_positive, ones_like, stabilize


def _pos(p):
    return np.maximum(p, 0)


def _neg(p):
    return np.minimum(p, 0)


def _gamma(gamma, part):
    def modified(p):
        scaled = part(p)  # a new array
        if not isinstance(scaled, np.ndarray) or not scaled.dtype == p.dtype == np.result_type(scaled, gamma):
            return p + gamma * scaled
        # p + gamma * part(p) in place: the same values (IEEE addition commutes) in one new array, not three
        scaled *= gamma
        scaled += p
        return scaled
    return modified


def _identity_input(x):
    return x


def _without_bias(params):
    """The same weight array (so the emitted graph stores it once) with a zero bias."""
    if params is None or params.bias is None:
        return params
    return Params(params.weight, np.zeros_like(params.bias))


@dataclass(eq=False, repr=False)
class ZeroRule(Rule):
    """LRP-0: R_j = sum_i W_ij a_j / (sum_l W_il a_l + b_i) R_i."""

    def is_compatible(self, layer):
        return layer.linear


@dataclass(eq=False, repr=False)
class EpsilonRule(Rule):
    """LRP-epsilon: the LRP-0 denominator plus epsilon * sign(z)."""
    epsilon: float = DEFAULT_EPSILON

    def modify_denominator(self, z):
        return stabilize(z, self.epsilon)

    def is_compatible(self, layer):
        return layer.linear


@dataclass(eq=False, repr=False)
class GammaRule(Rule):
    """LRP-gamma: weights and bias W + gamma W+, b + gamma b+."""
    gamma: float = DEFAULT_GAMMA

    def modify_parameters(self, param):
        return _gamma(self.gamma, _pos)(param)  # param + gamma * max(param, 0)


@dataclass(eq=False, repr=False)
class WSquareRule(Rule):
    """LRP-w²: R_j = sum_i W_ij² / sum_l W_il² R_i (inputs set to one, bias dropped)."""

    def modify_input(self, x):
        return ones_like(x)

    def modify_weight(self, weight):
        return weight ** 2

    def modify_bias(self, bias):
        return np.zeros_like(bias)


@dataclass(eq=False, repr=False)
class FlatRule(Rule):
    """LRP-Flat: like WSquare with all weights one: R_j = sum_i R_i / n_i."""

    def modify_input(self, x):
        return ones_like(x)

    def modify_weight(self, weight):
        return np.ones_like(weight)

    def modify_bias(self, bias):
        return np.zeros_like(bias)


@dataclass(eq=False, repr=False)
class PassRule(Rule):
    """Pass relevance through unchanged (reshaped to the input): for activations, reshapes, dropout."""

    def is_compatible(self, layer):
        return True

    def emit(self, ctx, layer, relevance_out):
        return layer.emitter.pass_through(ctx, layer, relevance_out)


@dataclass(eq=False, repr=False)
class ZPlusRule(Rule):
    """LRP-z+: (W+ a+ + W- a-) with bias b+ on the first part; AlphaBetaRule(1, 0), faster."""

    def groups(self, layer):
        p = layer.params
        return [Group([Term(keep_positive, with_params(p, _pos)),
                       Term(keep_negative, _without_bias(with_params(p, _neg)))],
                      denominator=self.modify_denominator)]


@dataclass(eq=False, repr=False)
class AlphaBetaRule(Rule):
    """LRP-alpha-beta: alpha times the positive, minus beta times the negative contributions."""
    alpha: float = DEFAULT_ALPHA
    beta: float = DEFAULT_BETA

    def __post_init__(self):
        super().__post_init__()  # finite and >= 0
        if not np.isclose(self.alpha - self.beta, 1.0):
            raise ValueError(f"AlphaBetaRule: alpha - beta must equal 1, got {self.alpha} - {self.beta}")

    def groups(self, layer):
        p = layer.params
        w_pos, w_neg = with_params(p, _pos), with_params(p, _neg)
        w_pos_nb, w_neg_nb = _without_bias(w_pos), _without_bias(w_neg)
        groups = [Group([Term(keep_positive, w_pos), Term(keep_negative, w_neg_nb)],
                        denominator=self.modify_denominator, coef=self.alpha)]
        if self.beta != 0:
            groups.append(Group([Term(keep_positive, w_neg), Term(keep_negative, w_pos_nb)],
                                denominator=self.modify_denominator, coef=-self.beta))
        return groups


def _fold_bounds(layer, low, high):
    """Params (l W+ + h W-, b) for ZBox's two bound terms, or None where the bounds cannot be folded into
    the weight: they must be scalars, or per-channel vectors on an ungrouped convolution (scaled along
    its input-channel axis) or on a dense layer with a 1-D input (scaled along its input features)."""
    p = layer.params
    if p is None:
        return None
    lo, hi = np.asarray(low, dtype=np.float64), np.asarray(high, dtype=np.float64)
    if lo.ndim > 1 or hi.ndim > 1:
        return None
    if lo.ndim == 1 or hi.ndim == 1:
        if layer.op_type in ("Conv", "ConvTranspose") and layer.node.attrs.get("group", 1) == 1:
            axis = layer.emitter.stack_axis
        elif layer.op_type == "Gemm":
            axis = 1
        else:
            return None
        channels = p.weight.shape[axis]
        if any(b.ndim == 1 and b.shape[0] != channels for b in (lo, hi)):
            return None  # a wrong length: the general path raises the error that names it
        shape = [1] * p.weight.ndim
        shape[axis] = channels
        lo, hi = (b.reshape(shape) if b.ndim == 1 else b for b in (lo, hi))
    w = p.weight.astype(np.float64)
    weight = np.maximum(w, 0) * lo + np.minimum(w, 0) * hi
    return Params(weight.astype(p.weight.dtype), p.bias)


@dataclass(eq=False, repr=False)
class ZBoxRule(Rule):
    """LRP-zB for bounded inputs in [low, high] (scalars, per-channel vectors or input-shaped arrays).

    Uses the layer's pre-activation z = W a + b (RelevancePropagation.jl used the post-activation).
    """
    low: Any = -3.0
    high: Any = 3.0

    def groups(self, layer):
        p = layer.params
        low, high = self.low, self.high
        folded = _fold_bounds(layer, low, high)
        if folded is not None:
            # l * (W+^T s) + h * (W-^T s) = (l W+ + h W-)^T s when the bounds do not vary over the positions
            # a weight is shared across: one transpose fewer, and the bias terms still cancel (b+ + b- = b).
            bound_terms = [Term(ones_like, folded, sign=-1.0)]
        else:
            bound_terms = [Term(lambda x, v=v: x.full_like(v) if hasattr(x, "full_like") else np.broadcast_to(v, x.shape),
                                with_params(p, part), sign=-1.0) for v, part in ((low, _pos), (high, _neg))]
        return [Group([Term(lambda x: x, p)] + bound_terms, denominator=self.modify_denominator)]

    def __repr__(self):
        def short(v):
            return repr(float(v)) if np.ndim(v) == 0 else f"<array {np.shape(v)}>"
        return f"ZBoxRule(low={short(self.low)}, high={short(self.high)})"


@dataclass(eq=False, repr=False)
class GeneralizedGammaRule(Rule):
    """Generalized LRP-gamma for layers with negative inputs (e.g. after LeakyReLU)."""
    gamma: float = DEFAULT_GAMMA

    def groups(self, layer):
        p, g = layer.params, self.gamma
        if layer.extra.get("nonnegative_input") and layer.extra.get("relu_output"):
            # a+ = a, a- = 0, and a ReLU gives no relevance to outputs z <= 0: the plain rule, exactly,
            # at a quarter of the convolutions (VGG-style layers, the inner convolutions of a ResNet)
            return [Group([Term(_identity_input, with_params(p, _gamma(g, _pos)))], denominator=self.modify_denominator)]
        plus = with_params(p, _gamma(g, _pos))
        minus = with_params(p, _gamma(g, _neg))
        plus_nb, minus_nb = _without_bias(plus), _without_bias(minus)
        nonnegative = layer.extra.get("nonnegative_input")  # a- = 0: the terms on the negative inputs vanish
        if nonnegative:
            positive_terms, negative_terms = [Term(_identity_input, plus)], [Term(_identity_input, minus)]
        else:
            positive_terms = [Term(keep_positive, plus), Term(keep_negative, minus_nb)]
            negative_terms = [Term(keep_positive, minus), Term(keep_negative, plus_nb)]

        def z_positive(z, forward):
            return forward(plus) if nonnegative else forward(plus, keep_positive) + forward(minus_nb, keep_negative)

        def z_negative(z, forward):
            # The two groups' modified weights sum to (2 + g) W on a+ and on a-, their biases to (2 + g) b, so
            # z- = (2 + g) z - z+ from the layer's own z = W a + b: the negative group needs no forward pass of
            # its own. z+ >= z, so where z < 0 (the only place z- is used) |z-| >= (1 + g)|z|: no cancellation.
            return (2 + g) * z - z_positive(z, forward)

        return [Group(positive_terms, denominator=self.modify_denominator, mask="positive", z=z_positive),
                Group(negative_terms, denominator=self.modify_denominator, mask="negative", z=z_negative)]


@dataclass(eq=False, repr=False)
class LayerNormRule(Rule):
    """LRP-LN (Ali et al.): the normalization's centering is linear, its scale is held constant.
    ``epsilon`` stabilizes the division by the centered input x - mean(x)."""
    epsilon: float = DEFAULT_STABILIZER

    def is_compatible(self, layer):
        return hasattr(layer.emitter, "emit_layernorm_rule")

    def emit(self, ctx, layer, relevance_out):
        return layer.emitter.emit_layernorm_rule(ctx, layer, relevance_out, epsilon=self.epsilon)


ALL_RULES = {c.__name__: c for c in (ZeroRule, EpsilonRule, GammaRule, WSquareRule, FlatRule, AlphaBetaRule,
                                     ZPlusRule, ZBoxRule, PassRule, GeneralizedGammaRule, LayerNormRule)}
