"""Composites: assign rules to layers by index, position and type (RelevancePropagation.jl's primitives).

Layer indices are 0-based, in topological order (see ``show_layer_indices``). Type keys are ONNX op types
("Conv", "Gemm", "MaxPool", ...) or the groups ConvLayer, DenseLayer, PoolingLayer, DropoutLayer,
ReshapingLayer, NormalizationLayer, ActivationLayer, MergeLayer, ScaleLayer; an op-type key wins over a
group key. Because ONNX keeps activations and reshapes as separate nodes, "first layer" and "last layer"
(FirstLayerMap, LastLayerMap, FirstLayerTypeMap, LastLayerTypeMap) mean the first/last layer that has
parameters. Later primitives override earlier ones.
"""
from __future__ import annotations

from .errors import RuleCompatibilityError
from .rules import (AlphaBetaRule, CPRule, EpsilonRule, FlatRule, GeneralizedGammaRule, LayerNormRule, PassRule,
                    Rule, SoftmaxRule, UniformRule, ZBoxRule, ZeroRule, ZPlusRule)
from .rules.attention import GRADIENT_STABILIZER
from .rules.base import DEFAULT_EPSILON, DEFAULT_GAMMA


def check_compatible(rule, layer):
    if not isinstance(rule, Rule):
        raise TypeError(f"expected an LRP rule for layer {layer.index} ('{layer.name}'), got {rule!r}")
    if not rule.is_compatible(layer):
        raise RuleCompatibilityError(
            f"{rule!r} does not fit layer {layer.index} '{layer.name}' (op type {layer.op_type}, "
            f"{layer.group}{', no parameters' if layer.params is None else ''})")


def _type_rule(mapping, layer):
    items = list(mapping.items()) if isinstance(mapping, dict) else list(mapping)
    for key, rule in items:
        if not isinstance(key, str):  # an op type or a group name (emitters.GROUPS)
            raise TypeError(f"type-map keys are op types or group names, got {key!r}")
    for key, rule in items:
        if key == layer.op_type:
            return rule
    for key, rule in items:
        if key == layer.group:
            return rule
    return None


def _param_layers(layers):
    return [l for l in layers if l.params is not None]


def _indices(rng, n):
    if isinstance(rng, range):
        return [i for i in rng if 0 <= i < n]
    start, stop = rng
    return list(range(max(start, 0), min(stop, n)))


class Primitive:
    def apply(self, rules, layers):
        raise NotImplementedError


class LayerMap(Primitive):
    """Put ``rule`` on the layer with this index (int) or node name (str)."""

    def __init__(self, index, rule):
        self.index, self.rule = index, rule

    def apply(self, rules, layers):
        if isinstance(self.index, str):
            found = [l for l in layers if l.name == self.index]
            if not found:
                raise KeyError(f"LayerMap: no layer named '{self.index}'")
            layer = found[0]
        else:
            if not -len(layers) <= self.index < len(layers):
                raise IndexError(f"LayerMap: index {self.index} out of range (model has {len(layers)} layers)")
            layer = layers[self.index]
        check_compatible(self.rule, layer)
        rules[layer.index] = self.rule

    def __repr__(self):
        return f"LayerMap({self.index!r}, {self.rule!r})"


class GlobalMap(Primitive):
    """Put ``rule`` on every layer it fits (layers it does not fit, e.g. activations, keep their rule)."""

    def __init__(self, rule):
        self.rule = rule

    def apply(self, rules, layers):
        for layer in layers:
            if self.rule.is_compatible(layer):
                rules[layer.index] = self.rule

    def __repr__(self):
        return f"GlobalMap({self.rule!r})"


class RangeMap(GlobalMap):
    """Put ``rule`` on the layers with index in ``range`` (a range or a (start, stop) pair, stop excluded)."""

    def __init__(self, range_, rule):
        super().__init__(rule)
        self.range = range_

    def apply(self, rules, layers):
        for i in _indices(self.range, len(layers)):
            if self.rule.is_compatible(layers[i]):
                rules[i] = self.rule

    def __repr__(self):
        return f"RangeMap({self.range!r}, {self.rule!r})"


