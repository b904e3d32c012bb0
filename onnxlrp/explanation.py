"""The Explanation returned by every analyzer (XAIBase.jl's fields, numpy arrays)."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Explanation:
    val: np.ndarray               # the relevance, same shape as the input
    output: np.ndarray            # the model output (softmax stripped)
    output_selection: np.ndarray  # int64, one flat output index per sample
    analyzer: str = "LRP"
    heatmap: str = "attribution"  # preset heatmapping style: attribution, sensitivity or cam
    extras: dict = field(default_factory=dict)

    def __repr__(self):
        def describe(v):  # numpy arrays, or OrtValues left on the device
            return f"{tuple(v.shape)} {v.dtype}" if isinstance(v, np.ndarray) else f"<OrtValue {v.shape()}>"
        return (f"Explanation(val={describe(self.val)}, output={describe(self.output)}, "
                f"output_selection={self.output_selection.tolist()}, analyzer={self.analyzer!r}, "
                f"heatmap={self.heatmap!r}, extras={list(self.extras)})")
