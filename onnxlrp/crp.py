"""Concept Relevance Propagation (Achtibat et al.): explain an output through chosen features (channels)
of one layer. ``CRP(lrp, layer, features).analyze(x)`` returns, for each selected feature, the input
relevance that flows through that feature only, stacked feature-major along the batch axis as in
RelevancePropagation.jl: rows ``i*N : (i+1)*N`` belong to the i-th feature of every sample.

The emitted graph has one more input, ``concept_mask`` (N, features), that multiplies the relevance at the
layer's output. One run with an all-ones mask finds the relevance per feature (for TopNFeatures); one run
over the batch repeated once per feature gives all concept relevances.
"""
from __future__ import annotations

import numpy as np

from .errors import InputError, LRPError
from .explanation import Explanation
from .rewriter import CONCEPT_MASK, CONCEPT_RELEVANCE, NORMALIZE, OUTPUT, RELEVANCE, SELECTION, SELECTION_USED


def _feature_relevance(r):
    """(N, features): relevance per feature, summed over any spatial axes."""
    r = np.asarray(r)
    return r.reshape(r.shape[0], r.shape[1], -1).sum(axis=2)


class TopNFeatures:
    """The n features with the highest relevance, per sample (spatial axes summed)."""

    def __init__(self, n: int):
        if n < 1:
            raise ValueError(f"TopNFeatures needs n >= 1, got {n}")
        self.n = int(n)

    def __call__(self, relevance):
        per_feature = _feature_relevance(relevance)
        if self.n > per_feature.shape[1]:
            raise InputError(f"TopNFeatures({self.n}): the layer has only {per_feature.shape[1]} features")
        order = np.argsort(-per_feature, axis=1, kind="stable")[:, : self.n]
        return order.T  # (features, N)

    def __repr__(self):
        return f"TopNFeatures({self.n})"


class IndexedFeatures:
    """The same features (0-based channel indices) for every sample."""

    def __init__(self, *indices: int):
        if not indices:
            raise ValueError("IndexedFeatures needs at least one index")
        self.indices = [int(i) for i in indices]

    def __call__(self, relevance):
        n_samples, n_features = np.asarray(relevance).shape[:2]
        bad = [i for i in self.indices if not 0 <= i < n_features]
        if bad:
            raise InputError(f"IndexedFeatures{tuple(bad)}: the layer has {n_features} features (0..{n_features - 1})")
        return np.repeat(np.asarray(self.indices)[:, None], n_samples, axis=1)

    def __repr__(self):
        return f"IndexedFeatures({', '.join(map(str, self.indices))})"


class CRP:
    """``CRP(lrp_analyzer, layer, features)``: ``layer`` is the index of the layer after which the concept
    is located (see ``show_layer_indices``); ``features`` a TopNFeatures or IndexedFeatures."""

    def __init__(self, lrp_analyzer, layer: int, features):
        n = len(lrp_analyzer.layers)
        if not 0 <= layer < n - 1:
            raise LRPError(f"CRP: layer index must be in 0..{n - 2} (a layer below the output), got {layer}")
        if not callable(features):
            raise TypeError("CRP: features must be TopNFeatures(n) or IndexedFeatures(i, ...)")
        self.lrp = lrp_analyzer
        self.layer = layer
        self.features = features

    def analyze(self, x, output_selection=None, *, inputs=None) -> Explanation:
        lrp = self.lrp
        x = lrp._check_input(x)
        _, session = lrp._build(tuple(x.shape[1:]), concept_layer=self.layer)
        n = x.shape[0]
        feeds = lrp._feeds(x, output_selection, inputs)
        channels = lrp.layers[self.layer].outputs[0].shape[1]
        feeds[CONCEPT_MASK] = np.ones((n, channels), dtype=lrp.input_dtype)
        names = [o.name for o in session.get_outputs()]
        first = lrp._run_bound(session, feeds, names, keep_on_device=False)
        selected = self.features(first[CONCEPT_RELEVANCE])  # (features, N)
        k = selected.shape[0]
        mask = np.zeros((k, n, channels), dtype=lrp.input_dtype)
        mask[np.arange(k)[:, None], np.arange(n)[None, :], selected] = 1
        # The batch once per feature, feature-major; every copy explains the output the first run chose.
        tiled = {name: (value if name == NORMALIZE else np.concatenate([value] * k))
                 for name, value in feeds.items() if name != CONCEPT_MASK}
        tiled[SELECTION] = np.tile(first[SELECTION_USED], k)
        tiled[CONCEPT_MASK] = mask.reshape(k * n, channels)
        second = lrp._run_bound(session, tiled, names, keep_on_device=False)
        return Explanation(val=second[RELEVANCE], output=first[OUTPUT], output_selection=first[SELECTION_USED],
                           analyzer="CRP", heatmap="attribution",
                           extras={"features": selected, "concept_relevance": first[CONCEPT_RELEVANCE]})

    def __repr__(self):
        return f"CRP(layer={self.layer}, features={self.features!r})"
