"""The relevance graph on onnxruntime's CUDA provider (skipped where the provider does not load)."""
import json
import os

import numpy as np
import onnxruntime as ort
import pytest

import onnxlrp
from onnxlrp.runtime import cuda_available, make_session

from .helpers_fixtures import FIXTURES, fixture_path, load_reference, relative_l2

pytestmark = pytest.mark.skipif(not cuda_available(), reason="onnxruntime's CUDA provider does not load here")

# Shape arithmetic onnxruntime itself places on the CPU.
SHAPE_OPS = {"Shape", "Gather", "Concat", "Unsqueeze", "Squeeze", "Reshape", "Slice", "Cast", "ConstantOfShape",
             "MemcpyToHost", "MemcpyFromHost", "Range", "Expand", "Size"}


@pytest.mark.parametrize("model", FIXTURES)
def test_no_compute_node_falls_back_to_cpu(model, tmp_path):
    analyzer = onnxlrp.LRP(fixture_path(model), onnxlrp.EpsilonGammaBox(-3.0, 3.0), device="cuda", verbose=False)
    session = make_session(analyzer.relevance_model.SerializeToString(), "cuda", profile=True)
    ref = load_reference(model)
    session.run(None, {"input": ref["x"], "output_selection": np.full(len(ref["x"]), -1, np.int64),
                       "normalize_output_relevance": np.array(True)})
    with open(session.end_profiling()) as f:
        events = json.load(f)
    os.remove(f.name)
    on_cpu = {(e["args"]["op_name"], e["name"]) for e in events
              if e.get("cat") == "Node" and e.get("args", {}).get("provider") == "CPUExecutionProvider"
              and e["args"].get("op_name") not in SHAPE_OPS}
    assert not on_cpu, f"compute nodes on the CPU: {sorted(on_cpu)}"


@pytest.mark.parametrize("model", FIXTURES)
def test_cuda_equals_cpu(model):
    ref = load_reference(model)
    cpu = onnxlrp.LRP(fixture_path(model), onnxlrp.EpsilonPlus(), device="cpu", verbose=False).analyze(ref["x"])
    gpu = onnxlrp.LRP(fixture_path(model), onnxlrp.EpsilonPlus(), device="cuda", verbose=False).analyze(ref["x"])
    assert relative_l2(gpu.val, cpu.val).max() <= 1e-4


def test_keep_on_device_returns_cuda_ortvalues():
    ref = load_reference("vgg")
    analyzer = onnxlrp.LRP(fixture_path("vgg"), onnxlrp.EpsilonPlus(), device="cuda", verbose=False)
    expl = analyzer.analyze(ref["x"], keep_on_device=True)
    assert isinstance(expl.val, ort.OrtValue) and expl.val.device_name().lower() == "cuda"
