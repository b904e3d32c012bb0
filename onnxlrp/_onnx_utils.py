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


def const_value(tensor):
    """numpy value of a gs tensor when it is a constant, else None."""
    if isinstance(tensor, gs.Constant):
        return np.asarray(tensor.values)
    return None


def producer(tensor):
    return tensor.inputs[0] if len(tensor.inputs) else None
