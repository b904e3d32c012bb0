"""The on-disk cache of relevance graphs (onnxlrp.cache): a hit gives the bit-identical relevance of a fresh
build; any change of the model, its external data, the rules, a user's rule source, onnxlrp or onnxruntime
misses; damaged entries are removed and rebuilt; concurrent writers leave one whole entry; it can be turned
off; a folder others may write to is not used."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import warnings

import numpy as np
import onnx
import pytest

import onnxlrp
from onnxlrp import cache as cache_module
from onnxlrp.errors import LRPWarning

from .helpers_fixtures import fixture_path

RNG = np.random.default_rng(0)
X = RNG.standard_normal((2, 3, 32, 32)).astype(np.float32)
COMPOSITE = onnxlrp.EpsilonGammaBox(-3.0, 3.0)


@pytest.fixture
def model(tmp_path):
    path = tmp_path / "model" / "resnet.onnx"
    path.parent.mkdir()
    shutil.copy(fixture_path("resnet"), path)
    return str(path)


@pytest.fixture
def folder(tmp_path):
    return str(tmp_path / "cache")


def build(model, folder, rules=COMPOSITE, **kw):
    """An analyzer whose cache entry (if it writes one) is complete when this returns."""
    kw.setdefault("verbose", False)
    return settle(onnxlrp.LRP(model, rules, device="cpu", cache=folder, **kw))


def settle(analyzer):
    for pending in analyzer._cache_writes:
        pending.wait()
    return analyzer


def keys(folder):
    return sorted(key for key, _, _ in cache_module.entries(folder))


def fresh(model, rules=COMPOSITE, **kw):
    return onnxlrp.LRP(model, rules, device="cpu", verbose=False, cache=False, **kw).analyze(X)


def test_second_construction_is_a_hit_with_the_same_relevance(model, folder):
    first = build(model, folder)
    assert first.cache_status == "miss" and len(keys(folder)) == 1
    second = build(model, folder)
    assert second.cache_status == "hit"
    assert list(second.construction_times) == ["cache"]  # no load, canonization or emission
    assert second._layers is None  # layers are made when something asks for them
    reference, cold, hot = fresh(model), first.analyze(X), second.analyze(X)
    for expl in (cold, hot):
        np.testing.assert_array_equal(expl.val, reference.val)
        np.testing.assert_array_equal(expl.output, reference.output)
        np.testing.assert_array_equal(expl.output_selection, reference.output_selection)
    with warnings.catch_warnings():
        warnings.simplefilter("error", LRPWarning)  # the made layers agree with the entry
        assert repr(second) == repr(first)
        assert second.input_shape == first.input_shape and second.output_shape == first.output_shape
        assert second.input_dtype == first.input_dtype and second.data_input == first.data_input
    assert len(keys(folder)) == 1


def test_a_changed_model_file_misses(model, folder):
    build(model, folder)
    proto = onnx.load(model)
    weight = next(t for t in proto.graph.initializer if len(t.dims) == 4)
    values = onnx.numpy_helper.to_array(weight).copy()
    values.flat[0] += 1.0
    weight.CopyFrom(onnx.numpy_helper.from_array(values, weight.name))
    before = os.stat(model)
    onnx.save(proto, model)
    os.utime(model, ns=(before.st_atime_ns, before.st_mtime_ns))  # the same size and mtime: the content decides
    assert os.path.getsize(model) == before.st_size
    changed = build(model, folder)
    assert changed.cache_status == "miss" and len(keys(folder)) == 2
    np.testing.assert_array_equal(changed.analyze(X).val, fresh(model).val)
    assert build(model, folder).cache_status == "hit"


def test_changed_external_data_misses(tmp_path, folder):
    source = fixture_path("transformers/bert_dynamo18")
    target = tmp_path / "bert"
    target.mkdir()
    for suffix in ("", ".data"):
        shutil.copy(source + suffix, str(target / "bert_dynamo18.onnx") + suffix)
    path = str(target / "bert_dynamo18.onnx")
    ids = np.arange(1, 7, dtype=np.int64)[None] % 50
    first = build(path, folder, onnxlrp.AttnLRP())
    first.analyze(ids)  # a token model's graphs are per sequence length: this one is written on analyze
    settle(first)
    entries = keys(folder)
    assert len(entries) == 1
    second = build(path, folder, onnxlrp.AttnLRP())
    second_val = second.analyze(ids).val
    assert "emit" not in second.construction_times  # the graph for this length came from the cache
    np.testing.assert_array_equal(second_val, first.analyze(ids).val)
    data = bytearray(open(path + ".data", "rb").read())
    data[-1] ^= 0x01  # one bit of one weight, in the external-data file only
    with open(path + ".data", "wb") as f:
        f.write(data)
    third = build(path, folder, onnxlrp.AttnLRP())
    settle(third).analyze(ids)
    settle(third)
    assert "emit" in third.construction_times
    assert len(keys(folder)) == 2


@pytest.mark.parametrize("change", ["rule parameter", "array parameter", "composite", "layer relevances",
                                    "onnxlrp version", "onnxlrp source", "onnxruntime version"])
def test_any_other_change_misses(model, folder, monkeypatch, change):
    low = np.full((3, 32, 32), -3.0, np.float32)
    rules = onnxlrp.Composite(onnxlrp.EpsilonRule(1e-3), onnxlrp.FirstLayerMap(onnxlrp.ZBoxRule(low, 3.0)))
    build(model, folder, rules)
    kw = {}
    if change == "rule parameter":
        rules = onnxlrp.Composite(onnxlrp.EpsilonRule(2e-3), onnxlrp.FirstLayerMap(onnxlrp.ZBoxRule(low, 3.0)))
    elif change == "array parameter":  # one element of 3072: its repr would not show it
        other = low.copy()
        other[1, 16, 16] = -2.5
        rules = onnxlrp.Composite(onnxlrp.EpsilonRule(1e-3), onnxlrp.FirstLayerMap(onnxlrp.ZBoxRule(other, 3.0)))
    elif change == "composite":
        rules = onnxlrp.EpsilonPlus()
    elif change == "layer relevances":
        kw["layer_relevances"] = True
    elif change == "onnxlrp version":
        monkeypatch.setattr(onnxlrp, "__version__", onnxlrp.__version__ + ".post1")
    elif change == "onnxlrp source":
        monkeypatch.setattr(cache_module, "_package_hash", lambda: "edited")
    elif change == "onnxruntime version":  # the installed version, as its metadata says (no import of onnx)
        version = cache_module._version
        monkeypatch.setattr(cache_module, "_version", lambda m: "0.0.1" if m == "onnxruntime" else version(m))
    analyzer = build(model, folder, rules, **kw)
    assert analyzer.cache_status == "miss" and len(keys(folder)) == 2
    np.testing.assert_array_equal(analyzer.analyze(X).val, fresh(model, rules, **kw).val)


def test_a_users_rule_is_keyed_by_its_source(model, folder, tmp_path, monkeypatch):
    module_path = tmp_path / "my_rules.py"
    source = textwrap.dedent("""
        from onnxlrp import EpsilonRule

        class MyRule(EpsilonRule):
            def modify_parameters(self, param):
                return param * SCALE

        SCALE = {scale}
    """)

    def load(scale):
        module_path.write_text(source.format(scale=scale))
        spec = importlib.util.spec_from_file_location("my_rules", module_path)
        module = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, "my_rules", module)
        spec.loader.exec_module(module)
        return module.MyRule()

    assert build(model, folder, load(1.0)).cache_status == "miss"
    assert build(model, folder, load(1.0)).cache_status == "hit"
    edited = build(model, folder, load(2.0))  # the same repr, other code
    assert edited.cache_status == "miss"
    np.testing.assert_array_equal(edited.analyze(X).val, fresh(model, load(2.0)).val)


def test_rules_that_cannot_be_described_are_not_cached(model, folder):
    class Opaque(onnxlrp.EpsilonRule):
        pass

    rule = Opaque()
    rule.transform = lambda w: w  # a function: nothing in a key can tell two of them apart
    analyzer = build(model, folder, rule)
    assert analyzer.cache_status.startswith("off") and "function" in analyzer.cache_status
    assert keys(folder) == []
    np.testing.assert_array_equal(analyzer.analyze(X).val, fresh(model, onnxlrp.EpsilonRule()).val)


def _entry_folder(folder):
    (key,) = keys(folder)
    return os.path.join(folder, key)


@pytest.mark.parametrize("damage", ["flipped weight byte", "truncated weights", "garbage graph", "garbage entry",
                                    "missing weights"])
def test_a_damaged_entry_is_removed_and_rebuilt(model, folder, damage, capsys):
    build(model, folder)
    entry = _entry_folder(folder)
    weights = os.path.join(entry, cache_module.WEIGHTS_FILE)
    if damage == "flipped weight byte":
        with open(weights, "r+b") as f:
            f.seek(os.path.getsize(weights) // 2)
            byte = f.read(1)
            f.seek(-1, 1)
            f.write(bytes([byte[0] ^ 0x40]))
    elif damage == "truncated weights":
        os.truncate(weights, os.path.getsize(weights) // 2)
    elif damage == "garbage graph":
        graph = os.path.join(entry, cache_module.GRAPH_FILE)
        size = os.path.getsize(graph)
        with open(graph, "wb") as f:
            f.write(os.urandom(size))
    elif damage == "garbage entry":
        with open(os.path.join(entry, cache_module.ENTRY_FILE), "w") as f:
            f.write("{not json")
    elif damage == "missing weights":
        os.unlink(weights)
    rebuilt = build(model, folder, verbose=True)
    assert rebuilt.cache_status == "miss"
    np.testing.assert_array_equal(rebuilt.analyze(X).val, fresh(model).val)
    if damage in ("flipped weight byte", "garbage graph"):  # sizes agree: the checksum or onnxruntime finds it
        assert "damaged cache entry" in capsys.readouterr().err
    assert build(model, folder).cache_status == "hit"
    assert len(keys(folder)) == 1


@pytest.fixture
def vgg_with_lifted_weights(tmp_path, monkeypatch):
    """The vgg fixture, with its dense weights handled as VGG16's are: no pre-packing (the limit lowered to
    one byte) and fed to the session as inputs (from 1 KiB on: the first classifier layer's; the second's
    1280 bytes stay in the graph, as every constant under runtime.DETACH_MIN_BYTES does)."""
    import onnxlrp.runtime
    monkeypatch.setattr(onnxlrp.runtime, "PREPACK_DENSE_LIMIT", 1)
    monkeypatch.setattr(onnxlrp.runtime, "LIFT_MIN_BYTES", 1 << 10)
    path = tmp_path / "model" / "vgg.onnx"
    path.parent.mkdir()
    shutil.copy(fixture_path("vgg"), path)
    return str(path)


DENSE_WEIGHT = "model.classifier.0.weight"


def _session(analyzer):
    return list(analyzer._built.values())[-1][1]


def _dense(names):
    """The names of the first dense layer's weight (the relevance graph's copy has a suffix) among ``names``."""
    return {n for n in names if n.split("__")[0] == DENSE_WEIGHT}


def test_dense_weights_fed_as_inputs_give_the_same_relevance_cold_missed_and_hit(vgg_with_lifted_weights, folder,
                                                                                 monkeypatch):
    """Without pre-packing the dense weights go to onnxruntime as inputs (VGG16's session: 1.0 -> 0.4 s; its
    cache entry: 1.2 s less of onnxruntime copying and writing them); the relevance is bit for bit that of the
    same session with them as initializers, cold, on the miss that writes the entry and on the hit that maps
    it, through a plain run and through IO binding; callers see the model's inputs only."""
    import onnxlrp.runtime
    model = vgg_with_lifted_weights
    cold = onnxlrp.LRP(model, COMPOSITE, device="cpu", verbose=False, cache=False)
    missed, hit = build(model, folder), build(model, folder)
    assert (missed.cache_status, hit.cache_status) == ("miss", "hit")
    for analyzer in (cold, missed, hit):
        assert not analyzer.prepack_weights
        session = _session(analyzer)
        assert isinstance(session, onnxlrp.runtime.WeightFeedingSession)
        assert len(session.weight_inputs) == 1 and _dense(session.weight_inputs)
        assert not _dense(i.name for i in session.get_inputs())
    assert all(isinstance(a, np.memmap) for a in _session(hit).weight_inputs.values())
    entry = _entry_folder(folder)
    saved = onnx.load(os.path.join(entry, cache_module.GRAPH_FILE), load_external_data=False)
    assert _dense(i.name for i in saved.graph.input)
    assert not _dense(t.name for t in saved.graph.initializer)  # onnxruntime did not write it
    monkeypatch.setattr(onnxlrp.runtime, "LIFT_MIN_BYTES", 1 << 62)
    constant = onnxlrp.LRP(model, COMPOSITE, device="cpu", verbose=False, cache=False)
    assert not isinstance(_session(constant), onnxlrp.runtime.WeightFeedingSession)
    reference = constant.analyze(X)
    for analyzer in (cold, missed, hit):
        for bound in (False, True):
            expl = analyzer.analyze(X, keep_on_device=bound)
            np.testing.assert_array_equal(np.asarray(expl.val.numpy() if bound else expl.val), reference.val)
            np.testing.assert_array_equal(np.asarray(expl.output.numpy() if bound else expl.output),
                                          reference.output)
    saved = onnx.load(hit.save(os.path.join(os.path.dirname(model), "saved.onnx")))
    assert _dense(t.name for t in saved.graph.initializer)  # the graph users get holds its weights


