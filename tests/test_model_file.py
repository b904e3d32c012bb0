"""The one-pass reader of .onnx files (onnxlrp/model_file.py): it gives the model onnx.load gives, reads
large weights straight into arrays of their own, checks their sizes, still runs onnx's checker, falls back
to onnx.load on layouts protobuf would merge, and never allocates what a small file only claims."""
from __future__ import annotations

import io
import os
import threading

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxlrp
from onnxlrp import loading, model_file
from onnxlrp.loading import load_model

from .helpers import F32, make_lrp, make_model

n = helper.make_node


@pytest.fixture(autouse=True)
def one_pass_for_every_size(monkeypatch):
    """The reader takes files from 16 MiB on; these tests' files are small."""
    monkeypatch.setattr(loading, "ONE_PASS_FROM_BYTES", 0)
BIG = model_file.RAW_DATA_MIN_BYTES // 4 + 7  # float32 elements just over the threshold


def _weights(rng):
    """Weights of several types around the threshold: read into arrays, kept in the skeleton, written back."""
    return {"w": rng.normal(size=(3, BIG)).astype(F32),       # large float32: an array of its own
            "small": rng.normal(size=(3,)).astype(F32),       # stays in the skeleton
            "i64": np.arange(2 * BIG, dtype=np.int64),        # large int64
            "f16": rng.normal(size=(BIG * 2,)).astype(np.float16),
            "flags": rng.integers(0, 2, size=model_file.RAW_DATA_MIN_BYTES + 1).astype(bool)}


def _gemm_model(rng, opset=17, extra=()):
    """Gemm(x, w) + small, with the other weights as unused initializers (the checker allows them)."""
    weights = _weights(rng)
    inits = [numpy_helper.from_array(v, k) for k, v in weights.items()]
    bf16 = helper.make_tensor("bf16", TensorProto.BFLOAT16, [BIG * 2], b"\x3f\x80" * (BIG * 2), raw=True)
    nodes = [n("Gemm", ["x", "w"], ["g"], transB=1), n("Add", ["g", "small"], ["z"])]
    model = make_model(nodes, [("x", [None, BIG])], [("z", [None, 3])], inits + [bf16] + list(extra), opset=opset)
    return model, weights


def _read(path):
    with open(path, "rb") as f:
        skeleton, payloads = model_file.read_skeleton(f, os.path.getsize(path))
    proto = onnx.ModelProto()
    proto.ParseFromString(skeleton)
    return proto, payloads


def test_same_model_as_onnx_load(tmp_path):
    model, weights = _gemm_model(np.random.default_rng(0))
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    proto, payloads = _read(path)
    arrays = model_file.attach(proto, payloads, lambda *a: AssertionError(a))
    assert sorted(arrays) == ["f16", "flags", "i64", "w"]  # bf16 has no numpy type: written back
    reference = {t.name: numpy_helper.to_array(t) for t in onnx.load(path).graph.initializer}
    for name, array in arrays.items():
        assert array.dtype == reference[name].dtype and array.shape == reference[name].shape
        np.testing.assert_array_equal(array, reference[name])
        assert array.base is payloads[[t.name for t in proto.graph.initializer].index(name)]  # no copy
    # everything but the payloads is the file's message, byte for byte
    model_file.restore(proto, arrays)
    assert proto.SerializeToString() == onnx.load(path).SerializeToString()
    # and the analyzer built from it gives the relevance of one built from the ModelProto
    x = np.random.default_rng(1).normal(size=(2, BIG)).astype(F32)
    np.testing.assert_array_equal(make_lrp(str(path)).analyze(x).val, make_lrp(model).analyze(x).val)


def test_small_tensors_and_attributes_stay_in_the_skeleton(tmp_path):
    big_constant = numpy_helper.from_array(np.ones((3, BIG), F32))
    model = make_model([n("Constant", [], ["w"], value=big_constant), n("Gemm", ["x", "w"], ["z"], transB=1)],
                       [("x", [None, BIG])], [("z", [None, 3])])
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    proto, payloads = _read(path)
    assert payloads == {}  # a Constant node's tensor is an attribute, read by protobuf
    assert proto.SerializeToString() == model.SerializeToString()


def test_raw_data_of_the_wrong_size(tmp_path):
    model, _ = _gemm_model(np.random.default_rng(0))
    model.graph.initializer[0].raw_data = model.graph.initializer[0].raw_data[:-4]
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())  # onnx.save would check it
    error = pytest.raises(onnxlrp.ModelLoadError, load_model, str(path)).value
    assert str(error) == (f"{path}: tensor 'w' of shape [3, {BIG}] needs {12 * BIG} bytes, its raw data holds "
                          f"{12 * BIG - 4}")


