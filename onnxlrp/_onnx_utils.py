"""Small helpers shared by the loader, the canonizer and the rewriter."""
import numpy as np
import onnx
import onnx_graphsurgeon as gs

# graph surgery on big zoo models is noisy at warning level (constant-folding sizes); keep errors only.
gs.logger.G_LOGGER.severity = gs.logger.G_LOGGER.ERROR

#: onnxruntime refuses IR versions newer than it knows; everything we emit uses this one.
EMIT_IR_VERSION = 8
#: The default-domain opset of every emitted graph (ScatterElements with reduction="add" needs 16,
#: GreaterOrEqual 12, Split/Squeeze/ReduceSum with axes as inputs 13). Older models are converted up.
MIN_EMIT_OPSET = 17


def default_opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    return 1


def quoted(name) -> str:
    """A name from the file, quoted for a one-line message: control characters (a newline, a NUL) in a
    hostile file's names are escaped so that they cannot break the message into several lines."""
    name = str(name)
    return f"'{name}'" if name.isprintable() else repr(name)


def node_label(node) -> str:
    """How messages name a gs node: its name (if it has one) and its op type."""
    return f"node {quoted(node.name)} ({node.op})" if node.name else f"an unnamed {node.op} node"


def format_shape(shape, limit: int = 8) -> str:
    """[d0, d1, ...]; a shape of absurd rank is shortened so that the message stays short."""
    dims = list(shape)
    if len(dims) > limit:
        return "[" + ", ".join(str(d) for d in dims[:limit]) + f", ...] (rank {len(dims)})"
    return "[" + ", ".join(str(d) for d in dims) + "]"


def const_value(tensor):
    """numpy value of a gs tensor when it is a constant, else None."""
    if isinstance(tensor, gs.Constant):
        return np.asarray(tensor.values)
    return None


def producer(tensor):
    return tensor.inputs[0] if len(tensor.inputs) else None


def opset_ir_version(opset: int) -> int:
    """The lowest IR version that carries ``opset`` (onnxruntime refuses IR versions it does not know)."""
    for _, ir_version, ai_onnx, *_ in onnx.helper.VERSION_TABLE:
        if ai_onnx >= opset:
            return max(ir_version, EMIT_IR_VERSION)
    return EMIT_IR_VERSION


def export_model(graph: gs.Graph, opset: int, doc: str = "") -> onnx.ModelProto:
    """A gs graph as a ModelProto of one default-domain ``opset`` and an IR version onnxruntime accepts."""
    model = gs.export_onnx(graph, do_type_check=False)
    model.ir_version = opset_ir_version(opset)
    del model.opset_import[:]
    model.opset_import.append(onnx.helper.make_opsetid("", opset))
    model.producer_name = "onnxlrp"
    model.doc_string = doc
    return model