@pytest.mark.parametrize("damage", ["flipped byte", "record outside the file", "not float32", "missing file"])
def test_a_damaged_file_of_weight_inputs_is_found_and_rebuilt(vgg_with_lifted_weights, folder, damage, capsys):
    model = vgg_with_lifted_weights
    build(model, folder)
    entry = _entry_folder(folder)
    inputs = os.path.join(entry, cache_module.INPUTS_FILE)
    if damage == "flipped byte":
        with open(inputs, "r+b") as f:
            f.seek(100)
            byte = f.read(1)
            f.seek(-1, 1)
            f.write(bytes([byte[0] ^ 0x40]))
    elif damage == "missing file":
        os.unlink(inputs)
    else:
        path = os.path.join(entry, cache_module.ENTRY_FILE)
        with open(path) as f:
            data = json.load(f)
        record = data["meta"]["weight_inputs"][-1]
        if damage == "record outside the file":
            record[3] = os.path.getsize(inputs) - 64
        else:
            record[1] = "|O"
        with open(path, "w") as f:
            json.dump(data, f)
    rebuilt = build(model, folder, verbose=True)
    assert rebuilt.cache_status == "miss"
    if damage == "flipped byte":  # the sizes agree: the checksum finds it
        assert "damaged cache entry" in capsys.readouterr().err
    np.testing.assert_array_equal(rebuilt.analyze(X).val,
                                  onnxlrp.LRP(model, COMPOSITE, device="cpu", verbose=False,
                                              cache=False).analyze(X).val)
    assert build(model, folder).cache_status == "hit"


