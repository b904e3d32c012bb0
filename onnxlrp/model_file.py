"""Read an .onnx file in one pass, each large weight straight into its own numpy buffer.

``onnx.load`` holds every weight three times on its way to an array (the file's bytes, the parsed message,
numpy's copy of it), and onnx's checker reads the file once more: on VGG16 (528 MB) that was 2.5 s of a
4 s construction. Here the file is read once: protobuf's wire format is walked down ModelProto.graph ->
GraphProto.initializer -> TensorProto.raw_data, each raw_data payload of RAW_DATA_MIN_BYTES or more is
read into an uint8 array of its own, and everything else (nodes, attributes, small tensors, the tensors'
dims and types) is copied into a *skeleton*: the same message with those payloads empty, which protobuf
parses in milliseconds and onnx's checker checks (``checkable``: those tensors as typed inputs). ``attach`` then gives each payload its tensor's dtype
and shape, after checking that the sizes agree.

The walk only accepts the plain layout that serializers write. Where protobuf would merge or override
(a second ``graph`` field, a second ``raw_data`` in one tensor), on a group or a length past the end of
its message, it raises ``UnusualLayout`` and the caller reads the file with ``onnx.load`` instead: the
same model, the slow way. Nothing is allocated for a length before it is checked against the bytes
the file has left, so a small file cannot ask for a large buffer.
"""
from __future__ import annotations

import collections
import math
import sys

import numpy as np

#: raw_data payloads from this size on are read into arrays of their own; smaller ones stay in the
#: skeleton (protobuf parses them as fast as we could copy them).
RAW_DATA_MIN_BYTES = 4096

# field numbers in onnx.proto
_MODEL_GRAPH = 7
_GRAPH_INITIALIZER = 5
_TENSOR_RAW_DATA = 9

#: ONNX data types whose raw data numpy reads as is (little-endian, fixed size); payloads of other types
#: (bfloat16, float8, 4-bit, strings) go back into their TensorProto and onnx converts them.
_NUMPY_TYPES = {1: np.float32, 2: np.uint8, 3: np.int8, 4: np.uint16, 5: np.int16, 6: np.int32, 7: np.int64,
                9: np.bool_, 10: np.float16, 11: np.float64, 12: np.uint32, 13: np.uint64}


class UnusualLayout(Exception):
    """The file is not laid out as serializers write it; read it with onnx.load."""


