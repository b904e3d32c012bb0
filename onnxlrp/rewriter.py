"""The graph rewriter: one ONNX model holding the forward pass and the relevance backward pass.

Inputs:  the model's data input; ``output_selection`` (int64 [N], -1 = the argmax of that sample's
         flattened output); ``normalize_output_relevance`` (bool scalar: seed 1 or the output's value).
Outputs: ``output`` (the model output, softmax stripped), ``relevance`` (shaped like the input),
         ``output_selection_used`` (int64 [N]) and, on request, ``relevance_layer_<i>`` (relevance arriving
         at layer i's output).
Modified weights are initializers computed once; rules reuse the forward pass's own pre-activations.
"""
from __future__ import annotations

import hashlib
from collections import defaultdict

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ._onnx_utils import export_model
from .rules.expr import Sym

from .interface import NORMALIZE, OUTPUT, POSITION, RELEVANCE, SELECTION, SELECTION_USED  # noqa: E402,F401
CONCEPT_MASK = "concept_mask"
CONCEPT_RELEVANCE = "concept_relevance"


class Builder:
    """Adds nodes and deduplicated constants to a gs graph."""

    def __init__(self, graph: gs.Graph, dtype, prefix="lrp"):
        self.graph = graph
        self.prefix = prefix  # a second builder on the same graph needs its own (float64 lowering)
        self.dtype = np.dtype(dtype)
        self.onnx_dtype = onnx.helper.np_dtype_to_tensor_dtype(self.dtype)
        self._n = 0
        self._consts = {}   # small arrays, by content
        self._by_id = {}    # id(array) -> (array, Constant): big arrays by identity (the array is kept alive)

    def fresh(self, hint):
        self._n += 1
        return f"{self.prefix}/{hint}_{self._n}"

    def variable(self, hint, dtype=None):
        return gs.Variable(self.fresh(hint), dtype=dtype)

    def op(self, op, inputs, attrs=None, outputs=1):
        inputs = [gs.Variable.empty() if (isinstance(i, str) and i == "") else i for i in inputs]
        outs = [gs.Variable(self.fresh(op.lower())) for _ in range(outputs)]
        self.graph.nodes.append(gs.Node(op, name=self.fresh(op), attrs=attrs or {}, inputs=inputs, outputs=outs))
        return outs[0] if outputs == 1 else outs

    def adopt(self, array, constant):
        """Reuse ``constant`` whenever ``array`` itself is asked for (the model's own initializers)."""
        self._by_id[id(array)] = (array, constant)

    def const(self, array):
        """A constant for ``array``: unchanged weights reuse the model's initializer, the same array asked
        twice gives one initializer, and small arrays are deduplicated by content."""
        hit = self._by_id.get(id(array))
        if hit is not None and hit[0] is array:
            return hit[1]
        source = array
        array = np.asarray(array)
        if array.dtype.kind == "f":
            array = array.astype(self.dtype, copy=False)
        array = np.ascontiguousarray(array)
        if array.nbytes > 1 << 16:  # hashing big weights costs more than it saves
            constant = gs.Constant(self.fresh("const"), array)
            self._by_id[id(source)] = (source, constant)
            return constant
        key = (array.dtype.str, array.shape, hashlib.blake2b(array.tobytes(), digest_size=16).digest())
        if key not in self._consts:
            self._consts[key] = gs.Constant(self.fresh("const"), array)
        return self._consts[key]

    def i64(self, values):
        return self.const(np.asarray(values, dtype=np.int64))

    def add_all(self, vars_):
        vars_ = [v for v in vars_ if v is not None]
        if not vars_:
            return None
        return vars_[0] if len(vars_) == 1 else self.op("Sum", vars_)


