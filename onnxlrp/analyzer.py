"""The LRP analyzer: load, canonize, assign rules, emit one relevance graph, run it on onnxruntime."""
from __future__ import annotations

import json
import os
import sys
import threading
import time
import warnings
from typing import TYPE_CHECKING

import numpy as np
import onnxruntime as ort

from .cache import WEIGHTS_FILE, ModelCache, Uncacheable, usable_root
from .cache import describe as describe_for_cache
from .cache import resolve as resolve_cache
from .composite import Composite, GlobalMap, check_compatible, default_rules
from .errors import InputError, LRPError, LRPWarning
from .explanation import Explanation
from .files import atomic_write
# onnx, onnx-graphsurgeon and the modules built on them (loading, canonization, layers, rewriter, precision)
# are imported where a graph is loaded or emitted: a cache hit needs none of them (onnxlrp.interface)
from .interface import BATCH_DIM, NORMALIZE, OUTPUT, POSITION, RELEVANCE, SELECTION, SELECTION_USED, check_precision
from .rules import AlphaBetaRule, Rule

if TYPE_CHECKING:
    import onnx
from .runtime import (WeightFeedingSession, check_device, cuda_provider_options, detach_weights,
                      lift_dense_weights, make_session, prepacking_pays, session_device, will_use_cuda)

GRAPH_DOC = """{title}.
Inputs:
  {x} {xtype} {xshape}: the model's data input{others}
  output_selection int64 (N): flat output index to explain per sample; -1 = the sample's top output; any
    other value outside 0..K-1 is refused: output_selection_used -1 and NaN relevance for that sample{position}
  normalize_output_relevance bool (): true = seed relevance 1, false = seed the output's value
Outputs:
  output float {yshape}: the model output '{yname}' (softmax stripped)
  relevance float {rshape}: the relevance of {explained}
  output_selection_used int64 (N): the explained output index per sample (-1: the selection was refused)
Rules:
{rules}"""

#: sum |R_in| above this many times the seed (1, or the explained output's value) is an explosion.
EXPLOSION = 1e3

POSITION_DOC = """
  output_position int64 (N): the position of the (N, T, ...) output whose top output -1 selects; -1 = last"""

#: Values for a token model's other inputs when analyze() is given none: (name part, fill).
DEFAULT_TOKEN_INPUTS = (("mask", "ones"), ("token_type", "zeros"), ("segment", "zeros"), ("position", "arange"))


