"""Gradient baselines as emitted graphs: ``Gradient``, ``InputTimesGradient``, ``SmoothGrad`` and
``IntegratedGradients``.

They are LRP analyzers whose one rule on every layer is the layer's vector-Jacobian product (each
emitter's ``vjp``: a linear layer's transpose with its own weights, an activation's true derivative, the
product rule on products and gates, softmax's and LayerNorm's Jacobians). So the graph is emitted by the
same rewriter, holds the forward and the backward pass, runs in one onnxruntime call per batch, and saves
and deploys like a relevance graph. The seed is the selected output's one-hot (its gradient); with
``normalize_output_relevance=False`` it is scaled by the output's value, as the relevance graph's is.

On piecewise-linear networks (ReLU, max-pooling, no LRN) LRP-0 equals gradient x input, which makes
InputTimesGradient the independent reference of the identity check (issue 10).

SmoothGrad and IntegratedGradients put all their samples of a batch into one run: each input becomes a
group of rows (the input itself and its noisy copies; the path from the baseline to it), and the graph
explains, in every row of a group, the output selected on the group's input row (the clean input, the
path's end), as ExplainableAI.jl selects on the plain forward pass.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

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

    def _check_explosion(self, x, expl, feeds, total):
        """A gradient has no conservation to break: its size is the model's."""


class InputTimesGradient(Gradient):
    """Gradient x input (the multiplication is inside the emitted graph): ``heatmap="attribution"``."""
    _times_input = True
    method_name, heatmap_kind = "InputTimesGradient", "attribution"
    _graph_title = "onnxlrp input x gradient graph (the input times the selected output's gradient)"


class _Augmented(Gradient):
    """A gradient analyzer that explains each input through a group of rows built from it (one run)."""
    method_name = ""
    _rows = "rows"

    @property
    def _graph_title(self):
        size, ref = self._selection_group
        return (f"onnxlrp gradient graph for {self.method_name}: the batch comes in groups of {size} rows "
                f"({self._rows}), and output_selection -1 explains in every row the top output of its group's "
                f"row {ref}; average the rows' gradients as {type(self).__name__} does")

    def _augment(self, x, n_rows):
        raise NotImplementedError

    def _reduce(self, x, grads):
        raise NotImplementedError

    def analyze(self, x, output_selection=None, *, inputs=None, keep_on_device=False, position=-1):
        if keep_on_device:
            raise ValueError(f"{type(self).__name__} averages on the host: keep_on_device is not available")
        x = self._check_input(x)
        n, size = len(x), self._selection_group[0]
        rows = self._augment(x, size)  # (n * size, ...)
        sel = None
        if output_selection is not None:
            sel = np.repeat(np.broadcast_to(np.asarray(output_selection), (n,)), size)
        others = {k: np.repeat(np.asarray(v), size, axis=0) for k, v in (inputs or {}).items()}
        pos = np.repeat(np.broadcast_to(np.asarray(position), (n,)), size) if self.sequence_output else position
        expl = super().analyze(rows, sel, inputs=others, position=pos)
        grads = np.asarray(expl.val).reshape((n, size) + np.asarray(expl.val).shape[1:])
        ref = self._selection_group[1]
        out = np.asarray(expl.output).reshape((n, size) + np.asarray(expl.output).shape[1:])[:, ref]
        chosen = np.asarray(expl.output_selection).reshape(n, size)[:, ref]
        extras = {k: (np.asarray(v).reshape((n, size) + np.asarray(v).shape[1:])[:, ref]
                      if k in ("output_position", "token_relevance") else v) for k, v in expl.extras.items()}
        val = self._reduce(x, grads)
        if self.token_input:
            extras["token_relevance"] = val.sum(axis=tuple(range(2, val.ndim)))
        return type(expl)(val=val, output=out, output_selection=chosen, analyzer=self.method_name,
                          heatmap=self.heatmap_kind, extras=extras)


class SmoothGrad(_Augmented):
    """The gradient averaged over ``n`` copies of the input with Gaussian noise of standard deviation ``std``
    added (Smilkov et al. 2017), for the output selected on the input itself; ``seed`` seeds the noise.
    All ``n`` copies of every input of a batch run in one onnxruntime call: memory grows with n x batch."""
    method_name, heatmap_kind = "SmoothGrad", "sensitivity"
    _rows = "the input, then its noisy copies"

    def __init__(self, model, n=50, std=0.1, *, seed=0, **kw):
        if int(n) < 1 or not np.isfinite(std) or std < 0:
            raise ValueError(f"SmoothGrad: n must be >= 1 and std finite and >= 0, got n={n}, std={std}")
        self.n, self.std, self.seed = int(n), float(std), seed
        self._selection_group = (self.n + 1, 0)  # row 0 of each group: the input itself
        super().__init__(model, **kw)

    def _augment(self, x, size):
        if self.token_input:
            raise ValueError("SmoothGrad adds noise to a float input; token ids take none (explain the "
                             "embeddings with Gradient or IntegratedGradients)")
        rng = np.random.default_rng(self.seed)
        rows = np.repeat(x[:, None], size, axis=1)
        rows[:, 1:] += (self.std * rng.standard_normal(rows[:, 1:].shape)).astype(x.dtype)
        return rows.reshape((-1,) + x.shape[1:])

    def _reduce(self, x, grads):
        return grads[:, 1:].mean(axis=1)  # the noisy copies; row 0 only chose the output


class IntegratedGradients(_Augmented):
    """(x - baseline) times the gradient averaged over ``n`` points of the straight path from ``baseline``
    (default zeros) to x, t = 0, 1/(n-1), ..., 1 as ExplainableAI.jl's (Sundararajan et al. 2017); the output
    is the one selected at x. Completeness: the attributions sum to about f(x) - f(baseline)."""
    method_name, heatmap_kind = "IntegratedGradients", "attribution"
    _rows = "the path from the baseline to the input"

    def __init__(self, model, n=50, baseline=None, **kw):
        if int(n) < 2:
            raise ValueError(f"IntegratedGradients: n must be >= 2 (the path's ends), got {n}")
        self.n, self.baseline = int(n), baseline
        self._selection_group = (self.n, self.n - 1)  # the last point of each path: x itself
        super().__init__(model, **kw)

    def _start(self, x):
        if self.baseline is None:
            return np.zeros_like(x)
        base = np.asarray(self.baseline, dtype=x.dtype)
        try:
            return np.broadcast_to(base, x.shape)
        except ValueError:
            raise ValueError(f"IntegratedGradients: the baseline's shape {base.shape} does not fit the input "
                             f"{x.shape}") from None

    def _augment(self, x, size):
        if self.token_input:
            raise ValueError("IntegratedGradients interpolates a float input; token ids cannot be interpolated")
        t = np.linspace(0.0, 1.0, size, dtype=x.dtype).reshape((1, size) + (1,) * (x.ndim - 1))
        start = self._start(x)[:, None]
        return (start + t * (x[:, None] - start)).reshape((-1,) + x.shape[1:])

    def _reduce(self, x, grads):
        return (x - self._start(x)) * grads.mean(axis=1)


__all__ = ["Gradient", "GradientRule", "InputTimesGradient", "IntegratedGradients", "SmoothGrad"]
