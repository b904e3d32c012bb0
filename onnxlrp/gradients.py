"""Gradient baselines as emitted graphs: ``Gradient`` and ``InputTimesGradient``.

They are LRP analyzers whose one rule on every layer is the layer's vector-Jacobian product (each
emitter's ``vjp``: a linear layer's transpose with its own weights, an activation's true derivative, the
product rule on products and gates, softmax's and LayerNorm's Jacobians). So the graph is emitted by the
same rewriter, holds the forward and the backward pass, runs in one onnxruntime call per batch, and saves
and deploys like a relevance graph. The seed is the selected output's one-hot (its gradient); with
``normalize_output_relevance=False`` it is scaled by the output's value, as the relevance graph's is.

On piecewise-linear networks (ReLU, max-pooling, no LRN) LRP-0 equals gradient x input, which makes
InputTimesGradient the independent reference of the identity check (issue 10).
"""
from __future__ import annotations

from dataclasses import dataclass

from .analyzer import LRP
from .rules.base import Rule


@dataclass(eq=False, repr=False)
class GradientRule(Rule):
    """The layer's true derivative: the output's cotangent through the layer's vector-Jacobian product."""

    def is_compatible(self, layer):
        return True

    def emit(self, ctx, layer, relevance_out):
        return layer.emitter.vjp(ctx, layer, relevance_out)

    def __repr__(self):
        return "GradientRule()"


class Gradient(LRP):
    """The gradient of the selected output with respect to the input, from one emitted graph.

    ``Gradient(model).analyze(x[, output_selection])`` returns an Explanation with ``heatmap="sensitivity"``;
    the other keywords are LRP's (``device``, ``input_name``, ``output_name``, ``precision``, ...). Every op
    on a path from the input to the output needs a derivative: an op without one is refused, never passed
    through (``skip_checks`` does not apply).
    """
    _gradient = True
    method_name, heatmap_kind = "Gradient", "sensitivity"
    _graph_title = "onnxlrp gradient graph (the selected output's gradient with respect to the input)"

    def __init__(self, model, rules_or_composite=None, **kw):
        if rules_or_composite is not None and not (
                isinstance(rules_or_composite, (list, tuple)) and all(isinstance(r, GradientRule)
                                                                      for r in rules_or_composite)):
            raise TypeError(f"{type(self).__name__} takes no rules (it differentiates every layer exactly); "
                            f"got {rules_or_composite!r}")
        super().__init__(model, None, **kw)

    def _resolve_rules(self, spec):
        return [GradientRule() for _ in self.layers]

    def _check_explosion(self, x, expl, feeds):
        """A gradient has no conservation to break: its size is the model's."""


class InputTimesGradient(Gradient):
    """Gradient x input (the multiplication is inside the emitted graph): ``heatmap="attribution"``."""
    _times_input = True
    method_name, heatmap_kind = "InputTimesGradient", "attribution"
    _graph_title = "onnxlrp input x gradient graph (the input times the selected output's gradient)"


__all__ = ["Gradient", "GradientRule", "InputTimesGradient"]
