"""Load an ONNX model from any exporter into one clean, analyzable form.

Steps: read (external data only from inside the model's own folder), validate with onnx's checker,
inline local functions, convert the opset up to MIN_EMIT_OPSET, make the batch dimension symbolic,
fold constants (opset-9 graphs hold weights as Constant/ConstantOfShape nodes; legacy exports compute
Flatten shapes with Shape/Gather/Concat) and infer shapes.

Hostile files and bad input are refused with a one-line ModelLoadError (InputError for a bad
``feature_shape``) naming the file, the node or tensor and what was expected:

- Constant folding is bounded before anything is computed: the size of every tensor folding would create
  is worked out from the constant inputs (ConstantOfShape's shape, Expand's shape with broadcasting, Tile's
  repeats, Range's (limit - start) / delta, Resize's scales or sizes, Pad's pads; onnx's shape inference
  of the single node for the others). One tensor may take at most ``max_fold_bytes`` (load_model's
  keyword), else $ONNXLRP_MAX_FOLD_BYTES (bytes; K/M/G/T suffixes count powers of 1024: "4G"), else
  DEFAULT_MAX_FOLD_BYTES = 1 GiB; all of them together FOLD_TOTAL_FACTOR (4) times that. Initializers and
  Constant nodes are what the file holds and are not counted.
- An input dimension after the batch axis of 0 or less, or more than MAX_SAMPLE_ELEMENTS (2**31)
  elements per sample, declared by the file or given as ``feature_shape``.
- An empty weight (a 0 dimension) of a Conv, Gemm, MatMul, normalization or arithmetic node.
- External data whose location holds a NUL byte, leaves the model's folder (also through a symlink), is
  not a regular file (a named pipe, a device, a socket: checked with stat before opening, so reading
  never blocks) or holds fewer or other bytes than its tensor needs.
"""
from __future__ import annotations

import math
import os
import stat
from dataclasses import dataclass

import numpy as np
import onnx
import onnx.inliner
import onnx.version_converter
import onnx_graphsurgeon as gs
import onnxruntime as ort
from google.protobuf.message import DecodeError

from ._onnx_utils import EMIT_IR_VERSION, MIN_EMIT_OPSET, default_opset, format_shape, node_label, quoted
from .errors import InputError, ModelLoadError
from . import model_file
from .folding import bound_constant_folding, fold_byte_limit

from .interface import BATCH_DIM  # noqa: E402,F401


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


def _read_model(path: str):
    """(the model, whether it holds external data, {initializer name: array} read by model_file: their
    TensorProtos in the model hold empty raw data)."""
    if "\0" in path:  # os.stat would raise a bare "embedded null byte" ValueError
        raise ModelLoadError(f"{path!r}: the path holds a NUL byte; expected a file name")
    if not os.path.exists(path):
        raise ModelLoadError(f"{path}: no such file")
    if os.path.isdir(path):
        raise ModelLoadError(f"{path}: is a folder, expected an .onnx file")
    model, arrays = _read_protobuf_file(path)
    if model is None:  # an unusual layout or a text format: onnx's own reader
        try:
            model = onnx.load(path, load_external_data=False)
        except (DecodeError, RuntimeWarning, ValueError, onnx.onnx_cpp2py_export.checker.ValidationError) as exc:
            raise ModelLoadError(f"{path}: not an ONNX model ({type(exc).__name__}: {exc})") from None
    if not model.graph.node and not model.graph.input:
        raise ModelLoadError(f"{path}: not an ONNX model (no graph inside)")
    external = any(True for _ in _external_tensors(model))
    _load_external_data(model, path)
    return model, external, arrays


def _raw_size_error(path):
    return lambda tensor, expected, got: ModelLoadError(
        f"{path}: tensor {quoted(tensor.name)} of shape {format_shape(tensor.dims)} needs {expected} bytes, "
        f"its raw data holds {got}")


#: Files from this size on go through model_file's one-pass reader. Its walk is Python, field by field: on a
#: 650 KB graph of 1000 nodes (NASNetMobile) it takes 60 ms where onnx.load takes 1.5; on VGG16's 528 MB it
#: saves 2.2 s.
ONE_PASS_FROM_BYTES = 16 << 20


