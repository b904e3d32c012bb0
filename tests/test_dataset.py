"""explain_dataset on one machine: the shards hold what LRP.analyze gives on the same inputs, a killed run
resumes to the same files, memory does not grow with the shard or the dataset, and bad input is refused
with the file named. The Ray path is in test_dataset_ray.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import onnxlrp
from onnxlrp.cli import main
from onnxlrp.dataset.shards import OutputFolder
from onnxlrp.dataset.sources import Decoder, list_items, preprocessing_for
from onnxlrp.errors import InputError, LRPError
from onnxlrp.images import IMAGENET_MEAN, IMAGENET_STD, load_image, normalize

ROOT = Path(__file__).resolve().parent.parent
VGG = str(ROOT / "models_fixtures" / "vgg.onnx")
MLP = str(ROOT / "models_fixtures" / "mlp.onnx")


@pytest.fixture(scope="module")
def analyzer():
    return onnxlrp.LRP(VGG, onnxlrp.EpsilonGammaBox(-3.0, 3.0), verbose=False)


def make_images(folder, n, size=(40, 48), seed=0):
    """n random PNGs, every third in a subfolder (the listing is recursive)."""
    rng = np.random.default_rng(seed)
    (folder / "sub").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        where = folder / "sub" if i % 3 else folder
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(where / f"img{i}.png")
    return folder


def reference(analyzer, x, batch_size):
    """LRP.analyze on the same samples, in the same batches."""
    rel, out, sel = [], [], []
    for s in range(0, len(x), batch_size):
        e = analyzer.analyze(x[s:s + batch_size])
        rel.append(e.val), out.append(np.asarray(e.output).reshape(len(e.val), -1)), sel.append(e.output_selection)
    return np.concatenate(rel), np.concatenate(out), np.concatenate(sel)


def test_folder_of_images_equals_analyze(analyzer, tmp_path):
    src = make_images(tmp_path / "imgs", 23)
    (src / "sub" / "broken.png").write_bytes(b"not an image")
    (src / ".hidden.png").write_bytes(b"skipped")
    run = onnxlrp.explain_dataset(analyzer, source=str(src), out=tmp_path / "out", batch_size=4, shard_size=10)
    assert (run.items, run.shards, run.rows, run.errors, run.skipped) == (24, 3, 24, 1, 0)
    results = onnxlrp.load_results(tmp_path / "out")
    rows = results.rows
    names = [r["input"] for r in rows]
    assert names[0] == str(src / "img0.png") and str(src / "sub" / "broken.png") in names
    assert names.index(str(src / "sub" / "img2.png")) < names.index(str(src / "sub" / "img10.png"))  # natural order
    bad = names.index(str(src / "sub" / "broken.png"))
    assert rows[bad]["status"] == "error" and "not an image" in rows[bad]["error"]
    assert rows[bad]["class"] is None and np.isnan(results[bad]).all()  # never zeros that read as "no relevance"

    # the same inputs, decoded independently of the pipeline, through LRP.analyze in the same batches
    x = np.zeros((24, 3, 32, 32), np.float32)
    for i, name in enumerate(names):
        if i != bad:
            arr = normalize(load_image(name, (32, 32)), IMAGENET_MEAN, IMAGENET_STD)
            x[i] = arr.transpose(2, 0, 1)
    relevance = np.concatenate([results.relevance(k) for k in range(3)])
    for shard in range(3):
        lo, hi = shard * 10, min(shard * 10 + 10, 24)
        keep = [i for i in range(lo, hi) if i != bad]
        for s in range(lo, hi, 4):
            batch = [i for i in range(s, min(s + 4, hi)) if i != bad]
            e = analyzer.analyze(x[batch])
            np.testing.assert_array_equal(relevance[batch], e.val)
            out = np.asarray(e.output).reshape(len(batch), -1)
            for j, i in enumerate(batch):
                assert rows[i]["class"] == int(e.output_selection[j]) == rows[i]["predicted"] == int(out[j].argmax())
                assert rows[i]["score"] == pytest.approx(float(out[j].max()), rel=1e-6)
                assert rows[i]["relevance_sum"] == pytest.approx(float(e.val[j].sum(dtype=np.float64)), rel=1e-6)
        assert len(keep) == sum(r["status"] == "ok" for r in rows[lo:hi])
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["totals"] == {"rows": 24, "errors": 1}
    assert manifest["source"]["items"] == 24
    from onnxlrp.cache import content_hash
    assert manifest["model"]["sha256"] == content_hash(VGG)[0]  # taken from the cache's key, not read again


def test_arrays_and_parquet_sources(analyzer, tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rng = np.random.default_rng(1)
    batch = rng.standard_normal((5, 3, 32, 32)).astype(np.float32)
    np.save(tmp_path / "batch.npy", batch)
    np.save(tmp_path / "one.npy", batch[0] * 2)
    pngs = []
    for i in range(3):
        img = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
        img.save(tmp_path / f"p{i}.png")
        pngs.append((tmp_path / f"p{i}.png").read_bytes())
    pq.write_table(pa.table({"path": [f"cat/{i}.png" for i in range(3)], "image": pngs}), tmp_path / "img.parquet",
                   row_group_size=2)
    pq.write_table(pa.table({"x": [list(s.reshape(-1)) for s in batch[:2]]}), tmp_path / "arr.parquet")
    sources = [str(tmp_path / f) for f in ("batch.npy", "one.npy", "img.parquet", "arr.parquet")]
    run = onnxlrp.explain_dataset(analyzer, source=sources, out=tmp_path / "out", batch_size=3, shard_size=4,
                                  format="parquet")
    assert (run.items, run.errors) == (11, 0)
    results = onnxlrp.load_results(tmp_path / "out")
    names = [r["input"] for r in results.rows]
    assert names[:2] == [f"{sources[0]}#0", f"{sources[0]}#1"] and names[5] == sources[1]
    assert names[6:9] == ["cat/0.png", "cat/1.png", "cat/2.png"] and names[9] == f"{sources[3]}#0"
    images = np.stack([normalize(load_image(tmp_path / f"p{i}.png", (32, 32)), IMAGENET_MEAN,
                                 IMAGENET_STD).transpose(2, 0, 1) for i in range(3)])
    x = np.concatenate([batch, batch[:1] * 2, images, batch[:2]])
    got = np.stack([results[i] for i in range(11)])
    for lo in range(0, 11, 4):  # shards of 4, batches of 3 inside each
        for s in range(lo, min(lo + 4, 11), 3):
            e = min(s + 3, lo + 4, 11)
            np.testing.assert_array_equal(got[s:e], analyzer.analyze(x[s:e]).val)


def test_rerun_skips_finished_shards_and_refuses_another_run(analyzer, tmp_path):
    src = make_images(tmp_path / "imgs", 12)
    out = tmp_path / "out"
    first = onnxlrp.explain_dataset(analyzer, source=str(src), out=out, batch_size=5, shard_size=5)
    before = {p.name: p.read_bytes() for p in (out / "shards").iterdir()}
    again = onnxlrp.explain_dataset(analyzer, source=str(src), out=out, batch_size=5, shard_size=5)
    assert (first.rows, again.rows, again.skipped) == (12, 0, 3)
    (out / "shards" / "shard-00001.rows.json").unlink()  # as if the run had died writing shard 1
    third = onnxlrp.explain_dataset(analyzer, source=str(src), out=out, batch_size=5, shard_size=5)
    assert (third.rows, third.skipped) == (5, 2)
    assert {p.name: p.read_bytes() for p in (out / "shards").iterdir()} == before
    with pytest.raises(InputError, match="another configuration .*shard_size"):
        onnxlrp.explain_dataset(analyzer, source=str(src), out=out, batch_size=5, shard_size=4)
    other = onnxlrp.LRP(VGG, onnxlrp.EpsilonPlus(), verbose=False)
    with pytest.raises(InputError, match="another configuration .*rules"):
        onnxlrp.explain_dataset(other, source=str(src), out=out, batch_size=5, shard_size=5)
    make_images(src, 13)  # one more image: another dataset
    with pytest.raises(InputError, match="another configuration .*source"):
        onnxlrp.explain_dataset(analyzer, source=str(src), out=out, batch_size=5, shard_size=5)
    (out / "notes.txt").write_text("mine")
    replaced = onnxlrp.explain_dataset(analyzer, source=str(src), out=out, batch_size=5, shard_size=4, force=True)
    assert (replaced.rows, replaced.shards) == (13, 4)
    assert (out / "notes.txt").read_text() == "mine"  # --force removes only what a run writes
    assert sorted(p.name for p in (out / "shards").iterdir()) == sorted(
        f"shard-{k:05d}.{ext}" for k in range(4) for ext in ("npy", "rows.json"))


KILLED_RUN = """
import os, signal, sys
import onnxlrp
from onnxlrp.dataset import shards
commit = shards.ShardWriter.commit
def dying_commit(self):
    if self.k == 1:  # its relevance is in a temporary file: the process dies before the rename
        os.kill(os.getpid(), signal.SIGKILL)
    return commit(self)
