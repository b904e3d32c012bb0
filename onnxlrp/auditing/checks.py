"""``onnxlrp audit``: the checks a CI pipeline runs on every export, each a named pass/fail with figures.

- coverage      every node has an emitter and a rule (what ``check`` says), else the nodes that have none
- forward       the relevance graph's ``output`` against the original file run by plain onnxruntime (its
                pre-softmax tensor where onnxlrp strips an output softmax): max abs and relative error
- conservation  per layer, the relevance passed to the inputs against what reaches the output; on the model
                without biases, with onnxlrp's rules of linear layers as LRP-0 (as LXT's conservation check
                does), any layer that loses or creates relevance is a node handled wrong (or a rule of the
                user's that is not conservative): the first one from the output is named. The rules' own
                absorption (biases, stabilizers) is reported per layer
- identity      on piecewise-linear graphs, LRP-0 seeded with the output's value against the emitted
                gradient graph's gradient x input (onnxlrp.gradients): no framework needed
- health        NaN/Inf (the layer where it starts), sum |R| against the seed (above ``explosion`` x is an
                explosion: the layer that multiplies most), the share of exactly-zero relevance, and where
                |z| is below an LRP-0/Epsilon layer's stabilizer on outputs that carry relevance
- precision     the composite in float64 against float32: rounding told apart from rule effects
- faithfulness  region perturbation (Samek et al. 2017): patches removed most-relevant-first (MoRF) and
                least-relevant-first (LeRF), the explained logit after each step from the original file in
                plain onnxruntime; AOPC and ABPC = AUC(LeRF) - AUC(MoRF) (per sample, over |f(x)|) against
                random orders (ABPC ~ 0) and gradient x input. Passes when the relevance's ABPC beats the
                random orders' by ``faithfulness_margin``
- regression    against a stored earlier audit (a baseline, see drift.py): per-sample relative L2 of the
                relevance, overlap of the most relevant features, the outputs; names the layers whose
                parameters or rules changed
- compare       another export of the same model (legacy vs dynamo, fp32 vs fp16, optimized vs not) explained
                on the same inputs and classes: outputs and relevance must agree within the same bounds

Thresholds have defaults (DEFAULT_THRESHOLDS) and can be set per check. Inputs: an array, or seeded
synthetic ones of the declared shape (standard normal; token ids uniform over the vocabulary), or a
baseline's. The report's pictures and HTML page: report.py.
"""
from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass, field

import numpy as np

from ..errors import InputError, LRPWarning, UnsupportedModelError

CHECKS = ("coverage", "forward", "conservation", "identity", "health", "precision", "faithfulness", "regression",
          "compare")

DEFAULT_THRESHOLDS = {
    "forward_rtol": 1e-4,        # max |ours - onnxruntime's| / max |onnxruntime's|, float32
    "conservation_tol": 1e-3,    # |sum R_in - sum R_out| / sum |R_out| per layer, conservative twin
    "identity_rtol": 1e-3,       # per-sample relative L2 of LRP-0 vs gradient x input (float32 kinks)
    "explosion": 1e3,            # sum |R| above this many times the seed
    "precision_rtol": 1e-2,      # per-sample relative L2 of float32 vs float64 relevance
    "faithfulness_margin": 0.0,  # ABPC of the relevance minus ABPC of random orders must exceed this
    # regression (against a baseline) and compare (against another export), per sample:
    "drift_rtol": 1e-2,          # relative L2 of the relevance (float32 rounding of a new runtime stays below)
    "drift_output_rtol": 1e-4,   # max |output difference| / max |output|
    "drift_topk_overlap": 0.9,   # share of the most relevant 1 % of features that both maps have in common
}

#: Region perturbation (Samek et al. 2017), the defaults of ``faithfulness=`` (CLI --patch-size, --steps,
#: --fill, --random-orders): square patches of ``patch_size`` pixels (None: 1/8 of the shorter image side;
#: single features for vectors, or groups of ``patch_size``), removed in ``steps`` steps, replaced by
#: ``fill`` (0: the mean of normalized inputs; "mean": each sample's own mean per channel), against
#: ``random_orders`` random orders.
PATCH_FRACTION = 1 / 8
#: Below this largest change of the explained output (over |f(x)|) under any removal, faithfulness is skipped.
INSENSITIVE = 1e-6
FAITHFULNESS_DEFAULTS = {"patch_size": None, "steps": 16, "fill": 0.0, "random_orders": 4}

#: Ops on which LRP-0 (PassRule on activations) equals gradient x input: ReLU-like kinks and linear maps.
#: A Clip with an upper bound saturates (its gradient is 0 where LRP passes relevance on): not here.
_PIECEWISE_LINEAR_ACTIVATIONS = ("Relu", "LeakyRelu", "PRelu")
_LINEAR_GROUPS = ("ConvLayer", "DenseLayer", "PoolingLayer", "ReshapingLayer", "DropoutLayer", "MergeLayer",
                  "ScaleLayer")


@dataclass
class CheckResult:
    name: str
    status: str                    # "pass", "fail" or "skip"
    summary: str                   # one line: what was measured, or why it failed or was skipped
    figures: dict = field(default_factory=dict)
    layer: str | None = None       # the layer a failure points at
    seconds: float = 0.0


