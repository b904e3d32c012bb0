"""Directional derivatives of piecewise-linear models in float64, an independent reference for
LRP-0 = gradient x input that reaches double rounding.

On the linear region of x a piecewise-linear model is an affine map f(x') = J x' + c. Finite differences
of f itself only stay in that region for steps of ~1e-7 on a 224x224 zoo graph, where their own rounding
is ~1e-10. So the model is evaluated with its kinks frozen at x instead: every ReLU/Clip multiplies by its
0/1 pattern at x (plus the clipped constant) and every MaxPool gathers the argmax it took at x. That graph
is the affine map of x's region everywhere, and J v = f_lin(x + v) - f_lin(x) exactly, for any v.

The double forward pass is the model itself cast to double (softmax stripped by the canonizer); the few ops
onnxruntime has no double kernel for are lowered exactly (tests/test_precision.py checks each against onnx's
reference evaluator).
"""
import gc

import numpy as np
import onnx_graphsurgeon as gs
import onnxruntime as ort

import onnxlrp
from onnxlrp._onnx_utils import export_model
from onnxlrp.canonization import canonize_graph
from onnxlrp.loading import load_model
from onnxlrp.precision import cast_floats, lower_double_ops

KINKS = ("Relu", "Clip", "MaxPool")


def _session(loaded):
    """A CPU session of ``loaded``'s graph, which is let go first: on VGG19 each copy of the double weights
    (graph, proto, bytes, session) is 1.1 GB."""
    graph, loaded.graph = loaded.graph, None
    graph.cleanup().toposort()
    lower_double_ops(graph)
    data = export_model(graph, max(loaded.opset, 17)).SerializeToString()
    del graph
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"])


def _double_graph(path, feature_shape):
    loaded = load_model(path, None, feature_shape)
    cast_floats(loaded.graph)
    canonize_graph(loaded.graph)  # LRP explains the logits: the softmax goes (Dropout too; BN fuses in double)
    unsupported = {n.op for n in loaded.graph.nodes if n.op in ("LeakyRelu", "PRelu", "Max", "Min", "ReduceMax")}
    assert not unsupported, f"kinks this helper does not freeze: {unsupported}"
    return loaded


def _clip_bounds(node):
    lo = node.inputs[1].values if len(node.inputs) > 1 and isinstance(node.inputs[1], gs.Constant) else -np.inf
    hi = node.inputs[2].values if len(node.inputs) > 2 and isinstance(node.inputs[2], gs.Constant) else np.inf
    return float(lo), float(hi)


def _kink_values(path, x):
    """The pre-activation of every ReLU/Clip and the argmax of every MaxPool at x (one sample)."""
    loaded = _double_graph(path, tuple(x.shape[1:]))
    _expose_kinks(loaded.graph)
    session = _session(loaded)
    return session.run(None, {loaded.data_input: x})


def _expose_kinks(graph):
    wanted = []
    for k, node in enumerate(n for n in graph.nodes if n.op in KINKS):
        if node.op in ("Relu", "Clip"):
            wanted.append(node.inputs[0])
        else:
            if len(node.outputs) < 2:
                node.outputs.append(gs.Variable(f"frozen_{k}/argmax", dtype=np.int64))
            wanted.append(node.outputs[1])
    graph.outputs = wanted


def _drop_constant_terms(graph):
    """The linear part of an affine graph: biases, BatchNorm shifts and constant addends set to zero (the
    frozen kinks' offsets are left out by the caller)."""
    for node in list(graph.nodes):
        if node.op in ("Conv", "ConvTranspose", "Gemm") and len(node.inputs) > 2:
            kept = list(node.inputs[:2])
            node.inputs.clear()
            node.inputs.extend(kept)
        elif node.op == "BatchNormalization":
            gamma, _, _, var = (np.asarray(t.values, np.float64) for t in node.inputs[1:5])
            scale = gamma / np.sqrt(var + node.attrs.get("epsilon", 1e-5))
            rank = len(node.inputs[0].shape)
            data = node.inputs[0]
            node.op, node.attrs = "Mul", {}
            node.inputs.clear()
            node.inputs.extend([data, gs.Constant(f"{node.outputs[0].name}/scale",
                                                  scale.reshape((-1,) + (1,) * (rank - 2)))])
        elif node.op in ("Add", "Sub") and any(isinstance(t, gs.Constant) for t in node.inputs):
            variable = [t for t in node.inputs if not isinstance(t, gs.Constant)]
            negate = node.op == "Sub" and isinstance(node.inputs[0], gs.Constant)
            node.op, node.attrs = ("Neg" if negate else "Identity"), {}
            node.inputs.clear()
            node.inputs.extend(variable)


