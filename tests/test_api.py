"""The analyzer's public surface: devices, saving, shapes, listings."""
import io
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import onnxlrp
from onnxlrp.runtime import cuda_available

from .helpers_fixtures import fixture_path, load_reference


@pytest.fixture(scope="module")
def vgg():
    return onnxlrp.LRP(fixture_path("vgg"), onnxlrp.EpsilonGammaBox(-3.0, 3.0), verbose=False)


def test_saved_graph_runs_in_plain_onnxruntime(vgg, tmp_path):
    ref = load_reference("vgg")
    path = tmp_path / "lrp.onnx"
    vgg.save(path)
    model = onnx.load(path)
    onnx.checker.check_model(model)
    assert "output_selection" in model.doc_string and "relevance" in model.doc_string
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out, rel, sel = session.run(["output", "relevance", "output_selection_used"], {
        "input": ref["x"], "output_selection": np.full(4, -1, np.int64),
        "normalize_output_relevance": np.array(True)})
    expl = vgg.analyze(ref["x"])
    np.testing.assert_array_equal(rel, expl.val)
    np.testing.assert_array_equal(sel, expl.output_selection)


def test_emitted_ir_version_is_accepted_and_checked(vgg):
    model = vgg.relevance_model
    onnx.checker.check_model(model)
    assert model.ir_version <= onnx.IR_VERSION
    assert {o.name for o in model.graph.output} == {"output", "relevance", "output_selection_used"}


def test_keep_on_device_returns_ortvalues(vgg):
    ref = load_reference("vgg")
    expl = vgg.analyze(ref["x"], keep_on_device=True)
    assert isinstance(expl.val, ort.OrtValue)
    np.testing.assert_array_equal(expl.val.numpy(), vgg.analyze(ref["x"]).val)
    assert "OrtValue" in repr(expl)


@pytest.mark.skipif(cuda_available(), reason="checks the message on machines without CUDA")
def test_cuda_request_without_cuda_is_a_clear_error():
    with pytest.raises(RuntimeError, match="CUDA provider did not load"):
        onnxlrp.LRP(fixture_path("mlp"), device="cuda", verbose=False)


def test_cpu_notice_names_the_fallback(capsys):
    import onnxlrp.runtime as runtime
    runtime._notified.clear()
    onnxlrp.LRP(fixture_path("mlp"), device="auto", verbose=True)
    err = capsys.readouterr().err
    assert ("running on CPU" in err) != cuda_available()


def test_bad_device_name():
    with pytest.raises(ValueError, match="device must be"):
        onnxlrp.LRP(fixture_path("mlp"), device="tpu", verbose=False)


def test_wrong_shape_and_dtype_name_expected_and_got(vgg):
    with pytest.raises(onnxlrp.InputError, match=r"expects shape \(N, 3, 32, 32\), got \(2, 3, 16, 16\)"):
        vgg.analyze(np.zeros((2, 3, 16, 16), np.float32))
    with pytest.raises(onnxlrp.InputError, match=r"x\[None\]"):
        vgg.analyze(np.zeros((3, 32, 32), np.float32))
    with pytest.raises(onnxlrp.InputError, match="floating-point"):
        vgg.analyze(np.zeros((1, 3, 32, 32), np.uint8))


def test_float64_input_is_accepted(vgg):
    ref = load_reference("vgg")
    np.testing.assert_array_equal(vgg.analyze(ref["x"].astype(np.float64)).val, vgg.analyze(ref["x"]).val)


def _dynamic_spatial_model():
    """Conv-Relu-GlobalAveragePool on (n, 2, h, w): a relevance graph per input size."""
    torch_free = onnx.helper
    x = torch_free.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 2, "h", "w"])
    y = torch_free.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", 3])
    w = np.random.default_rng(0).standard_normal((3, 2, 3, 3)).astype(np.float32)
    nodes = [torch_free.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             torch_free.make_node("Relu", ["c"], ["r"]),
             torch_free.make_node("GlobalAveragePool", ["r"], ["g"]),
             torch_free.make_node("Flatten", ["g"], ["y"])]
    graph = torch_free.make_graph(nodes, "dyn", [x], [y], [onnx.numpy_helper.from_array(w, "w")])
    return torch_free.make_model(graph, opset_imports=[torch_free.make_opsetid("", 17)], ir_version=8)