@dataclass
class AuditReport:
    model: str
    rules: str
    inputs: str
    checks: list
    fail_on: tuple = CHECKS
    #: the arrays behind the figures (not in to_dict): inputs, other_inputs, output, output_selection,
    #: relevance, layers (parameter fingerprints), model_sha256, layout, token_input
    data: dict = field(default_factory=dict, repr=False)

    def save_baseline(self, path):
        """Write this audit as a baseline (one JSON file) that a later ``audit(..., baseline=path)`` compares
        against."""
        from .drift import save_baseline
        save_baseline(self, path)

    def write_report(self, directory) -> list:
        """Pictures (relevance, faithfulness curves, conservation per layer) and an HTML page in
        ``directory``; returns the files written."""
        from .report import write_report
        return write_report(self, directory)

    @property
    def failed(self):
        return [c for c in self.checks if c.status == "fail" and c.name in self.fail_on]

    @property
    def passed(self) -> bool:
        return not self.failed

    def check(self, name) -> CheckResult:
        return next(c for c in self.checks if c.name == name)

    def to_dict(self):
        return {"model": self.model, "rules": self.rules, "inputs": self.inputs, "passed": self.passed,
                "fail_on": list(self.fail_on),
                "checks": [{"name": c.name, "status": c.status, "gating": c.name in self.fail_on,
                            "summary": c.summary, "layer": c.layer, "figures": _jsonable(c.figures),
                            "seconds": round(c.seconds, 3)} for c in self.checks]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, allow_nan=False)

    def to_junit(self) -> str:
        """JUnit XML: one testcase per check (failed checks that do not gate are reported as skipped)."""
        import xml.etree.ElementTree as ET
        failures = sum(1 for c in self.checks if c.status == "fail" and c.name in self.fail_on)
        skipped = sum(1 for c in self.checks if c.status == "skip" or (c.status == "fail" and c.name not in self.fail_on))
        suite = ET.Element("testsuite", name="onnxlrp audit", tests=str(len(self.checks)), failures=str(failures),
                           errors="0", skipped=str(skipped), time=f"{sum(c.seconds for c in self.checks):.3f}")
        props = ET.SubElement(suite, "properties")
        for key in ("model", "rules", "inputs"):
            ET.SubElement(props, "property", name=key, value=str(getattr(self, key)))
        for c in self.checks:
            case = ET.SubElement(suite, "testcase", classname=f"onnxlrp.audit.{_stem(self.model)}", name=c.name,
                                 time=f"{c.seconds:.3f}")
            detail = json.dumps(_jsonable(c.figures), indent=1, allow_nan=False)
            if c.status == "fail" and c.name in self.fail_on:
                ET.SubElement(case, "failure", message=c.summary, type="AuditFailure").text = detail
            elif c.status != "pass":
                ET.SubElement(case, "skipped", message=c.summary)
            ET.SubElement(case, "system-out").text = detail
        return ET.tostring(suite, encoding="unicode", xml_declaration=True)

    def table(self) -> str:
        lines = [f"# audit of {self.model}: {self.rules}; inputs: {self.inputs}"]
        width = max(len(c.name) for c in self.checks)
        for c in self.checks:
            status = c.status.upper() if c.name in self.fail_on or c.status != "fail" else "fail (not gating)"
            lines.append(f"{c.name:<{width}}  {status:<5}  {c.summary}")
        lines.append("audit passed" if self.passed else
                     f"audit failed: {', '.join(c.name for c in self.failed)}")
        return "\n".join(lines)


def _stem(path):
    import os
    return os.path.splitext(os.path.basename(str(path)))[0].replace(".", "_") or "model"


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return float(value) if np.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    return value


def _rel_l2(a, b):
    a = np.asarray(a, np.float64).reshape(len(a), -1)
    b = np.asarray(b, np.float64).reshape(len(b), -1)
    return np.sqrt(((a - b) ** 2).sum(1)) / np.maximum(np.sqrt((b ** 2).sum(1)), 1e-300)


# -- inputs ---------------------------------------------------------------------------------------------------
def synthetic_inputs(analyzer, samples=4, seed=0, feature_shape=None):
    """Seeded inputs of the declared shape: standard normal floats, or token ids uniform over the
    vocabulary (sequence length 8 where it is dynamic). ``feature_shape`` fills dynamic dims."""
    rng = np.random.default_rng(seed)
    declared = analyzer.input_shape
    if feature_shape is not None:
        dims = tuple(int(d) for d in feature_shape)
    elif declared is not None and all(isinstance(d, int) for d in declared[1:]):
        dims = tuple(declared[1:])
    elif analyzer.token_input and declared is not None:
        dims = tuple(d if isinstance(d, int) else 8 for d in declared[1:])
    else:
        raise InputError(f"{analyzer.source}: the input {declared} has dynamic dims besides the batch; give the "
                         "dims after the batch axis (input_shape=..., CLI --input-shape) or inputs")
    if analyzer.token_input:
        return rng.integers(0, analyzer.vocab_size, size=(samples,) + dims).astype(analyzer.input_dtype)
    return rng.standard_normal((samples,) + dims).astype(analyzer.input_dtype)


# -- the checks -----------------------------------------------------------------------------------------------
def _twin_kwargs(analyzer):
    """What another analyzer of the same model needs to explain the same input and output."""
    return dict(verbose=False, device="cpu", input_name=analyzer._input_name, output_name=analyzer.output_name,
                skip_checks=analyzer.skip_checks)


def _timed(fn):
    def run(*args, **kw):
        start = time.perf_counter()
        result = fn(*args, **kw)
        result.seconds = time.perf_counter() - start
        return result
    return run


@_timed
def _coverage(analyzer):
    from collections import Counter
    from ..emitters.elementwise import FALLBACK_PASS
    rules = Counter(type(r).__name__ for r in analyzer.rules)
    figures = {"layers": len(analyzer.layers), "rules": dict(rules)}
    passed_through = [f"{l.index} '{l.name}' ({l.op_type})" for l in analyzer.layers if l.emitter is FALLBACK_PASS]
    if passed_through:
        figures["passed_through"] = passed_through
        return CheckResult("coverage", "fail", f"{len(passed_through)} node(s) have no emitter and pass relevance "
                           f"through unchanged (skip_checks): {', '.join(passed_through[:5])}", figures,
                           layer=passed_through[0])
    return CheckResult("coverage", "pass", f"{len(analyzer.layers)} layers, each with an emitter and a rule", figures)