class FirstLayerMap(Primitive):
    """Put ``rule`` on the first layer that has parameters."""

    def __init__(self, rule):
        self.rule = rule

    def _target(self, layers):
        p = _param_layers(layers)
        return p[0] if p else None

    def apply(self, rules, layers):
        layer = self._target(layers)
        if layer is not None:
            check_compatible(self.rule, layer)
            rules[layer.index] = self.rule

    def __repr__(self):
        return f"{type(self).__name__}({self.rule!r})"


class LastLayerMap(FirstLayerMap):
    """Put ``rule`` on the last layer that has parameters."""

    def _target(self, layers):
        p = _param_layers(layers)
        return p[-1] if p else None


class GlobalTypeMap(Primitive):
    """Map layer types to rules on all layers: ``GlobalTypeMap({"ConvLayer": GammaRule(), "Gemm": ...})``."""

    def __init__(self, mapping):
        self.mapping = dict(mapping)

    def _targets(self, layers):
        return layers

    def apply(self, rules, layers):
        for layer in self._targets(layers):
            rule = _type_rule(self.mapping, layer)
            if rule is not None:
                check_compatible(rule, layer)
                rules[layer.index] = rule

    def __repr__(self):
        body = ",\n".join(f"    {k} => {v!r}" for k, v in self.mapping.items())
        return f"{type(self).__name__}(\n{body},\n  )"


class RangeTypeMap(GlobalTypeMap):
    def __init__(self, range_, mapping):
        super().__init__(mapping)
        self.range = range_

    def _targets(self, layers):
        return [layers[i] for i in _indices(self.range, len(layers))]


class FirstLayerTypeMap(GlobalTypeMap):
    """A type map applied to the first layer that has parameters only."""

    def _targets(self, layers):
        p = _param_layers(layers)
        return p[:1]


class LastLayerTypeMap(GlobalTypeMap):
    def _targets(self, layers):
        p = _param_layers(layers)
        return p[-1:]


class FirstNTypeMap(GlobalTypeMap):
    """A type map applied to the layers with index < n."""

    def __init__(self, n, mapping):
        super().__init__(mapping)
        self.n = n

    def _targets(self, layers):
        return layers[: self.n]


def default_rules(layers):
    """ZeroRule on every layer with a linear map (parameters, pooling, merges), the LRP-0 counterparts on
    the layers of attention (SoftmaxRule on softmaxes, UniformRule on products of two activations), and
    PassRule elsewhere."""
    zero, passing = ZeroRule(), PassRule()
    by_group = {"SoftmaxLayer": SoftmaxRule(), "AttentionLayer": UniformRule(), "ProductLayer": UniformRule()}
    return [zero if layer.linear else by_group.get(layer.group, passing) for layer in layers]


class Composite:
    """``Composite(*primitives)`` or ``Composite(default_rule, *primitives)``."""

    def __init__(self, *primitives, name=None):
        if primitives and isinstance(primitives[0], Rule):
            primitives = (GlobalMap(primitives[0]),) + primitives[1:]
        for p in primitives:
            if not isinstance(p, Primitive):
                raise TypeError(f"Composite takes composite primitives (GlobalTypeMap, LayerMap, ...), got {p!r}")
        self.primitives = list(primitives)
        self.name = name

    def rules(self, layers):
        rules = default_rules(layers)
        for p in self.primitives:
            p.apply(rules, layers)
        return rules

    def __repr__(self):
        inner = ",\n  ".join(repr(p) for p in self.primitives)
        return f"Composite(\n  {inner},\n)"


def _base_map(conv_rule, epsilon):
    eps = EpsilonRule(epsilon)
    return GlobalTypeMap({
        "ConvLayer": conv_rule,
        "DenseLayer": eps,
        "ScaleLayer": eps,
        "LayerNormalization": LayerNormRule(),
        "NormalizationLayer": PassRule(),
        "DropoutLayer": PassRule(),
        "ReshapingLayer": PassRule(),
        "ActivationLayer": PassRule(),
        "PoolingLayer": eps,
        "MergeLayer": eps,
    })


