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


def test_weight_prepacking_is_off_for_large_dense_layers_on_the_batch(tmp_path, monkeypatch):
    """onnxruntime's pre-packing stays on for small dense weights and for products over tokens, and goes
    off for a CNN-style dense layer of PREPACK_DENSE_LIMIT bytes (VGG16: 2 s and 600+ MiB saved); a cache
    hit runs its session the same way, with the same relevance. The limit is lowered to 1 MiB here: a
    64 MiB weight would raise this process's peak RSS, which every later subprocess inherits as its own
    ru_maxrss (test_hostile_models measures one)."""
    from onnx import TensorProto, helper, numpy_helper

    import onnxlrp.runtime
    assert onnxlrp.LRP(fixture_path("vgg"), verbose=False, device="cpu", cache=False).prepack_weights
    monkeypatch.setattr(onnxlrp.runtime, "PREPACK_DENSE_LIMIT", 1 << 20)
    side = 512  # 1 MiB of float32
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((side, side)) / side ** 0.5).astype(np.float32)
    tokens = helper.make_model(helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])], "tokens",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, side])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, side])], [numpy_helper.from_array(w, "W")]),
        opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    assert onnxlrp.LRP(tokens, verbose=False, device="cpu").prepack_weights
    dense = helper.make_model(helper.make_graph(
        [helper.make_node("Gemm", ["x", "W"], ["y"], transB=1)], "dense",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", side])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", side])], [numpy_helper.from_array(w, "W")]),
        opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    path = tmp_path / "dense.onnx"
    onnx.save(dense, path)
    x = rng.standard_normal((2, side)).astype(np.float32)
    built = onnxlrp.LRP(path, verbose=False, device="cpu", cache=tmp_path / "cache")
    for pending in built._cache_writes:  # the entry is written on a thread
        pending.wait()
    hit = onnxlrp.LRP(path, verbose=False, device="cpu", cache=tmp_path / "cache")
    assert (built.cache_status, hit.cache_status) == ("miss", "hit")
    assert not built.prepack_weights and not hit.prepack_weights
    # one linear layer, no bias: x_i W_ji / z_j for the top output j (LRP-0 and the default rules agree)
    top = w[(x @ w.T).argmax(1)]
    want = x * top / (x * top).sum(1, keepdims=True)
    for analyzer in (built, hit):
        np.testing.assert_allclose(analyzer.analyze(x).val, want, rtol=1e-3, atol=1e-6)