def _original_outputs(model, output_name):
    """The original file run by plain onnxruntime, with the tensor before an output softmax (which
    onnxlrp strips) added as an output. Returns (run(x) -> array, what was compared)."""
    import onnx
    import onnxruntime as ort
    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(model)
    outputs = [o.name for o in proto.graph.output]
    name = output_name or outputs[0]
    producers = {o: node for node in proto.graph.node for o in node.output}
    target, node = name, producers.get(name)
    while node is not None and node.op_type in ("Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity"):
        node = producers.get(node.input[0])
    what = f"output '{name}'"
    if node is not None and node.op_type in ("Softmax", "LogSoftmax"):
        target, what = node.input[0], f"'{node.input[0]}' (before the {node.op_type} onnxlrp strips)"
        if target not in outputs:
            proto = onnx.ModelProto.FromString(proto.SerializeToString())
            proto.graph.output.append(onnx.helper.make_empty_tensor_value_info(target))
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    data = session.get_inputs()
    # Caffe2-era files declare a batch of 1 (onnxlrp makes it symbolic): run those one sample at a time
    one_at_a_time = any(i.shape and i.shape[0] == 1 for i in data)

    def run(feeds):
        feeds = {i.name: np.asarray(feeds[i.name]) for i in data if i.name in feeds}
        if not one_at_a_time:
            return session.run([target], feeds)[0]
        n = len(next(iter(feeds.values())))
        return np.concatenate([session.run([target], {k: v[j:j + 1] for k, v in feeds.items()})[0]
                               for j in range(n)])
    return run, what


@_timed
def _forward(analyzer, model, feeds, expl, rtol):
    try:
        run, what = _original_outputs(model, analyzer.output_name)
        theirs = np.asarray(run(feeds), np.float64)
    except Exception as exc:  # noqa: BLE001 - an original that onnxruntime cannot run is reported
        return CheckResult("forward", "skip", f"onnxruntime cannot run the original file: {str(exc).splitlines()[0]}")
    ours = np.asarray(expl.output, np.float64)
    if theirs.size != ours.size:
        return CheckResult("forward", "fail", f"the relevance graph's output has {ours.size} values, the original "
                           f"{what} {theirs.size}", {"ours": list(ours.shape), "original": list(theirs.shape)})
    theirs = theirs.reshape(ours.shape)
    abs_err = float(np.abs(ours - theirs).max())
    rel_err = abs_err / max(float(np.abs(theirs).max()), 1e-30)
    figures = {"compared": what, "max_abs_error": abs_err, "max_rel_error": rel_err, "rtol": rtol}
    ok = rel_err <= rtol
    return CheckResult("forward", "pass" if ok else "fail",
                       f"max error {abs_err:.3g} ({rel_err:.3g} of the largest value; bound {rtol:g}) against "
                       f"plain onnxruntime on {what}", figures)


#: Rules whose definition moves relevance to or from nothing: the softmax rule of AttnLRP (a bias-like term).
_NOT_CONSERVATIVE = ("SoftmaxRule",)


def conservative_rules(rules):
    """The rules of the conservative twin: onnxlrp's own rules on linear layers become LRP-0 (AlphaBeta and
    ZPlus are not conservative by their own definition where a neuron's contributions all have one sign),
    the others and a rule of the user's stay as they are. The division guard is 1e-30 (AttnLRP's), not
    LRP-0's 1e-9: without biases a constant-weight zoo file's activations are ~1e-11, where 1e-9 would
    absorb nearly everything; only an exact 0 / 0 (a ReLU that zeroed a pooled output) needs a guard."""
    from ..rules import EpsilonRule
    from ..rules.attention import GRADIENT_STABILIZER
    from ..rules.builtin import ALL_RULES
    kept = ("PassRule", "LayerNormRule", "SoftmaxRule", "UniformRule", "CPRule")
    return [EpsilonRule(GRADIENT_STABILIZER) if type(r) in set(ALL_RULES.values()) and type(r).__name__ not in kept
            else r for r in rules]


def without_biases(analyzer, feature_shape=None):
    """The canonized model with every bias set to zero (Conv/Gemm/MatMul biases, BatchNorm shifts, constant
    addends of scale layers), as LXT's conservation check runs the model: then LRP-0 passes on exactly what
    reaches a layer, where the bias would have taken its share. ``feature_shape`` (the dims after the batch
    axis) other than the analyzer's first: canonized again for it, as the analyzer does (a token model's
    sequence length folds into its reshape targets and masks)."""
    import onnx_graphsurgeon as gs
    from .._onnx_utils import export_model
    from ..canonization import canonize_graph
    from ..layers import build_layers
    layers = analyzer.layers
    if feature_shape is None or tuple(feature_shape) == tuple(analyzer._canonical_shape or ()):
        graph = analyzer._canonical.copy()
    else:
        graph = analyzer._load(tuple(feature_shape)).graph
        canonize_graph(graph)
        layers = build_layers(graph, analyzer.explained, strict=not analyzer.skip_checks)
    tensors = graph.tensors()

    def zero(tensor):
        if isinstance(tensor, gs.Constant):
            tensors[tensor.name].values = np.zeros_like(np.asarray(tensor.values))  # a new array: shared ones stay
    for layer in layers:
        node = layer.node
        if node.op in ("Conv", "ConvTranspose", "Gemm") and len(node.inputs) > 2:
            zero(node.inputs[2])
        elif node.op == "BatchNormalization":  # shift = beta - mean * gamma / sqrt(var + eps) = 0
            gamma, _, mean, var = (np.asarray(t.values, np.float64) for t in node.inputs[1:5])
            beta = mean * gamma / np.sqrt(var + node.attrs.get("epsilon", 1e-5))
            tensors[node.inputs[2].name].values = beta.astype(np.asarray(node.inputs[2].values).dtype)
        elif layer.group == "ScaleLayer" and node.op in ("Add", "Sub"):
            for t in node.inputs:
                zero(t)
        for extra in layer.nodes[1:]:  # a fused bias Add
            for t in extra.inputs:
                zero(t)
    return export_model(graph, analyzer.opset)


def _absorbing_operands(layer):
    """Operands of the layer's node that are computed (not initializers) but carry no relevance: a class
    token Expand-ed from a constant and concatenated, a mask's fill. Like a bias, they keep their share."""
    import onnx_graphsurgeon as gs
    ins = {id(t) for t in layer.inputs}
    return [t for t in layer.node.inputs if id(t) not in ins and t.name and not isinstance(t, gs.Constant)
            and t.inputs and layer.op_type in ("Concat", "Where")]


