"""onnxlrp: Layer-wise Relevance Propagation for any ONNX model, on onnxruntime.

The API mirrors RelevancePropagation.jl: ``LRP(model, composite).analyze(x)`` returns an Explanation.
"""
from .analyzer import LRP, analyze
from .api import LRP_CONFIG, canonize, flatten_model, lrp_rules, show_layer_indices, strip_softmax
from .composite import (AttnLRP, CPLRP, Composite, EpsilonAlpha2Beta1, EpsilonAlpha2Beta1Flat, EpsilonGammaBox, EpsilonPlus,
                        EpsilonPlusFlat, FirstLayerMap, FirstLayerTypeMap, FirstNTypeMap, GlobalMap, GlobalTypeMap,
                        LastLayerMap, LastLayerTypeMap, LayerMap, PRESETS, RangeMap, RangeTypeMap)
from .crp import CRP, IndexedFeatures, TopNFeatures
from .errors import (DeviceError, InputError, LRPError, LRPWarning, ModelLoadError, RuleCompatibilityError,
                     UnsupportedModelError)
from .explanation import Explanation
# The module is named heatmaps so that onnxlrp.heatmap is the function.
from .heatmaps import TextHeatmap, heatmap, heatmap_overlay, text_heatmap
from . import images
from .rules import (AlphaBetaRule, CPRule, EpsilonRule, FlatRule, GammaRule, GeneralizedGammaRule, LayerNormRule,
                    PassRule, Rule, SoftmaxRule, UniformRule, WSquareRule, ZBoxRule, ZeroRule, ZPlusRule)

__version__ = "0.1.0"

__all__ = [
    "LRP", "analyze", "Explanation", "CRP", "TopNFeatures", "IndexedFeatures", "canonize", "strip_softmax", "flatten_model", "show_layer_indices",
    "lrp_rules", "LRP_CONFIG", "Composite", "LayerMap", "GlobalMap", "RangeMap", "FirstLayerMap", "LastLayerMap",
    "GlobalTypeMap", "RangeTypeMap", "FirstLayerTypeMap", "LastLayerTypeMap", "FirstNTypeMap", "PRESETS",
    "EpsilonGammaBox", "EpsilonPlus", "EpsilonAlpha2Beta1", "EpsilonPlusFlat", "EpsilonAlpha2Beta1Flat",
    "AttnLRP", "CPLRP", "SoftmaxRule", "UniformRule", "CPRule",
    "Rule", "ZeroRule", "EpsilonRule", "GammaRule", "WSquareRule", "FlatRule", "AlphaBetaRule", "ZPlusRule",
    "ZBoxRule", "PassRule", "GeneralizedGammaRule", "LayerNormRule",
    "heatmap", "heatmap_overlay", "text_heatmap", "TextHeatmap", "images",
    "LRPError", "LRPWarning", "DeviceError", "ModelLoadError", "UnsupportedModelError", "RuleCompatibilityError", "InputError",
]