def linearized_model(path, x, homogeneous=False):
    """(run, input name): ``run(x')`` evaluates the selected model on the linear region of x (one sample,
    float64), i.e. with every kink frozen where x put it; with ``homogeneous`` only its linear part J x'
    (no biases), which carries no rounding from a large constant part."""
    kinks = _kink_values(path, x)  # first: its session is gone before the second graph loads
    loaded = _double_graph(path, tuple(x.shape[1:]))
    _freeze_kinks(loaded.graph, kinks, homogeneous)
    name = loaded.data_input
    session = _session(loaded)  # built from locals that are gone: the graph's weights go with it
    return (lambda xs: session.run(None, {name: xs})[0]), name


def _freeze_kinks(graph, kinks, homogeneous):
    for k, node in enumerate([n for n in graph.nodes if n.op in KINKS]):
        z, y = node.inputs[0], node.outputs[0]
        value = kinks[k]
        node.name = f"frozen_{k}"  # exporters leave names empty or repeat them
        if node.op == "MaxPool":
            flat = gs.Variable(f"{node.name}/flat", dtype=np.float64)
            gathered = gs.Variable(f"{node.name}/gathered", dtype=np.float64)
            graph.nodes += [gs.Node("Reshape", inputs=[z, gs.Constant(f"{node.name}/minus1", np.array([-1]))],
                                    outputs=[flat]),
                            gs.Node("Gather", inputs=[flat, gs.Constant(f"{node.name}/at", value.reshape(-1))],
                                    outputs=[gathered]),
                            gs.Node("Reshape", inputs=[gathered, gs.Constant(f"{node.name}/shape",
                                                                             np.array(value.shape, np.int64))],
                                    outputs=[y])]
        else:
            lo, hi = _clip_bounds(node) if node.op == "Clip" else (0.0, np.inf)
            slope = ((value > lo) & (value < hi)).astype(np.float64)
            offset = np.where(value <= lo, lo, 0.0) + np.where(value >= hi, hi, 0.0)
            if homogeneous:
                offset = np.zeros_like(offset)
            scaled = gs.Variable(f"{node.name}/scaled", dtype=np.float64)
            graph.nodes += [gs.Node("Mul", inputs=[z, gs.Constant(f"{node.name}/slope", slope)], outputs=[scaled]),
                            gs.Node("Add", inputs=[scaled, gs.Constant(f"{node.name}/offset", offset)], outputs=[y])]
        node.outputs.clear()
    if homogeneous:
        _drop_constant_terms(graph)


def directional_derivatives(path, x, selection, directions):
    """J_sel v for each sample of x (float64) and direction v (K, *x.shape[1:]): an (N, K) array, from the
    frozen graph's linear part. Random-weight zoo graphs have logits that are almost all bias (|f| up to
    1e11 |J x|): a difference f(x + v) - f(x) would carry that much more rounding."""
    result = np.empty((len(x), len(directions)))
    for i in range(len(x)):
        run, _ = linearized_model(path, x[i:i + 1].astype(np.float64), homogeneous=True)
        for j, v in enumerate(directions):  # one at a time: the frozen max-pools gather one sample's argmax
            result[i, j] = run(np.asarray(v, np.float64)[None]).reshape(-1)[selection[i]]
    return result


def identity_error(path, x, directions=4, coordinates=8):
    """Worst per-sample |<R - x * grad, u>| / (|R| |u|) over random dense and single-pixel u, with the
    gradient's directional derivatives from the model's affine map on x's linear region (above)."""
    analyzer = onnxlrp.LRP(path, precision="float64", normalize_output_relevance=False, verbose=False)
    expl = analyzer.analyze(x)
    assert expl.val.dtype == np.float64 and expl.output.dtype == np.float64
    del analyzer  # the reference below builds two double sessions of its own (VGG19: 1.1 GB of weights each)
    gc.collect()
    n, d = len(x), int(np.prod(x.shape[1:]))
    rng = np.random.default_rng(2)
    pixels = np.zeros((coordinates, d))
    pixels[np.arange(coordinates), rng.choice(d, coordinates, replace=False)] = 1.0
    u = np.concatenate([rng.standard_normal((directions, d)), pixels])
    relevance = expl.val.reshape(n, d)
    worst = 0.0
    for i in range(n):
        # along v = x * u the derivative of the explained logit is <x * grad, u>
        v = (x[i].reshape(1, d) * u).reshape((-1,) + x.shape[1:])
        want = directional_derivatives(path, x[i:i + 1], expl.output_selection[i:i + 1], v)[0]
        got = u @ relevance[i]
        worst = max(worst, float(np.max(np.abs(got - want) / (np.linalg.norm(relevance[i]) *
                                                                 np.linalg.norm(u, axis=1)))))
    return worst