def _layer_sums(probe_expl, n):
    """{layer: (sum R, sum |R|) per sample over its outputs} and the same over its inputs. Where one of a
    layer's tensors does not have the samples on its first axis (an operand broadcast over the batch, a
    reshape that folds the batch into the tokens), only the batch's total is exact: every sample then gets
    the batch's mean, on both sides."""
    def per_layer(relevances):
        out, mixed = {}, set()
        for (i, _), r in relevances.items():
            r = np.asarray(r, np.float64)
            if r.ndim and r.shape[0] == n:
                r = r.reshape(n, -1)
                total, magnitude = r.sum(1), np.abs(r).sum(1)
            else:
                total, magnitude = np.full(n, r.sum() / n), np.full(n, np.abs(r).sum() / n)
                mixed.add(i)
            before = out.get(i, (0.0, 0.0))
            out[i] = (before[0] + total, before[1] + magnitude)
        return out, mixed
    received, mixed_out = per_layer(probe_expl.extras.get("output_relevances", {}))
    passed, mixed_in = per_layer(probe_expl.extras.get("input_relevances", {}))
    for i in mixed_out | mixed_in:
        for table in (received, passed):
            if i in table:
                table[i] = tuple(np.full(n, v.mean()) for v in table[i])
    return received, passed


@_timed
def _conservation(analyzer, model, x, feeds_inputs, tol, selection):
    from ..analyzer import _probe_class
    kw = dict(_twin_kwargs(analyzer), layer_relevances=True, precision=analyzer.precision)
    n = len(x)
    figures = {}
    # the composite's own: what each layer absorbs (biases, stabilizers, epsilon) or creates
    own = _probe_class(type(analyzer))(model, list(analyzer.rules), **kw)
    own._explosion_reported = own._nonfinite_warned = True
    own_expl = own.analyze(x, selection, inputs=feeds_inputs)
    analyzer.__dict__["_audit_probe"] = own_expl  # health reads each layer's incoming relevance from it
    received, passed = _layer_sums(own_expl, n)
    shares = {}
    for layer in analyzer.layers:
        if layer.index in received and layer.index in passed:
            out = received[layer.index][0]
            shares[layer.index] = float(np.nanmean(1.0 - passed[layer.index][0] / np.where(out == 0, np.nan, out)))
    figures["absorbed_share_per_layer"] = {f"{i} {analyzer.layers[i].name}": v for i, v in shares.items()}
    # the conservative twin: every layer must pass on what reaches it
    # the canonized graph keeps only the explained output (its softmax stripped, so it has another name)
    # Seeded with the output's value: where the model without biases gives ~0 (a constant-weight zoo file)
    # there is then ~0 to pass on, instead of a seed of 1 that no input can carry.
    twin = _probe_class(type(analyzer))(without_biases(analyzer, x.shape[1:]), conservative_rules(analyzer.rules),
                                        **dict(kw, output_name=None, normalize_output_relevance=False))
    twin._explosion_reported = twin._nonfinite_warned = True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LRPWarning)
        twin_expl = twin.analyze(x, selection, inputs=feeds_inputs)
    received, passed = _layer_sums(twin_expl, n)
    worst, exempt, absorbing, errors, first_bad = None, [], [], {}, None
    for layer in sorted(analyzer.layers, key=lambda l: -l.index):  # from the output: the first to break it
        if layer.index not in received:
            continue
        if type(analyzer.rules[layer.index]).__name__ in _NOT_CONSERVATIVE:
            exempt.append(f"{layer.index} {layer.name}")
            continue
        if _absorbing_operands(layer):  # a class token concatenated, a mask's fill: bias-like shares
            absorbing.append(f"{layer.index} {layer.name}")
            continue
        out, out_abs = received[layer.index]
        got, got_abs = passed.get(layer.index, (np.zeros(n), np.zeros(n)))
        # relative to the larger magnitude: LRP-0 without bias cancels where z is small against its terms
        err = np.abs(got - out) / np.maximum(np.maximum(out_abs, got_abs), 1e-30)
        errors[f"{layer.index} {layer.name}"] = float(err.max())  # NaN stays NaN (null in JSON)
        if worst is None or np.nanmax(err) > worst[1]:
            worst = (layer, float(np.nanmax(err)))
        if first_bad is None and not np.all(err <= tol):  # NaN fails too
            first_bad = (layer, err, got, out)
    figures.update(twin_error_per_layer=errors, tol=tol)
    if first_bad is not None:
        layer, err, got, out = first_bad
        k = int(np.nanargmax(np.where(np.isnan(err), np.inf, err)))
        figures["conservative_error"] = float(err.max())
        return CheckResult("conservation", "fail",
                           f"with biases and epsilons zeroed, layer {layer.index} '{layer.name}' ({layer.op_type}) "
                           f"under {analyzer.rules[layer.index]!r} passes on {float(got[k]):.6g} of the "
                           f"{float(out[k]):.6g} that reach it (error {err[k]:.3g}; bound {tol:g}): relevance is "
                           "lost or created there", figures, layer=f"{layer.index} {layer.name}")
    figures.update(worst_layer_error=worst[1] if worst else 0.0, not_conservative_by_definition=exempt,
                   absorbing_constant_operands=absorbing)
    own_total = np.asarray(own_expl.val, np.float64).reshape(n, -1).sum(1)
    figures["input_relevance_sum"] = own_total.tolist()
    return CheckResult("conservation", "pass",
                       f"every layer passes on what reaches it with biases and epsilons zeroed (worst error "
                       f"{worst[1] if worst else 0:.2g}, bound {tol:g}"
                       + (f"; {len(exempt)} softmax layers not conservative by definition" if exempt else "")
                       + (f"; {len(absorbing)} layers with a computed constant operand (a class token, a "
                          "mask fill) that keeps its share" if absorbing else "")
                       + f"); under the rules as given the input gets {own_total.min():.3g}..{own_total.max():.3g} "
                       "of a seed of 1", figures)