def test_the_checker_still_runs(tmp_path):
    """The skeleton is checked: a node's bad attribute is found in a file of large weights."""
    model, _ = _gemm_model(np.random.default_rng(0))
    model.graph.node[0].attribute.append(helper.make_attribute("transB", 0))  # a second transB
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    error = pytest.raises(onnxlrp.ModelLoadError, load_model, str(path)).value
    assert str(error).startswith(f"{path}: fails onnx's checker: ")


def test_duplicate_initializer_names_are_refused(tmp_path):
    model, _ = _gemm_model(np.random.default_rng(0))
    model.graph.initializer.append(model.graph.initializer[0])
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    error = pytest.raises(onnxlrp.ModelLoadError, load_model, str(path)).value
    assert str(error) == f"{path}: fails onnx's checker: w initializer name is not unique"


def test_an_old_opset_is_converted_without_the_weights(tmp_path, monkeypatch):
    """The version converter gets the skeleton: the weights are not written back for it."""
    model, weights = _gemm_model(np.random.default_rng(2), opset=11)
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    monkeypatch.setattr(model_file, "restore", lambda *a: pytest.fail("weights written back for the converter"))
    loaded = load_model(str(path))
    assert loaded.opset == 17
    np.testing.assert_array_equal(loaded.graph.tensors()["w"].values, weights["w"])


def test_converter_losing_a_weight_falls_back_to_the_full_model(tmp_path, monkeypatch):
    model, weights = _gemm_model(np.random.default_rng(3), opset=11)
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    real = onnx.version_converter.convert_version

    def dropping(proto, target):  # as if an adapter had replaced the weight by one it computed
        out = real(proto, target)
        if out.graph.initializer[0].raw_data == b"":
            out.graph.initializer[0].raw_data = np.zeros((3, BIG), F32).tobytes()
        return out
    monkeypatch.setattr(onnx.version_converter, "convert_version", dropping)
    loaded = load_model(str(path))
    np.testing.assert_array_equal(loaded.graph.tensors()["w"].values, weights["w"])


def _field(number, payload: bytes) -> bytes:
    return model_file._varint_bytes(number << 3 | 2) + model_file._varint_bytes(len(payload)) + payload


@pytest.mark.parametrize("layout", ["two_graphs", "two_raw_data"])
def test_layouts_protobuf_merges_are_read_by_onnx_load(tmp_path, layout):
    """Protobuf merges a repeated message field and keeps the last of two raw_data: the reader leaves such
    files to onnx.load, whose model they are."""
    model, _ = _gemm_model(np.random.default_rng(4))
    data = model.SerializeToString()
    if layout == "two_graphs":
        extra = onnx.GraphProto()
        extra.doc_string = "merged"
        data += _field(7, extra.SerializeToString())
    else:  # the first raw_data zeros, the second (which protobuf keeps) the weight
        tensor = onnx.TensorProto()
        tensor.CopyFrom(model.graph.initializer[0])
        weight = tensor.raw_data
        tensor.raw_data = bytes(len(weight))
        graph = onnx.GraphProto()
        graph.CopyFrom(model.graph)
        del graph.initializer[0]
        rest = onnx.ModelProto()
        rest.CopyFrom(model)
        rest.ClearField("graph")
        graph_bytes = graph.SerializeToString() + _field(5, tensor.SerializeToString() + _field(9, weight))
        data = rest.SerializeToString() + _field(7, graph_bytes)
    path = tmp_path / "m.onnx"
    path.write_bytes(data)
    with open(path, "rb") as f, pytest.raises(model_file.UnusualLayout):
        model_file.read_skeleton(f, len(data))
    expected = onnx.load(path)
    loaded = load_model(str(path))
    for tensor in expected.graph.initializer:
        if tensor.name in ("w", "small"):
            np.testing.assert_array_equal(loaded.graph.tensors()[tensor.name].values, numpy_helper.to_array(tensor))
    if layout == "two_graphs":
        assert expected.graph.doc_string == "merged"


def test_a_claimed_length_is_checked_before_allocating():
    """A 60-byte file whose weight claims a terabyte: refused by the reader without allocating it."""
    tensor = model_file._varint_bytes(2 << 3) + b"\x01" + model_file._varint_bytes(9 << 3 | 2) + \
        model_file._varint_bytes(1 << 40)
    data = _field(7, _field(5, tensor))  # the payload itself is missing
    with pytest.raises(model_file.UnusualLayout, match="past the end"):
        model_file.read_skeleton(io.BytesIO(data), len(data))