class EmitContext:
    """What emitters and rules see: the builder, static shapes, and the shared term machinery."""

    def __init__(self, builder):
        self.b = builder

    @staticmethod
    def shape(tensor):
        if tensor.shape is None:
            raise ValueError(f"tensor '{tensor.name}' has no inferred shape")
        return tuple(tensor.shape)

    def _static_tail(self, like):
        """The static sizes of ``like`` past its first (batch) axis, or None where one is not known."""
        dims = self.shape(like)[1:]
        if dims and all(isinstance(d, (int, np.integer)) and d > 0 for d in dims):
            return [int(d) for d in dims]
        return None

    def reshape_like(self, var, like, var_like):
        """Reshape ``var`` (shaped like the tensor ``var_like``) to the shape of ``like``. Where both share
        their first (batch) axis, a static target [0, d1, ...] keeps the shape known to onnxruntime's shape
        inference, which its NCHWc layout pass needs to keep elementwise ops between convolutions in the
        blocked layout; Shape(like) would hide it."""
        tail = self._static_tail(like)
        if tail is not None and self.shape(like)[0] == self.shape(var_like)[0]:
            return self.b.op("Reshape", [var, self.b.i64([0] + tail)])
        return self.b.op("Reshape", [var, self.b.op("Shape", [like])])

    def expand_like(self, var, like):
        """Broadcast a batch-first ``var`` to the shape of ``like`` (a static target where possible, see
        reshape_like)."""
        tail = self._static_tail(like)
        if tail is not None:
            return self.b.op("Expand", [var, self.b.i64([1] + tail)])
        return self.b.op("Expand", [var, self.b.op("Shape", [like])])

    def sym(self, var, like):
        return Sym(self.b, var, self.shape(like)[1:])

    def emit_terms(self, layer, groups, relevance_out):
        """The shared emission of every Group/Term rule (see onnxlrp.rules.base)."""
        b, emitter = self.b, layer.emitter
        r_out = relevance_out[0]
        xs = [Sym(b, t, self.shape(t)[1:]) for t in layer.inputs]
        z_orig = layer.outputs[0]
        # the graph's pre-activation is the layer's map under layer.params, so rules may build on it
        z_is_layer_map = not (layer.extra.get("interior") or layer.extra.get("params_changed"))
        modified, products = {}, {}  # kept with what their keys' ids refer to, so no id is reused

        def inputs_under(hook):
            """The layer's inputs under an input hook, once per hook: groups whose terms share one share them."""
            if id(hook) not in modified:
                modified[id(hook)] = (hook, [hook(x) for x in xs])
            return modified[id(hook)][1]

        def forward(params, input=None):
            """The layer's map under ``params`` of its inputs (or of ``input(x)``), once per pair."""
            inputs = xs if input is None else inputs_under(input)
            key = (id(params),) + tuple(id(i) for i in inputs)
            if key not in products:
                products[key] = (params, self.sym(emitter.forward(self, layer, inputs, params), z_orig))
            return products[key][1]

        contributions = [[] for _ in xs]
        for group in groups:
            terms = [(term, inputs_under(term.input)) for term in group.terms]
            if group.z is not None and z_is_layer_map:
                z = group.z(self.sym(z_orig, z_orig), forward).var
            else:
                z = self._sum_of_forwards(layer, terms, xs, z_is_layer_map, forward)
            r = r_out
            if group.mask is not None:
                zsym = self.sym(z_orig, z_orig)
                mask = zsym.positive_mask() if group.mask == "positive" else zsym.negative_mask()
                r = b.op("Mul", [r, mask.var])
            denominator = group.denominator(self.sym(z, z_orig))
            s = b.op("Div", [r, denominator.var])
            all_grads = emitter.backward_terms(self, layer, s, [term.params for term, _ in terms])
            for (term, inputs), grads in zip(terms, all_grads):
                factor = term.sign * group.coef
                for i, (inp, g) in enumerate(zip(inputs, grads)):
                    if g is None:
                        continue
                    # a ones input (WSquare, Flat, ZBox's folded bounds) leaves the transpose as it is
                    c = g if getattr(inp, "fill", None) == 1.0 else b.op("Mul", [inp.var, g])
                    if factor != 1.0:
                        c = b.op("Mul", [c, b.const(np.asarray(factor, dtype=b.dtype))])
                    contributions[i].append(c)
        return [b.add_all(c) for c in contributions]

    def _sum_of_forwards(self, layer, terms, xs, z_is_layer_map, forward):
        """A group's pre-activation as its terms' forward passes (``forward``, emit_terms' shared products)
        summed, each with its sign."""
        b, z = self.b, None
        for term, inputs in terms:
            if all(i is x for i, x in zip(inputs, xs)) and _same_params(term.params, layer.params) \
                    and z_is_layer_map:
                z_term = layer.outputs[0]  # reuse the forward pass's own pre-activation
            else:
                z_term = forward(term.params, term.input).var
            if term.sign < 0:
                z = b.op("Neg", [z_term]) if z is None else b.op("Sub", [z, z_term])
            else:
                z = z_term if z is None else b.op("Add", [z, z_term])
        return z


def _same_params(p, q):
    if p is q:
        return True
    if p is None or q is None:
        return False
    return p.weight is q.weight and (p.bias is q.bias)


def _group_top(ctx, top, group):
    """Every row of a group of ``size`` rows takes the top output of the group's row ``ref`` (SmoothGrad's
    clean input, Integrated Gradients' input at t = 1): the noisy or interpolated copies explain the class
    the input itself is given."""
    if group is None:
        return top
    b = ctx.b
    size, ref = group
    rows = b.op("Reshape", [top, b.i64([-1, size])])
    chosen = b.op("Gather", [rows, b.i64(ref)], attrs={"axis": 1})
    spread = b.op("Expand", [b.op("Unsqueeze", [chosen, b.i64([1])]), b.i64([1, size])])
    return b.op("Reshape", [spread, b.i64([-1])])