def _piecewise_linear_reason(analyzer):
    """None when LRP-0 = gradient x input holds on the graph, else why not."""
    for layer in analyzer.layers:
        if layer.group == "ActivationLayer" and layer.op_type not in _PIECEWISE_LINEAR_ACTIVATIONS:
            if layer.op_type == "Clip":
                hi = layer.node.inputs[2] if len(layer.node.inputs) > 2 else None
                if (hi is None or not hi.name) and layer.node.attrs.get("max") is None:
                    continue  # Clip(min, no max) is a ReLU-like kink
            return f"layer {layer.index} '{layer.name}' ({layer.op_type}) is not piecewise linear"
        if layer.group not in _LINEAR_GROUPS + ("ActivationLayer", "NormalizationLayer") or \
                layer.op_type in ("LRN", "LayerNormalization"):
            return f"layer {layer.index} '{layer.name}' ({layer.op_type}) is not piecewise linear"
    return None


def _gradient_twin(analyzer, model, precision):
    """The model's InputTimesGradient, built once per audit and precision (identity and faithfulness both
    need it, and building a large graph's twin takes seconds); UnsupportedModelError when an op has no
    derivative."""
    from ..gradients import InputTimesGradient
    cache = analyzer.__dict__.setdefault("_audit_gradient_twins", {})
    if precision not in cache:
        try:
            cache[precision] = InputTimesGradient(model, **dict(_twin_kwargs(analyzer), precision=precision))
        except UnsupportedModelError as exc:
            cache[precision] = exc
    if isinstance(cache[precision], Exception):
        raise cache[precision]
    return cache[precision]


@_timed
def _identity(analyzer, model, x, feeds_inputs, rtol, selection):
    from ..analyzer import LRP
    reason = _piecewise_linear_reason(analyzer)
    if reason:
        return CheckResult("identity", "skip", f"{reason}: LRP-0 = gradient x input does not hold")
    kw = dict(_twin_kwargs(analyzer), precision=analyzer.precision)
    try:
        gxi = _gradient_twin(analyzer, model, analyzer.precision)
    except UnsupportedModelError as exc:
        return CheckResult("identity", "skip", f"no gradient graph: {str(exc).splitlines()[1].strip()}")
    lrp0 = LRP(model, None, normalize_output_relevance=False, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LRPWarning)
        a = lrp0.analyze(x, selection, inputs=feeds_inputs)
        b = gxi.analyze(x, a.output_selection, inputs=feeds_inputs)
    return _per_sample_comparison("identity", "LRP-0 against the gradient graph's gradient x input", a.val, b.val, rtol)


def _per_sample_comparison(name, what, ours, reference, rtol):
    """Pass when every sample's relative L2 distance is within ``rtol``."""
    err = _rel_l2(ours, reference)
    ok = bool(np.all(err <= rtol))
    return CheckResult(name, "pass" if ok else "fail",
                       f"{what}: relative L2 up to {err.max():.3g} per sample (bound {rtol:g})"
                       + ("" if ok else f"; worst sample {int(np.nanargmax(err)) if np.any(np.isfinite(err)) else 0}"),
                       {"per_sample_rel_l2": err.tolist(), "rtol": rtol})


def _stabilizer_hits(analyzer, feeds):
    """{layer: share} for the layers whose rule divides by the layer's output z (LRP-0, Epsilon): the share of
    the outputs that carry relevance where |z| is below the rule's stabilizer, so that the stabilizer, not the
    rule, decides what they pass on. Needs the conservation check's probe (each layer's incoming relevance)."""
    from ..rules import EpsilonRule, ZeroRule
    from ..rules.base import DEFAULT_STABILIZER
    probe = analyzer.__dict__.get("_audit_probe")
    received = probe.extras.get("output_relevances", {}) if probe is not None else {}
    if not received:
        return {}
    try:
        values = analyzer._layer_outputs(feeds)
    except Exception:  # noqa: BLE001 - a shape the canonized graph was not built for: no figure
        return {}
    z_of = {layer.index: z for layer, z in zip(sorted(analyzer.layers, key=lambda l: l.index), values)}
    hits = {}
    for layer in analyzer.layers:
        rule = analyzer.rules[layer.index]
        if type(rule) not in (ZeroRule, EpsilonRule) or layer.index not in z_of:
            continue
        stabilizer = rule.epsilon if isinstance(rule, EpsilonRule) else float(DEFAULT_STABILIZER)
        r, z = received.get((layer.index, 0)), np.asarray(z_of[layer.index])
        if r is None or np.shape(r) != z.shape:
            continue
        carrying = np.asarray(r) != 0
        share = float(np.mean(np.abs(z[carrying]) < stabilizer)) if carrying.any() else 0.0
        if share > 0:
            hits[f"{layer.index} {layer.name}"] = share
    return hits


@_timed
def _health(analyzer, x, feeds, expl, explosion):
    n = len(x)
    val = np.asarray(expl.val, np.float64).reshape(n, -1)
    nonfinite = expl.extras.get("nonfinite")
    figures = {"zero_share": float(np.mean(val == 0)), "explosion_bound": explosion,
               "stabilizer_hits": _stabilizer_hits(analyzer, feeds)}
    if nonfinite:
        figures["nonfinite_samples"] = nonfinite["samples"]
        return CheckResult("health", "fail", f"samples {nonfinite['samples']}: {nonfinite['reason']}", figures)
    total = np.abs(val).sum(1)
    out = np.asarray(expl.output, np.float64).reshape(n, -1)
    sel = np.asarray(expl.output_selection).reshape(-1) % out.shape[1]
    seed = np.ones(n) if analyzer.normalize_output_relevance else np.abs(out[np.arange(n), sel])
    ratio = total / np.maximum(seed, 1e-30)
    figures["sum_abs_relevance_over_seed"] = ratio.tolist()
    hits = figures["stabilizer_hits"]
    worst = max(hits, key=hits.get) if hits else None
    note = (f"; |z| below the stabilizer on {hits[worst]:.1%} of the relevance-carrying outputs of layer {worst} "
            "(the stabilizer decides their relevance)") if worst else ""
    if np.any(ratio > explosion):
        bad = int(np.argmax(ratio))
        culprit = analyzer._explosion_layer(x[bad:bad + 1], feeds, bad)
        where = "" if culprit is None else (f": layer {culprit[0].index} '{culprit[0].name}' ({culprit[0].op_type}) "
                                            f"passes back {culprit[1]:.3g}x what reaches it")
        return CheckResult("health", "fail", f"relevance explodes on sample {bad}: sum |R| = {ratio[bad]:.3g} x the "
                           f"seed (bound {explosion:g}){where}{note}", figures,
                           layer=None if culprit is None else f"{culprit[0].index} {culprit[0].name}")
    return CheckResult("health", "pass", f"finite; sum |R| {ratio.min():.3g}..{ratio.max():.3g} x the seed (bound "
                       f"{explosion:g}); {figures['zero_share']:.1%} of the relevance exactly zero{note}", figures)