def test_an_entry_that_disagrees_with_the_model_is_dropped(model, folder):
    build(model, folder)
    path = os.path.join(_entry_folder(folder), cache_module.ENTRY_FILE)
    with open(path) as f:
        entry = json.load(f)
    entry["meta"]["analyzer"]["rules"] = "something else"
    with open(path, "w") as f:
        json.dump(entry, f)
    stale = build(model, folder)
    assert stale.cache_status == "hit"
    with pytest.warns(LRPWarning, match="did not match the model"):
        stale.layers
    assert keys(folder) == []
    np.testing.assert_array_equal(stale.analyze(X).val, fresh(model).val)  # built again, not the entry's


WRITER = """
import sys, numpy as np, onnxlrp
x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
analyzer = onnxlrp.LRP(sys.argv[1], onnxlrp.EpsilonGammaBox(-3.0, 3.0), device="cpu", verbose=False, cache=sys.argv[2])
np.save(sys.argv[3], analyzer.analyze(x).val)
"""


def test_concurrent_writers_leave_one_whole_entry(model, folder, tmp_path):
    outs = [str(tmp_path / f"r{i}.npy") for i in range(3)]
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, model, folder, out]) for out in outs]
    assert [p.wait(timeout=300) for p in procs] == [0, 0, 0]
    reference = fresh(model).val
    for out in outs:
        np.testing.assert_array_equal(np.load(out), reference)
    assert len(keys(folder)) == 1
    assert not [n for n in os.listdir(folder) if n.startswith(".tmp-")]  # the losers removed theirs
    assert build(model, folder).cache_status == "hit"