def _select_outputs(ctx, y, selection, position, group=None):
    """The flat output index explained per sample: ``selection`` where it is in range, the top output where
    it is -1 (for sequence outputs (N, T, ...) with ``position`` given, the top output at that position,
    -1 = last), and -1 where it is anything else: an invalid request is not answered (emit_relevance_graph
    makes that sample's relevance NaN)."""
    b = ctx.b
    flat_y = b.op("Reshape", [y, b.i64([0, -1])])
    shape = ctx.shape(y)
    count = int(np.prod(shape[1:]))
    top_wanted = b.op("Equal", [selection, b.i64(-1)])
    in_range = b.op("And", [b.op("GreaterOrEqual", [selection, b.i64(0)]), b.op("Less", [selection, b.i64(count)])])
    selection = b.op("Where", [in_range, selection, b.i64(-1)])
    if position is None:
        top = _group_top(ctx, b.op("ArgMax", [flat_y], attrs={"axis": 1, "keepdims": 0}), group)
        return flat_y, b.op("Where", [top_wanted, top, selection])
    steps, per_step = int(shape[1]), int(np.prod(shape[2:]))
    pos = b.op("Where", [b.op("Less", [position, b.i64(0)]), b.op("Add", [position, b.i64(steps)]), position])
    rows = b.op("Reshape", [y, b.i64([0, steps, per_step])])
    at = b.op("Cast", [b.op("Equal", [b.i64(np.arange(steps)[None, :]), b.op("Unsqueeze", [pos, b.i64([1])])])],
              attrs={"to": b.onnx_dtype})
    picked = b.op("ReduceSum", [b.op("Mul", [rows, b.op("Unsqueeze", [at, b.i64([2])])]), b.i64([1])],
                  attrs={"keepdims": 0})
    top = b.op("ArgMax", [picked], attrs={"axis": 1, "keepdims": 0})
    top = _group_top(ctx, b.op("Add", [b.op("Mul", [pos, b.i64(per_step)]), top]), group)
    return flat_y, b.op("Where", [top_wanted, top, selection])