@_timed
def _precision(analyzer, model, rules, x, feeds_inputs, expl, rtol):
    from ..analyzer import LRP
    if analyzer.precision == "float64":
        return CheckResult("precision", "skip", "the audit runs in float64 already")
    kw = dict(_twin_kwargs(analyzer), normalize_output_relevance=analyzer.normalize_output_relevance)
    double = LRP(model, rules, precision="float64", **kw)
    x64 = x if analyzer.token_input else np.asarray(x, np.float64)
    inputs64 = {k: (np.asarray(v, np.float64) if np.asarray(v).dtype.kind == "f" else v) for k, v in feeds_inputs.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LRPWarning)
        e64 = double.analyze(x64, expl.output_selection, inputs=inputs64)
    return _per_sample_comparison("precision", "float32 against float64 relevance", expl.val, e64.val, rtol)


def _image_axes(shape):
    """(channel axis, spatial axes) of one rank-3 sample: the smallest axis is the channels."""
    channel = int(np.argmin(shape))
    return channel, [a for a in range(3) if a != channel]


def _patch_ids(shape, patch_size=None):
    """Patch index of every element of one sample of ``shape`` (no batch axis), and the patch count: square
    patches of ``patch_size`` pixels over the two spatial axes of an image (default 1/8 of the shorter side),
    groups of ``patch_size`` consecutive features otherwise (default 1)."""
    if len(shape) == 3:
        channel, spatial = _image_axes(shape)
        h, w = shape[spatial[0]], shape[spatial[1]]
        p = int(patch_size) if patch_size else max(1, int(round(min(h, w) * PATCH_FRACTION)))
        rows, cols = np.arange(h) // p, np.arange(w) // p
        per_pixel = rows[:, None] * (cols.max() + 1) + cols[None, :]
        ids = np.expand_dims(per_pixel, channel)
        return np.broadcast_to(ids, shape), int(per_pixel.max()) + 1
    count = int(np.prod(shape))
    ids = np.arange(count) // int(patch_size or 1)
    return ids.reshape(shape), int(ids[-1]) + 1


def _fill_values(x, fill):
    """What removed features are replaced by, one array per sample: a constant, or ("mean") the sample's own
    mean per channel (per sample for vectors)."""
    x = np.asarray(x)
    if fill == "mean":
        if x.ndim == 4:
            channel, spatial = _image_axes(x.shape[1:])
            means = x.mean(axis=tuple(1 + a for a in spatial), keepdims=True)
        else:
            means = x.reshape(len(x), -1).mean(1).reshape((len(x),) + (1,) * (x.ndim - 1))
        return np.broadcast_to(means, x.shape).astype(x.dtype)
    return np.full_like(x, float(fill))


def _perturbation_curves(run, feeds, name, x, orders, ids, steps, fills, sel):
    """The explained logit after removing 0, 1/steps, ..., all patches in each order: (n, orders, steps+1)."""
    n, n_orders = len(x), orders.shape[1]
    count = orders.shape[2]
    cuts = np.round(np.linspace(0, count, steps + 1)).astype(int)
    variants = np.repeat(x[:, None, None], n_orders, axis=1)
    variants = np.repeat(variants, steps + 1, axis=2)  # (n, orders, steps+1, ...)
    for i in range(n):
        for o in range(n_orders):
            for k, cut in enumerate(cuts):
                removed = np.isin(ids, orders[i, o, :cut])
                variants[i, o, k][removed] = fills[i][removed]
    rows = variants.reshape((-1,) + x.shape[1:])
    extra = {k: np.repeat(np.asarray(v), n_orders * (steps + 1), axis=0) for k, v in feeds.items() if k != name}
    out = np.concatenate([np.asarray(run({name: rows[j:j + 256], **{k: v[j:j + 256] for k, v in extra.items()}}),
                                     np.float64).reshape(len(rows[j:j + 256]), -1)
                          for j in range(0, len(rows), 256)])
    logits = out[np.arange(len(rows)), np.repeat(sel, n_orders * (steps + 1))]
    return logits.reshape(n, n_orders, steps + 1)


def _abpc(morf, lerf, f0):
    """Per sample: (AOPC of MoRF, ABPC = AUC(LeRF) - AUC(MoRF)), both over |f(x)|."""
    scale = np.maximum(np.abs(f0), 1e-12)
    aopc = (f0[:, None] - morf).mean(-1) / scale
    abpc = (lerf.mean(-1) - morf.mean(-1)) / scale
    return aopc, abpc


def faithfulness_options(options=None):
    """FAITHFULNESS_DEFAULTS updated by ``options``, checked: ValueError naming the option."""
    opts = dict(FAITHFULNESS_DEFAULTS)
    unknown = set(options or {}) - set(opts)
    if unknown:
        raise ValueError(f"unknown faithfulness options {sorted(unknown)}; known: {sorted(opts)}")
    opts.update({k: v for k, v in (options or {}).items() if v is not None or k == "patch_size"})
    for key in ("steps", "random_orders"):
        if isinstance(opts[key], bool) or not isinstance(opts[key], (int, np.integer)) or opts[key] < 1:
            raise ValueError(f"faithfulness option {key} must be a positive integer, got {opts[key]!r}")
    if opts["patch_size"] is not None and (isinstance(opts["patch_size"], bool) or
                                           not isinstance(opts["patch_size"], (int, np.integer)) or
                                           opts["patch_size"] < 1):
        raise ValueError(f"faithfulness option patch_size must be a positive integer, got {opts['patch_size']!r}")
    fill = opts["fill"]
    if fill != "mean" and (isinstance(fill, bool) or not isinstance(fill, (int, float, np.floating, np.integer))
                           or not np.isfinite(fill)):
        raise ValueError(f"faithfulness option fill must be a finite number or 'mean', got {fill!r}")
    return opts