class LRP:
    """Layer-wise Relevance Propagation on an ONNX model.

    ``LRP(model)``: ZeroRule on every layer with parameters, pooling or merges (PassRule elsewhere);
    ``LRP(model, composite)``: rules from a Composite (e.g. ``EpsilonGammaBox(-3, 3)``);
    ``LRP(model, [rule, rule, ...])``: one rule per layer index (see ``show_layer_indices``);
    ``LRP(model, rule)``: that rule on every layer it fits.

    The data input is the first graph input that has no initializer; pass ``input_name`` to explain
    another one, and the other inputs' values to ``analyze(..., inputs={name: array})``. A model with
    several graph outputs explains the first one (and says so when ``verbose``); ``output_name`` picks
    another. ``model_outputs`` lists them all and ``output_name`` is the one explained.

    ``max_fold_bytes`` raises the bound on one tensor that constant folding may create (default 1 GiB, or
    $ONNXLRP_MAX_FOLD_BYTES: a small file must not make loading allocate gigabytes).

    ``cache`` (default True): keep the relevance graph on disk and take it from there when the same file is
    analyzed again with the same rules (onnxlrp.cache; a folder path puts it there, False turns it off).

    ``spinning=False``: onnxruntime's idle threads on the CPU sleep instead of spinning between ops (spinning
    is the fastest when nothing else runs), for programs that share the cores with other work (``onnxlrp
    explain`` on a folder: its decoding and writing threads ran beside it 11-15 % faster). The thread count
    stays onnxruntime's, and so does the relevance, bit for bit.

    ``precision="float64"`` runs everything in double (canonization, modified weights, the relevance graph),
    to tell float32 rounding apart from rule effects; ops onnxruntime has no double kernel for are lowered to
    ones it has, and a graph that still needs one runs on onnx's reference evaluator (slow, for verification).
    """

    #: emit each layer's relevance per input too (the explosion probe's graph)
    _input_relevances = False
    #: layers for a gradient graph (every data operand is an input; onnxlrp.gradients)
    _gradient = False
    #: multiply the backward pass's result by the input in the graph (InputTimesGradient)
    _times_input = False
    #: (size, ref): the batch comes in groups whose rows explain the top output of row ref (SmoothGrad)
    _selection_group = None
    #: Explanation.analyzer / Explanation.heatmap, and the emitted graph's title
    method_name, heatmap_kind = "LRP", "attribution"
    _graph_title = "onnxlrp relevance graph (Layer-wise Relevance Propagation)"

    def __init__(self, model, rules_or_composite=None, *, normalize_output_relevance=True, skip_checks=False,
                 verbose=True, device="auto", input_name=None, layer_relevances=False, allow_tf32=False,
                 cudnn_conv_algo_search="EXHAUSTIVE", precision="float32", output_name=None, max_fold_bytes=None,
                 cache=True, spinning=True):
        self.precision = precision
        self._dtype = check_precision(precision)
        self.source = os.fspath(model) if isinstance(model, (str, os.PathLike)) else "<ModelProto>"
        self._model, self._input_name = model, input_name  # read again for other input shapes
        self.output_name = output_name
        self._max_fold_bytes = max_fold_bytes
        self.normalize_output_relevance = bool(normalize_output_relevance)
        self.skip_checks = skip_checks
        self.verbose = verbose
        check_device(device)  # before a cache hit skips making a session the usual way
        self.device = device
        self.spinning = bool(spinning)
        self.layer_relevances = layer_relevances
        self.cuda_options = cuda_provider_options(allow_tf32, cudnn_conv_algo_search)
        self._rules_spec = rules_or_composite
        # made from the model on a cache miss, or when first asked for after a hit (see the properties)
        self._layers = self._rules = self._canonical_graph = self._canonization = None
        self._built = {}
        self._cache_writes = []  # cache entries being written (onnxlrp.cache.PendingEntry)
        self._built_concepts = {}
        self._out_shapes = {}
        self._explosion_reported = False
        self._nonfinite_warned = False
        self._diagnosis = {}  # the probe analyzer and the forward session, built once when first needed
        # analyze may run on several threads at once (onnxruntime's Run is thread-safe; onnxlrp explain runs
        # two small batches together): what it builds on first need (a graph for a new input shape, the
        # diagnosis) is built under this lock, once
        self._lock = threading.RLock()
        #: seconds per construction phase: load (read, check, shape inference, constant folding), canonize,
        #: layers (and rules), then per emitted graph emit, serialize and session (onnxruntime's setup); on a
        #: cache hit: cache (the key and the entry) and session
        self.construction_times = {}
        clock = time.perf_counter()
        self._cache = self._open_cache(cache)
        #: "hit" (the relevance graph came from onnxlrp.cache), "miss" (built, and written there) or why the
        #: cache is not used
        self.cache_status = "off" if self._cache is None else "miss"
        if isinstance(self._cache, str):
            self.cache_status, self._cache = self._cache, None
        if not (self._cache is not None and self._cache_hit()):
            if self._cache is not None:
                self._lap("cache", clock)
            self._construct()
            if self.input_shape is not None and all(isinstance(d, int) for d in self.input_shape[1:]):
                self._build(tuple(self.input_shape[1:]))
        if verbose and len(self.model_outputs) > 1 and output_name is None:
            print(f"onnxlrp: {self.source} has {len(self.model_outputs)} outputs "
                  f"({', '.join(self.model_outputs)}); explaining '{self.output_name}' (choose another with "
                  "output_name=)", file=sys.stderr)

    def _construct(self):
        """Load, canonize, build the layers and resolve the rules (what a cache hit skips)."""
        from .canonization import canonize_graph
        from .layers import build_layers
        clock = time.perf_counter()
        loaded = self._load(None)
        clock = self._lap("load", clock)
        self._canonization = canonize_graph(loaded.graph)
        clock = self._lap("canonize", clock)
        self.data_input = loaded.data_input
        self.other_inputs = loaded.other_inputs
        self.opset = loaded.opset
        #: the tensor whose relevance is returned: the data input, or a token model's embedding output
        self.explained = loaded.explained
        self.token_input = loaded.explained != loaded.data_input
        self.vocab_size = loaded.vocab_size
        self._canonical_graph = loaded.graph  # emission works on copies (they share the weight arrays)
        self._layers = build_layers(loaded.graph, self.explained, strict=not self.skip_checks,
                                    gradient=self._gradient)
        self._rules = self._resolve_rules(self._rules_spec)
        _confirm_relu_outputs(self._layers, self._rules)
        #: onnxruntime's weight pre-packing for this model's sessions (onnxlrp.runtime.prepacking_pays)
        self.prepack_weights = prepacking_pays(self._layers)
        self._lap("layers", clock)
        x = next(t for t in loaded.graph.inputs if t.name == self.data_input)
        self._canonical_shape = tuple(x.shape[1:]) if x.shape is not None else None
        self.input_shape = loaded.declared_shape
        self.input_dtype = np.dtype(x.dtype or np.float32)
        self._other_info = {t.name: (np.dtype(t.dtype or np.float32), t.shape) for t in loaded.graph.inputs
                            if t.name in self.other_inputs}
        y = loaded.graph.outputs[0]
        self.output_shape = tuple(y.shape) if y.shape is not None else None
        # Token models with a (N, T, ...) output (language models, token classifiers) explain one position.
        self.sequence_output = self.token_input and self.output_shape is not None and len(self.output_shape) == 3
        if self.sequence_output:
            self.output_shape = (BATCH_DIM, "T") + tuple(self.output_shape[2:])

    # -- what a cache hit makes only when asked ----------------------------------------------------------
    def _materialized(self, name):
        if self._layers is None:
            self._materialize()
        return getattr(self, name)

    layers = property(lambda self: self._materialized("_layers"), doc="The layers after canonization.")
    rules = property(lambda self: self._materialized("_rules"), doc="One rule per layer.")
    canonization = property(lambda self: self._materialized("_canonization"),
                            doc="What canonization changed (a summary).")
    _canonical = property(lambda self: self._materialized("_canonical_graph"))

    def _materialize(self):
        """After a cache hit: make the canonized graph, layers and rules from the model, and check that they
        agree with the entry (if not, it is removed and the relevance graphs are built again)."""
        self._construct()
        if self._metadata() != self._restored:
            warnings.warn(f"{self.source}: the cache entry did not match the model; it was removed and the "
                          "relevance graph is built again", LRPWarning, stacklevel=3)
            if self._cache is not None:
                self._cache.forget()
            self._built.clear()
            self._out_shapes.clear()

    # -- the cache (onnxlrp.cache) -----------------------------------------------------------------------
    def _open_cache(self, cache):
        """A ModelCache, None (off) or why the cache is not used."""
        root = resolve_cache(cache)
        if root is None:
            return None
        if not isinstance(self._model, (str, os.PathLike)):
            return "off (the model is a ModelProto: only files are cached)"
        if self._dtype != np.float32:
            return "off (float64 graphs are not cached)"
        if self.device == "cuda" or will_use_cuda(self.device):  # "cuda" without CUDA must fail, not hit
            return "off (CUDA sessions are not cached)"
        try:
            description = self._cache_description()
        except Uncacheable as exc:
            if self.verbose:
                print(f"onnxlrp: the relevance graph is not cached: {exc}", file=sys.stderr)
            return f"off ({exc})"
        root = usable_root(root, self.verbose)
        if root is None:
            return "off (the cache folder is not usable)"
        return ModelCache(root, self.source, description, self.verbose)

    def _cache_description(self):
        """What the relevance graph depends on besides the model and the input shape."""
        sources = {}
        options = {name: getattr(self, name) for name in (
            "_input_name", "output_name", "skip_checks", "layer_relevances", "_max_fold_bytes", "_input_relevances",
            "_gradient", "_times_input", "_selection_group", "_graph_title", "method_name", "heatmap_kind")}
        return {"analyzer": describe_for_cache(type(self), sources),
                "rules": describe_for_cache(self._rules_spec, sources),
                "options": describe_for_cache(options, sources), "sources": sorted(sources.items())}

    def _metadata(self):
        """What the analyzer needs to run a relevance graph without the canonized model (JSON-able)."""
        shape = lambda s: None if s is None else list(s)  # noqa: E731
        meta = {"model_outputs": self.model_outputs, "output_name": self.output_name, "data_input": self.data_input,
                "other_inputs": self.other_inputs, "opset": self.opset, "explained": self.explained,
                "vocab_size": self.vocab_size, "input_shape": shape(self.input_shape),
                "input_dtype": self.input_dtype.str, "output_shape": shape(self.output_shape),
                "sequence_output": self.sequence_output, "canonical_shape": shape(self._canonical_shape),
                "other_info": {k: [d.str, shape(s)] for k, (d, s) in self._other_info.items()},
                "rules": self.rules_listing(), "prepack_weights": self.prepack_weights}
        return json.loads(json.dumps(meta))

    def _restore(self, meta):
        shape = lambda s: None if s is None else tuple(s)  # noqa: E731
        self.model_outputs, self.output_name = list(meta["model_outputs"]), meta["output_name"]
        self.data_input, self.other_inputs = meta["data_input"], list(meta["other_inputs"])
        self.opset, self.explained, self.vocab_size = meta["opset"], meta["explained"], meta["vocab_size"]
        self.token_input = self.explained != self.data_input
        self.input_shape, self.output_shape = shape(meta["input_shape"]), shape(meta["output_shape"])
        self.input_dtype = np.dtype(meta["input_dtype"])
        self.sequence_output = bool(meta["sequence_output"])
        self._canonical_shape = shape(meta["canonical_shape"])
        self._other_info = {k: (np.dtype(d), shape(s)) for k, (d, s) in meta["other_info"].items()}
        self.prepack_weights = bool(meta["prepack_weights"])
        self._restored = json.loads(json.dumps(meta))

    def _cache_hit(self):
        """Take the relevance graph for the file's own input shape from the cache; False on a miss."""
        clock = time.perf_counter()
        found = self._cache.load(None, self.device, self.verbose, self.spinning)
        if found is None:
            return False
        entry, session = found
        try:
            self._restore(entry.meta["analyzer"])
            shape = self._canonical_shape
            self._out_shapes[shape] = shape_of(entry.meta["output_shape"])
        except (KeyError, TypeError, ValueError):
            self._cache.forget()
            return False
        self._built[shape] = ((shape, None), session)
        self.cache_status = "hit"
        self._lap("cache", clock)
        return True

    def _lap(self, phase, since):
        now = time.perf_counter()
        self.construction_times[phase] = self.construction_times.get(phase, 0.0) + now - since
        return now

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
    def _load(self, feature_shape):
        from .loading import load_model
        from .precision import cast_floats
        loaded = load_model(self._model, self._input_name, feature_shape, max_fold_bytes=self._max_fold_bytes)
        self._select_output(loaded)
        if self._dtype != np.float32:  # before canonizing: BatchNorm fusion is then exact in double too
            cast_floats(loaded.graph, self._dtype)
        return loaded

    def _select_output(self, loaded):
        """Keep the one graph output that is explained (the first unless ``output_name`` says), and drop
        the nodes and inputs that only the others need."""
        graph = loaded.graph
        self.model_outputs = [t.name for t in graph.outputs]
        name = self.output_name if self.output_name is not None else self.model_outputs[0]
        chosen = next((t for t in graph.outputs if t.name == name), None)
        if chosen is None:
            raise InputError(f"{self.source}: the model has no output named {name!r}; its outputs are "
                             f"{self.model_outputs}")
        self.output_name = name
        if len(graph.outputs) == 1:
            return
        graph.outputs = [chosen]
        graph.cleanup(remove_unused_graph_inputs=False)
        used = {t.name for node in graph.nodes for t in node.inputs} | {chosen.name}
        if loaded.data_input not in used:
            raise InputError(f"{self.source}: output {name!r} does not depend on the data input "
                             f"'{loaded.data_input}'; nothing to explain")
        loaded.other_inputs = [n for n in loaded.other_inputs if n in used]
        graph.inputs = [t for t in graph.inputs if t.name == loaded.data_input or t.name in loaded.other_inputs]

    def _build(self, feature_shape, concept_layer=None):
        # CRP graphs (with a concept mask) are kept apart: relevance_model/save mean the plain graph.
        built = self._built if concept_layer is None else self._built_concepts
        key = feature_shape if concept_layer is None else (feature_shape, concept_layer)
        found = built.get(key)
        if found is not None:
            return found
        with self._lock:
            if key not in built:  # not built by another thread meanwhile
                self._build_new(built, key, feature_shape, concept_layer)
            return built[key]

    def _build_new(self, built, key, feature_shape, concept_layer):
        clock = time.perf_counter()
        cached = self._cache is not None and concept_layer is None
        if cached:
            # the file's own static shape has the key the construction looks for (a token model's canonical
            # shape is only the length its layers were found with)
            static = self.input_shape is not None and all(isinstance(d, int) for d in self.input_shape[1:])
            shape_key = None if static and feature_shape == tuple(self.input_shape[1:]) else feature_shape
            found = (self._cache.load(shape_key, self.device, self.verbose, self.spinning) if shape_key is not None
                     else None)
            if found is not None:
                self._out_shapes[feature_shape] = shape_of(found[0].meta["output_shape"])
                built[key] = ((feature_shape, None), found[1])
                return built[key]
            entry_shape = shape_key  # the entry's shape key (None: the file's own shape)
        from .rewriter import export_relevance_model
        graph, doc = self._emit(feature_shape, concept_layer)
        clock = self._lap("emit", clock)
        # float32: the weights go to the session as arrays, not through protobuf (float64 may need the
        # whole bytes for onnx's reference evaluator)
        weights = detach_weights(graph) if self._dtype == np.float32 else None
        # without pre-packing, the dense weights are cheaper as inputs than as initializers (see there)
        weight_inputs = (lift_dense_weights(graph, weights) if weights and not self.prepack_weights and
                         not will_use_cuda(self.device) else None)
        model_bytes = export_relevance_model(graph, self.opset, doc).SerializeToString()  # the proto goes
        self._out_shapes[feature_shape] = tuple(graph.outputs[0].shape) if graph.outputs[0].shape else None
        # The session holds what it needs (and the detached arrays); the emitted graph is let go, and
        # relevance_model / save emit it again.
        del graph
        clock = self._lap("serialize", clock)
        # the model file's hash (the entry's key) runs on a thread beside all this; the entry waits for it
        pending = self._cache.start_entry(entry_shape) if cached else None
        try:
            session = self._session(model_bytes, weights, pending, weight_inputs)
        except BaseException:
            if pending is not None:
                pending.abandon()
            raise
        if pending is not None:
            pending.finish({"analyzer": self._metadata(), "shape": list(feature_shape),
                            "output_shape": None if self._out_shapes[feature_shape] is None else
                            list(self._out_shapes[feature_shape])}, weight_inputs)
            self._cache_writes.append(pending)
        self._lap("session", clock)
        del model_bytes, weights, weight_inputs
        built[key] = ((feature_shape, concept_layer), session)
        return built[key]

    def _emit(self, feature_shape, concept_layer=None):
        """The canonized graph for this input shape with the relevance pass added, and its doc string."""
        from .canonization import canonize_graph
        from .layers import build_layers
        from .precision import lower_double_ops
        from .rewriter import emit_relevance_graph
        if feature_shape == self._canonical_shape:
            graph = self._canonical.copy()
        else:
            # Load again with the shape fixed: shapes computed at run time (attention scales, causal
            # masks, reshape targets) fold into constants for this shape.
            loaded = self._load(feature_shape)
            canonize_graph(loaded.graph)
            graph = loaded.graph
            _share_arrays(graph, self._canonical)
        layers = build_layers(graph, self.explained, strict=not self.skip_checks, gradient=self._gradient)
        _confirm_relu_outputs(layers, self.rules)
        if [l.op_type for l in layers] != [l.op_type for l in self.layers]:
            raise LRPError(f"{self.source}: the graph has a different layer structure for input shape "
                           f"{feature_shape}")
        y = graph.outputs[0]
        r = graph.tensors()[self.explained]
        others = "".join(f"\n  {name} {np.dtype(t.dtype)} {_fmt_shape(t.shape or ('?',))}: another model input"
                         for name, t in ((t.name, t) for t in graph.inputs if t.name in self.other_inputs))
        doc = GRAPH_DOC.format(title=self._graph_title, x=self.data_input, yname=self.output_name, xtype=self.input_dtype, xshape=_fmt_shape((BATCH_DIM, *feature_shape)),
                               others=others, position=POSITION_DOC if self.sequence_output else "",
                               yshape=_fmt_shape(y.shape or ("?",)), rshape=_fmt_shape(r.shape or ("?",)),
                               explained="the input" if not self.token_input else
                               f"the embedding output '{self.explained}'", rules=self.rules_listing())
        emit_relevance_graph(graph, layers, self.rules, self.data_input,
                             layer_relevances=self.layer_relevances, concept_layer=concept_layer,
                             explained=self.explained, sequence_output=self.sequence_output,
                             input_relevances=self._input_relevances, times_input=self._times_input,
                             selection_group=self._selection_group)
        if self._dtype == np.float64:
            lower_double_ops(graph)
        return graph, doc

    def _session(self, model_bytes, weights=None, pending=None, weight_inputs=None):
        try:
            return make_session(model_bytes, self.device, verbose=self.verbose, cuda_options=self.cuda_options,
                                weights=weights, prepack=self.prepack_weights, save_to=None if pending is None else
                                (pending.graph_path, WEIGHTS_FILE), weight_inputs=weight_inputs, spinning=self.spinning)
        except (ort.capi.onnxruntime_pybind11_state.NotImplemented,
                ort.capi.onnxruntime_pybind11_state.InvalidGraph) as e:
            if self._dtype != np.float64 or ("tensor(double)" not in str(e) and "implementation for" not in str(e)):
                raise
            # a double op onnxruntime has no kernel for and onnxlrp does not lower (Erf, Resize, ...), or
            # one whose schema has no double at all (Celu)
            if self.verbose:
                op = (str(e).split("implementation for ")[-1].split(" node")[0] if "implementation for" in str(e)
                      else str(e).split("of operator (")[-1].split(")")[0])
                print(f"onnxlrp: float64 runs on onnx's reference evaluator (slow): onnxruntime has no double "
                      f"kernel for {op}", file=sys.stderr)
            import onnx

            from .precision import ReferenceSession
            return ReferenceSession(onnx.load_from_string(model_bytes))

    def _export(self, built):
        from .rewriter import export_relevance_model
        graph, doc = self._emit(*built[0])
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
        """Write the emitted relevance graph; it runs in plain onnxruntime without onnxlrp. The file is
        written whole or not at all, and never through a symlink planted beside it (onnxlrp.files)."""
        model = self._export(self._build(tuple(input_shape))) if input_shape is not None else self.relevance_model
        data = model.SerializeToString()
        del model
        with atomic_write(os.fspath(path)) as f:
            f.write(data)
        return path

    # -- analysis ---------------------------------------------------------------------------------------
    def _check_input(self, x):
        if not isinstance(x, np.ndarray):
            x = np.asarray(x)
        if self.token_input:
            if not np.issubdtype(x.dtype, np.integer):
                raise InputError(f"{self.source}: input '{self.data_input}' expects integer token ids "
                                 f"({self.input_dtype}), got dtype {x.dtype}")
            if x.size and (x.min() < 0 or x.max() >= self.vocab_size):
                bad = int(x.min()) if x.min() < 0 else int(x.max())
                raise InputError(f"{self.source}: token id {bad} in '{self.data_input}' is out of range: the "
                                 f"embedding table has {self.vocab_size} rows (valid: 0..{self.vocab_size - 1})")
        elif not np.issubdtype(x.dtype, np.floating):
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
        x = np.ascontiguousarray(x, dtype=self.input_dtype)
        if not self.token_input and not np.all(np.isfinite(x)):
            # NaN in, NaN relevance out would read as "no relevance" in a heatmap
            bad = np.flatnonzero(~np.isfinite(x.reshape(len(x), -1)).all(1)).tolist()
            shown = ", ".join(map(str, bad[:5])) + (", ..." if len(bad) > 5 else "")
            raise InputError(f"{self.source}: input '{self.data_input}' holds NaN or infinite values "
                             f"(sample{'s' if len(bad) > 1 else ''} {shown})")
        return x

    def _selection(self, output_selection, n, n_outputs):
        if output_selection is None:
            return np.full(n, -1, dtype=np.int64)
        sel = np.asarray(output_selection)
        if not np.issubdtype(sel.dtype, np.integer):
            raise InputError(f"output_selection must be integers, got {sel.dtype}")
        if sel.size and sel.max() > np.iinfo(np.int64).max:
            raise InputError(f"output_selection {int(sel.max())} out of range: the model has "
                             f"{n_outputs or 'fewer'} outputs per sample")
        sel = np.full(n, int(sel), dtype=np.int64) if sel.ndim == 0 else sel.astype(np.int64).reshape(-1)
        if sel.shape[0] != n:
            raise InputError(f"output_selection has {sel.shape[0]} entries for a batch of {n}")
        # -1 is the sample's top output, as in the exported graph
        invalid = (sel < -1) | (sel >= n_outputs) if n_outputs is not None else sel < -1
        if np.any(invalid):
            bad = sorted(set(sel[invalid].tolist()))
            shown = ", ".join(map(str, bad[:5])) + (", ..." if len(bad) > 5 else "")
            raise InputError(f"output_selection {shown} out of range: the model has {n_outputs} outputs "
                             f"per sample (valid: 0..{n_outputs - 1}, or -1 for the top output)")
        return sel

    def analyze(self, x, output_selection=None, *, inputs=None, keep_on_device=False, position=-1) -> Explanation:
        """Explain ``x`` (a batch): relevance of the selected output (default: each sample's top output).

        Token models (integer ``input_ids``) return the relevance of the word-embedding output (N, T, H) in
        ``val`` and its sum over H in ``extras["token_relevance"]``; their other inputs default to all ones
        (attention masks), zeros (token types) and 0..T-1 (position ids). For a (N, T, V) output (a language
        model, a token classifier) ``position`` (default -1, the last) says which position is explained and
        ``output_selection`` is then the class or token id at that position.

        With ``keep_on_device=True`` the Explanation's ``val`` and ``output`` are onnxruntime OrtValues left
        where the session ran (on the GPU with the CUDA provider), for chaining further GPU work.
        """
        x = self._check_input(x)
        feature_shape = tuple(x.shape[1:])
        _, session = self._build(feature_shape)
        names, input_shapes, _ = _session_facts(session)
        feeds = self._feeds(x, output_selection, inputs, self._out_shapes.get(feature_shape), position,
                            input_shapes)
        results = self._run_bound(session, feeds, names, keep_on_device)
        extras = {}
        layer_keys = [k for k in names if k.startswith("relevance_layer_")]
        if layer_keys:
            extras["layerwise_relevances"] = {int(k.rsplit("_", 1)[1]): results[k] for k in layer_keys}
        for prefix, key in (("relevance_in_", "input_relevances"), ("relevance_out_", "output_relevances")):
            keys = [k for k in names if k.startswith(prefix)]
            if keys:
                extras[key] = {tuple(int(p) for p in k.split("_")[2:]): results[k] for k in keys}
        selection = results[SELECTION_USED]
        if self.sequence_output:
            per_step = int(np.prod(self._out_shapes[feature_shape][2:]))
            extras["output_position"] = selection // per_step
            selection = selection % per_step
        if self.token_input and isinstance(results[RELEVANCE], np.ndarray):
            extras["token_relevance"] = results[RELEVANCE].sum(axis=tuple(range(2, results[RELEVANCE].ndim)))
        expl = Explanation(val=results[RELEVANCE], output=results[OUTPUT],
                           output_selection=selection, analyzer=self.method_name, heatmap=self.heatmap_kind,
                           extras=extras)
        if not keep_on_device:
            # One pass over the relevance serves both checks: a float64 sum of float32 magnitudes cannot
            # overflow, so it is finite exactly when every value is (a float64 graph's sum can: that case
            # takes the exact test).
            total = np.abs(np.asarray(expl.val).reshape(len(x), -1)).sum(1, dtype=np.float64)
            if not (np.isfinite(total).all() and np.isfinite(expl.output).all()):
                finite = self._check_finite(x, expl, feeds)
            else:
                finite = True
            if finite and not self._explosion_reported:
                self._check_explosion(x, expl, feeds, total)
        return expl

    def _check_finite(self, x, expl, feeds):
        """False (and an LRPWarning naming the layer, once per analyzer) when a sample's output or relevance
        is not finite; ``expl.extras["nonfinite"]`` then holds the samples, the first of them and why it is
        not finite (the layer where it starts), on every call."""
        n = len(x)
        out_ok = np.isfinite(np.asarray(expl.output).reshape(n, -1)).all(1)
        rel_ok = np.isfinite(np.asarray(expl.val).reshape(n, -1)).all(1)
        bad = np.flatnonzero(~(out_ok & rel_ok))
        if not bad.size:
            return True
        first = int(bad[0])
        if self._input_relevances:  # a probe says nothing about itself (it would build a probe of its own)
            expl.extras["nonfinite"] = {"samples": bad.tolist(), "first": first, "reason": "not finite"}
            return False
        with self._lock:  # the diagnosis builds sessions once, whichever thread needs them first
            reason = (self._overflow_reason(feeds, first) if not out_ok[first]
                      else self._nonfinite_relevance_reason(x, feeds, first))
            warn, self._nonfinite_warned = not self._nonfinite_warned, True
        if warn:
            warnings.warn(f"{self.source}: sample {first}: {reason}", LRPWarning, stacklevel=3)
        expl.extras["nonfinite"] = {"samples": bad.tolist(), "first": first, "reason": reason}
        return False

    @staticmethod
    def _describe(layer):
        return f"layer {layer.index} '{layer.name}' ({layer.op_type})"

    def _layer_outputs(self, feeds, rows=slice(None)):
        """Each layer's first output (in layer order) on ``feeds``, from the canonized graph run by plain
        onnxruntime (the session is built once): what the rules divide by, and where an overflow starts.
        ``rows``: which samples (a slice of the batch)."""
        layers = sorted(self.layers, key=lambda l: l.index)
        if "forward" not in self._diagnosis:
            import onnx_graphsurgeon as gs
            graph = self._canonical.copy()
            tensors = graph.tensors()
            outs = [tensors[l.outputs[0].name] for l in layers]
            for t in outs:
                t.dtype = t.dtype or self._dtype
            graph.outputs = outs
            weights = detach_weights(graph)  # as for the relevance graph: no protobuf copy of the weights
            self._diagnosis["forward"] = make_session(gs.export_onnx(graph).SerializeToString(), "cpu",
                                                      verbose=False, weights=weights)
        session = self._diagnosis["forward"]
        wanted = {i.name for i in session.get_inputs()}
        return session.run(None, {k: np.asarray(v)[rows] for k, v in feeds.items() if k in wanted})

    def _overflow_reason(self, feeds, index):
        """Why the forward pass is not finite: the first layer whose output overflows (the input is finite)."""
        reason = "the model's output is not finite (NaN or infinite values: its forward pass overflows float32)"
        layers = sorted(self.layers, key=lambda l: l.index)
        try:
            values = self._layer_outputs(feeds, slice(index, index + 1))
        except Exception:  # the diagnosis is best effort; the fact stands without it
            return reason
        for layer, value in zip(layers, values):
            if not np.all(np.isfinite(value)):
                return f"{reason[:-1]}: {self._describe(layer)} is the first layer whose output is not)"
        return reason

    def _nonfinite_relevance_reason(self, x, feeds, index):
        reason = "the relevance is not finite (NaN or infinite values) though the model's output is"
        probe = self._probe(x[index:index + 1], feeds, index)
        if probe is None:
            return reason
        received, passed = probe
        for layer in sorted(self.layers, key=lambda l: -l.index):  # backward order: the first to produce it
            if np.isfinite(received.get(layer.index, np.nan)) and not np.isfinite(passed.get(layer.index, 0.0)):
                return (f"{reason}: {self._describe(layer)} under {self.rules[layer.index]!r} is the first to "
                        "produce it from finite relevance (a denominator or a modified weight overflows float32)")
        return reason

    def _check_explosion(self, x, expl, feeds, total):
        """Say once which layer's rule made the relevance explode (sum |R| above EXPLOSION times the seed:
        a denominator that crosses zero, e.g. the plain Gamma rule on outputs z < 0), instead of handing
        back an explosion silently. ``total``: each sample's sum |R| (float64)."""
        n = len(x)
        if self.normalize_output_relevance and total.max() <= EXPLOSION:  # the seed is 1: nothing to look at
            return
        out = np.asarray(expl.output, np.float64)
        sel = np.asarray(expl.output_selection)
        if self.sequence_output:
            out = out[np.arange(n), np.asarray(expl.extras["output_position"])]
        out = out.reshape(n, -1)
        value = np.abs(out[np.arange(n), sel])
        seed = np.ones(n) if self.normalize_output_relevance else value
        # Explaining an output that is ~0 next to the others divides by ~0 by the user's choice, not the rule's.
        tiny = value < 1e-3 * np.abs(out).max(axis=1)
        bad = np.flatnonzero(~(total <= EXPLOSION * np.maximum(seed, 1e-30)) & ~tiny)
        if not bad.size:
            return
        # A large sum alone can be right (a near-zero explained output spread over large inputs): only a
        # layer that passes back far more relevance than reaches it is an explosion. The probe builds a
        # second relevance graph, so it runs once per analyzer whatever it finds.
        with self._lock:
            if self._explosion_reported:  # by another thread meanwhile
                return
            self._explosion_reported = True
            culprit = self._explosion_layer(x[bad[:1]], feeds, bad[0])
        if culprit is None:
            return
        layer, ratio = culprit
        rule = self.rules[layer.index]
        if isinstance(rule, AlphaBetaRule) and ratio <= rule.alpha + rule.beta + 1e-3:
            # no near-zero denominator: the rule's own bound, compounded over the layers
            why = (f"{type(rule).__name__} passes back alpha = {rule.alpha:g} times the relevance of a neuron whose "
                   "contributions all have one sign (an empty negative part), and up to alpha + beta times, "
                   "at every layer: ZPlusRule (alpha 1, beta 0) keeps it bounded")
        else:
            why = ("its denominator comes near zero where relevance arrives: a stabler rule there "
                   "(GeneralizedGammaRule instead of GammaRule, a larger epsilon) keeps it bounded")
        warnings.warn(f"{self.source}: relevance explodes on sample {int(bad[0])}: {self._describe(layer)} under "
                      f"{rule!r} passes back {ratio:.3g}x the relevance that reaches it (sum |R| = "
                      f"{total[bad[0]]:.3g} for a seed of {seed[bad[0]]:.3g}); {why}", LRPWarning, stacklevel=3)

    def _probe(self, x, feeds, index):
        """For sample ``index``: ({layer: sum |R| at its outputs}, {layer: sum |R| it passes to its inputs}),
        from a twin relevance graph that returns every layer's relevance per input; None if that fails."""
        try:
            probe = self._diagnosis.get("probe")
            if probe is None:
                probe = _probe_class(type(self))(
                    self._model, list(self.rules), normalize_output_relevance=True, verbose=False, device="cpu",
                    input_name=self._input_name, layer_relevances=True, skip_checks=self.skip_checks,
                    precision=self.precision, output_name=self.output_name, max_fold_bytes=self._max_fold_bytes)
                probe._explosion_reported = True
                probe._nonfinite_warned = True
                self._diagnosis["probe"] = probe
            inputs = {k: np.asarray(v)[index:index + 1] for k, v in feeds.items() if k in self.other_inputs}
            sel = np.asarray(feeds[SELECTION])[index:index + 1]
            kw = {"position": np.asarray(feeds[POSITION])[index:index + 1]} if POSITION in feeds else {}
            if self.sequence_output and sel[0] >= 0:
                sel = sel % int(np.prod(self._out_shapes[tuple(x.shape[1:])][2:]))
            expl = probe.analyze(x, None if sel[0] < 0 else sel, inputs=inputs, **kw)
        except Exception:  # a diagnosis that fails says nothing
            return None
        received = {}
        for (i, _), r in expl.extras.get("output_relevances", {}).items():
            received[i] = received.get(i, 0.0) + float(np.abs(r).sum())
        passed = {}
        for (i, _), r in expl.extras["input_relevances"].items():
            passed[i] = passed.get(i, 0.0) + float(np.abs(r).sum())
        return received, passed

    def _explosion_layer(self, x, feeds, index):
        """(layer, ratio) of the layer that multiplies the relevance reaching it the most (sum |R| passed to
        its inputs over sum |R| at its output, from one sample's per-layer relevances): the first one nearest
        the output above EXPLOSION, else the largest ratio where an explosion builds up over several layers
        (residual sums that nearly cancel, each x10..x50); None if no layer multiplies it by 2 or more."""
        probe = self._probe(x, feeds, index)
        if probe is None:
            return None
        received, passed = probe
        worst = None
        for layer in sorted(self.layers, key=lambda l: -l.index):
            if received.get(layer.index, 0.0) > 0:
                ratio = passed.get(layer.index, 0.0) / received[layer.index]
                if ratio > EXPLOSION:
                    return layer, ratio
                if ratio >= 2 and (worst is None or ratio > worst[1]):
                    worst = (layer, ratio)
        return worst

    def _feeds(self, x, output_selection, inputs, y_shape=None, position=-1, input_shapes=None):
        y_shape = y_shape or self.output_shape
        n_out = int(np.prod(y_shape[1:])) if y_shape and all(isinstance(d, int) for d in y_shape[1:]) else None
        extra = {}
        if self.sequence_output:
            steps, per_step = int(y_shape[1]), int(np.prod(y_shape[2:]))
            pos = np.asarray(position).astype(np.int64).reshape(-1)
            if not np.issubdtype(np.asarray(position).dtype, np.integer) or np.any((pos < -steps) | (pos >= steps)):
                raise InputError(f"position {position} out of range: the output has {steps} positions")
            pos = np.broadcast_to(np.where(pos < 0, pos + steps, pos), (x.shape[0],)).astype(np.int64)
            sel = self._selection(output_selection, x.shape[0], per_step)
            sel = np.where(sel >= 0, pos * per_step + sel, sel)  # -1: the top output at that position
            extra[POSITION] = pos
        else:
            sel = self._selection(output_selection, x.shape[0], n_out)
        feeds = {self.data_input: x, SELECTION: sel,
                 NORMALIZE: np.asarray(self.normalize_output_relevance), **extra}
        unknown = sorted(set(inputs or {}) - set(self.other_inputs))
        if unknown:
            raise InputError(f"{self.source}: the model has no other input {unknown[0]!r}; its other inputs are "
                             f"{self.other_inputs}")
        for name in self.other_inputs:
            value = (inputs or {}).get(name)
            if value is None:
                value = self._default_input(name, x)
            if value is None:
                raise InputError(f"{self.source}: the model has another input '{name}'; pass its value with "
                                 f"analyze(..., inputs={{'{name}': array}})")
            feeds[name] = self._check_other(name, value, x, (input_shapes or {}).get(name))
        return feeds

    def _default_input(self, name, x):
        """A token model's attention mask (ones), token types (zeros) or position ids (0..T-1)."""
        dtype, shape = self._other_info[name]
        if not self.token_input or shape is None or len(shape) != x.ndim:
            return None
        for part, fill in DEFAULT_TOKEN_INPUTS:
            if part in name.lower():
                if fill == "arange":
                    return np.broadcast_to(np.arange(x.shape[1], dtype=dtype), x.shape).copy()
                return (np.ones if fill == "ones" else np.zeros)(x.shape, dtype=dtype)
        return None

    def _check_other(self, name, value, x, session_shape=None):
        """``value`` as the session takes it; ``session_shape``: the input's shape in the graph built for x's
        shape (dims a token model's sequence length fixes are known only there)."""
        dtype, shape = self._other_info[name]
        try:
            value = np.asarray(value)
        except ValueError as exc:  # a ragged list
            raise InputError(f"{self.source}: input '{name}' is not an array: {exc}") from None
        if value.dtype.kind not in "biuf":
            raise InputError(f"{self.source}: input '{name}' expects dtype {dtype}, got {value.dtype}")
        if value.dtype.kind != dtype.kind and not (value.dtype.kind in "iub" and dtype.kind in "iub"):
            raise InputError(f"{self.source}: input '{name}' expects dtype {dtype}, got {value.dtype}")
        if shape is not None:
            shape = (BATCH_DIM, *shape[1:])  # the batch axis, whatever the file calls it
            if value.ndim != len(shape):
                raise InputError(f"{self.source}: input '{name}' expects rank {len(shape)} "
                                 f"{_fmt_shape(shape)}, got shape {value.shape}")
            if value.shape[0] != x.shape[0]:
                raise InputError(f"{self.source}: input '{name}' has {value.shape[0]} samples, "
                                 f"'{self.data_input}' has {x.shape[0]}")
            # a fixed dim that does not fit would reach onnxruntime as a raw shape error
            fixed = session_shape if session_shape is not None and len(session_shape) == len(shape) else ()
            for axis, (want, got) in enumerate(zip(fixed[1:], value.shape[1:]), 1):
                if isinstance(want, int) and want != got:
                    raise InputError(f"{self.source}: input '{name}' expects shape {_fmt_shape(shape)}, "
                                     f"got {value.shape} (axis {axis}: {got} instead of {want})")
        return np.ascontiguousarray(value, dtype=dtype)

    @staticmethod
    def _run_bound(session, feeds, names, keep_on_device):
        """One run. On the GPU through IO binding: inputs are copied to the device once; outputs stay there
        and only what the caller wants as numpy is copied back. On the CPU a plain run does the same with
        less work per call (IO binding cost 60 us a call, a third of a 32x32 MLP's whole run)."""
        device = _session_facts(session)[2]
        if device is None or device == "cpu" and not keep_on_device:  # None: onnx's reference evaluator
            return dict(zip(names, session.run(names, feeds)))
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