def _read_protobuf_file(path: str):
    """(skeleton ModelProto, arrays) through model_file's one-pass reader, or (None, {}) where onnx.load
    must read the file: a small file, a text format by its extension, or a layout the reader does not take."""
    f, st = _open_regular(path, f"{path}:", "an .onnx file")  # onnx.load would block on a FIFO
    with f:
        text_format = onnx.serialization.registry.get_format_from_file_extension(os.path.splitext(path)[1]) \
            not in (None, "protobuf")
        if text_format or st.st_size < ONE_PASS_FROM_BYTES:
            return None, {}
        try:
            skeleton, payloads = model_file.read_skeleton(f, st.st_size)
        except model_file.UnusualLayout:
            return None, {}
    model = onnx.ModelProto()
    try:
        model.ParseFromString(skeleton)
    except DecodeError:
        return None, {}  # onnx.load names the problem as it always has
    return model, model_file.attach(model, payloads, _raw_size_error(path))


def _external_tensors(model):
    for tensor in onnx.external_data_helper._get_all_tensors(model):
        if tensor.HasField("data_location") and tensor.data_location == onnx.TensorProto.EXTERNAL:
            yield tensor


def _file_kind(mode) -> str:
    for test, kind in ((stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder")):
        if test(mode):
            return kind
    return "not a regular file"


def _open_regular(target, what, expected):
    """(``target`` opened for binary reading, its fstat), or a ModelLoadError "{what} is a named pipe
    (FIFO); expected {expected}". O_NONBLOCK: opening a FIFO returns at once and the fstat refuses it,
    instead of waiting for a writer."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(target, flags)
    except OSError as exc:
        raise ModelLoadError(f"{what} cannot be read ({exc.strerror})") from None
    f = os.fdopen(fd, "rb")
    st = os.fstat(f.fileno())
    if not stat.S_ISREG(st.st_mode):
        f.close()
        raise ModelLoadError(f"{what} is {_file_kind(st.st_mode)}; expected {expected}")
    return f, st


def _external_int(path, tensor, info, key) -> int | None:
    raw = info.get(key)
    if raw is None or raw == "":
        return None
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise ModelLoadError(f"{path}: tensor {quoted(tensor.name)} has external data {key} {raw!r}; "
                             "expected a byte count of 0 or more")
    return value


#: Bytes per element of the data types whose raw data has a fixed size (packed 4-bit types left out).
_RAW_ITEMSIZE = {getattr(onnx.TensorProto, name): size for name, size in (
    ("FLOAT", 4), ("DOUBLE", 8), ("FLOAT16", 2), ("BFLOAT16", 2), ("INT8", 1), ("UINT8", 1), ("INT16", 2),
    ("UINT16", 2), ("INT32", 4), ("UINT32", 4), ("INT64", 8), ("UINT64", 8), ("BOOL", 1), ("COMPLEX64", 8),
    ("COMPLEX128", 16))}


def _expected_raw_bytes(tensor) -> int | None:
    """Bytes the raw data of ``tensor`` must hold, from its dims and data type (None: not checked). A
    mismatch would only surface later as numpy's reshape error."""
    itemsize = _RAW_ITEMSIZE.get(tensor.data_type)
    return None if itemsize is None else math.prod(tensor.dims) * itemsize


def _load_external_data(model: onnx.ModelProto, path: str) -> None:
    """Read each tensor's external data ourselves rather than through onnx's loader: every location is
    checked first (inside the model's folder, no NUL byte, a regular file) and the file is opened only
    then, so a named pipe, a device or a socket is never opened for reading (reading a FIFO blocks
    forever, a device may never end)."""
    base = os.path.realpath(os.path.dirname(os.path.abspath(path)))
    for tensor in list(_external_tensors(model)):
        info = {e.key: e.value for e in tensor.external_data}
        location = info.get("location", "")
        what = f"tensor {quoted(tensor.name)}: external data location {location!r}"
        if not location:
            raise ModelLoadError(f"{path}: tensor {quoted(tensor.name)} holds external data without a location")
        if "\0" in location:  # os.path functions would raise a bare "embedded null byte" ValueError
            raise ModelLoadError(f"{path}: {what} holds a NUL byte; expected a file name")
        target = os.path.realpath(os.path.join(base, location))
        if os.path.isabs(location) or os.path.commonpath([base, target]) != base:
            raise ModelLoadError(
                f"{path}: tensor {quoted(tensor.name)} points to external data {location!r} outside the "
                f"model's folder {base}; refusing to read it")
        try:
            mode = os.stat(target).st_mode  # stat, unlike open, never blocks on a FIFO
        except FileNotFoundError:
            raise ModelLoadError(f"{path}: external data file {location!r} of tensor {quoted(tensor.name)} "
                                 "is missing") from None
        except OSError as exc:
            raise ModelLoadError(f"{path}: {what} cannot be read ({exc.strerror})") from None
        if not stat.S_ISREG(mode):
            raise ModelLoadError(f"{path}: {what} is {_file_kind(mode)}; expected a regular file")
        offset = _external_int(path, tensor, info, "offset") or 0
        length = _external_int(path, tensor, info, "length")
        f, st = _open_regular(target, f"{path}: {what}", "a regular file")  # swapped for a FIFO since the stat?
        with f:
            available = st.st_size - offset
            if length is None:
                length = max(available, 0)
            if offset > st.st_size or length > available:
                raise ModelLoadError(f"{path}: {what} holds {st.st_size} bytes; tensor {quoted(tensor.name)} "
                                     f"needs bytes {offset} to {offset + length}")
            expected = _expected_raw_bytes(tensor)
            if expected is not None and expected != length:
                raise ModelLoadError(
                    f"{path}: tensor {quoted(tensor.name)} of shape {format_shape(tensor.dims)} needs {expected} "
                    f"bytes, its external data {location!r} gives {length}")
            f.seek(offset)
            data = f.read(length)
        tensor.raw_data = data
        tensor.data_location = onnx.TensorProto.DEFAULT
        del tensor.external_data[:]


#: Files from this size on are checked by path (see load_model).
CHECK_FROM_FILE_BYTES = 64 << 20


def _check(model, source: str) -> None:
    try:
        onnx.checker.check_model(model)
    except (onnx.checker.ValidationError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"{source}: fails onnx's checker: {first}") from None


def _upgrade_opset(model: onnx.ModelProto, source: str, arrays: dict) -> onnx.ModelProto:
    """The model at opset MIN_EMIT_OPSET. The converter's adapters for an upgrade move attributes to
    inputs and never read an initializer's data, so the skeleton is converted as it is (no copy of the
    weights); should it fail or lose one of the ``arrays``' tensors, the weights go back into the model
    and it is converted again."""
    opset = default_opset(model)
    if opset >= MIN_EMIT_OPSET:
        return model
    if arrays:
        try:
            converted = onnx.version_converter.convert_version(model, MIN_EMIT_OPSET)
        except Exception:  # converted again below, with the data
            converted = None
        if converted is not None and _kept_initializers(model, converted, arrays):
            return converted
        model_file.restore(model, arrays)
        arrays.clear()
    try:
        return onnx.version_converter.convert_version(model, MIN_EMIT_OPSET)
    except Exception as exc:  # the converter raises bare RuntimeErrors/IndexErrors
        raise ModelLoadError(
            f"{source}: cannot convert opset {opset} to {MIN_EMIT_OPSET}: {exc}") from None


def _kept_initializers(before, after, arrays) -> bool:
    """Whether every initializer read into ``arrays`` is in ``after`` as it was in ``before``: same dims and
    data type, raw data still empty (the converter neither read, replaced nor dropped it)."""
    def described(model):
        return {t.name: (tuple(t.dims), t.data_type, t.raw_data == b"") for t in model.graph.initializer
                if t.name in arrays}
    return described(after) == described(before)


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


# -- input sizes ---------------------------------------------------------------------------------------------
#: Elements one sample of an input (every axis but the batch) may declare: 2**31 (8 GiB of float32) is
#: beyond what LRP on one machine can hold; a larger declaration is a broken or hostile file.
MAX_SAMPLE_ELEMENTS = 1 << 31


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


def _apply_shapes(graph: gs.Graph, inferred: dict) -> None:
    for name, tensor in graph.tensors().items():
        if isinstance(tensor, gs.Variable) and name in inferred and tensor not in graph.inputs:
            elem_type, dims = inferred[name]
            tensor.shape = dims
            if tensor.dtype is None and elem_type:
                tensor.dtype = onnx.helper.tensor_dtype_to_np_dtype(elem_type)


def _infer_once(graph: gs.Graph, before_symbolic=None) -> None:
    """onnx's shape inference, then onnxruntime's symbolic one where onnx left sizes unknown.
    ``before_symbolic(graph)`` runs in between, on onnx's shapes: the symbolic inference materializes
    some constants (np.ones of an int64 ConstantOfShape's shape), so folding is bounded before it."""
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
    if before_symbolic is not None:
        _apply_shapes(graph, inferred)
        before_symbolic(graph)
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
    _apply_shapes(graph, inferred)


def _infer_shapes(graph: gs.Graph, source: str, before_symbolic=None) -> gs.Graph:
    """Infer shapes into ``graph`` (in place; returned for chaining). ``before_symbolic``: see _infer_once."""
    try:
        _infer_once(graph, before_symbolic)
        if _explicit_ceil_mode_pools(graph):
            clear_inferred_shapes(graph)  # infer again from scratch
            _infer_once(graph)
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"{source}: shape inference failed: {exc}") from None
    return graph


def _check_declared_dims(graph: gs.Graph, source: str) -> None:
    """Refuse inputs that declare a size of 0 or less, or an absurd total size, on an axis after the batch
    (which is made symbolic): such an input leaves shape inference without shapes downstream, and the
    error would surface far away as "tensor ... has no inferred shape"."""
    for tensor in graph.inputs:
        if isinstance(tensor, gs.Variable) and tensor.shape:
            _check_sample_dims(source, tensor.name, list(tensor.shape)[1:], ModelLoadError, "has")


def _check_sample_dims(source, name, dims, error, verb) -> None:
    """``dims``: the axes of one sample (axis 1 on); the message counts axes with the batch as axis 0."""
    for axis, d in enumerate(dims, start=1):
        if isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d <= 0:
            raise error(f"{source}: input {quoted(name)} {verb} dimension {int(d)} at axis {axis}; "
                        "expected a positive size")
    static = [int(d) for d in dims if isinstance(d, (int, np.integer)) and not isinstance(d, bool)]
    if math.prod(static) > MAX_SAMPLE_ELEMENTS:
        raise error(f"{source}: input {quoted(name)} {verb} shape {format_shape(['N'] + list(dims))}, "
                    f"{math.prod(static):,} elements per sample; expected at most {MAX_SAMPLE_ELEMENTS:,}")


def _check_feature_shape(source, name, feature_shape) -> tuple:
    """The data input's shape without the batch axis, as given to load_model: positive integers."""
    try:
        dims = list(feature_shape)
    except TypeError:
        raise InputError(f"{source}: feature shape for input {quoted(name)} must be a sequence of sizes, "
                         f"got {type(feature_shape).__name__}") from None
    for axis, d in enumerate(dims, start=1):
        if isinstance(d, bool) or not isinstance(d, (int, np.integer)):
            raise InputError(f"{source}: input {quoted(name)} is given size {d!r} at axis {axis}; "
                             "expected a positive integer")
    _check_sample_dims(source, name, dims, InputError, "is given")
    return tuple(int(d) for d in dims)


#: Ops whose constant inputs are weights: an empty one (a 0 dimension) cannot be right, and numpy or
#: onnxruntime would fail on it far away ("operands could not be broadcast together ...").
_WEIGHT_OPS = frozenset((
    "Conv", "ConvTranspose", "Gemm", "MatMul", "BatchNormalization", "InstanceNormalization",
    "LayerNormalization", "GroupNormalization", "PRelu", "Add", "Sub", "Mul", "Div"))


def _check_empty_weights(graph: gs.Graph, source: str) -> None:
    for node in graph.nodes:
        if node.op not in _WEIGHT_OPS:
            continue
        for tensor in node.inputs:
            if isinstance(tensor, gs.Constant) and tensor.shape is not None and 0 in tuple(tensor.shape):
                raise ModelLoadError(
                    f"{source}: {node_label(node)} has an empty weight {quoted(tensor.name)} of shape "
                    f"{format_shape(tensor.shape)}; expected a tensor with no 0 dimension")


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


def _imported(model, source):
    """(the checked ModelProto at opset MIN_EMIT_OPSET, its gs graph with every weight read)."""
    check_target = None
    if isinstance(model, onnx.ModelProto):
        proto, arrays = onnx.ModelProto(), {}
        proto.CopyFrom(model)
        if any(True for _ in _external_tensors(proto)):
            raise ModelLoadError("<ModelProto>: tensors hold external data; pass the model's path instead")
    else:
        proto, external, arrays = _read_model(source)
        # a large self-contained file that onnx.load had to read is checked from disk: onnx's checker on
        # a ModelProto serializes it first (VGG16: 4.8 s of 8 s loading), on a path its C++ side reads the
        # file itself. model_file's skeleton is small: checked as it is.
        if not external and not arrays and os.path.getsize(source) >= CHECK_FROM_FILE_BYTES:
            check_target = source
    _check(check_target or (model_file.checkable(proto, arrays) if arrays else proto), source)
    _check_data_types(proto, source)
    if proto.functions:
        proto = onnx.inliner.inline_local_functions(proto)
    proto = _upgrade_opset(proto, source, arrays)
    # IR < 4 lists initializers as inputs and shape inference ignores the ones that are not: lift it.
    proto.ir_version = max(proto.ir_version, EMIT_IR_VERSION)
    try:
        graph = gs.import_onnx(proto)
    except (KeyError, ValueError, TypeError, IndexError, AttributeError) as exc:  # what onnx's checker lets by
        raise ModelLoadError(f"{source}: onnx-graphsurgeon cannot read the graph: {type(exc).__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
    if arrays:
        tensors = graph.tensors()
        for name, array in arrays.items():
            if name in tensors:  # an initializer no node reads is not in gs's graph
                tensors[name].values = array
    return proto, graph


_KNOWN_DATA_TYPES = frozenset(onnx.TensorProto.DataType.values()) - {onnx.TensorProto.UNDEFINED}
_KNOWN_ELEMENT_TYPES = _KNOWN_DATA_TYPES | {onnx.TensorProto.UNDEFINED}  # a value's type may be left unset


def _check_data_types(model, source) -> None:
    """onnx's checker lets any number through as a tensor's data type (a flipped byte makes a float weight
    type 69); name the tensor before onnx-graphsurgeon's bare KeyError would."""
    graph = model.graph
    for tensor in graph.initializer:
        if tensor.data_type not in _KNOWN_DATA_TYPES:
            raise ModelLoadError(f"{source}: tensor {quoted(tensor.name)} has data type {tensor.data_type}, which "
                                 "ONNX does not define")
    for info in (*graph.input, *graph.output, *graph.value_info):
        if info.type.HasField("tensor_type") and info.type.tensor_type.elem_type not in _KNOWN_ELEMENT_TYPES:
            raise ModelLoadError(f"{source}: value {quoted(info.name)} has element type "
                                 f"{info.type.tensor_type.elem_type}, which ONNX does not define")


def load_model(model, input_name: str | None = None, feature_shape=None, *,
               max_fold_bytes: int | None = None) -> LoadedModel:
    """Read and normalize a model given as a path or an onnx.ModelProto. ``feature_shape`` (the data
    input's shape without the batch axis) fixes dynamic axes before constants are folded, so that shapes
    computed at run time (attention scales, causal masks, reshape targets) become constants.
    ``max_fold_bytes``: the most bytes one tensor computed by constant folding may take (default
    $ONNXLRP_MAX_FOLD_BYTES, else DEFAULT_MAX_FOLD_BYTES); see the module docstring."""
    fold_limit = fold_byte_limit(max_fold_bytes)
    if isinstance(model, (str, os.PathLike)):
        source = os.fspath(model)
    elif isinstance(model, onnx.ModelProto):
        source = "<ModelProto>"
    else:
        raise ModelLoadError(f"expected a path or an onnx.ModelProto, got {type(model).__name__}")
    try:
        proto, graph = _imported(model, source)
    except UnicodeDecodeError as exc:  # protobuf decodes a string field when it is first read
        raise ModelLoadError(f"{source}: not an ONNX model (a name or string field is not valid UTF-8: "
                             f"{exc.reason})") from None
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
    _check_declared_dims(graph, source)
    _check_empty_weights(graph, source)

    original = list(data_input.shape) if data_input.shape else None
    old_batch = _symbolic_batch(graph, data_input)
    declared = tuple(data_input.shape) if data_input.shape else None
    _fix_batch_reshapes(graph, old_batch)
    dynamic = bool(declared) and any(not isinstance(d, int) for d in declared[1:])
    if feature_shape is None and token_input and dynamic:
        feature_shape = [d if isinstance(d, int) else PROBE_SEQUENCE_LENGTH for d in declared[1:]]
    if feature_shape is not None:
        feature_shape = _check_feature_shape(source, data_input.name, feature_shape)
        if declared is not None and len(feature_shape) != len(declared) - 1:
            raise ModelLoadError(f"{source}: input '{data_input.name}' has rank {len(declared)}, got a "
                                 f"feature shape of rank {len(feature_shape)}")
        _fix_input_dims(graph, data_input, original, feature_shape)
    # Folding is bounded before anything is computed (see _FoldBound): on onnx's inferred shapes, before
    # onnxruntime's symbolic inference materializes constants, and again on the final shapes, where
    # Shape nodes the symbolic inference made static fold too.
    bound = lambda g: bound_constant_folding(g, source, fold_limit)  # noqa: E731
    graph = _infer_shapes(graph, source, bound)
    bound(graph)
    # Folding evaluates constant subgraphs with onnxruntime, whose optimizer warns about nodes it keeps.
    ort.set_default_logger_severity(3)
    try:
        graph.fold_constants(error_ok=False)
    except Exception as exc:
        raise ModelLoadError(f"{source}: constant folding failed: {exc}") from None
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    _check_empty_weights(graph, source)  # weights that folding computed (opset-9 Constant nodes)
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