@_timed
def _faithfulness(analyzer, model, x, feeds_inputs, expl, margin, seed, opts):
    if analyzer.token_input or analyzer.sequence_output:
        return CheckResult("faithfulness", "skip", "token models: their ids cannot be perturbed continuously")
    try:
        run, what = _original_outputs(model, analyzer.output_name)
    except Exception as exc:  # noqa: BLE001
        return CheckResult("faithfulness", "skip", f"onnxruntime cannot run the original file: {str(exc).splitlines()[0]}")
    ids, count = _patch_ids(x.shape[1:], opts["patch_size"])
    steps, fill, n_random = opts["steps"], opts["fill"], opts["random_orders"]
    fills = _fill_values(x, fill)
    sel = np.asarray(expl.output_selection).reshape(-1)
    n = len(x)

    def orders_of(rel):
        per_patch = np.stack([np.bincount(ids.reshape(-1), weights=np.asarray(r, np.float64).reshape(-1),
                                          minlength=count) for r in rel])
        morf = np.argsort(-per_patch, axis=1, kind="stable")
        return np.stack([morf, morf[:, ::-1]], axis=1)  # (n, 2, patches): MoRF, LeRF

    feeds = {analyzer.data_input: x, **feeds_inputs}
    f0 = np.asarray(run(feeds), np.float64).reshape(n, -1)[np.arange(n), sel]
    curves = {}
    curves["relevance"] = _perturbation_curves(run, feeds, analyzer.data_input, x, orders_of(expl.val), ids,
                                               steps, fills, sel)
    rng = np.random.default_rng(seed)
    # an even count: the random orders are paired, one as MoRF and one as LeRF
    random_orders = np.stack([np.stack([rng.permutation(count) for _ in range(2 * ((n_random + 1) // 2))])
                              for _ in range(n)])
    random = _perturbation_curves(run, feeds, analyzer.data_input, x, random_orders, ids, steps, fills, sel)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", LRPWarning)
            gxi = _gradient_twin(analyzer, model, "float32").analyze(x, sel, inputs=feeds_inputs).val
        curves["gradient_x_input"] = _perturbation_curves(run, feeds, analyzer.data_input, x, orders_of(gxi), ids,
                                                          steps, fills, sel)
    except Exception:  # noqa: BLE001 - no gradient graph (an op without a derivative): reported without it
        pass
    figures = {"compared": what, "patches": count, "patch_size": opts["patch_size"], "steps": steps, "fill": fill,
               "random_orders": random_orders.shape[1], "margin": margin}
    for key, c in curves.items():
        aopc, abpc = _abpc(c[:, 0], c[:, 1], f0)
        figures[key] = {"aopc_morf": float(aopc.mean()), "abpc": float(abpc.mean()),
                        "morf_curve": c[:, 0].mean(0).tolist(), "lerf_curve": c[:, 1].mean(0).tolist()}
    # random orders in pairs, one as MoRF and one as LeRF: an ABPC of about 0
    r_aopc, r_abpc = _abpc(random[:, 0::2].mean(1), random[:, 1::2].mean(1), f0)
    figures["random"] = {"aopc_morf": float(r_aopc.mean()), "abpc": float(r_abpc.mean()),
                         "curve": random.mean((0, 1)).tolist()}
    # how far removing patches moves the output at all: a model whose output ignores its input (a
    # constant-weight zoo file, where biases carry the logit) ranks no order above another
    moved = max(float(np.max(np.abs(c - f0[:, None, None]))) for c in (*curves.values(), random))
    figures["largest_change_over_f"] = moved / max(float(np.abs(f0).max()), 1e-30)
    if not figures["largest_change_over_f"] > INSENSITIVE:
        return CheckResult("faithfulness", "skip", f"removing patches changes the explained output by at most "
                           f"{figures['largest_change_over_f']:.2g} of |f(x)|: the output does not depend on the "
                           "input, so no order of removal can be told from another", figures)
    ours, chance = figures["relevance"]["abpc"], figures["random"]["abpc"]
    ok = ours > chance + margin
    extra = (f", gradient x input {figures['gradient_x_input']['abpc']:.3g}" if "gradient_x_input" in figures else "")
    return CheckResult("faithfulness", "pass" if ok else "fail",
                       f"ABPC {ours:.3g} of |f(x)| against {chance:.3g} for random orders{extra} ({count} patches, "
                       f"{steps} steps, fill {fill}; AOPC of MoRF "
                       f"{figures['relevance']['aopc_morf']:.3g})", figures)


# -- the audit ------------------------------------------------------------------------------------------------
def audit(model, rules_or_composite=None, *, inputs=None, other_inputs=None, samples=4, seed=0, input_shape=None,
          output_selection=None, output_name=None, input_name=None, thresholds=None, precision_check=True,
          fail_on=CHECKS, skip_checks=False, faithfulness=None, baseline=None, compare=None,
          rules_description=None, on_check=None) -> AuditReport:
    """Audit ``model`` under ``rules_or_composite`` (LRP's default rules when None) on ``inputs`` (an array
    with a batch axis, or a function that takes the analyzer and returns one; default: the baseline's
    inputs, else ``samples`` seeded synthetic inputs, see synthetic_inputs). Returns an AuditReport (``.passed``, ``.checks``, ``.table()``, ``.to_json()``,
    ``.to_junit()``, ``.save_baseline(path)``, ``.write_report(folder)``).

    ``thresholds``: bounds per check (DEFAULT_THRESHOLDS). ``faithfulness``: region perturbation options
    (FAITHFULNESS_DEFAULTS). ``baseline``: a baseline file (or a loaded drift.Baseline) of an earlier audit;
    its inputs and classes are used unless ``inputs``/``output_selection`` are given. ``compare``: another
    export of the same model, explained on the same inputs and classes. ``on_check(name)`` is called as
    each check starts (progress)."""
    from .drift import Baseline, load_baseline
    limits = dict(DEFAULT_THRESHOLDS)
    unknown = set(thresholds or {}) - set(limits)
    if unknown:
        raise ValueError(f"unknown audit thresholds {sorted(unknown)}; known: {sorted(limits)}")
    limits.update(thresholds or {})
    unknown = set(fail_on) - set(CHECKS)
    if unknown:
        raise ValueError(f"unknown audit checks {sorted(unknown)}; known: {list(CHECKS)}")
    opts = faithfulness_options(faithfulness)
    if baseline is not None and not isinstance(baseline, Baseline):
        baseline = load_baseline(baseline)
    source = str(model) if not hasattr(model, "SerializeToString") else "<ModelProto>"
    rules_desc = rules_description or _describe_rules(rules_or_composite)
    kw = dict(verbose=False, device="cpu", input_name=input_name, output_name=output_name, skip_checks=skip_checks)
    with np.errstate(all="ignore"):  # NaN and overflow are what the checks report, not numpy warnings
        return _audit(model, rules_or_composite, source, rules_desc, kw, inputs, other_inputs, samples, seed,
                      input_shape, output_selection, limits, precision_check, fail_on, opts, baseline, compare,
                      on_check or (lambda name: None))


def _describe_rules(spec):
    if spec is None:
        return "default rules (LRP-0)"
    if isinstance(spec, (list, tuple)):
        return f"{len(spec)} rules given"
    return getattr(spec, "name", None) or type(spec).__name__ if not hasattr(spec, "emit") else repr(spec)


def _audit(model, rules_or_composite, source, rules_desc, kw, inputs, other_inputs, samples, seed, input_shape,
           output_selection, limits, precision_check, fail_on, opts, baseline, compare, on_check):
    from ..analyzer import LRP
    from ..images import detect_layout
    from .drift import _file_sha256, compare_check, layer_fingerprints, regression_check
    try:
        analyzer = LRP(model, rules_or_composite, **kw)
    except UnsupportedModelError as exc:
        nodes = [f"'{name}' ({op}): {reason}" for name, op, reason in exc.nodes]
        checks = [CheckResult("coverage", "fail", f"{len(nodes)} node(s) not supported: " + "; ".join(nodes[:5])
                              + ("; ..." if len(nodes) > 5 else ""), {"unsupported": nodes})]
        checks += [CheckResult(name, "skip", "no relevance graph (coverage failed)") for name in CHECKS[1:]]
        return AuditReport(source, rules_desc, "-", checks, tuple(fail_on))
    feeds_inputs = dict(other_inputs or {})
    if callable(inputs):
        inputs = inputs(analyzer)
    if inputs is not None:
        x = np.asarray(inputs)
        described = f"{len(x)} given"
    elif baseline is not None:
        x, described = baseline.inputs, f"{len(baseline.inputs)} of the baseline {baseline.describe()}"
        feeds_inputs = {**baseline.other_inputs, **feeds_inputs}
        if output_selection is None:
            output_selection = baseline.output_selection
    else:
        x = synthetic_inputs(analyzer, samples, seed, input_shape)
        described = f"{len(x)} synthetic (seed {seed}, {'token ids' if analyzer.token_input else 'standard normal'})"
    checks = []

    def run(name, fn, *args):
        on_check(name)
        checks.append(fn(*args))
    run("coverage", _coverage, analyzer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LRPWarning)  # health reports these
        expl = analyzer.analyze(x, output_selection, inputs=feeds_inputs)
    selection = np.asarray(expl.output_selection)
    feeds = analyzer._feeds(analyzer._check_input(x), selection, feeds_inputs,
                            analyzer._out_shapes.get(tuple(x.shape[1:])))
    run("forward", _forward, analyzer, model, feeds, expl, limits["forward_rtol"])
    run("conservation", _conservation, analyzer, model, x, feeds_inputs, limits["conservation_tol"], selection)
    run("identity", _identity, analyzer, model, x, feeds_inputs, limits["identity_rtol"], selection)
    run("health", _health, analyzer, x, feeds, expl, limits["explosion"])
    if precision_check:
        run("precision", _precision, analyzer, model, rules_or_composite, x, feeds_inputs, expl,
            limits["precision_rtol"])
    else:
        checks.append(CheckResult("precision", "skip", "not asked for"))
    run("faithfulness", _faithfulness, analyzer, model, analyzer._check_input(x), feeds_inputs, expl,
        limits["faithfulness_margin"], seed, opts)
    shape = analyzer.input_shape
    data = {"inputs": np.asarray(x), "other_inputs": {k: np.asarray(v) for k, v in feeds_inputs.items()},
            "output": np.asarray(expl.output), "output_selection": selection.astype(np.int64),
            "relevance": np.asarray(expl.val), "layers": layer_fingerprints(analyzer), "model_sha256":
            _file_sha256(model), "token_input": analyzer.token_input,
            "layout": detect_layout(shape) if shape is not None and len(shape) == 4 and not analyzer.token_input
            else None}
    report = AuditReport(source, rules_desc, described, checks, tuple(fail_on), data)
    if baseline is not None:
        run("regression", _timed(regression_check), report, baseline, limits)
    else:
        checks.append(CheckResult("regression", "skip", "no baseline given (--baseline FILE; --update-baseline "
                                  "writes one)"))
    if compare is not None:
        run("compare", _timed(compare_check), analyzer, compare, rules_or_composite, x, feeds_inputs, expl, limits)
    else:
        checks.append(CheckResult("compare", "skip", "no other export given (--compare OTHER.onnx)"))
    return report


__all__ = ["AuditReport", "CheckResult", "CHECKS", "DEFAULT_THRESHOLDS", "FAITHFULNESS_DEFAULTS", "audit",
           "conservative_rules", "faithfulness_options", "synthetic_inputs", "without_biases"]
