"""Bounding constant folding: a 9 KB file whose ConstantOfShape([1, 1e9]) feeds a ReduceSum made folding
take 8 GB. Before onnx-graphsurgeon folds anything, the size of every tensor it would create is worked out
from the constant inputs, and a graph over the limit is refused with a one-line ModelLoadError naming the
node and the size (see onnxlrp.loading's docstring for the limits and how to raise them)."""
from __future__ import annotations

import math
import os
import re

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ._onnx_utils import EMIT_IR_VERSION, format_shape, node_label, quoted
from .errors import ModelLoadError

#: Bytes one tensor computed by constant folding may take by default. 1 GiB holds 268M float32 values:
#: VGG19's largest weight (102,760,448 values, 411 MB) fits with room to spare, while the 4 GB that a 9 KB
#: file's ConstantOfShape([1, 1e9]) would allocate does not.
DEFAULT_MAX_FOLD_BYTES = 1 << 30
#: The tensors one folding run computes, all together, may take this many times the per-tensor limit
#: (onnxruntime evaluates the whole constant subgraph in one session).
FOLD_TOTAL_FACTOR = 4
#: Environment variable that sets the per-tensor limit (bytes; K/M/G/T suffixes, powers of 1024).
MAX_FOLD_BYTES_ENV = "ONNXLRP_MAX_FOLD_BYTES"

#: Values of tensors up to this many elements are computed while bounding (shape arithmetic: the
#: Concat/Gather/Cast chains that feed a ConstantOfShape or an Expand).
_EVAL_ELEMENTS = 1 << 16
#: Ops whose output can be far larger than their inputs: when the size of such a node's output cannot be
#: told before computing it, folding it is refused.
_GENERATIVE_OPS = frozenset((
    "ConstantOfShape", "Expand", "Tile", "Range", "Resize", "Upsample", "Pad", "OneHot", "RandomNormal",
    "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli", "Loop", "Scan",
    "ConvTranspose", "MaxUnpool", "CenterCropPad", "Col2Im"))
#: Ops whose output shape depends on the values of their inputs after the first (their values are
#: computed, when small, so that shape inference can use them).
_VALUE_DEPENDENT_OPS = frozenset((
    "Reshape", "Slice", "Pad", "Expand", "Tile", "ConstantOfShape", "Range", "Resize", "Upsample", "OneHot",
    "TopK", "Squeeze", "Unsqueeze", "Split", "ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin",
    "ReduceProd", "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare",
    "CenterCropPad", "Col2Im", "MaxUnpool"))
#: Ops whose output shares the input's data (not counted against the total).
_VIEW_OPS = frozenset(("Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity"))
#: Ops onnx-graphsurgeon never folds (as in its fold_constants).
_NO_FOLD_OPS = frozenset(("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"))
#: Ops that are not evaluated to learn values (random, control flow).
_NO_EVAL_OPS = frozenset(("RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
                          "Multinomial", "Bernoulli", "Loop", "Scan", "If"))

_SIZE_SUFFIX = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def fold_byte_limit(value=None) -> int:
    """The per-tensor folding limit in bytes: ``value`` (load_model's ``max_fold_bytes``) if given, else
    $ONNXLRP_MAX_FOLD_BYTES, else DEFAULT_MAX_FOLD_BYTES."""
    where = "max_fold_bytes"
    if value is None:
        raw = os.environ.get(MAX_FOLD_BYTES_ENV, "").strip()
        if not raw:
            return DEFAULT_MAX_FOLD_BYTES
        where = MAX_FOLD_BYTES_ENV
        match = re.fullmatch(r"(\d[\d_]*)\s*([KMGT]?)(?:i?B)?", raw, flags=re.IGNORECASE)
        if not match:
            raise ModelLoadError(f"{MAX_FOLD_BYTES_ENV}={raw!r}: expected a number of bytes such as 2000000000 "
                                 "or 4G")
        value = int(match.group(1).replace("_", "")) * _SIZE_SUFFIX[match.group(2).upper()]
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ModelLoadError(f"{where}={value!r}: expected a positive number of bytes")
    return int(value)


class _Unbounded(Exception):
    """A node whose output size cannot be told, or is invalid, before computing it (the reason)."""


