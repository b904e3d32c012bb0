"""Hostile files and bad input: tiny models whose constant folding would allocate gigabytes or terabytes
(refused before anything is allocated, under a memory limit of the test's own), inputs that declare sizes
of 0, below 0 or beyond reason, empty weights, and external data that holds a NUL byte, is a named pipe
or is shorter than its tensor. Each is refused with onnxlrp's own error: one line naming the file, the
node or tensor, the op type and what was expected."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxlrp
from onnxlrp.folding import DEFAULT_MAX_FOLD_BYTES, MAX_FOLD_BYTES_ENV
from onnxlrp.loading import load_model

from .helpers import F32, init, make_lrp, make_model, vi

n = helper.make_node
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ONE = helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])
#: The address space the folding-bomb loads run under: well below what any bomb would allocate, well above
#: what importing onnxruntime and loading a small model takes (about 100 MB resident).
MEMORY_LIMIT = 2 << 30


def _one_line(exc):
    msg = str(exc)
    assert "\n" not in msg and "Traceback" not in msg, msg
    return msg


def _scaled_by(nodes, inits, name="bomb"):
    """x (N, 4) times ReduceSum of a constant subgraph: a 4-wide model whose only foldable part is
    ``nodes`` (the last one making tensor 'big')."""
    nodes = list(nodes) + [n("ReduceSum", ["big"], ["s"], keepdims=0), n("Mul", ["x", "s"], ["z"])]
    return make_model(nodes, [("x", [None, 4])], [("z", [None, 4])], inits)


def _constant_of_shape(shape, dtype=TensorProto.FLOAT, name="bomb"):
    value = helper.make_tensor("v", dtype, [1], [1])
    return _scaled_by([n("ConstantOfShape", ["shape"], ["big"], value=value, name=name)],
                      [init("shape", np.array(shape, np.int64))])


def _bombs():
    """name -> (model, node name, op type, elements it would create): 4 GB to 40 TB each, from files of
    a few hundred bytes (the broadcast one: 800 KB)."""
    bombs = {
        # the issue's model: 4 GB of float32 from a 1-element shape, summed away
        "constant_of_shape_1e9": (_constant_of_shape([1, 10 ** 9]), "bomb", "ConstantOfShape", 10 ** 9),
        "constant_of_shape_16GB": (_constant_of_shape([4, 10 ** 9]), "bomb", "ConstantOfShape", 4 * 10 ** 9),
        "constant_of_shape_4TB": (_constant_of_shape([10 ** 6, 10 ** 6]), "bomb", "ConstantOfShape", 10 ** 12),
        "constant_of_shape_int64": (_constant_of_shape([1, 10 ** 9], TensorProto.INT64, "ints"), "ints",
                                    "ConstantOfShape", 10 ** 9),
        "expand": (_scaled_by([n("Expand", ["one", "shape"], ["big"], name="widen")],
                              [init("one", np.ones((1, 1))), init("shape", np.array([40000, 40000], np.int64))]),
                   "widen", "Expand", 40000 * 40000),
        "tile": (_scaled_by([n("Tile", ["one", "repeats"], ["big"], name="tiles")],
                            [init("one", np.ones((2, 2))), init("repeats", np.array([30000, 30000], np.int64))]),
                 "tiles", "Tile", 60000 * 60000),
        "range": (_scaled_by([n("Range", ["start", "limit", "delta"], ["big"], name="count")],
                             [init("start", np.array(0.0)), init("limit", np.array(1e10)),
                              init("delta", np.array(1.0))]), "count", "Range", 10 ** 10),
        "resize": (_scaled_by([n("Resize", ["img", "", "scales"], ["big"], name="zoom")],
                              [init("img", np.ones((1, 1, 4, 4))),
                               init("scales", np.array([1, 1, 20000, 20000], F32))]), "zoom", "Resize", 80000 ** 2),
        # the shape computed by a chain (Concat, Mul) of small constants, the way exporters write it
        "computed_shape": (_scaled_by([n("Concat", ["a", "b"], ["ab"], axis=0), n("Mul", ["ab", "k"], ["shape"]),
                                       n("ConstantOfShape", ["shape"], ["big"], value=ONE, name="computed")],
                                      [init("a", np.array([1], np.int64)), init("b", np.array([10 ** 5], np.int64)),
                                       init("k", np.array([10 ** 4], np.int64))]), "computed", "ConstantOfShape",
                           10 ** 4 * 10 ** 9),
        # an outer sum of two 400 KB constants
        "broadcast": (_scaled_by([n("Add", ["col", "row"], ["big"], name="outer")],
                                 [init("col", np.ones((100000, 1))), init("row", np.ones((1, 100000)))]),
                      "outer", "Add", 10 ** 10),
    }
    # the static size of the data input (axis 1) in the shape: folded once the input's shape is known
    nodes = [n("Shape", ["x"], ["sx"]), n("Gather", ["sx", "i1"], ["d1"], axis=0),
             n("Unsqueeze", ["d1", "ax0"], ["d1u"]), n("Concat", ["d1u", "huge"], ["shape"], axis=0),
             n("ConstantOfShape", ["shape"], ["big"], value=ONE, name="from_input")]
    bombs["shape_of_input"] = (_scaled_by(nodes, [init("i1", np.array(1, np.int64)), init("ax0", np.array([0], np.int64)),
                                                  init("huge", np.array([10 ** 9], np.int64))]),
                               "from_input", "ConstantOfShape", 4 * 10 ** 9)
    # inside the branch of an If whose condition is constant (folded after the outer graph)
    then = helper.make_graph([n("ConstantOfShape", ["shape"], ["big"], value=ONE, name="in_branch"),
                              n("ReduceSum", ["big"], ["t"], keepdims=0)], "then", [], [vi("t", [])])
    other = helper.make_graph([n("Identity", ["unit"], ["e"])], "else", [], [vi("e", [])])
    bombs["if_branch"] = (make_model([n("If", ["cond"], ["s"], then_branch=then, else_branch=other),
                                      n("Mul", ["x", "s"], ["z"])], [("x", [None, 4])], [("z", [None, 4])],
                                     [init("cond", np.array(True)), init("shape", np.array([1, 10 ** 9], np.int64)),
                                      init("unit", np.array(1.0))]), "in_branch", "ConstantOfShape", 10 ** 9)
    return bombs


_LOADER = textwrap.dedent("""
    import json, resource, sys
    try:
        resource.setrlimit(resource.RLIMIT_AS, ({limit}, {limit}))
    except (ValueError, OSError):  # a platform without address-space limits: run unlimited
        pass
    sys.path.insert(0, {root!r})
    from onnxlrp.loading import load_model
    results = {{}}
    for name, path in json.loads(sys.argv[1]).items():
        try:
            load_model(path)
            kind, msg = "loaded", ""
        except Exception as exc:
            kind, msg = type(exc).__name__, str(exc)
        results[name] = [kind, msg]
    results["maxrss_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps(results))
""")


@pytest.fixture(scope="module")
def bomb_results(tmp_path_factory):
    """Load every bomb (and one ordinary model) in one subprocess limited to MEMORY_LIMIT of address space."""
    pytest.importorskip("resource")
    folder = tmp_path_factory.mktemp("bombs")
    bombs = _bombs()
    paths = {}
    for name, (model, *_) in bombs.items():
        paths[name] = str(folder / f"{name}.onnx")
        onnx.save(model, paths[name])
        assert os.path.getsize(paths[name]) < 1_000_000  # small files (the broadcast one holds two 400 KB rows)
    paths["ordinary"] = str(folder / "ordinary.onnx")
    onnx.save(_constant_of_shape([1, 1000]), paths["ordinary"])
    env = dict(os.environ)
    env.pop(MAX_FOLD_BYTES_ENV, None)
    proc = subprocess.run([sys.executable, "-c", _LOADER.format(limit=MEMORY_LIMIT, root=ROOT), json.dumps(paths)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    return bombs, paths, results


@pytest.mark.parametrize("name", list(_bombs()))
def test_folding_bomb_refused_before_allocating(bomb_results, name):
    bombs, paths, results = bomb_results
    _, node, op, elements = bombs[name]
    kind, msg = results[name]
    assert kind == "ModelLoadError", (kind, msg)
    assert "\n" not in msg
    assert msg.startswith(paths[name] + ": refusing to fold constants")
    assert f"node '{node}' ({op})" in msg
    assert f"{elements:,} elements" in msg and f"the limit is {DEFAULT_MAX_FOLD_BYTES:,} bytes per tensor" in msg
    assert MAX_FOLD_BYTES_ENV in msg and "max_fold_bytes" in msg


def test_folding_bombs_stay_within_the_memory_limit(bomb_results):
    _, _, results = bomb_results
    assert results["ordinary"][0] == "loaded"  # the limit leaves room for an ordinary load
    assert results["maxrss_kb"] * 1024 < MEMORY_LIMIT // 2


def test_the_issue_bomb_message(bomb_results):
    """The whole message for the issue's model (loaded in the memory-limited subprocess: should the bound
    ever break, this test must not take 8 GB of the test run's own memory)."""
    _, paths, results = bomb_results
    assert results["constant_of_shape_1e9"][1] == (
        f"{paths['constant_of_shape_1e9']}: refusing to fold constants: node 'bomb' (ConstantOfShape) would "
        "create tensor 'big' of shape [1, 1000000000] (1,000,000,000 elements of float32, 4,000,000,000 bytes); "
        "the limit is 1,073,741,824 bytes per tensor (raise it with ONNXLRP_MAX_FOLD_BYTES or "
        "load_model(max_fold_bytes=...))")


def test_ordinary_folding_still_works():
    """An opset-9 export's Constant weights, a ConstantOfShape zero bias and small Expand/Tile/Range/Resize
    constants all fold, to the values numpy gives."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=(3, 4)).astype(F32)
    nodes = [n("Constant", [], ["W"], value=numpy_helper.from_array(w)),
             n("ConstantOfShape", ["bshape"], ["zeros"], value=ONE),
             n("Range", ["r0", "r1", "r2"], ["ramp"]),
             n("Expand", ["ramp", "eshape"], ["grid"]), n("Tile", ["grid", "reps"], ["tiled"]),
             n("Resize", ["tiled4", "", "scales"], ["big4"], mode="nearest"),
             n("Reshape", ["tiled", "shape4"], ["tiled4"]), n("Reshape", ["big4", "shape2"], ["big2"]),
             n("ReduceSum", ["big2", "ax0"], ["colsum"], keepdims=0),
             n("Gemm", ["x", "W", "zeros"], ["g"], transB=1), n("Add", ["g", "colsum"], ["z"])]
    inits = [init("bshape", np.array([3], np.int64)), init("r0", np.array(0.0)), init("r1", np.array(3.0)),
             init("r2", np.array(1.0)), init("eshape", np.array([2, 3], np.int64)),
             init("reps", np.array([2, 1], np.int64)), init("shape4", np.array([1, 1, 4, 3], np.int64)),
             init("scales", np.array([1, 1, 2, 1], F32)), init("shape2", np.array([8, 3], np.int64)),
             init("ax0", np.array([0], np.int64))]
    nodes = nodes[:5] + [nodes[6], nodes[5]] + nodes[7:]  # topological order
    model = make_model(nodes, [("x", [None, 4])], [("z", [None, 3])], inits)
    loaded = load_model(model)
    assert [node.op for node in loaded.graph.nodes] == ["Gemm", "Add"]
    colsum = next(t for t in loaded.graph.tensors().values() if t.name == "colsum")
    np.testing.assert_allclose(colsum.values, 8 * np.arange(3.0))
    x = rng.normal(size=(2, 4)).astype(F32)
    e = make_lrp(model).analyze(x, 1)
    np.testing.assert_allclose(e.output, x @ w.T + 1.0 + 8 * np.arange(3.0), rtol=1e-5, atol=1e-5)


def test_fold_limit_keyword_and_environment(monkeypatch):
    model = _constant_of_shape([1, 10 ** 6])  # 4 MB: folds by default
    monkeypatch.delenv(MAX_FOLD_BYTES_ENV, raising=False)
    load_model(model)
    with pytest.raises(onnxlrp.ModelLoadError, match=r"4,000,000 bytes\); the limit is 1,000,000 bytes"):
        load_model(model, max_fold_bytes=1_000_000)
    monkeypatch.setenv(MAX_FOLD_BYTES_ENV, "1M")
    with pytest.raises(onnxlrp.ModelLoadError, match=r"the limit is 1,048,576 bytes per tensor"):
        load_model(model)
    load_model(model, max_fold_bytes=8 << 20)  # the keyword wins over the environment
    monkeypatch.setenv(MAX_FOLD_BYTES_ENV, "8_000_000")
    load_model(model)
    # and a bomb passes a limit raised far enough: 40 MB of the issue's shape, under a 64 MiB limit
    monkeypatch.setenv(MAX_FOLD_BYTES_ENV, "64MiB")
    load_model(_constant_of_shape([1, 10 ** 7]))
    for bad in ("lots", "-5", "1.5G", "0"):
        monkeypatch.setenv(MAX_FOLD_BYTES_ENV, bad)
        with pytest.raises(onnxlrp.ModelLoadError, match=MAX_FOLD_BYTES_ENV):
            load_model(model)
    monkeypatch.delenv(MAX_FOLD_BYTES_ENV)
    for bad in (0, -1, "1G", 1.5, True):
        with pytest.raises(onnxlrp.ModelLoadError, match="max_fold_bytes"):
            load_model(model, max_fold_bytes=bad)


def test_analyzer_and_cli_pass_the_fold_limit_on(monkeypatch, tmp_path):
    monkeypatch.delenv(MAX_FOLD_BYTES_ENV, raising=False)
    model = _constant_of_shape([1, 10 ** 6])
    with pytest.raises(onnxlrp.ModelLoadError, match=r"the limit is 1,000,000 bytes"):
        onnxlrp.LRP(model, max_fold_bytes=1_000_000, verbose=False)
    path = tmp_path / "bomb.onnx"
    onnx.save(_constant_of_shape([1, 10 ** 9]), path)
    from onnxlrp.cli import main
    assert main(["check", str(path)], standalone_mode=False) == 1


def test_total_fold_budget():
    """Many tensors each under the per-tensor limit: all together may take 4 times it."""
    nodes = []
    for i in range(6):
        nodes += [n("ConstantOfShape", ["shape"], [f"c{i}"], value=ONE, name=f"part{i}"),
                  n("ReduceSum", [f"c{i}"], [f"s{i}"], keepdims=0)]
    nodes += [n("Sum", [f"s{i}" for i in range(6)], ["s"]), n("Mul", ["x", "s"], ["z"])]
    model = make_model(nodes, [("x", [None, 4])], [("z", [None, 4])], [init("shape", np.array([250000], np.int64))])
    msg = _one_line(pytest.raises(onnxlrp.ModelLoadError, load_model, model, max_fold_bytes=1_100_000).value)
    assert "node 'part4' (ConstantOfShape)" in msg and "4,400,000 bytes for all folded tensors together" in msg
    load_model(model, max_fold_bytes=2_000_000)


@pytest.mark.parametrize("op, attrs, inits, why", [
    ("ConstantOfShape", {}, [np.array([3, -2], np.int64)], "holds a negative size"),
    ("Range", {}, [np.array(0.0), np.array(5.0), np.array(0.0)], "its delta is 0"),
])
def test_invalid_generator_inputs(op, attrs, inits, why):
    names = [f"in{i}" for i in range(len(inits))]
    model = _scaled_by([n(op, names, ["big"], name="gen", **attrs)],
                       [init(name, value) for name, value in zip(names, inits)])
    msg = _one_line(pytest.raises(onnxlrp.ModelLoadError, load_model, model).value)
    assert f"node 'gen' ({op}) cannot be computed" in msg and why in msg


# -- input dimensions ---------------------------------------------------------------------------------------------------
def _summing(shape, dtype=TensorProto.FLOAT):
    """x of ``shape`` summed over its last axis."""
    return make_model([n("ReduceSum", ["x", "last"], ["z"], keepdims=0)], [vi("x", shape, dtype)],
                      [vi("z", [None, shape[1]])], [init("last", np.array([-1], np.int64))], infer_outputs=False)


@pytest.mark.parametrize("size", [0, -5])
def test_input_declaring_a_non_positive_dimension(size):
    msg = _one_line(pytest.raises(onnxlrp.ModelLoadError, make_lrp, _summing([None, 3, size])).value)
    assert msg == f"<ModelProto>: input 'x' has dimension {size} at axis 2; expected a positive size"


def test_input_declaring_an_absurd_size(tmp_path):
    path = tmp_path / "huge.onnx"
    onnx.save(_summing([None, 3, 10 ** 12]), str(path))
    msg = _one_line(pytest.raises(onnxlrp.ModelLoadError, make_lrp, path).value)
    assert msg == (f"{path}: input 'x' has shape [N, 3, 1000000000000], 3,000,000,000,000 elements per sample; "
                   "expected at most 2,147,483,648")


def test_batch_axis_declared_zero_still_loads():
    """Some exporters write 0 or -1 for a dynamic batch; the batch axis is made symbolic anyway."""
    assert make_lrp(_summing([0, 3, 4])).analyze(np.ones((2, 3, 4), F32)).val.shape == (2, 3, 4)


@pytest.mark.parametrize("feature_shape, expected", [
    ((3, 0), "input 'x' is given dimension 0 at axis 2; expected a positive size"),
    ((3, -5), "input 'x' is given dimension -5 at axis 2; expected a positive size"),
    ((3, 10 ** 12), "input 'x' is given shape [N, 3, 1000000000000], 3,000,000,000,000 elements per sample"),
    ((3, 2.5), "input 'x' is given size 2.5 at axis 2; expected a positive integer"),
])
def test_feature_shape_checked(feature_shape, expected):
    msg = _one_line(pytest.raises(onnxlrp.InputError, load_model, _summing([None, 3, "T"]), None,
                                  feature_shape).value)
    assert expected in msg


# -- empty weights ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("op, weight, x_shape", [
    ("Gemm", (0, 4), [None, 4]), ("MatMul", (4, 0), [None, 4]), ("Conv", (0, 3, 3, 3), [None, 3, 5, 5])])
def test_empty_weight(op, weight, x_shape):
    attrs = {"transB": 1} if op == "Gemm" else {}
    model = make_model([n(op, ["x", "W"], ["z"], name="layer", **attrs)], [("x", x_shape)], ["z"],
                       [init("W", np.zeros(weight))])
    msg = _one_line(pytest.raises(onnxlrp.ModelLoadError, make_lrp, model).value)
    shape = "[" + ", ".join(map(str, weight)) + "]"
    assert msg == (f"<ModelProto>: node 'layer' ({op}) has an empty weight 'W' of shape {shape}; "
                   "expected a tensor with no 0 dimension")


def test_empty_weight_from_a_constant_node():
    """An old export holding its (empty) weight in a Constant node: caught once folding made it one."""
    nodes = [n("Constant", [], ["W"], value=numpy_helper.from_array(np.zeros((0, 4), F32))),
             n("Gemm", ["x", "W"], ["z"], transB=1, name="dense")]
    model = make_model(nodes, [("x", [None, 4])], ["z"], opset=11)
    with pytest.raises(onnxlrp.ModelLoadError, match=r"node 'dense' \(Gemm\) has an empty weight 'W' of shape \[0, 4\]"):
        make_lrp(model)


# -- external data ------------------------------------------------------------------------------------------------------
def _external(tmp_path, location=None):
    """A Gemm model saved with its weight in external file w.bin; ``location`` rewrites the reference."""
    rng = np.random.default_rng(7)
    model = make_model([n("Gemm", ["x", "W"], ["z"], transB=1)], [("x", [None, 40])], ["z"],
                       [init("W", rng.normal(size=(3, 40)))])
    path = tmp_path / "model.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, location="w.bin", size_threshold=0)
    if location is not None:
        proto = onnx.load(str(path), load_external_data=False)
        for entry in proto.graph.initializer[0].external_data:
            if entry.key == "location":
                entry.value = location
        onnx.save_model(proto, str(path))
    return path


def test_external_location_with_a_nul_byte(tmp_path):
    path = _external(tmp_path, "w.bin\0.txt")
    msg = _one_line(pytest.raises(onnxlrp.ModelLoadError, make_lrp, path).value)
    assert msg == f"{path}: tensor 'W': external data location 'w.bin\\x00.txt' holds a NUL byte; expected a file name"


def _load_in_thread(path):
    """make_lrp(path) in a daemon thread: a test that would block reading a FIFO fails instead of hanging."""
    outcome = {}

    def target():
        try:
            make_lrp(path)
            outcome["error"] = None
        except Exception as exc:  # noqa: BLE001 - handed to the test
            outcome["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(60)
    assert not thread.is_alive(), "loading blocked on the external data file"
    return outcome["error"]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
@pytest.mark.parametrize("via_symlink", [False, True])
def test_external_data_that_is_a_fifo(tmp_path, via_symlink):
    path = _external(tmp_path, "link.bin" if via_symlink else None)
    os.remove(tmp_path / "w.bin")
    os.mkfifo(tmp_path / "w.bin")
    if via_symlink:
        os.symlink(tmp_path / "w.bin", tmp_path / "link.bin")  # inside the folder, to a FIFO
    error = _load_in_thread(path)
    assert isinstance(error, onnxlrp.ModelLoadError), error
    location = "link.bin" if via_symlink else "w.bin"
    assert _one_line(error) == (f"{path}: tensor 'W': external data location '{location}' is a named pipe (FIFO); "
                                "expected a regular file")


def test_external_data_file_too_short(tmp_path):
    path = _external(tmp_path)
    data = (tmp_path / "w.bin").read_bytes()
    (tmp_path / "w.bin").write_bytes(data[:100])
    msg = _one_line(pytest.raises(onnxlrp.ModelLoadError, make_lrp, path).value)
    assert msg == f"{path}: tensor 'W': external data location 'w.bin' holds 100 bytes; tensor 'W' needs bytes 0 to 480"


def test_external_data_length_not_matching_the_tensor(tmp_path):
    path = _external(tmp_path)
    proto = onnx.load(str(path), load_external_data=False)
    for entry in proto.graph.initializer[0].external_data:
        if entry.key == "length":
            entry.value = "240"
    onnx.save_model(proto, str(path))
    msg = _one_line(pytest.raises(onnxlrp.ModelLoadError, make_lrp, path).value)
    assert msg == f"{path}: tensor 'W' of shape [3, 40] needs 480 bytes, its external data 'w.bin' gives 240"


def test_external_data_still_loads(tmp_path):
    path = _external(tmp_path)
    x = np.ones((1, 40), F32)
    np.testing.assert_allclose(make_lrp(path).analyze(x, 0).output, make_lrp(onnx.load(str(path))).analyze(x, 0).output)


def test_model_path_with_a_nul_byte(tmp_path):
    msg = _one_line(pytest.raises(onnxlrp.ModelLoadError, make_lrp, str(tmp_path / "m\0.onnx")).value)
    assert "holds a NUL byte" in msg