def emit_relevance_graph(graph: gs.Graph, layers, rules, data_input: str, layer_relevances=False,
                         concept_layer=None, explained=None, sequence_output=False, input_relevances=False,
                         times_input=False, selection_group=None):
    """Add the backward pass for ``rules`` (one per layer) to ``graph`` (in place).

    ``explained`` names the tensor whose relevance is the output (default: the data input; for token
    models the embedding lookup's output). With ``sequence_output`` the graph gets an input
    ``output_position`` (int64 [N], -1 = last) that says at which position of a (N, T, ...) output the top
    output is explained. With ``concept_layer`` (CRP), the relevance arriving at that layer's output is
    also an output (``concept_relevance``) and is multiplied by the input ``concept_mask`` (N, features)
    before it goes on. With ``input_relevances`` each layer's contribution to each of its inputs is an output
    too (``relevance_in_<layer>_<input>``), which tells which consumer of a shared tensor created relevance,
    and so is the relevance reaching each of its outputs (``relevance_out_<layer>_<output>``).
    With ``times_input`` the result is multiplied by the explained tensor (gradient x input). With
    ``selection_group = (size, ref)`` the batch comes in groups of ``size`` rows and -1 selects, for every
    row of a group, the top output of its row ``ref``.
    """
    x_in = next(t for t in graph.inputs if t.name == data_input)
    x = x_in if explained in (None, data_input) else graph.tensors()[explained]
    reserved = {OUTPUT, RELEVANCE, SELECTION, SELECTION_USED, NORMALIZE, POSITION, CONCEPT_MASK, CONCEPT_RELEVANCE}
    for name, tensor in graph.tensors().items():
        if name in reserved or name.startswith("relevance_layer_"):
            if tensor in graph.inputs:
                raise ValueError(f"the model's input '{name}' uses a name the relevance graph reserves")
            tensor.name = f"{name}__model"
    dtype = np.dtype(x.dtype or np.float32)
    b = Builder(graph, dtype)
    for tensor in graph.tensors().values():
        if isinstance(tensor, gs.Constant):
            b.adopt(np.asarray(tensor.values), tensor)
    ctx = EmitContext(b)
    for layer in layers:
        layer.emitter.prepare(ctx, layer)

    y = graph.outputs[0]
    y_shape = ctx.shape(y)
    k = int(np.prod(y_shape[1:])) if len(y_shape) > 1 else 1
    selection = gs.Variable(SELECTION, dtype=np.int64, shape=["batch"])
    normalize = gs.Variable(NORMALIZE, dtype=np.bool_, shape=[])
    position = gs.Variable(POSITION, dtype=np.int64, shape=["batch"]) if sequence_output else None
    flat_y, selection_used = _select_outputs(ctx, y, selection, position, selection_group)
    # One-hot as Equal(arange, selection): onnxruntime has OneHot for few value types (no double).
    column = b.op("Unsqueeze", [selection_used, b.i64([1])])
    onehot = b.op("Cast", [b.op("Equal", [b.i64(np.arange(k)[None, :]), column])], attrs={"to": b.onnx_dtype})
    value = b.op("Where", [normalize, b.const(np.asarray(1, dtype=dtype)), flat_y])
    seed = ctx.reshape_like(b.op("Mul", [onehot, value]), y, y)

    concept_mask = gs.Variable(CONCEPT_MASK, dtype=dtype, shape=["batch", "features"])
    concept = None
    relevance = defaultdict(list)
    relevance[y.name].append(seed)
    per_layer, per_input, per_output = {}, {}, {}
    for layer, rule in zip(reversed(layers), reversed(rules)):
        r_out = [b.add_all(relevance.get(t.name, [])) for t in layer.outputs]
        if all(r is None for r in r_out):
            continue
        if layer_relevances and r_out[0] is not None:
            per_layer[layer.index] = r_out[0]
        if input_relevances:  # every output's, for layers with several (a Split's q, k, v)
            per_output.update({(layer.index, k): r for k, r in enumerate(r_out) if r is not None})
        if layer.index == concept_layer:
            concept = r_out[0]
            rank = len(ctx.shape(layer.outputs[0]))
            features = ctx.shape(layer.outputs[0])[1]
            mask = b.op("Reshape", [concept_mask, b.i64([0, features] + [1] * (rank - 2))])
            r_out = [b.op("Mul", [concept, mask])] + r_out[1:]
        r_in = rule.emit(ctx, layer, r_out)
        if input_relevances:
            per_input.update({(layer.index, k): r for k, r in enumerate(r_in) if r is not None})
        for tensor, r in zip(layer.inputs, r_in):
            if r is not None:
                relevance[tensor.name].append(r)
    r_x = b.add_all(relevance.get(x.name, []))
    if r_x is None:  # no path from the output to the input
        r_x = b.op("Mul", [x, b.const(np.asarray(0, dtype=dtype))])
    elif times_input:
        r_x = b.op("Mul", [r_x, x])
    # an output_selection out of range (not -1) explains nothing: NaN, never a plausible all-zero map
    refused = b.op("Equal", [selection_used, b.i64(-1)])
    rank = len(ctx.shape(x))
    refused = b.op("Reshape", [refused, b.i64([-1] + [1] * (rank - 1))])
    r_x = b.op("Where", [refused, b.const(np.asarray(np.nan, dtype=dtype)), r_x])

    def named_output(name, var, dt=dtype, shape=None):
        out = gs.Variable(name, dtype=dt, shape=shape)
        graph.nodes.append(gs.Node("Identity", name=f"lrp/{name}", inputs=[var], outputs=[out]))
        return out

    outputs = [named_output(OUTPUT, y, shape=y.shape), named_output(RELEVANCE, r_x, shape=x.shape),
               named_output(SELECTION_USED, selection_used, np.int64, ["batch"])]
    if concept_layer is not None:
        if concept is None:
            raise ValueError(f"no relevance reaches layer {concept_layer}")
        outputs.append(named_output(CONCEPT_RELEVANCE, concept))
    outputs += [named_output(f"relevance_layer_{index}", per_layer[index]) for index in sorted(per_layer)]
    outputs += [named_output(f"relevance_in_{i}_{k}", per_input[i, k]) for i, k in sorted(per_input)]
    outputs += [named_output(f"relevance_out_{i}_{k}", per_output[i, k]) for i, k in sorted(per_output)]

    graph.inputs = [x_in] + [t for t in graph.inputs if t is not x_in and isinstance(t, gs.Variable)] + \
        [selection, normalize] + ([position] if position is not None else [])
    if concept_layer is not None:
        graph.inputs.append(concept_mask)
    graph.outputs = outputs
    graph.cleanup(remove_unused_graph_inputs=False).toposort()


def export_relevance_model(graph: gs.Graph, opset: int, doc="") -> onnx.ModelProto:
    """The ModelProto of an emitted relevance graph."""
    return export_model(graph, opset, doc)