def _static(shape):
    """``shape`` as a tuple of Python ints when every dimension is known, else None."""
    if shape is None:
        return None
    dims = []
    for d in shape:
        if isinstance(d, (bool, np.bool_)) or not isinstance(d, (int, np.integer)):
            return None
        dims.append(int(d))
    return tuple(dims)


def _np_dtype(dtype):
    """``dtype`` as a numpy dtype, None when not known (gs leaves some as None or as onnx enums)."""
    if dtype is None:
        return None
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(dtype) if isinstance(dtype, int) else dtype)
    except Exception:
        return None


def _itemsize(dtype) -> int:
    dtype = _np_dtype(dtype)
    if dtype is None:
        return 4  # not known: counted as float32, as the message then says
    return dtype.itemsize if dtype.kind not in "OSUV" and dtype.itemsize else 8  # strings: a pointer each


def _ints(value, what):
    flat = np.asarray(value).reshape(-1)
    if flat.dtype.kind not in "iu":
        raise _Unbounded(f"its {what} input holds {flat.dtype} values; expected integers")
    return [int(v) for v in flat]


def _broadcast(a, b):
    """numpy/ONNX multidirectional broadcasting of two static shapes (Python ints: no overflow)."""
    rank = max(len(a), len(b))
    a, b = (1,) * (rank - len(a)) + tuple(a), (1,) * (rank - len(b)) + tuple(b)
    out = []
    for x, y in zip(a, b):
        if x != y and 1 not in (x, y):
            raise _Unbounded(f"shapes {format_shape(a)} and {format_shape(b)} do not broadcast")
        out.append(y if x == 1 else x)
    return tuple(out)