_PROBES = {}


def _probe_class(cls):
    """The analyzer's twin that also returns each layer's relevance per input, to find the layer whose rule
    creates relevance (a tensor read by several layers gets the sum of their contributions)."""
    if cls not in _PROBES:
        _PROBES[cls] = type(f"_{cls.__name__}Probe", (cls,), {"_input_relevances": True})
    return _PROBES[cls]


def _confirm_relu_outputs(layers, rules):
    """Keep a layer's ``relu_output`` mark (GeneralizedGammaRule then drops its z < 0 group) only where the
    relevance reaching the layer's output is a multiple of the activations, so that it is 0 wherever the
    ReLU's output is: every layer reading it (through pass-through layers) must use a rule that multiplies
    by its input. WSquare, Flat, ZBox or a rule of the user's may give relevance to zero activations."""
    from .rules import (AlphaBetaRule, EpsilonRule, GammaRule, GeneralizedGammaRule, PassRule, ZeroRule,
                        ZPlusRule)
    proportional_rules = (ZeroRule, EpsilonRule, GammaRule, GeneralizedGammaRule, ZPlusRule, AlphaBetaRule)
    readers = {}
    for layer in layers:
        for t in layer.inputs:
            readers.setdefault(t.name, []).append(layer)

    def proportional(name, depth=8):
        found = readers.get(name, [])
        if not found or depth == 0:
            return False  # a graph output (the seed) or too far to look
        for layer in found:
            rule = rules[layer.index]
            if type(rule) is PassRule:
                if not all(proportional(t.name, depth - 1) for t in layer.outputs):
                    return False
            elif type(rule) not in proportional_rules:
                return False
        return True

    for layer in layers:
        if layer.extra.get("relu_output") and not proportional(layer.outputs[0].name):
            layer.extra["relu_output"] = False