def _varint_bytes(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


class _Wire:
    """A reader of protobuf fields from a binary file, counting its position."""

    def __init__(self, f):
        self.f, self.pos = f, 0

    def read(self, n: int) -> bytes:
        data = self.f.read(n)
        if len(data) != n:
            raise UnusualLayout("truncated")
        self.pos += n
        return data

    def read_into(self, buffer: np.ndarray) -> None:
        """Fill ``buffer`` (its length checked by the caller) straight from the file."""
        if self.f.readinto(memoryview(buffer)) != buffer.nbytes:
            raise UnusualLayout("truncated")
        self.pos += buffer.nbytes

    def varint(self) -> tuple[int, bytes]:
        raw = bytearray()
        value = shift = 0
        while True:
            byte = self.f.read(1)
            if not byte:
                raise UnusualLayout("truncated varint")
            raw += byte
            value |= (byte[0] & 0x7F) << shift
            if not byte[0] & 0x80:
                self.pos += len(raw)
                return value, bytes(raw)
            shift += 7
            if shift > 63:
                raise UnusualLayout("varint over 64 bits")

    def fields(self, end: int):
        """Yield (field number, wire type, the field's key bytes) up to ``end``; the caller then reads the
        payload with ``payload`` or ``length``."""
        while self.pos < end:
            key, raw = self.varint()
            number, wire_type = key >> 3, key & 7
            if number == 0 or wire_type in (3, 4) or wire_type > 5:  # groups, or not a field
                raise UnusualLayout(f"wire type {wire_type}")
            yield number, wire_type, raw
        if self.pos != end:
            raise UnusualLayout("a field runs past its message")

    def length(self, end: int) -> tuple[int, bytes]:
        """A length-delimited payload's length (checked against ``end``) and its encoded bytes."""
        n, raw = self.varint()
        if n > end - self.pos:
            raise UnusualLayout("a length past the end of its message")
        return n, raw

    def payload(self, wire_type: int, end: int) -> bytes:
        """The rest of a field after its key, as bytes."""
        if wire_type == 0:
            return self.varint()[1]
        if wire_type in (1, 5):
            n = 8 if wire_type == 1 else 4
            if n > end - self.pos:
                raise UnusualLayout("a fixed-size field past the end of its message")
            return self.read(n)
        n, raw = self.length(end)
        return raw + self.read(n)


def read_skeleton(f, size: int) -> tuple[bytes, dict[int, np.ndarray]]:
    """(the ModelProto bytes with large raw_data payloads emptied, {index in graph.initializer: payload
    as uint8}) from the binary file ``f`` of ``size`` bytes, read from its start."""
    wire = _Wire(f)
    payloads: dict[int, np.ndarray] = {}
    model = bytearray()
    seen_graph = False
    for number, wire_type, key in wire.fields(size):
        if number == _MODEL_GRAPH and wire_type == 2:
            if seen_graph:  # protobuf would merge the two
                raise UnusualLayout("two graphs")
            seen_graph = True
            n, _ = wire.length(size)
            graph = _graph(wire, wire.pos + n, payloads)
            model += key + _varint_bytes(len(graph)) + graph
        else:
            model += key + wire.payload(wire_type, size)
    return bytes(model), payloads


def _graph(wire: _Wire, end: int, payloads: dict) -> bytes:
    out = bytearray()
    index = 0
    for number, wire_type, key in wire.fields(end):
        if number == _GRAPH_INITIALIZER and wire_type == 2:
            n, _ = wire.length(end)
            tensor = _tensor(wire, wire.pos + n, payloads, index)
            out += key + _varint_bytes(len(tensor)) + tensor
            index += 1
        else:
            out += key + wire.payload(wire_type, end)
    return bytes(out)


def _tensor(wire: _Wire, end: int, payloads: dict, index: int) -> bytes:
    out = bytearray()
    seen_raw = False
    for number, wire_type, key in wire.fields(end):
        if number == _TENSOR_RAW_DATA and wire_type == 2:
            if seen_raw:  # protobuf would keep the last one
                raise UnusualLayout("two raw_data fields")
            seen_raw = True
            n, raw = wire.length(end)
            if n >= RAW_DATA_MIN_BYTES:
                buffer = np.empty(n, np.uint8)
                wire.read_into(buffer)
                payloads[index] = buffer
                out += key + b"\x00"  # present and empty: the checker still sees one value field
            else:
                out += key + raw + wire.read(n)
        else:
            out += key + wire.payload(wire_type, end)
    return bytes(out)


def attach(model, payloads: dict[int, np.ndarray], itemsize_error) -> dict[str, np.ndarray]:
    """{initializer name: array} for the payloads numpy reads as is, with the tensor's dtype and shape;
    the others are written back into their TensorProto. ``itemsize_error(tensor, expected, got)`` returns
    the exception for a payload whose size does not match the tensor's dims and type."""
    arrays = {}
    initializers = model.graph.initializer
    names = collections.Counter(t.name for t in initializers)
    for index, buffer in payloads.items():
        tensor = initializers[index]
        dtype = _NUMPY_TYPES.get(tensor.data_type)
        if dtype is None or sys.byteorder != "little" or tensor.data_location == 1 or names[tensor.name] > 1 \
                or _other_value_fields(tensor):
            # 1: EXTERNAL. A duplicate name, or values in a second field, stay for onnx's checker to refuse.
            tensor.raw_data = buffer.tobytes()  # onnx's own conversion, or its checker's refusal
            continue
        expected = math.prod(tensor.dims) * np.dtype(dtype).itemsize  # exact: no int64 wrap-around
        if expected != buffer.nbytes:
            raise itemsize_error(tensor, expected, buffer.nbytes)
        arrays[tensor.name] = buffer.view(dtype).reshape(tuple(tensor.dims))
    return arrays


def _other_value_fields(tensor) -> bool:
    """Whether ``tensor`` holds values besides its raw data (or is a segment), which onnx's checker refuses."""
    return tensor.HasField("segment") or any(len(getattr(tensor, f)) for f in (
        "float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data"))


def checkable(model, arrays: dict[str, np.ndarray]):
    """A copy of the skeleton for onnx's checker, which refuses a tensor whose raw data is shorter than its
    shape: the initializers read into ``arrays`` become typed graph inputs (``attach`` checked their sizes
    and types, and that their names are unique)."""
    from onnx import helper

    copy = type(model)()
    copy.CopyFrom(model)
    graph = copy.graph
    kept = [t for t in graph.initializer if t.name not in arrays]
    inputs = {i.name for i in graph.input}
    for tensor in graph.initializer:
        if tensor.name in arrays and tensor.name not in inputs:
            graph.input.append(helper.make_tensor_value_info(tensor.name, tensor.data_type, tensor.dims))
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return copy


def restore(model, arrays: dict[str, np.ndarray]) -> None:
    """Write the arrays back into their TensorProtos (for onnx code that reads the data itself)."""
    for tensor in model.graph.initializer:
        if tensor.name in arrays:
            tensor.raw_data = arrays[tensor.name].tobytes()