class _FoldBound:
    """Walks a graph as onnx-graphsurgeon's fold_constants will fold it (constants, nodes whose inputs
    are all constant, Shape of a tensor with a static shape and its Gather/Slice) and works out, BEFORE
    anything is computed, the shape of every tensor that folding would create: from the constant inputs
    for the ops whose output can dwarf their inputs (ConstantOfShape, Expand, Tile, Range, Resize, Pad,
    OneHot), by onnx's shape inference of the single node for the others. Refuses a tensor over the
    per-tensor limit, or all of them together over the total. Constants the file holds (initializers,
    Constant nodes) are what was read already and are not counted."""

    def __init__(self, graph: gs.Graph, source: str, limit: int):
        self.source, self.limit, self.total_limit = source, limit, limit * FOLD_TOTAL_FACTOR
        self.total = 0
        self.shapes = {}     # name -> static shape tuple (None: not known) of every foldable tensor
        self.dtypes = {}     # name -> numpy dtype (None: not known)
        self.values = {}     # name -> ndarray, small tensors whose values are known
        self.consts = {}     # name -> gs.Constant, read on demand
        self.producers = {}  # name -> the foldable node that makes it
        self.failed = set()  # names whose values could not be computed
        self.partial = {}    # name -> dims (int or None) of Shape(x) where x is not constant
        self.graph_outputs = set()
        self.opset_imports = list(graph.import_domains or []) or [onnx.helper.make_opsetid("", graph.opset)]

    # -- knowledge -------------------------------------------------------------------------------------------
    def _register_constants(self, graph):
        for name, tensor in graph.tensors().items():
            if isinstance(tensor, gs.Constant) and name not in self.shapes:
                self.shapes[name], self.dtypes[name] = _static(tensor.shape), tensor.dtype
                self.consts[name] = tensor

    def foldable(self, tensor) -> bool:
        return tensor.name in self.shapes

    def _small(self, name) -> bool:
        shape = self.shapes.get(name)
        return shape is not None and math.prod(shape) <= _EVAL_ELEMENTS

    def value(self, tensor):
        """The values of a small foldable tensor (computed from its inputs when needed), else None."""
        if tensor.is_empty() or tensor.name not in self.shapes:
            return None
        stack = [tensor.name]
        while stack:  # depth-first without recursion: a hostile chain may be thousands of nodes long
            name = stack[-1]
            if name in self.values or name in self.failed or not self._small(name):
                stack.pop()
                continue
            if name in self.consts:
                self.values[name] = np.asarray(self.consts[name].values)
                stack.pop()
                continue
            node = self.producers.get(name)
            if node is None or node.op in _NO_EVAL_OPS or any(True for _ in node.subgraphs()) or \
                    not all(self._small(o.name) for o in node.outputs if not o.is_empty()):
                self.failed.add(name)
                stack.pop()
                continue
            pending = [t.name for t in node.inputs if not t.is_empty() and t.name not in self.values
                       and t.name not in self.failed and self._small(t.name) and t.name not in stack]
            if pending:
                stack.extend(pending)
                continue
            stack.pop()
            self._evaluate(node)
        return self.values.get(tensor.name)

    def _evaluate(self, node):
        """Compute a small node's outputs with onnx's reference evaluator (numpy, no session)."""
        outputs = [o.name for o in node.outputs if not o.is_empty()]
        feeds = {}
        for t in node.inputs:
            if not t.is_empty():
                if t.name not in self.values:
                    self.failed.update(outputs)
                    return
                feeds[t.name] = self.values[t.name]
        try:
            from onnx.reference import ReferenceEvaluator
            model = self._node_model(node, typed=[t for t in node.inputs if not t.is_empty()], inits=())
            results = ReferenceEvaluator(model).run(None, feeds)
        except Exception:  # an op the reference lacks: the values stay unknown
            self.failed.update(outputs)
            return
        for name, result in zip(outputs, results):
            result = np.asarray(result)
            if _static(result.shape) != self.shapes.get(name):
                self.failed.add(name)  # disagrees with the shape worked out: trust neither as a value
            else:
                self.values[name] = result

    def _node_model(self, node, typed, inits):
        from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter
        inputs = [onnx.helper.make_tensor_value_info(
            t.name, onnx.helper.np_dtype_to_tensor_dtype(_np_dtype(self.dtypes[t.name]) or np.dtype(np.float32)),
            self.shapes[t.name]) for t in typed]
        outputs = [onnx.helper.make_empty_tensor_value_info(o.name) for o in node.outputs if not o.is_empty()]
        graph = onnx.helper.make_graph([OnnxExporter.export_node(node)], "fold_bound", inputs, outputs,
                                       list(inits))
        return onnx.helper.make_model(graph, opset_imports=self.opset_imports, ir_version=EMIT_IR_VERSION)

    # -- output shapes ---------------------------------------------------------------------------------------
    def _input(self, node, index):
        return node.inputs[index] if index < len(node.inputs) and not node.inputs[index].is_empty() else None

    def _shape(self, tensor):
        return None if tensor is None else self.shapes.get(tensor.name)

    def _known(self, node, index):
        tensor = self._input(node, index)
        return None if tensor is None else self.value(tensor)

    def _explicit(self, node):
        """[(shape, dtype)] per output worked out from the constant inputs, None when this op has no rule
        here or an input it needs is not known. Raises _Unbounded for inputs no run could accept."""
        op, x = node.op, self._input(node, 0)
        xshape, xdtype = self._shape(x), (self.dtypes.get(x.name) if x is not None else None)
        if op == "ConstantOfShape":
            dims = self._known(node, 0)
            if dims is None:
                return None
            dims = _ints(dims, "shape")
            if any(d < 0 for d in dims):
                raise _Unbounded(f"its shape input {format_shape(dims)} holds a negative size")
            value = node.attrs.get("value")
            return [(tuple(dims), value.dtype if isinstance(value, gs.Constant) else np.float32)]
        if op in ("Expand", "Tile"):
            other = self._known(node, 1)
            if other is None or xshape is None:
                return None
            other = _ints(other, "shape" if op == "Expand" else "repeats")
            if op == "Expand":
                return [(_broadcast(xshape, other), xdtype)]
            if len(other) != len(xshape) or any(r < 0 for r in other):
                raise _Unbounded(f"repeats {format_shape(other)} do not fit an input of shape {format_shape(xshape)}")
            return [(tuple(d * r for d, r in zip(xshape, other)), xdtype)]
        if op == "Range":
            args = [self._known(node, i) for i in range(3)]
            if any(a is None for a in args):
                return None
            if any(np.asarray(a).size != 1 for a in args):
                raise _Unbounded("start, limit and delta must be scalars")
            start, limit, delta = (np.asarray(a).reshape(-1)[0].item() for a in args)
            if delta == 0:
                raise _Unbounded("its delta is 0")
            if isinstance(start, int) and isinstance(limit, int) and isinstance(delta, int):
                count = -((start - limit) // delta)  # ceil((limit - start) / delta) in exact integers
            else:
                quotient = (float(limit) - float(start)) / float(delta)
                if not math.isfinite(quotient):
                    raise _Unbounded(f"start {start}, limit {limit} and delta {delta} give no finite length")
                count = math.ceil(quotient)
            return [((max(count, 0),), xdtype)]
        if op in ("Resize", "Upsample"):
            if xshape is None:
                return None
            rank = len(xshape)
            axes = [a % rank if rank else a for a in node.attrs.get("axes", range(rank))]
            if op == "Upsample":
                scales = node.attrs.get("scales") if len(node.inputs) < 2 else self._known(node, 1)
                sizes = None
            else:
                scales, sizes = self._known(node, 2), self._known(node, 3)
                if self._input(node, 3) is not None and sizes is None:
                    return None  # sizes given but not known
                if (sizes is None or not np.asarray(sizes).size) and self._input(node, 2) is not None \
                        and scales is None:
                    return None  # scales given but not known
            out = list(xshape)
            if sizes is not None and np.asarray(sizes).size:
                sizes = _ints(sizes, "sizes")
                if len(sizes) != len(axes) or any(s < 0 for s in sizes):
                    raise _Unbounded(f"sizes {format_shape(sizes)} do not fit an input of shape {format_shape(xshape)}")
                policy = node.attrs.get("keep_aspect_ratio_policy", "stretch")
                policy = policy.decode() if isinstance(policy, bytes) else policy
                if policy in ("not_larger", "not_smaller") and all(xshape[a] for a in axes):
                    ratios = [s / xshape[a] for s, a in zip(sizes, axes)]
                    scale = min(ratios) if policy == "not_larger" else max(ratios)
                    sizes = [math.ceil(scale * xshape[a]) for a in axes]  # an upper bound of the rounding
                for a, s in zip(axes, sizes):
                    out[a] = s
            elif scales is not None and np.asarray(scales).size:
                scales = [float(v) for v in np.asarray(scales, dtype=np.float64).reshape(-1)]
                if len(scales) != len(axes) or not all(math.isfinite(v) and v > 0 for v in scales):
                    raise _Unbounded(f"scales {scales} do not fit an input of shape {format_shape(xshape)}")
                for a, v in zip(axes, scales):
                    out[a] = math.floor(xshape[a] * v)
            else:
                return None
            return [(tuple(out), xdtype)]
        if op == "Pad":
            if xshape is None:
                return None
            pads = node.attrs.get("pads") if len(node.inputs) < 2 else self._known(node, 1)
            if pads is None:
                return None
            pads = [int(p) for p in np.asarray(pads).reshape(-1)]
            rank = len(xshape)
            axes = self._known(node, 3)
            axes = list(range(rank)) if axes is None else [int(a) % rank for a in np.asarray(axes).reshape(-1)]
            if len(pads) != 2 * len(axes):
                raise _Unbounded(f"pads {format_shape(pads)} do not fit an input of shape {format_shape(xshape)}")
            out = list(xshape)
            for i, a in enumerate(axes):
                out[a] += pads[i] + pads[i + len(axes)]
            if any(d < 0 for d in out):
                raise _Unbounded(f"pads {format_shape(pads)} leave a negative size")
            return [(tuple(out), xdtype)]
        if op == "OneHot":
            depth = self._known(node, 1)
            if depth is None or xshape is None:
                return None
            depth = int(np.asarray(depth).reshape(-1)[0])
            if depth < 0:
                raise _Unbounded(f"its depth is {depth}")
            axis = node.attrs.get("axis", -1)
            axis = axis % (len(xshape) + 1)
            values = self._input(node, 2)
            return [(tuple(xshape[:axis]) + (depth,) + tuple(xshape[axis:]),
                     self.dtypes.get(values.name) if values is not None else None)]
        if op == "NonZero":
            return None if xshape is None else [((len(xshape), math.prod(xshape)), np.int64)]  # at most
        return None

    def _inferred(self, node):
        """[(shape, dtype)] per output from onnx's shape inference of this node alone, with the known
        values of its inputs given as initializers."""
        if any(True for _ in node.subgraphs()):
            return [(None, None)] * len(node.outputs)
        typed, inits = [], []
        for index, t in enumerate(node.inputs):
            if t.is_empty():
                continue
            value = self.values.get(t.name)
            if value is None and (index > 0 and node.op in _VALUE_DEPENDENT_OPS or node.op in _GENERATIVE_OPS):
                value = self.value(t)
            if value is not None and all(i.name != t.name for i in inits):
                inits.append(onnx.numpy_helper.from_array(np.asarray(value), t.name))
            elif value is None and all(i.name != t.name for i in typed):
                if self.shapes.get(t.name) is None:
                    return [(None, None)] * len(node.outputs)
                typed.append(t)
        try:
            model = onnx.shape_inference.infer_shapes(self._node_model(node, typed, inits), data_prop=True)
        except Exception:
            return [(None, None)] * len(node.outputs)
        found = {}
        for info in list(model.graph.value_info) + list(model.graph.output):
            ttype = info.type.tensor_type
            if ttype.HasField("shape"):
                dims = [d.dim_value if d.HasField("dim_value") else None for d in ttype.shape.dim]
                dtype = onnx.helper.tensor_dtype_to_np_dtype(ttype.elem_type) if ttype.elem_type else None
                found[info.name] = (_static(dims), dtype)
        return [found.get(o.name, (None, None)) for o in node.outputs]

    # -- the walk -------------------------------------------------------------------------------------------
    def walk(self, graph: gs.Graph):
        self.graph_outputs.update(t.name for t in graph.outputs)
        self._register_constants(graph)
        for node in graph.nodes:
            try:
                self._visit(node)
            except ModelLoadError:
                raise
            except Exception as exc:  # a node this walk cannot read: refused rather than folded unbounded
                text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                raise ModelLoadError(f"{self.source}: cannot bound constant folding at {node_label(node)}: "
                                     f"{type(exc).__name__}: {text}") from None
            for subgraph in node.subgraphs():  # folded afterwards, with the outer constants known
                self.walk(subgraph)

    def _refuse(self, node, reason):
        raise ModelLoadError(f"{self.source}: refusing to fold constants: {node_label(node)} {reason}")

    def _visit(self, node):
        outs = [o for o in node.outputs if not o.is_empty()]
        if node.op == "Constant":  # what the file holds (or a scalar/list attribute): counted as read
            value = next(iter(node.attrs.values()), None) if len(node.attrs) == 1 else None
            if isinstance(value, gs.Constant):
                shape, dtype = _static(value.shape), value.dtype
                for o in outs:
                    self.shapes[o.name], self.dtypes[o.name] = shape, dtype
                    self.consts[o.name] = value
            elif value is not None and not isinstance(value, gs.Node.AttributeRef):
                array = np.asarray(value)
                for o in outs:
                    self.shapes[o.name], self.dtypes[o.name] = array.shape, array.dtype
                    self.values[o.name] = array
            else:  # an attribute onnx-graphsurgeon does not read (sparse_value): folding it fails, nothing big
                for o in outs:
                    self.shapes[o.name], self.dtypes[o.name] = None, None
            return
        inputs = [t for t in node.inputs if not t.is_empty()]
        if node.op == "Shape" and inputs:
            x = inputs[0]
            if not self.foldable(x):
                self._visit_shape(node, x.shape, outs)
                return
            if self.shapes[x.name] is not None:  # known without computing x (which may be large)
                self._visit_shape(node, self.shapes[x.name], outs)
                return
        if node.op in ("Gather", "Slice") and inputs and inputs[0].name in self.partial:
            self._visit_shape_part(node, self.partial[inputs[0].name], outs)
            return
        if not all(self.foldable(t) for t in inputs) or node.op in _NO_FOLD_OPS or \
                any(isinstance(v, gs.Node.AttributeRef) for v in node.attrs.values()):
            return
        for subgraph in node.subgraphs():
            if not all(t.name in self.shapes for t in subgraph._foreign_tensors().values()):
                return
        try:
            results = self._explicit(node)
        except _Unbounded as exc:
            self._refuse(node, f"cannot be computed: {exc}")
        if results is None:
            results = self._inferred(node)
            for i, o in enumerate(node.outputs):
                # fall back to the whole graph's shape inference, except for graph outputs, whose shape
                # the file declares (and may misdeclare)
                if i < len(results) and results[i][0] is None and o.name not in self.graph_outputs:
                    results[i] = (_static(o.shape), o.dtype if results[i][1] is None else results[i][1])
        for o, (shape, dtype) in zip(node.outputs, results):
            if o.is_empty():
                continue
            dtype = dtype if dtype is not None else o.dtype
            self.shapes[o.name], self.dtypes[o.name], self.producers[o.name] = shape, dtype, node
            if shape is None:
                if node.op in _GENERATIVE_OPS:
                    self._refuse(node, f"makes tensor {quoted(o.name)} of a size that cannot be told before "
                                       "computing it (its inputs are not small known constants)")
                continue
            elements = math.prod(shape)
            nbytes = elements * _itemsize(dtype)
            dname = (_np_dtype(dtype) or np.dtype(np.float32)).name
            what = (f"would create tensor {quoted(o.name)} of shape {format_shape(shape)} ({elements:,} "
                    f"elements of {dname}, {nbytes:,} bytes)")
            hint = f"(raise it with {MAX_FOLD_BYTES_ENV} or load_model(max_fold_bytes=...))"
            if nbytes > self.limit:
                self._refuse(node, f"{what}; the limit is {self.limit:,} bytes per tensor {hint}")
            if node.op not in _VIEW_OPS:
                self.total += nbytes
                if self.total > self.total_limit:
                    self._refuse(node, f"{what}, {self.total:,} bytes in all; the limit is {self.total_limit:,} "
                                       f"bytes for all folded tensors together ({FOLD_TOTAL_FACTOR} x the "
                                       f"per-tensor limit) {hint}")

    def _visit_shape(self, node, shape, outs):
        """Shape of a tensor: folded where its (inferred) dims are static, else remembered for the
        Gather/Slice that may pick a static part of it."""
        if shape is None or not outs:
            return
        dims = list(shape)
        start, end = node.attrs.get("start", 0), node.attrs.get("end")
        dims = dims[start:end] if end is not None else dims[start:]
        dims = [d if isinstance(d, (int, np.integer)) and not isinstance(d, bool) else None for d in dims]
        if all(d is not None for d in dims):
            self._set_value(outs[0], np.array(dims, dtype=np.int64), node)
        else:
            self.partial[outs[0].name] = dims

    def _visit_shape_part(self, node, dims, outs):
        """Gather/Slice of a Shape whose static part is picked: onnx-graphsurgeon folds those too."""
        if not outs:
            return
        try:
            if node.op == "Gather":
                index = self._known(node, 1)
                if index is None:
                    return
                picked = np.asarray(dims, dtype=object)[np.asarray(index).astype(np.int64)]
            else:
                params = [self._known(node, i) for i in (1, 2, 3, 4)] if len(node.inputs) >= 3 else \
                    [node.attrs.get(k) for k in ("starts", "ends", "axes", "steps")]
                start, end, axes, steps = (None if p is None else int(np.asarray(p).reshape(-1)[0]) for p in params)
                if start is None or end is None or axes not in (None, 0):
                    return
                picked = np.asarray(dims[start:end:steps or 1], dtype=object)
        except (IndexError, ValueError, TypeError):
            return
        picked = np.asarray(picked, dtype=object)  # a scalar index picks one dim, not an array
        if all(d is not None for d in picked.reshape(-1)):
            self._set_value(outs[0], picked.astype(np.int64), node)

    def _set_value(self, tensor, value, node):
        self.shapes[tensor.name], self.dtypes[tensor.name] = tuple(value.shape), value.dtype
        self.values[tensor.name], self.producers[tensor.name] = value, node


def bound_constant_folding(graph: gs.Graph, source: str, limit: int) -> None:
    """Refuse (ModelLoadError) a graph whose constant folding would create a tensor over ``limit`` bytes,
    or over FOLD_TOTAL_FACTOR * ``limit`` in all, before anything is allocated."""
    _FoldBound(graph, source, limit).walk(graph)
