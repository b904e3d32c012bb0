"""The rule machinery: a rule is data plus numpy parameter transforms; the ONNX emission is shared.

A rule on a layer with parameters (or on a parameter-free linear layer such as pooling or a sum) is a
list of :class:`Group` s, each a list of :class:`Term` s, in the spirit of Zennit's BasicHook::

    z_g   = sum_t sign_t * f(input_t(a); params_t)                 (forward under modified weights,
                                                                    or the group's own ``z`` identity)
    s_g   = mask_g(R_out) / denominator_g(z_g)
    R_in  = sum_g coef_g * sum_t sign_t * input_t(a) * f^T(s_g; params_t)

``f`` is the layer's own linear map and ``f^T`` its transpose (e.g. Conv and ConvTranspose). The generic
rule of RelevancePropagation.jl is one group with one term built from the hooks below; ZPlus, AlphaBeta,
ZBox and GeneralizedGamma list more terms.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from .expr import DivisionGuard, stabilize

#: RelevancePropagation.jl's defaults.
DEFAULT_GAMMA = 0.25
DEFAULT_EPSILON = 1e-6
#: the division guard of rules without an epsilon (1e-9 in float32, 1.9e-18 in float64: see DivisionGuard)
DEFAULT_STABILIZER = DivisionGuard(1e-9)
DEFAULT_ALPHA = 2.0
DEFAULT_BETA = 1.0


@dataclass(frozen=True)
class Params:
    """Weight and bias of a layer, as numpy arrays in the layer's own layout (bias may be None)."""
    weight: np.ndarray
    bias: Optional[np.ndarray] = None

    def map(self, weight_fn, bias_fn=None, keep_bias=True):
        bias = None
        if self.bias is not None:
            bias = (bias_fn or weight_fn)(self.bias) if keep_bias else np.zeros_like(self.bias)
        return Params(weight_fn(self.weight), bias)


def _identity(x):
    return x


@dataclass
class Term:
    input: Callable = _identity      # activation -> modified activation (numpy or Sym)
    params: Optional[Params] = None  # modified parameters; None for parameter-free layers
    sign: float = 1.0


@dataclass
class Group:
    terms: list
    denominator: Callable = field(default=lambda z: stabilize(z, DEFAULT_STABILIZER))
    coef: float = 1.0
    mask: Optional[str] = None  # None, "positive" or "negative": which sign of the layer's z it covers
    #: the group's modified pre-activation from fewer products, where the rule knows an identity for it:
    #: ``z(z_layer, forward)`` gets the layer's own pre-activation and ``forward(params, input=None)``, the
    #: layer's map under ``params`` of its inputs or of ``input(x)`` (emitted once per pair, so groups share
    #: them), and returns what the terms' forward passes would sum to. None: their sum. It is used only
    #: where the graph's pre-activation is the layer's map under its own params (not after a canonization
    #: that changed them); elsewhere the terms' sum is emitted.
    z: Optional[Callable] = None


class Rule:
    """Base class of every LRP rule. Subclass and override the hooks to write your own rule.

    Call order (as in RelevancePropagation.jl): ``modify_layer`` calls ``modify_weight`` and
    ``modify_bias``, which call ``modify_parameters``. ``modify_input`` and ``modify_denominator`` act on
    activations: they get a numpy array or a symbolic tensor (:class:`onnxlrp.rules.Sym`) and must use
    arithmetic or the helpers in :mod:`onnxlrp.rules` that work on both.
    """

    #: what the built-in rules' parameters may be (checked when a rule is made): EpsilonRule(-1) gave
    #: relevance of 1e13, GammaRule(-5) flips signs, ZBoxRule(3, -3) has no box
    NONNEGATIVE = ("epsilon", "gamma", "alpha", "beta")

    def __post_init__(self):
        name = type(self).__name__
        for field_name in self.NONNEGATIVE:
            if field_name in getattr(self, "__dataclass_fields__", {}):
                value = getattr(self, field_name)
                try:
                    ok = np.isfinite(float(value)) and float(value) >= 0
                except (TypeError, ValueError):
                    ok = False
                if not ok:
                    raise ValueError(f"{name}: {field_name} must be a finite number >= 0, got {value!r}")
        if {"low", "high"} <= set(getattr(self, "__dataclass_fields__", {})):
            try:
                low, high = np.asarray(self.low, np.float64), np.asarray(self.high, np.float64)
                np.broadcast(low, high)
            except (TypeError, ValueError):
                raise ValueError(f"{name}: low and high must be numbers or arrays of the same shape, got "
                                 f"{self.low!r} and {self.high!r}") from None
            if not (np.all(np.isfinite(low)) and np.all(np.isfinite(high))):
                raise ValueError(f"{name}: low and high must be finite, got {self.low!r} and {self.high!r}")
            if not np.all(low < high):
                raise ValueError(f"{name}: low must be below high (the box of the input values), got "
                                 f"low={self.low!r}, high={self.high!r}")

    def modify_input(self, x):
        return x

    def modify_denominator(self, z):
        return stabilize(z, DEFAULT_STABILIZER)

    def modify_parameters(self, param):
        return param

    def modify_weight(self, weight):
        return self.modify_parameters(weight)

    def modify_bias(self, bias):
        return self.modify_parameters(bias)

    def modify_layer(self, layer):
        """Return the modified :class:`Params` of ``layer`` (None for parameter-free layers)."""
        params = layer.params
        if params is None:
            return None
        bias = None if params.bias is None else self.modify_bias(params.bias)
        return Params(self.modify_weight(params.weight), bias)

    def is_compatible(self, layer) -> bool:
        """Layers this rule may be put on. The default, as in RelevancePropagation.jl: layers with weights."""
        return layer.params is not None

    # -- emission ------------------------------------------------------------------------------------
    def groups(self, layer):
        """The generic rule: one group, one term, built from the hooks."""
        return [Group([Term(self.modify_input, self.modify_layer(layer))], denominator=self.modify_denominator)]

    def emit(self, ctx, layer, relevance_out):
        """Emit this rule's backward step; returns one relevance tensor (or None) per data input."""
        return ctx.emit_terms(layer, self.groups(layer), relevance_out)

    def __repr__(self):
        fields = getattr(self, "__dataclass_fields__", None)
        if fields is None:  # a user's rule with a plain __init__: show its public attributes
            fields = [k for k in vars(self) if not k.startswith("_")]
        args = ", ".join(f"{k}={getattr(self, k)!r}" for k in fields)
        return f"{type(self).__name__}({args})"

    def __eq__(self, other):
        return type(self) is type(other) and repr(self) == repr(other)

    def __hash__(self):
        return hash(repr(self))


def with_params(params: Optional[Params], weight_fn, keep_bias=True, bias_fn=None):
    """Params with a transform applied (None stays None): the building block of multi-term rules."""
    return None if params is None else params.map(weight_fn, bias_fn=bias_fn, keep_bias=keep_bias)


__all__ = ["Params", "Term", "Group", "Rule", "with_params"]
