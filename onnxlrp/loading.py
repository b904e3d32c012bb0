"""Load an ONNX model from any exporter into one clean, analyzable form.

Steps: read (external data only from inside the model's own folder), validate with onnx's checker,
inline local functions, convert the opset up to MIN_EMIT_OPSET, make the batch dimension symbolic,
fold constants (opset-9 graphs hold weights as Constant/ConstantOfShape nodes; legacy exports compute
Flatten shapes with Shape/Gather/Concat) and infer shapes.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import onnx
import onnx.inliner
import onnx.version_converter
import onnx_graphsurgeon as gs
import onnxruntime as ort
from google.protobuf.message import DecodeError

from ._onnx_utils import EMIT_IR_VERSION, MIN_EMIT_OPSET, default_opset
from .errors import ModelLoadError

BATCH_DIM = "batch"


#: Sequence length used to build the layer structure of a token model whose length is dynamic (the
#: structure does not depend on it; each analyzed length gets its own graph).
PROBE_SEQUENCE_LENGTH = 8

#: Ops an integer token input may pass through on its way to the embedding lookup.
_TOKEN_PATH_OPS = ("Reshape", "Cast", "Unsqueeze", "Squeeze", "Flatten", "Identity")


@dataclass
class LoadedModel:
    graph: gs.Graph
    source: str  # a path or "<ModelProto>", for error messages
    data_input: str
    other_inputs: list
    opset: int
    #: the tensor whose relevance is reported: the data input, or for integer token inputs the output of
    #: the embedding lookup (Gather on a constant table)
    explained: str = ""
    #: the data input's shape as the file declares it (batch axis symbolic)
    declared_shape: tuple | None = None
    vocab_size: int | None = None


def _read_model(path: str) -> onnx.ModelProto:
    if not os.path.exists(path):
        raise ModelLoadError(f"{path}: no such file")
    if os.path.isdir(path):
        raise ModelLoadError(f"{path}: is a folder, expected an .onnx file")
    try:
        model = onnx.load(path, load_external_data=False)
    except (DecodeError, RuntimeWarning, ValueError, onnx.onnx_cpp2py_export.checker.ValidationError) as exc:
        raise ModelLoadError(f"{path}: not an ONNX model ({type(exc).__name__}: {exc})") from None
    if not model.graph.node and not model.graph.input:
        raise ModelLoadError(f"{path}: not an ONNX model (no graph inside)")
    _load_external_data(model, path)
    return model


def _external_tensors(model):
    for tensor in onnx.external_data_helper._get_all_tensors(model):
        if tensor.HasField("data_location") and tensor.data_location == onnx.TensorProto.EXTERNAL:
            yield tensor


def _load_external_data(model: onnx.ModelProto, path: str) -> None:
    base = os.path.realpath(os.path.dirname(os.path.abspath(path)))
    tensors = list(_external_tensors(model))
    for tensor in tensors:
        info = {e.key: e.value for e in tensor.external_data}
        location = info.get("location", "")
        target = os.path.realpath(os.path.join(base, location))
        if os.path.isabs(location) or os.path.commonpath([base, target]) != base:
            raise ModelLoadError(
                f"{path}: tensor '{tensor.name}' points to external data '{location}' outside the "
                f"model's folder {base}; refusing to read it")
        if not os.path.isfile(target):
            raise ModelLoadError(f"{path}: external data file '{location}' of tensor '{tensor.name}' is missing")
    if tensors:
        onnx.load_external_data_for_model(model, base)


def _check(model: onnx.ModelProto, source: str) -> None:
    try:
        onnx.checker.check_model(model)
    except (onnx.checker.ValidationError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"{source}: fails onnx's checker: {first}") from None


def _upgrade_opset(model: onnx.ModelProto, source: str) -> onnx.ModelProto:
    opset = default_opset(model)
    if opset >= MIN_EMIT_OPSET:
        return model
    try:
        return onnx.version_converter.convert_version(model, MIN_EMIT_OPSET)
    except Exception as exc:  # the converter raises bare RuntimeErrors/IndexErrors
        raise ModelLoadError(
            f"{source}: cannot convert opset {opset} to {MIN_EMIT_OPSET}: {exc}") from None


def _is_float(tensor) -> bool:
    return tensor.dtype is None or np.issubdtype(np.dtype(tensor.dtype), np.floating)


def clear_inferred_shapes(graph: gs.Graph, keep_outputs=False) -> None:
    """Forget the shapes of every tensor but the graph inputs (and outputs), before inferring anew."""
    keep = list(graph.inputs) + (list(graph.outputs) if keep_outputs else [])
    for tensor in graph.tensors().values():
        if isinstance(tensor, gs.Variable) and tensor not in keep:
            tensor.shape = None


def _symbolic_batch(graph: gs.Graph, data_input: gs.Variable) -> int | None:
    """Make dim 0 of the data input symbolic so any batch size runs. Returns the old static batch."""
    shape = data_input.shape
    if not shape:
        return None
    old = shape[0] if isinstance(shape[0], int) else None
    data_input.shape = [BATCH_DIM] + list(shape[1:])
    for out in graph.outputs:
        if out.shape:
            out.shape = [BATCH_DIM] + list(out.shape[1:])
    clear_inferred_shapes(graph, keep_outputs=True)
    return old


def _fix_batch_reshapes(graph: gs.Graph, old_batch) -> None:
    """Caffe2-era graphs reshape to a literal [1, -1]: copy the batch from the input instead."""
    if old_batch != 1:
        return
    for node in graph.nodes:
        if node.op != "Reshape" or node.attrs.get("allowzero", 0):
            continue
        target = node.inputs[1]
        if isinstance(target, gs.Constant):
            values = np.array(target.values, dtype=np.int64).copy()
            if values.ndim == 1 and values.size >= 2 and values[0] == 1 and -1 not in values[:1]:
                values[0] = 0
                node.inputs[1] = gs.Constant(target.name + "_batch", values)


def _ceil_mode_pool_size(size, k, s, d, pb, pe):
    """Output length of a ceil_mode pool as onnxruntime (and ONNX from opset 22 on) computes it: a
    window that would start in the right padding is dropped."""
    out = -(-(size + pb + pe - (k - 1) * d - 1) // s) + 1
    return out - 1 if (out - 1) * s >= size + pb else out


def _explicit_ceil_mode_pools(graph: gs.Graph) -> bool:
    """Rewrite ceil_mode MaxPool/AveragePool nodes whose last window onnxruntime drops as ceil_mode=0
    with the end padding that yields the same windows. onnx's shape inference for opsets < 22 keeps
    that window, so its shapes (which onnxruntime also checks the relevance graph against) disagree
    with onnxruntime's output. Padding is -inf for MaxPool and not counted by AveragePool with
    count_include_pad=0, so the rewrite is exact there; with count_include_pad=1 only when the end
    padding stays as it is (more of it would change the last window's divisor).
    Returns whether a node changed."""
    changed = False
    for node in graph.nodes:
        if node.op not in ("MaxPool", "AveragePool") or not node.attrs.get("ceil_mode", 0):
            continue
        if node.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET"):
            continue
        x = node.inputs[0]
        if x.shape is None or not all(isinstance(v, int) for v in x.shape[2:]):
            continue
        kernel = list(node.attrs["kernel_shape"])
        n = len(kernel)
        strides = list(node.attrs.get("strides", [1] * n))
        dilations = list(node.attrs.get("dilations", [1] * n))
        pads = list(node.attrs.get("pads", [0] * (2 * n)))
        new_end, differs = [], False
        for i, size in enumerate(x.shape[2:]):
            k, st, d, pb, pe = kernel[i], strides[i], dilations[i], pads[i], pads[n + i]
            out = _ceil_mode_pool_size(size, k, st, d, pb, pe)
            end = max(pe, (out - 1) * st + (k - 1) * d + 1 - size - pb)
            if (size + pb + end - (k - 1) * d - 1) // st + 1 != out:
                break  # no floor-mode padding gives these windows
            if end != pe and node.op == "AveragePool" and node.attrs.get("count_include_pad", 0):
                break
            differs |= out != -(-(size + pb + pe - (k - 1) * d - 1) // st) + 1
            new_end.append(end)
        else:
            if differs:
                node.attrs["ceil_mode"] = 0
                node.attrs["pads"] = pads[:n] + new_end
                changed = True
    return changed


#: Constants with more elements than this reach shape inference as typed graph inputs only, so big
#: weights are never serialized just to learn their (already known) shapes.
_SHAPE_ONLY_LIMIT = 4096


def _value_shapes(model) -> dict:
    """name -> (elem_type, dims) of every value with a shape (dims: int, a symbol name or None)."""
    shapes = {}
    for info in list(model.graph.value_info) + list(model.graph.output):
        ttype = info.type.tensor_type
        if not ttype.HasField("shape"):
            continue
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in ttype.shape.dim]
        shapes[info.name] = (ttype.elem_type, dims)
    return shapes


def _unknown_dims(dims, known_symbols) -> int:
    return sum(1 for d in dims if not isinstance(d, int) and d not in known_symbols)


def _infer_once(graph: gs.Graph) -> None:
    light = graph.copy()  # shares the numpy arrays
    typed_inputs = {}
    for node in light.nodes:
        for i, tensor in enumerate(node.inputs):
            if isinstance(tensor, gs.Constant) and int(np.prod(tensor.shape)) > _SHAPE_ONLY_LIMIT:
                if tensor.name not in typed_inputs:
                    typed_inputs[tensor.name] = gs.Variable(tensor.name, dtype=tensor.dtype, shape=list(tensor.shape))
                node.inputs[i] = typed_inputs[tensor.name]
    light.inputs.extend(typed_inputs.values())
    exported = gs.export_onnx(light, do_type_check=False)
    model = onnx.shape_inference.infer_shapes(exported, data_prop=True)
    inferred = _value_shapes(model)
    batch = {BATCH_DIM}
    if any(_unknown_dims(dims, batch) for _, dims in inferred.values()):
        # onnx's data propagation stops at shapes computed from Shape(x) of a symbolic batch (legacy
        # exports: Reshape(x, Concat(Shape(x)[:2], -1)), Expand(cls_token, Where(...))). onnxruntime's
        # symbolic shape inference carries the symbols through; take its sizes where onnx had none.
        try:
            from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference
            symbolic = _value_shapes(SymbolicShapeInference.infer_shapes(exported, auto_merge=True))
        except Exception:  # a best effort: onnx's shapes stay as they are
            symbolic = {}
        for name, (elem_type, dims) in inferred.items():
            better = symbolic.get(name)
            if better is not None and len(better[1]) == len(dims) and _unknown_dims(dims, batch) > \
                    _unknown_dims(better[1], batch):
                inferred[name] = (elem_type, [BATCH_DIM if d == "batch" else d for d in better[1]])
        for name, value in symbolic.items():
            inferred.setdefault(name, value)
    for name, tensor in graph.tensors().items():
        if isinstance(tensor, gs.Variable) and name in inferred and tensor not in graph.inputs:
            elem_type, dims = inferred[name]
            tensor.shape = dims
            if tensor.dtype is None and elem_type:
                tensor.dtype = onnx.helper.tensor_dtype_to_np_dtype(elem_type)


def _infer_shapes(graph: gs.Graph, source: str) -> gs.Graph:
    """Infer shapes into ``graph`` (in place; returned for chaining)."""
    try:
        _infer_once(graph)
        if _explicit_ceil_mode_pools(graph):
            clear_inferred_shapes(graph)  # infer again from scratch
            _infer_once(graph)
    except Exception as exc:
        raise ModelLoadError(f"{source}: shape inference failed: {exc}") from None
    return graph


def _fix_input_dims(graph: gs.Graph, data_input: gs.Variable, original, feature_shape) -> None:
    """Give the data input the static feature shape, and every other input the same sizes where it uses
    the same symbolic dimension (an attention mask shares the sequence axis of the token ids)."""
    mapping = {}
    if original and isinstance(original[0], str):
        mapping[original[0]] = BATCH_DIM
    for dim, size in zip(list(original or [])[1:], feature_shape):
        if isinstance(dim, str):
            mapping[dim] = int(size)
    data_input.shape = [BATCH_DIM] + [int(d) for d in feature_shape]
    for tensor in graph.inputs:
        if isinstance(tensor, gs.Variable) and tensor is not data_input and tensor.shape:
            tensor.shape = [mapping.get(d, d) if isinstance(d, str) else d for d in tensor.shape]


def _embedding_output(graph: gs.Graph, token_input: gs.Variable, source: str):
    """(output tensor, vocabulary size) of the embedding lookup fed by an integer token input: a Gather
    on a constant 2-D table along axis 0, reached through reshapes and casts. The largest table wins
    (the word embeddings, not a token-type table that shares the input)."""
    frontier, seen, found = [token_input], set(), []
    while frontier:
        tensor = frontier.pop()
        for node in tensor.outputs:
            if id(node) in seen:
                continue
            seen.add(id(node))
            if node.op in _TOKEN_PATH_OPS and node.inputs[0] is tensor:
                frontier.extend(node.outputs)
            elif node.op == "Gather" and len(node.inputs) == 2 and node.inputs[1] is tensor:
                table = node.inputs[0]
                if isinstance(table, gs.Constant) and len(table.shape) == 2 and node.attrs.get("axis", 0) == 0:
                    found.append((table.shape[0], node.outputs[0]))
    if not found:
        raise ModelLoadError(
            f"{source}: data input '{token_input.name}' has dtype {np.dtype(token_input.dtype)} and feeds no "
            "embedding lookup (a Gather on a constant table); LRP needs a floating-point input or token ids")
    vocab, output = max(found, key=lambda f: f[0])
    return output, int(vocab)


def _materialize_constants(graph: gs.Graph) -> None:
    """Read every lazily loaded weight once. gs reads a LazyValues constant anew on each access, so
    the rules, the emitters and the session would each hold their own copy of the weights, and the
    ModelProto behind them would stay alive."""
    from onnx_graphsurgeon.ir.tensor import LazyValues
    for tensor in graph.tensors().values():
        if isinstance(tensor, gs.Constant) and isinstance(tensor._values, LazyValues):
            tensor.values = tensor._values.load()


def load_model(model, input_name: str | None = None, feature_shape=None) -> LoadedModel:
    """Read and normalize a model given as a path or an onnx.ModelProto. ``feature_shape`` (the data
    input's shape without the batch axis) fixes dynamic axes before constants are folded, so that shapes
    computed at run time (attention scales, causal masks, reshape targets) become constants."""
    if isinstance(model, (str, os.PathLike)):
        source = os.fspath(model)
        proto = _read_model(source)
    elif isinstance(model, onnx.ModelProto):
        source = "<ModelProto>"
        proto = onnx.ModelProto()
        proto.CopyFrom(model)
        if any(True for _ in _external_tensors(proto)):
            raise ModelLoadError("<ModelProto>: tensors hold external data; pass the model's path instead")
    else:
        raise ModelLoadError(f"expected a path or an onnx.ModelProto, got {type(model).__name__}")

    _check(proto, source)
    if proto.functions:
        proto = onnx.inliner.inline_local_functions(proto)
    proto = _upgrade_opset(proto, source)
    # IR < 4 lists initializers as inputs and shape inference ignores the ones that are not: lift it.
    proto.ir_version = max(proto.ir_version, EMIT_IR_VERSION)

    graph = gs.import_onnx(proto)
    # Old IR versions list initializers as inputs too; gs already turned those into Constants.
    data_inputs = [t for t in graph.inputs if isinstance(t, gs.Variable)]
    if not data_inputs:
        raise ModelLoadError(f"{source}: the graph has no data input (every input has an initializer)")
    if input_name is None:
        data_input = data_inputs[0]
    else:
        matches = [t for t in data_inputs if t.name == input_name]
        if not matches:
            raise ModelLoadError(f"{source}: no data input named '{input_name}'; "
                                 f"data inputs are {[t.name for t in data_inputs]}")
        data_input = matches[0]
    token_input = not _is_float(data_input)
    if token_input and not np.issubdtype(np.dtype(data_input.dtype), np.integer):
        raise ModelLoadError(f"{source}: data input '{data_input.name}' has dtype {np.dtype(data_input.dtype)}; "
                             "LRP needs a floating-point input or integer token ids")
    if not graph.outputs:
        raise ModelLoadError(f"{source}: the graph has no outputs")

    original = list(data_input.shape) if data_input.shape else None
    old_batch = _symbolic_batch(graph, data_input)
    declared = tuple(data_input.shape) if data_input.shape else None
    _fix_batch_reshapes(graph, old_batch)
    dynamic = bool(declared) and any(not isinstance(d, int) for d in declared[1:])
    if feature_shape is None and token_input and dynamic:
        feature_shape = [d if isinstance(d, int) else PROBE_SEQUENCE_LENGTH for d in declared[1:]]
    if feature_shape is not None:
        if declared is not None and len(feature_shape) != len(declared) - 1:
            raise ModelLoadError(f"{source}: input '{data_input.name}' has rank {len(declared)}, got a "
                                 f"feature shape of rank {len(feature_shape)}")
        _fix_input_dims(graph, data_input, original, feature_shape)
    graph = _infer_shapes(graph, source)
    # Folding evaluates constant subgraphs with onnxruntime, whose optimizer warns about nodes it keeps.
    ort.set_default_logger_severity(3)
    try:
        graph.fold_constants(error_ok=False)
    except Exception as exc:
        raise ModelLoadError(f"{source}: constant folding failed: {exc}") from None
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    graph = _infer_shapes(graph, source)
    _materialize_constants(graph)
    opset = max(default_opset(proto), MIN_EMIT_OPSET)
    del proto  # the graph holds every array now
    data_input = next(t for t in graph.inputs if t.name == data_input.name)
    others = [t.name for t in graph.inputs if isinstance(t, gs.Variable) and t is not data_input]
    explained, vocab = data_input.name, None
    if token_input:
        embedding, vocab = _embedding_output(graph, data_input, source)
        explained = embedding.name
    return LoadedModel(graph=graph, source=source, data_input=data_input.name, other_inputs=others,
                       opset=opset, explained=explained,
                       declared_shape=declared, vocab_size=vocab)