def test_the_cache_can_be_turned_off(model, tmp_path, monkeypatch):
    folder = str(tmp_path / "cache")
    monkeypatch.setenv("ONNXLRP_CACHE_DIR", folder)
    assert build(model, False).cache_status == "off"
    monkeypatch.setenv("ONNXLRP_CACHE", "0")
    assert build(model, True).cache_status == "off"
    assert not os.path.exists(folder)
    from click.testing import CliRunner

    from onnxlrp.cli.app import cli
    monkeypatch.delenv("ONNXLRP_CACHE")
    egb = ["-c", "EpsilonGammaBox", "--low", "-3", "--high", "3"]
    result = CliRunner().invoke(cli, ["export", model, *egb, "-o", str(tmp_path / "lrp.onnx"), "--no-cache", "-q"])
    assert result.exit_code == 0, result.output
    assert not os.path.exists(folder)
    result = CliRunner().invoke(cli, ["export", model, *egb, "-o", str(tmp_path / "lrp2.onnx"), "-q"])
    assert result.exit_code == 0, result.output
    for thread in threading.enumerate():  # the command's entry, written on a thread (a process waits at exit)
        if thread.name == "onnxlrp-cache-write":
            thread.join()
    assert keys(folder) and build(model, True).cache_status == "hit"
    info = CliRunner().invoke(cli, ["cache", "info"])
    assert folder in info.output and "entries: 1" in info.output
    cleared = CliRunner().invoke(cli, ["cache", "clear"])
    assert cleared.exit_code == 0 and keys(folder) == []