def _share_arrays(graph, canonical):
    """Let ``graph`` (the model loaded again for another input shape) use the arrays of ``canonical``
    where a constant has the same name and value, so each weight is held once."""
    import onnx_graphsurgeon as gs
    known = {name: t for name, t in canonical.tensors().items() if isinstance(t, gs.Constant)}
    for name, tensor in graph.tensors().items():
        other = known.get(name)
        if isinstance(tensor, gs.Constant) and other is not None and tensor.values is not other.values:
            a, b = np.asarray(tensor.values), np.asarray(other.values)
            if a.shape == b.shape and a.dtype == b.dtype and np.array_equal(a, b):
                tensor.values = b


def _session_facts(session):
    """(output names, {input name: shape}, device) of a session, looked up once: onnxruntime builds
    fresh Python objects on every get_outputs() call. The reference evaluator (float64) has neither
    shapes nor a device (None)."""
    facts = getattr(session, "_onnxlrp_facts", None)
    if facts is None:
        if isinstance(session, (ort.InferenceSession, WeightFeedingSession)):
            facts = ([o.name for o in session.get_outputs()], {i.name: tuple(i.shape) for i in session.get_inputs()},
                     session_device(session))
        else:
            facts = ([o.name for o in session.get_outputs()], None, None)
        session._onnxlrp_facts = facts
    return facts


def shape_of(value):
    return None if value is None else tuple(value)


def _fmt_shape(shape):
    return "(" + ", ".join("N" if d == BATCH_DIM else str(d) for d in shape) + ")"


def analyze(x, analyzer: LRP, output_selection=None, **kw) -> Explanation:
    """``analyze(input, method[, output_selection])`` as in RelevancePropagation.jl."""
    return analyzer.analyze(x, output_selection, **kw)
