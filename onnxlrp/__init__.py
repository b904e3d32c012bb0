"""onnxlrp: Layer-wise Relevance Propagation for any ONNX model, on onnxruntime.

The API mirrors RelevancePropagation.jl: ``LRP(model, composite).analyze(x)`` returns an Explanation.

Names load on first use (PEP 562): ``import onnxlrp`` alone does not import onnx and onnxruntime, so the
command line's ``--help`` and ``--version`` answer at once.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

#: public name -> the submodule that defines it
_EXPORTS = {
    "analyzer": ["LRP", "analyze"],
    "auditing": ["AuditReport", "audit"],
    "api": ["LRP_CONFIG", "canonize", "flatten_model", "lrp_rules", "show_layer_indices", "strip_softmax"],
    "composite": ["AttnLRP", "CPLRP", "Composite", "EpsilonAlpha2Beta1", "EpsilonAlpha2Beta1Flat", "EpsilonGammaBox",
                  "EpsilonPlus", "EpsilonPlusFlat", "FirstLayerMap", "FirstLayerTypeMap", "FirstNTypeMap", "GlobalMap",
                  "GlobalTypeMap", "LastLayerMap", "LastLayerTypeMap", "LayerMap", "PRESETS", "RangeMap",
                  "RangeTypeMap"],
    "crp": ["CRP", "IndexedFeatures", "TopNFeatures"],
    "dataset": ["explain_dataset", "load_results"],
    "errors": ["DeviceError", "InputError", "LRPError", "LRPWarning", "ModelLoadError", "RuleCompatibilityError",
               "UnsupportedModelError"],
    "explanation": ["Explanation"],
    "gradients": ["Gradient", "InputTimesGradient", "IntegratedGradients", "SmoothGrad"],
    # The module is named heatmaps so that onnxlrp.heatmap is the function.
    "heatmaps": ["TextHeatmap", "heatmap", "heatmap_overlay", "text_heatmap"],
    "rules": ["AlphaBetaRule", "CPRule", "EpsilonRule", "FlatRule", "GammaRule", "GeneralizedGammaRule",
              "LayerNormRule", "PassRule", "Rule", "SoftmaxRule", "UniformRule", "WSquareRule", "ZBoxRule", "ZeroRule",
              "ZPlusRule"],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
#: submodules reachable as attributes (``onnxlrp.images.load_image``) without importing them first
_SUBMODULES = ("analyzer", "api", "auditing", "canonization", "cli", "composite", "crp", "dataset", "emitters", "errors", "explanation", "files", "gradients",
               "heatmaps", "images", "layers", "loading", "pipeline", "precision", "rewriter", "rules", "runtime")

__all__ = sorted(_WHERE) + ["images"]


def __getattr__(name):
    if name in _WHERE:
        value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # once loaded, a plain attribute
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
