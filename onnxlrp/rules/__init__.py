"""LRP rules: the eleven of RelevancePropagation.jl and the base class for your own."""
from .base import DEFAULT_EPSILON, DEFAULT_GAMMA, DEFAULT_STABILIZER, Group, Params, Rule, Term, with_params
from .builtin import (ALL_RULES, AlphaBetaRule, EpsilonRule, FlatRule, GammaRule, GeneralizedGammaRule,
                      LayerNormRule, PassRule, WSquareRule, ZBoxRule, ZeroRule, ZPlusRule)
from .attention import CPRule, SoftmaxRule, UniformRule
from .expr import Sym, keep_negative, keep_positive, ones_like, sign0, stabilize, zeros_like

__all__ = [
    "Rule", "Params", "Term", "Group", "with_params", "Sym",
    "ZeroRule", "EpsilonRule", "GammaRule", "WSquareRule", "FlatRule", "AlphaBetaRule", "ZPlusRule",
    "ZBoxRule", "PassRule", "GeneralizedGammaRule", "LayerNormRule", "SoftmaxRule", "UniformRule", "CPRule",
    "ALL_RULES",
    "keep_positive", "keep_negative", "ones_like", "zeros_like", "sign0", "stabilize",
    "DEFAULT_EPSILON", "DEFAULT_GAMMA", "DEFAULT_STABILIZER",
]

ALL_RULES.update({c.__name__: c for c in (SoftmaxRule, UniformRule, CPRule)})