@pytest.mark.skipif(not hasattr(os, "getuid"), reason="POSIX permissions")
def test_a_folder_others_can_write_to_is_not_used(model, folder, capsys):
    os.makedirs(folder)
    os.chmod(folder, 0o777)
    analyzer = build(model, folder, verbose=True)
    assert analyzer.cache_status.startswith("off")
    assert "others may write to it" in capsys.readouterr().err
    assert keys(folder) == []


def test_least_recently_used_entries_go_past_the_bound(model, folder, monkeypatch):
    build(model, folder, onnxlrp.EpsilonPlus())
    (size,) = [s for _, s, _ in cache_module.entries(folder)]
    monkeypatch.setenv("ONNXLRP_CACHE_MAX_BYTES", str(int(size * 1.5)))
    build(model, folder, onnxlrp.EpsilonGammaBox(-3.0, 3.0))
    newest = keys(folder)
    assert len(newest) == 1
    assert build(model, folder, onnxlrp.EpsilonGammaBox(-3.0, 3.0)).cache_status == "hit"
    assert build(model, folder, onnxlrp.EpsilonPlus()).cache_status == "miss"


HIT_WITHOUT_ONNX = """
import sys, numpy as np, onnxlrp
x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
analyzer = onnxlrp.LRP(sys.argv[1], onnxlrp.EpsilonGammaBox(-3.0, 3.0), device="cpu", verbose=False, cache=sys.argv[2])
np.save(sys.argv[3], analyzer.analyze(x).val)
print(analyzer.cache_status, sorted(m for m in ("onnx", "onnx_graphsurgeon", "ml_dtypes") if m in sys.modules))
"""


def test_a_hit_runs_without_importing_onnx(model, folder, tmp_path):
    """onnx's import (its ml_dtypes extension) took 1.3 s of the 2 s a hit took from a fresh process: a hit
    and its first analyze need onnxruntime and numpy only."""
    build(model, folder)
    out = str(tmp_path / "r.npy")
    proc = subprocess.run([sys.executable, "-c", HIT_WITHOUT_ONNX, model, folder, out], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[0] == "hit []"
    np.testing.assert_array_equal(np.load(out), fresh(model).val)


def test_sleeping_threads_on_the_session_built_and_the_one_from_the_cache(model, folder):
    """LRP(spinning=False): onnxruntime's idle threads sleep, on a miss and on a hit, with onnxruntime's own
    thread count; the relevance is the default session's bit for bit."""
    reference = fresh(model)
    for status in ("miss", "hit"):
        analyzer = build(model, folder, spinning=False)
        assert analyzer.cache_status == status
        options = next(iter(analyzer._built.values()))[1].get_session_options()
        assert options.intra_op_num_threads == 0  # onnxruntime's default
        assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
        np.testing.assert_array_equal(analyzer.analyze(X).val, reference.val)
    spinning = build(model, folder)
    assert spinning.cache_status == "hit"
    with pytest.raises(RuntimeError, match="does not have configuration"):  # onnxruntime's default: spinning
        next(iter(spinning._built.values()))[1].get_session_options().get_session_config_entry(
            "session.intra_op.allow_spinning")