shards.ShardWriter.commit = dying_commit
onnxlrp.explain_dataset(sys.argv[1], onnxlrp.EpsilonGammaBox(-3.0, 3.0), source=sys.argv[2], out=sys.argv[3],
                        batch_size=4, shard_size=6, verbose=False, progress=False)
"""


def test_killed_run_resumes_to_the_same_files(analyzer, tmp_path):
    src = make_images(tmp_path / "imgs", 20)
    killed = subprocess.run([sys.executable, "-c", KILLED_RUN, VGG, str(src), str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr
    shards_dir = tmp_path / "out" / "shards"
    left = sorted(p.name for p in shards_dir.iterdir())
    assert "shard-00000.rows.json" in left and not any(n.startswith("shard-00001") for n in left)
    assert any(n.startswith(".shard-00001") and n.endswith(".partial") for n in left)  # the temporary it left
    resumed = onnxlrp.explain_dataset(VGG, onnxlrp.EpsilonGammaBox(-3.0, 3.0), source=str(src), out=tmp_path / "out",
                                      batch_size=4, shard_size=6, verbose=False)
    assert (resumed.skipped, resumed.rows) == (1, 14)
    assert not any(p.name.endswith(".partial") for p in shards_dir.iterdir())
    clean = onnxlrp.explain_dataset(analyzer, source=str(src), out=tmp_path / "clean", batch_size=4, shard_size=6)
    assert clean.rows == 20
    for k in range(4):
        for name in (f"shard-{k:05d}.npy", f"shard-{k:05d}.rows.json"):
            assert (shards_dir / name).read_bytes() == (tmp_path / "clean" / "shards" / name).read_bytes(), name


def _peak_bytes(analyzer, src, out, shard_size):
    tracemalloc.start()
    try:
        onnxlrp.explain_dataset(analyzer, source=str(src), out=out, batch_size=8, shard_size=shard_size)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memory_does_not_grow_with_the_shard_or_the_dataset(analyzer, tmp_path):
    """The shard's relevance is streamed to its file batch by batch: 640 rows of 12 KiB in one shard (7.5 MiB
    if it were held) take the memory of 64 rows in one."""
    rng = np.random.default_rng(3)
    for name, n in (("small", 64), ("large", 640)):
        (tmp_path / name).mkdir()
        np.save(tmp_path / name / "x.npy", rng.standard_normal((n, 3, 32, 32)).astype(np.float32))
    _peak_bytes(analyzer, tmp_path / "small", tmp_path / "warm", 64)  # imports and first-call allocations
    small = _peak_bytes(analyzer, tmp_path / "small", tmp_path / "o1", 64)
    large = _peak_bytes(analyzer, tmp_path / "large", tmp_path / "o2", 640)
    assert large < small + 2 * 2 ** 20, (small, large)


def test_bad_sources_are_named(analyzer, tmp_path):
    np.save(tmp_path / "wrong.npy", np.zeros((2, 3, 16, 16), np.float32))
    with pytest.raises(InputError, match=r"wrong\.npy: shape \(2, 3, 16, 16\) does not fit .*\(3, 32, 32\)"):
        onnxlrp.explain_dataset(analyzer, source=str(tmp_path / "wrong.npy"), out=tmp_path / "o")
    np.save(tmp_path / "ints.npy", np.zeros((2, 3, 32, 32), np.int64))
    with pytest.raises(InputError, match=r"ints\.npy: dtype int64"):
        onnxlrp.explain_dataset(analyzer, source=str(tmp_path / "ints.npy"), out=tmp_path / "o")
    with pytest.raises(InputError, match="matches no files"):
        onnxlrp.explain_dataset(analyzer, source=str(tmp_path / "*.jpg"), out=tmp_path / "o")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="empty: the folder holds no images"):
        onnxlrp.explain_dataset(analyzer, source=str(tmp_path / "empty"), out=tmp_path / "o")
    # NaN in an array sample: its own error row, never NaN relevance passed off as a result
    x = np.zeros((3, 3, 32, 32), np.float32)
    x[1, 0, 0, 0] = np.nan
    np.save(tmp_path / "empty" / "nan.npy", x)
    run = onnxlrp.explain_dataset(analyzer, source=str(tmp_path / "empty"), out=tmp_path / "o")
    rows = onnxlrp.load_results(tmp_path / "o").rows
    assert run.errors == 1 and rows[1]["status"] == "error" and "NaN" in rows[1]["error"]
    # a shards folder someone replaced by a link is not written through
    target = tmp_path / "elsewhere"
    target.mkdir()
    (tmp_path / "linked").mkdir()
    os.symlink(target, tmp_path / "linked" / "shards")
    with pytest.raises(InputError, match="shards: is a symbolic link"):
        onnxlrp.explain_dataset(analyzer, source=str(tmp_path / "empty"), out=tmp_path / "linked")
    assert not list(target.iterdir())
    mlp = onnxlrp.LRP(MLP, verbose=False)
    make_images(tmp_path / "imgs", 2)
    with pytest.raises(InputError, match="is not an image"):
        onnxlrp.explain_dataset(mlp, source=str(tmp_path / "imgs"), out=tmp_path / "o3")


def test_parquet_columns_are_checked(analyzer, tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"label": [1, 2]}), tmp_path / "labels.parquet")
    with pytest.raises(InputError, match="labels.parquet: no column holds images or arrays .*label"):
        onnxlrp.explain_dataset(analyzer, source=str(tmp_path / "labels.parquet"), out=tmp_path / "o")
    with pytest.raises(InputError, match="has no column 'pixels'"):
        onnxlrp.explain_dataset(analyzer, source=str(tmp_path / "labels.parquet"), out=tmp_path / "o",
                                column="pixels")
    (tmp_path / "fake.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(InputError, match="fake.parquet: not a readable Parquet file"):
        onnxlrp.explain_dataset(analyzer, source=str(tmp_path / "fake.parquet"), out=tmp_path / "o")


def test_dynamic_size_needs_an_input_shape(tmp_path):
    import onnx
    model = onnx.load(str(ROOT / "models_fixtures" / "resnet.onnx"))
    for dim in model.graph.input[0].type.tensor_type.shape.dim[2:]:
        dim.dim_param = "size"
    lrp = onnxlrp.LRP(model, verbose=False)
    src = make_images(tmp_path / "imgs", 3, size=(50, 70))
    with pytest.raises(LRPError, match="dynamic dims .*input_shape"):
        onnxlrp.explain_dataset(lrp, source=str(src), out=tmp_path / "o")
    with pytest.raises(LRPError, match=r"input_shape \(3, 32\) does not fit"):
        onnxlrp.explain_dataset(lrp, source=str(src), out=tmp_path / "o", input_shape=(3, 32))
    run = onnxlrp.explain_dataset(lrp, source=str(src), out=tmp_path / "o", input_shape=(3, 40, 36))
    assert run.rows == 3 and onnxlrp.load_results(tmp_path / "o")[2].shape == (3, 40, 36)


def test_cli(tmp_path):
    src = make_images(tmp_path / "imgs", 7)
    args = ["explain-dataset", VGG, str(src), "--out", str(tmp_path / "out"), "--shard-size", "3", "-b", "2",
            "-c", "EpsilonGammaBox", "--low", "-3", "--high", "3", "--heatmaps", "--progress"]
    proc = subprocess.run([sys.executable, "-m", "onnxlrp", *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "7 inputs in 3 shards; explained 7" in proc.stdout
    assert "explain-dataset 7/7 rows (100%)" in proc.stderr and "rows/s ETA" in proc.stderr
    pictures = sorted((tmp_path / "out" / "heatmaps").rglob("*.png"))
    assert len(pictures) == 7 and Image.open(pictures[0]).size[1] >= 256  # drawn large enough to read
    assert main([*args, "--no-progress"], standalone_mode=False) == 0  # resumes: nothing left to do
    assert main([*args[:-2], "--shard-size", "4"], standalone_mode=False) == 1  # another configuration
    assert main(["explain-dataset", VGG, str(src), "--out", str(tmp_path / "o2"), "--workers", "2"],
                standalone_mode=False) == 2
    results = onnxlrp.load_results(tmp_path / "out")
    lrp = onnxlrp.LRP(VGG, onnxlrp.EpsilonGammaBox(-3.0, 3.0), verbose=False)
    prep = preprocessing_for(lrp)
    decoder = Decoder(prep)
    items = list_items([str(src)], prep)
    x = np.stack([decoder.sample(it) for it in items[3:5]])
    np.testing.assert_array_equal(results.relevance(1)[:2], lrp.analyze(x).val)
    assert OutputFolder(tmp_path / "out", "npy").is_done(2)


def test_ray_path_without_ray_says_what_to_install(analyzer, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if the extra were not installed
    src = make_images(tmp_path / "imgs", 2)
    with pytest.raises(LRPError, match=r"needs Ray Data \(pip install 'onnxlrp\[ray\]'\)"):
        onnxlrp.explain_dataset(analyzer, source=str(src), out=tmp_path / "o", ray="auto")


def test_cores_are_split_only_where_it_runs_faster(analyzer, tmp_path, monkeypatch):
    """The pipeline times itself with the analyzer's session and, where decoding is a large part of the work,
    with a session on fewer cores, and keeps the faster; the relevance is the same bit for bit either way."""
    from onnxlrp.dataset import pipeline
    split = pipeline.CoreSplit(analyzer, preprocessing_for(analyzer), 4)
    if not split.splittable:
        pytest.skip("one core: nothing to split")
    x = np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32)
    reference = analyzer.analyze(x).val
    clock = iter(np.arange(0.0, 100.0, 1.0))
    monkeypatch.setattr(pipeline.time, "perf_counter", lambda: float(next(clock)))
    # decoding as costly as the relevance on every core: a split is tried; here it runs faster (1 s a batch
    # against 2 s), so it stays
    for _ in range(1 + pipeline.TIMED_BATCHES):
        split(x, None)
        split.observe(4, 1e-3 * split.n, 4e-3)
        next(clock)  # the analyzer's session: 2 s per batch
    assert split._phase == "warm-split"
    for _ in range(1 + pipeline.TIMED_BATCHES):
        np.testing.assert_array_equal(split(x, None)[1], reference)  # the split session's relevance
        split.observe(4, 1e-3 * split.n, 4e-3)
    assert split._phase == "done" and split.chosen.startswith("onnxruntime on"), split.chosen
    np.testing.assert_array_equal(split(x, None)[1], reference)
    # decoding that costs next to nothing is not worth a trial
    cheap = pipeline.CoreSplit(analyzer, preprocessing_for(analyzer), 4)
    for _ in range(1 + pipeline.TIMED_BATCHES):
        cheap.observe(4, 1e-6, 4e-3)
    assert cheap._phase == "done" and "kept: decoding 0 %" in cheap.chosen


def test_a_whole_run_with_a_split_equals_analyze(analyzer, tmp_path, monkeypatch):
    from onnxlrp.dataset import pipeline
    monkeypatch.setattr(pipeline, "TIMED_BATCHES", 1)
    src = make_images(tmp_path / "imgs", 30)
    run = onnxlrp.explain_dataset(analyzer, source=str(src), out=tmp_path / "o", batch_size=3, shard_size=30)
    results = onnxlrp.load_results(tmp_path / "o")
    prep = preprocessing_for(analyzer)
    decoder = Decoder(prep)
    x = np.stack([decoder.sample(it) for it in list_items([str(src)], prep)])
    for s in range(0, 30, 3):
        np.testing.assert_array_equal(results.relevance(0)[s:s + 3], analyzer.analyze(x[s:s + 3]).val)
    assert run.backend


def test_output_folder_inside_the_source_is_not_read_back(analyzer, tmp_path):
    src = make_images(tmp_path / "imgs", 5)
    first = onnxlrp.explain_dataset(analyzer, source=str(src), out=src / "lrp", shard_size=2)
    again = onnxlrp.explain_dataset(analyzer, source=str(src), out=src / "lrp", shard_size=2)
    assert (first.items, again.items, again.skipped) == (5, 5, 3)  # its own shards are not new inputs


def test_parquet_nested_lists_nulls_and_large_row_groups(analyzer, tmp_path, monkeypatch):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    from onnxlrp.dataset import sources
    x = np.random.default_rng(5).standard_normal((3, 3, 32, 32)).astype(np.float32)
    nested = [s.tolist() for s in x[:2]] + [None]  # (3, 32, 32) nested lists, and a null
    pq.write_table(pa.table({"pixel_values": nested}), tmp_path / "nested.parquet")
    run = onnxlrp.explain_dataset(analyzer, source=str(tmp_path / "nested.parquet"), out=tmp_path / "o")
    results = onnxlrp.load_results(tmp_path / "o")
    assert run.errors == 1 and "value is null" in results.rows[2]["error"]
    np.testing.assert_array_equal(results.relevance(0)[:2], analyzer.analyze(x[:2]).val)
    monkeypatch.setattr(sources, "MAX_ROW_GROUP_BYTES", 1000)
    onnxlrp.explain_dataset(analyzer, source=str(tmp_path / "nested.parquet"), out=tmp_path / "o2")
    rows = onnxlrp.load_results(tmp_path / "o2").rows
    assert all(r["status"] == "error" and "over the limit of 1,000" in r["error"] for r in rows)