def EpsilonGammaBox(low, high, *, epsilon=DEFAULT_EPSILON, gamma=DEFAULT_GAMMA):
    """Gamma on convolutions, Epsilon on dense layers, ZBox(low, high) on the first convolution.

    The Gamma rule is the generalized one (GeneralizedGammaRule, Zennit's Gamma): it equals the plain
    GammaRule wherever that is well defined (a ReLU after the layer, non-negative inputs and positive
    outputs) and stays stable where relevance reaches outputs z < 0 (residual branches, separable and
    pre-activation convolutions), where the plain rule's denominator z + gamma (W+ a + b+) crosses zero
    and relevance explodes. Put GammaRule in a composite of your own for the plain rule."""
    return Composite(_base_map(GeneralizedGammaRule(gamma), epsilon),
                     FirstLayerTypeMap({"ConvLayer": ZBoxRule(low, high)}), name="EpsilonGammaBox")


def EpsilonPlus(*, epsilon=DEFAULT_EPSILON):
    """ZPlus on convolutions, Epsilon on dense layers."""
    return Composite(_base_map(ZPlusRule(), epsilon), name="EpsilonPlus")


def EpsilonAlpha2Beta1(*, epsilon=DEFAULT_EPSILON):
    """AlphaBeta(2, 1) on convolutions, Epsilon on dense layers."""
    return Composite(_base_map(AlphaBetaRule(2.0, 1.0), epsilon), name="EpsilonAlpha2Beta1")


def EpsilonPlusFlat(*, epsilon=DEFAULT_EPSILON):
    """EpsilonPlus with Flat on the first convolution."""
    return Composite(_base_map(ZPlusRule(), epsilon), FirstLayerTypeMap({"ConvLayer": FlatRule()}),
                     name="EpsilonPlusFlat")


def EpsilonAlpha2Beta1Flat(*, epsilon=DEFAULT_EPSILON):
    """EpsilonAlpha2Beta1 with Flat on the first convolution."""
    return Composite(_base_map(AlphaBetaRule(2.0, 1.0), epsilon), FirstLayerTypeMap({"ConvLayer": FlatRule()}),
                     name="EpsilonAlpha2Beta1Flat")


def _transformer_map(epsilon, product_rule):
    """LXT's efficient rules as a type map: LRP-0 (or epsilon) on linear layers, bias and residual adds,
    identity on activations, LayerNorm with its standard deviation held constant."""
    if epsilon < 0 or not epsilon == epsilon:
        raise ValueError(f"epsilon must be >= 0, got {epsilon}")
    # epsilon=0 is LXT's LRP-0: only exact zeros are guarded (see GRADIENT_STABILIZER)
    linear = EpsilonRule(epsilon if epsilon > 0 else GRADIENT_STABILIZER)
    return GlobalTypeMap({
        "ConvLayer": linear,
        "DenseLayer": linear,
        "ScaleLayer": linear,
        "MergeLayer": linear,
        "PoolingLayer": linear,
        "BatchNormalization": linear,
        "LayerNormalization": LayerNormRule(GRADIENT_STABILIZER),
        "NormalizationLayer": PassRule(),
        "DropoutLayer": PassRule(),
        "ReshapingLayer": PassRule(),
        "ActivationLayer": PassRule(),
        "MaskLayer": PassRule(),
        "SoftmaxLayer": SoftmaxRule(),
        "AttentionLayer": product_rule,
        "ProductLayer": product_rule,
    })


def AttnLRP(epsilon=0.0):
    """AttnLRP (Achtibat et al., ICML 2024) as LXT 2.1's efficient rules: LRP-0 on linear layers (or
    Epsilon with ``epsilon`` > 0), the softmax rule, the uniform rule on q kᵀ, probs v and other products
    of two activations, LayerNormRule, and the identity rule on activations."""
    return Composite(_transformer_map(epsilon, UniformRule(GRADIENT_STABILIZER)), name="AttnLRP")


def CPLRP(epsilon=0.0):
    """CP-LRP (Ali et al., ICML 2022) as LXT's ``cp_LRP``: AttnLRP with the attention probabilities held
    constant, so relevance flows through the values only, never into queries and keys."""
    return Composite(_transformer_map(epsilon, CPRule(GRADIENT_STABILIZER)), name="CPLRP")


PRESETS = {f.__name__: f for f in (EpsilonGammaBox, EpsilonPlus, EpsilonAlpha2Beta1, EpsilonPlusFlat,
                                   EpsilonAlpha2Beta1Flat, AttnLRP, CPLRP)}
