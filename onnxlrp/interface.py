"""The relevance graph's interface (its input and output names, the batch dim, the precisions), importable
without onnx: a cache hit runs the graph with onnxruntime and numpy alone, and importing onnx takes a second
and more here (its ml_dtypes extension)."""
from __future__ import annotations

import numpy as np

OUTPUT = "output"
RELEVANCE = "relevance"
SELECTION = "output_selection"
SELECTION_USED = "output_selection_used"
NORMALIZE = "normalize_output_relevance"
POSITION = "output_position"
#: the symbolic batch dim of the graphs onnxlrp emits
BATCH_DIM = "batch"

PRECISIONS = {"float32": np.float32, "float64": np.float64}


def check_precision(precision):
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    return np.dtype(PRECISIONS[precision])
