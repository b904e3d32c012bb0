"""Model-level helpers of the public API: canonize, strip_softmax, flatten_model, show_layer_indices,
lrp_rules, and LRP_CONFIG for extending onnxlrp to new ops."""
from __future__ import annotations

import sys

import onnx
import onnx.inliner

from ._onnx_utils import export_model
from .canonization import canonize_graph, strip_softmax_outputs
from .composite import Composite, default_rules
from .emitters import EMITTERS, Emitter
from .layers import build_layers
from .loading import load_model


def canonize(model) -> onnx.ModelProto:
    """Load, canonize (fuse BatchNorm, split LayerNorm, strip output softmax, drop Dropout/Identity) and
    return the canonized ModelProto."""
    loaded = load_model(model)
    canonize_graph(loaded.graph)
    return export_model(loaded.graph, loaded.opset)


def strip_softmax(model) -> onnx.ModelProto:
    """Remove Softmax/LogSoftmax nodes that produce graph outputs (never ones inside the graph)."""
    loaded = load_model(model)
    strip_softmax_outputs(loaded.graph)
    return export_model(loaded.graph, loaded.opset)


def flatten_model(model) -> onnx.ModelProto:
    """Inline all local functions (ONNX's nested 'chains') into one flat graph."""
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(model)
    return onnx.inliner.inline_local_functions(model)


def _layers(model):
    loaded = load_model(model)
    canonize_graph(loaded.graph)
    return build_layers(loaded.graph, loaded.explained)


def lrp_rules(model, composite=None) -> list:
    """The rule of every layer (index order) that ``composite`` (or the default) assigns."""
    layers = _layers(model)
    return composite.rules(layers) if isinstance(composite, Composite) else default_rules(layers)


def show_layer_indices(model, composite=None, file=None):
    """Print index, node name, op type, group, shapes and rule of every layer after canonization."""
    from .analyzer import LRP
    analyzer = model if isinstance(model, LRP) else None
    layers = analyzer.layers if analyzer else _layers(model)
    rules = analyzer.rules if analyzer else (composite.rules(layers) if composite else default_rules(layers))
    out = file or sys.stdout
    print(f"{'index':>5}  {'op type':<20} {'group':<18} {'name':<36} {'rule':<36} shapes", file=out)
    for layer, rule in zip(layers, rules):
        print(f"{layer.index:>5}  {layer.op_type:<20} {layer.group:<18} {layer.name[:36]:<36} "
              f"{rule!r:<36} {layer.shape_str()}", file=out)
    return layers


class _LRPConfig:
    """Extension points, as RelevancePropagation.jl's LRP_CONFIG."""

    def supports_layer(self, op_type: str) -> bool:
        return op_type in EMITTERS

    def register_emitter(self, emitter, op_types=None):
        """Register an Emitter (class or instance) for its op types (or the ones given)."""
        instance = emitter() if isinstance(emitter, type) else emitter
        if not isinstance(instance, Emitter):
            raise TypeError("register_emitter expects an onnxlrp.emitters.Emitter")
        for op in op_types or instance.op_types:
            EMITTERS[op] = instance
        return emitter

    def supports_activation(self, op_type: str) -> bool:
        e = EMITTERS.get(op_type)
        return e is not None and e.group == "ActivationLayer"

    def register_activation(self, op_type: str):
        """Treat ``op_type`` as an elementwise activation that relevance passes through."""
        from .emitters.elementwise import ActivationEmitter
        EMITTERS[op_type] = EMITTERS.get("Relu") or ActivationEmitter()


LRP_CONFIG = _LRPConfig()
