"""Construction (issue 12, part 1): the relevance graph's weights reach onnxruntime as arrays, not through
a serialized protobuf, and each construction phase is timed."""
from __future__ import annotations

import gc

import numpy as np
import onnx
import onnxruntime as ort

import onnxlrp
from onnxlrp.runtime import DETACH_MIN_BYTES, IN_MEMORY

from .helpers_fixtures import fixture_path


def test_detached_weights_give_the_relevance_of_the_whole_graph():
    analyzer = onnxlrp.LRP(fixture_path("vgg"), onnxlrp.EpsilonGammaBox(-3, 3), verbose=False, device="cpu",
                           cache=False)  # a cache hit's session maps its weights from the entry instead
    session = list(analyzer._built.values())[0][1]
    weights, _ = session._onnxlrp_weights
    assert len(weights) >= 5 and all(a.nbytes >= DETACH_MIN_BYTES for a in weights.values())
    gc.collect()  # the emitted graph is gone; the session still has its weights
    x = np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)
    ours = analyzer.analyze(x)
    # the exported graph holds every weight itself (no placeholder), and plain onnxruntime agrees
    model = analyzer.relevance_model
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL or any(e.value == IN_MEMORY for e in t.external_data)
                   for t in model.graph.initializer)
    plain = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = analyzer._feeds(x, ours.output_selection, None, analyzer._out_shapes.get(x.shape[1:]))
    relevance = plain.run(["relevance"], {i.name: feeds[i.name] for i in plain.get_inputs()})[0]
    np.testing.assert_array_equal(relevance, ours.val)


def test_construction_phases_are_timed():
    analyzer = onnxlrp.LRP(fixture_path("resnet"), onnxlrp.EpsilonPlus(), verbose=False, device="cpu", cache=False)
    times = analyzer.construction_times
    assert list(times) == ["load", "canonize", "layers", "emit", "serialize", "session"]
    assert all(v >= 0 for v in times.values())
    dynamic = onnxlrp.LRP(fixture_path("mlp"), verbose=False, device="cpu", cache=False)
    assert "session" in dynamic.construction_times  # the mlp's shape is static too