@pytest.mark.parametrize("cut", [0.5, 0.999])
def test_truncated_file(tmp_path, cut):
    model, _ = _gemm_model(np.random.default_rng(6))
    data = model.SerializeToString()
    path = tmp_path / "m.onnx"
    path.write_bytes(data[:int(len(data) * cut)])
    error = pytest.raises(onnxlrp.ModelLoadError, load_model, str(path)).value
    assert str(error).startswith(f"{path}: not an ONNX model (DecodeError: ")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_a_model_path_that_is_a_fifo(tmp_path):
    path = tmp_path / "model.onnx"
    os.mkfifo(path)
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.update(error=pytest.raises(
        onnxlrp.ModelLoadError, load_model, str(path)).value), daemon=True)
    thread.start()
    thread.join(60)
    assert not thread.is_alive(), "loading blocked on a FIFO"
    assert str(outcome["error"]) == f"{path}: is a named pipe (FIFO); expected an .onnx file"


def test_an_undefined_data_type_is_named(tmp_path):
    """onnx's checker lets any number through as a data type (a flipped byte in a fuzzed file)."""
    model, _ = _gemm_model(np.random.default_rng(7))
    model.graph.initializer[0].data_type = 69
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    error = pytest.raises(onnxlrp.ModelLoadError, load_model, str(path)).value
    assert str(error) == f"{path}: tensor 'w' has data type 69, which ONNX does not define"


@pytest.mark.parametrize("name", ["w", "small"])  # a weight read into an array, one left in the skeleton
def test_a_name_that_is_not_utf8(tmp_path, name):
    model, _ = _gemm_model(np.random.default_rng(8))
    for tensor in model.graph.initializer:
        if tensor.name == name:
            tensor.name = name + "QQ"
    for node in model.graph.node:
        node.input[:] = [i + "QQ" if i == name else i for i in node.input]
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString().replace(name.encode() + b"QQ", name.encode() + b"\xf4Q"))
    error = pytest.raises(onnxlrp.ModelLoadError, load_model, str(path)).value
    assert str(error).startswith(f"{path}: ") and "utf-8" in str(error).lower() and "\n" not in str(error)


def test_mutated_files_load_or_are_refused_in_one_line(tmp_path):
    """Seeded fuzzing: flipped bytes anywhere, flipped bytes among the tags and lengths, truncations. Each
    file either loads or is refused with a one-line ModelLoadError; nothing else escapes, nothing hangs."""
    model, _ = _gemm_model(np.random.default_rng(0))
    data = model.SerializeToString()
    rng = np.random.default_rng(12)
    path = tmp_path / "m.onnx"
    outcomes = {"loaded": 0, "refused": 0}
    for _ in range(150):
        mutated = bytearray(data)
        kind = rng.integers(0, 3)
        if kind == 1:
            mutated = mutated[:rng.integers(0, len(mutated))]
        else:
            span = len(mutated) if kind == 0 else 200  # kind 2: the model's and graph's own fields
            for _ in range(rng.integers(1, 4)):
                mutated[rng.integers(0, span)] = rng.integers(0, 256)
        path.write_bytes(bytes(mutated))
        try:
            load_model(str(path))
            outcomes["loaded"] += 1
        except onnxlrp.ModelLoadError as exc:
            assert str(exc).startswith(f"{path}: ") and "\n" not in str(exc), str(exc)
            outcomes["refused"] += 1
    assert outcomes["loaded"] > 20 and outcomes["refused"] > 20, outcomes  # both kinds were exercised


def test_raw_data_beside_typed_values_is_refused(tmp_path):
    """The checker refuses a tensor with two value fields; the reader leaves such a tensor to it."""
    model, _ = _gemm_model(np.random.default_rng(9))
    model.graph.initializer[0].float_data.append(1.0)
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    error = pytest.raises(onnxlrp.ModelLoadError, load_model, str(path)).value
    assert str(error) == (f"{path}: fails onnx's checker: TensorProto (tensor name: w) should contain one and only "
                          "one value field.")


def test_small_files_are_read_by_onnx_load(tmp_path, monkeypatch):
    monkeypatch.setattr(loading, "ONE_PASS_FROM_BYTES", 16 << 20)
    monkeypatch.setattr(model_file, "read_skeleton", lambda *a: pytest.fail("the one-pass reader ran"))
    model, weights = _gemm_model(np.random.default_rng(10))
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    np.testing.assert_array_equal(load_model(str(path)).graph.tensors()["w"].values, weights["w"])