def test_dynamic_spatial_model_builds_per_input_size():
    model = _dynamic_spatial_model()
    analyzer = onnxlrp.LRP(model, onnxlrp.EpsilonPlus(), verbose=False)
    with pytest.raises(onnxlrp.LRPError, match="dynamic"):
        analyzer.relevance_model
    rng = np.random.default_rng(1)
    for shape in [(2, 2, 8, 8), (1, 2, 5, 7)]:
        expl = analyzer.analyze(rng.standard_normal(shape).astype(np.float32))
        assert expl.val.shape == shape and np.isfinite(expl.val).all()


def test_analyze_from_several_threads_builds_each_input_size_once(monkeypatch):
    """analyze may be called from several threads at once (onnxlrp explain runs two small batches together):
    a graph for a new input size is built once, by the first thread to need it, and every result is the one
    a call on its own gives, bit for bit."""
    analyzer = onnxlrp.LRP(_dynamic_spatial_model(), onnxlrp.EpsilonPlus(), verbose=False, cache=False)
    builds, real = [], onnxlrp.LRP._build_new

    def build_new(self, built, key, *args):
        builds.append(key)
        time.sleep(0.2)  # the other threads ask for the same size meanwhile
        return real(self, built, key, *args)

    monkeypatch.setattr(onnxlrp.LRP, "_build_new", build_new)
    rng = np.random.default_rng(2)
    xs = [rng.standard_normal(shape).astype(np.float32) for shape in [(2, 2, 8, 8), (3, 2, 8, 8), (1, 2, 5, 7)] * 3]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda x: analyzer.analyze(x).val, xs))
    assert sorted(builds) == [(2, 5, 7), (2, 8, 8)]
    for x, val in zip(xs, got):
        np.testing.assert_array_equal(val, analyzer.analyze(x).val)


def test_listings_show_indices_ops_and_rules(vgg):
    text = repr(vgg)
    assert "ZBoxRule(low=-3.0, high=3.0)" in text and "GammaRule(gamma=0.25)" in text
    buf = io.StringIO()
    onnxlrp.show_layer_indices(fixture_path("vgg"), onnxlrp.EpsilonPlus(), file=buf)
    lines = buf.getvalue().splitlines()
    assert lines[1].split()[0] == "0" and "Conv" in lines[1] and "ZPlusRule" in lines[1]
    rules = onnxlrp.lrp_rules(fixture_path("vgg"), onnxlrp.EpsilonPlusFlat())
    assert isinstance(rules[0], onnxlrp.FlatRule) and len(rules) == len(vgg.layers)


def test_layerwise_relevances_on_request():
    ref = load_reference("mlp")
    analyzer = onnxlrp.LRP(fixture_path("mlp"), layer_relevances=True, verbose=False)
    expl = analyzer.analyze(ref["x"])
    per_layer = expl.extras["layerwise_relevances"]
    last = max(per_layer)
    onehot = np.zeros_like(expl.output)
    onehot[np.arange(len(onehot)), expl.output_selection] = 1
    np.testing.assert_array_equal(per_layer[last], onehot)


def test_analyze_function_and_batches(vgg):
    ref = load_reference("vgg")
    a = onnxlrp.analyze(ref["x"], vgg, 2)
    assert list(a.output_selection) == [2, 2, 2, 2]
    batches = list(vgg.analyze_batches([ref["x"][:2], ref["x"][2:]]))
    np.testing.assert_allclose(np.concatenate([b.val for b in batches]), vgg.analyze(ref["x"]).val, rtol=1e-5,
                               atol=1e-7)


def test_the_exported_graph_refuses_out_of_range_selections_and_analyze_agrees_on_minus_one(tmp_path):
    """An invalid output_selection (10 or 1e6 for 10 classes, -2) used to give an all-zero map or the top
    class; now output_selection_used is -1 and the relevance NaN for that sample only. -1 means the top
    output in both the graph and analyze()."""
    x = load_reference("vgg")["x"][:4]
    analyzer = onnxlrp.LRP(fixture_path("vgg"), verbose=False)
    path = analyzer.save(tmp_path / "lrp.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rel, used = session.run(["relevance", "output_selection_used"], {
        "input": x, "output_selection": np.array([3, 10, 1_000_000, -2]), "normalize_output_relevance": np.array(True)})
    np.testing.assert_array_equal(used, [3, -1, -1, -1])
    assert np.all(np.isfinite(rel[0])) and np.abs(rel[0]).sum() > 0
    assert np.all(np.isnan(rel[1:]))
    assert "refused" in onnx.load(str(path)).doc_string
    top = analyzer.analyze(x, -1)
    np.testing.assert_array_equal(top.output_selection, analyzer.analyze(x).output_selection)
    for bad in (10, -2, np.uint64(2 ** 63)):
        with pytest.raises(onnxlrp.InputError, match="out of range"):
            analyzer.analyze(x, bad)
