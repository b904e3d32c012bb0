"""The LRP analyzer: load, canonize, assign rules, emit one relevance graph, run it on onnxruntime."""
from __future__ import annotations

import os
import numpy as np
import onnx
import onnxruntime as ort

from .canonize import canonize_graph
from .composite import Composite, GlobalMap, check_compatible, default_rules
from .errors import InputError, LRPError
from .explanation import Explanation
from .layers import build_layers
from .loading import BATCH_DIM, _infer_shapes, clear_inferred_shapes, load_model
from .rewriter import (NORMALIZE, OUTPUT, RELEVANCE, SELECTION, SELECTION_USED, emit_relevance_model,
                       export_relevance_model)
from .rules import Rule
from .runtime import cuda_provider_options, make_session, session_device

GRAPH_DOC = """onnxlrp relevance graph (Layer-wise Relevance Propagation).
Inputs:
  {x} float {xshape}: the model's data input
  output_selection int64 (N): flat output index to explain per sample; -1 = the sample's top output
  normalize_output_relevance bool (): true = seed relevance 1, false = seed the output's value
Outputs:
  output float {yshape}: the model output (softmax stripped)
  relevance float {xshape}: the input relevance
  output_selection_used int64 (N): the explained output index per sample
Rules:
{rules}"""


class LRP:
    """Layer-wise Relevance Propagation on an ONNX model.

    ``LRP(model)``: ZeroRule on every layer with parameters, pooling or merges (PassRule elsewhere);
    ``LRP(model, composite)``: rules from a Composite (e.g. ``EpsilonGammaBox(-3, 3)``);
    ``LRP(model, [rule, rule, ...])``: one rule per layer index (see ``show_layer_indices``);
    ``LRP(model, rule)``: that rule on every layer it fits.

    The data input is the first graph input that has no initializer; pass ``input_name`` to explain
    another one, and the other inputs' values to ``analyze(..., inputs={name: array})``.
    """

    def __init__(self, model, rules_or_composite=None, *, normalize_output_relevance=True, skip_checks=False,
                 verbose=True, device="auto", input_name=None, layer_relevances=False, allow_tf32=False,
                 cudnn_conv_algo_search="EXHAUSTIVE"):
        self.source = os.fspath(model) if isinstance(model, (str, os.PathLike)) else "<ModelProto>"
        loaded = load_model(model, input_name)
        self.canonization = canonize_graph(loaded.graph)
        self.data_input = loaded.data_input
        self.other_inputs = loaded.other_inputs
        self.opset = loaded.opset
        self.normalize_output_relevance = bool(normalize_output_relevance)
        self.skip_checks = skip_checks
        self.verbose = verbose
        self.device = device
        self.layer_relevances = layer_relevances
        self.cuda_options = cuda_provider_options(allow_tf32, cudnn_conv_algo_search)
        self._canonical = loaded.graph  # emission works on copies (they share the weight arrays)
        self.layers = build_layers(loaded.graph, self.data_input, strict=not skip_checks)
        self.rules = self._resolve_rules(rules_or_composite)
        x = next(t for t in loaded.graph.inputs if t.name == self.data_input)
        self.input_shape = tuple(x.shape) if x.shape is not None else None
        self.input_dtype = np.dtype(x.dtype or np.float32)
        y = loaded.graph.outputs[0]
        self.output_shape = tuple(y.shape) if y.shape is not None else None
        self._built = {}
        self._built_concepts = {}
        if self.input_shape is not None and all(isinstance(d, int) for d in self.input_shape[1:]):
            self._build(tuple(self.input_shape[1:]))

    # -- rules -----------------------------------------------------------------------------------------
    def _resolve_rules(self, spec):
        layers = self.layers
        if spec is None:
            return default_rules(layers)
        if isinstance(spec, Rule):
            spec = Composite(GlobalMap(spec))
        if isinstance(spec, Composite):
            return spec.rules(layers)
        if isinstance(spec, (list, tuple)):
            if len(spec) != len(layers):
                raise LRPError(f"{self.source}: got {len(spec)} rules for {len(layers)} layers; "
                               "see onnxlrp.show_layer_indices(model) for the layer list")
            for rule, layer in zip(spec, layers):
                check_compatible(rule, layer)
            return list(spec)
        raise TypeError(f"expected a Composite, a rule or a list of rules, got {type(spec).__name__}")

    # -- emission ---------------------------------------------------------------------------------------
    def _build(self, feature_shape, concept_layer=None):
        # CRP graphs (with a concept mask) are kept apart: relevance_model/save mean the plain graph.
        built = self._built if concept_layer is None else self._built_concepts
        key = feature_shape if concept_layer is None else (feature_shape, concept_layer)
        if key in built:
            return built[key]
        graph = self._canonical.copy()
        x = next(t for t in graph.inputs if t.name == self.data_input)
        if tuple(x.shape[1:]) != feature_shape:
            x.shape = [BATCH_DIM] + list(feature_shape)
            clear_inferred_shapes(graph)
            graph = _infer_shapes(graph, self.source)
        layers = build_layers(graph, self.data_input, strict=not self.skip_checks)
        if len(layers) != len(self.layers):
            raise LRPError(f"{self.source}: the graph has a different layer structure for input shape "
                           f"{feature_shape}")
        doc = GRAPH_DOC.format(x=self.data_input, xshape=_fmt_shape((BATCH_DIM, *feature_shape)),
                               yshape=_fmt_shape(self.output_shape or ("?",)), rules=self.rules_listing())
        model = emit_relevance_model(graph, layers, self.rules, self.data_input, self.opset,
                                     layer_relevances=self.layer_relevances, doc=doc,
                                     concept_layer=concept_layer)
        session = make_session(model.SerializeToString(), self.device, verbose=self.verbose,
                               cuda_options=self.cuda_options)
        del model  # the graph keeps the arrays; relevance_model exports it again on demand
        built[key] = ((graph, doc), session)
        return built[key]

    def _export(self, built):
        graph, doc = built[0]
        return export_relevance_model(graph, self.opset, doc)

    @property
    def relevance_model(self) -> onnx.ModelProto:
        """The emitted relevance graph (for the static input shape, or the last one analyzed)."""
        if not self._built:
            raise LRPError(f"{self.source}: the input shape is dynamic; call analyze once (or save with "
                           "input_shape=...) so the relevance graph can be emitted")
        return self._export(list(self._built.values())[-1])

    @property
    def execution_device(self) -> str:
        return session_device(list(self._built.values())[-1][1]) if self._built else "cpu"

    def save(self, path, input_shape=None):
        """Write the emitted relevance graph; it runs in plain onnxruntime without onnxlrp."""
        model = self._export(self._build(tuple(input_shape))) if input_shape is not None else self.relevance_model
        onnx.save(model, os.fspath(path))
        return path

    # -- analysis ---------------------------------------------------------------------------------------
    def _check_input(self, x):
        if not isinstance(x, np.ndarray):
            x = np.asarray(x)
        if not np.issubdtype(x.dtype, np.floating):
            raise InputError(f"{self.source}: input '{self.data_input}' expects a floating-point array "
                             f"({self.input_dtype}), got dtype {x.dtype}")
        expected = self.input_shape
        if expected is not None:
            if x.ndim != len(expected):
                hint = " (add a batch axis: x[None])" if x.ndim == len(expected) - 1 else ""
                raise InputError(f"{self.source}: input '{self.data_input}' expects shape "
                                 f"{_fmt_shape(expected)}, got {x.shape}{hint}")
            for want, got in zip(expected[1:], x.shape[1:]):
                if isinstance(want, int) and want != got:
                    raise InputError(f"{self.source}: input '{self.data_input}' expects shape "
                                     f"{_fmt_shape(expected)}, got {x.shape}")
        if x.shape[0] == 0:
            raise InputError(f"{self.source}: empty batch")
        return np.ascontiguousarray(x, dtype=self.input_dtype)

    def _selection(self, output_selection, n, n_outputs):
        if output_selection is None:
            return np.full(n, -1, dtype=np.int64)
        sel = np.asarray(output_selection)
        if not np.issubdtype(sel.dtype, np.integer):
            raise InputError(f"output_selection must be integers, got {sel.dtype}")
        sel = np.full(n, int(sel), dtype=np.int64) if sel.ndim == 0 else sel.astype(np.int64).reshape(-1)
        if sel.shape[0] != n:
            raise InputError(f"output_selection has {sel.shape[0]} entries for a batch of {n}")
        if n_outputs is not None and (np.any(sel < 0) or np.any(sel >= n_outputs)):
            bad = sorted(set(sel[(sel < 0) | (sel >= n_outputs)].tolist()))
            shown = ", ".join(map(str, bad[:5])) + (", ..." if len(bad) > 5 else "")
            raise InputError(f"output_selection {shown} out of range: the model has {n_outputs} outputs "
                             f"per sample (valid: 0..{n_outputs - 1})")
        return sel

    def analyze(self, x, output_selection=None, *, inputs=None, keep_on_device=False) -> Explanation:
        """Explain ``x`` (a batch): relevance of the selected output (default: each sample's top output).

        With ``keep_on_device=True`` the Explanation's ``val`` and ``output`` are onnxruntime OrtValues left
        where the session ran (on the GPU with the CUDA provider), for chaining further GPU work.
        """
        x = self._check_input(x)
        _, session = self._build(tuple(x.shape[1:]))
        feeds = self._feeds(x, output_selection, inputs)
        names = [o.name for o in session.get_outputs()]
        results = self._run_bound(session, feeds, names, keep_on_device)
        extras = {}
        layer_keys = [k for k in names if k.startswith("relevance_layer_")]
        if layer_keys:
            extras["layerwise_relevances"] = {int(k.rsplit("_", 1)[1]): results[k] for k in layer_keys}
        return Explanation(val=results[RELEVANCE], output=results[OUTPUT],
                           output_selection=results[SELECTION_USED], analyzer="LRP", heatmap="attribution",
                           extras=extras)

    def _feeds(self, x, output_selection, inputs):
        y_shape = self.output_shape
        n_out = int(np.prod(y_shape[1:])) if y_shape and all(isinstance(d, int) for d in y_shape[1:]) else None
        sel = self._selection(output_selection, x.shape[0], n_out)
        feeds = {self.data_input: x, SELECTION: sel,
                 NORMALIZE: np.asarray(self.normalize_output_relevance)}
        for name in self.other_inputs:
            if not inputs or name not in inputs:
                raise InputError(f"{self.source}: the model has another input '{name}'; pass its value with "
                                 f"analyze(..., inputs={{'{name}': array}})")
            feeds[name] = inputs[name]
        return feeds

    @staticmethod
    def _run_bound(session, feeds, names, keep_on_device):
        """One run through IO binding: inputs are copied to the device once; outputs stay there and only
        what the caller wants as numpy is copied back."""
        device = session_device(session)
        binding = session.io_binding()
        for name, value in feeds.items():
            binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(np.asarray(value), device, 0))
        for name in names:
            binding.bind_output(name, device)
        session.run_with_iobinding(binding)
        values = binding.get_outputs()
        if keep_on_device:
            return {n: (v if n in (RELEVANCE, OUTPUT) else v.numpy()) for n, v in zip(names, values)}
        return dict(zip(names, binding.copy_outputs_to_cpu()))

    def analyze_batches(self, batches, output_selection=None, **kw):
        """Explain an iterable of batches, yielding one Explanation per batch."""
        for batch in batches:
            yield self.analyze(batch, output_selection, **kw)

    def __call__(self, x, output_selection=None, **kw):
        return self.analyze(x, output_selection, **kw)

    # -- display ----------------------------------------------------------------------------------------
    def rules_listing(self):
        return "\n".join(f"  {l.index:>3}  {l.op_type:<20} {l.name!r:<40} => {r!r}" for l, r in
                         zip(self.layers, self.rules))

    def __repr__(self):
        return f"LRP(\n{self.rules_listing()}\n)"


def _fmt_shape(shape):
    return "(" + ", ".join("N" if d == BATCH_DIM else str(d) for d in shape) + ")"


def analyze(x, analyzer: LRP, output_selection=None, **kw) -> Explanation:
    """``analyze(input, method[, output_selection])`` as in RelevancePropagation.jl."""
    return analyzer.analyze(x, output_selection, **kw)
