"""explain_dataset on a local Ray cluster (2 CPUs): the actors, each with one session on the exported relevance
graph, write the very files the local pipeline writes, and a run cut short resumes on Ray. Skipped without
the 'ray' extra."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")

import onnxlrp  # noqa: E402

from .test_dataset import make_images  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
VGG = str(ROOT / "models_fixtures" / "vgg.onnx")


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=256 * 2 ** 20,
             configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def analyzer():
    return onnxlrp.LRP(VGG, onnxlrp.EpsilonGammaBox(-3.0, 3.0), verbose=False)


def _files(folder):
    return {p.name: p.read_bytes() for p in sorted((folder / "shards").iterdir())}


def test_ray_writes_the_local_pipelines_files(cluster, analyzer, tmp_path):
    src = make_images(tmp_path / "imgs", 17)
    (src / "broken.png").write_bytes(b"not an image")
    local = onnxlrp.explain_dataset(analyzer, source=str(src), out=tmp_path / "local", batch_size=4, shard_size=5)
    on_ray = onnxlrp.explain_dataset(analyzer, source=str(src), out=tmp_path / "ray", batch_size=4, shard_size=5,
                                     ray="auto", workers=2)
    assert (on_ray.rows, on_ray.errors, on_ray.shards) == (local.rows, local.errors, local.shards) == (18, 1, 4)
    assert _files(tmp_path / "ray") == _files(tmp_path / "local")
    # and both are LRP.analyze on the same inputs
    results = onnxlrp.load_results(tmp_path / "ray")
    from onnxlrp.dataset.sources import Decoder, list_items, preprocessing_for
    prep = preprocessing_for(analyzer)
    items = list_items([str(src)], prep)
    decoder = Decoder(prep)
    x = np.stack([decoder.sample(it) for it in items[5:9]])
    np.testing.assert_array_equal(results.relevance(1)[:4], analyzer.analyze(x).val)


def test_ray_resumes_a_run_cut_short(cluster, analyzer, tmp_path):
    src = make_images(tmp_path / "imgs", 16)
    clean = tmp_path / "clean"
    onnxlrp.explain_dataset(analyzer, source=str(src), out=clean, batch_size=3, shard_size=4, format="parquet")
    out = tmp_path / "out"
    onnxlrp.explain_dataset(analyzer, source=str(src), out=out, batch_size=3, shard_size=4, format="parquet")
    for k in (1, 3):  # as if the run had died before these shards were written
        (out / "shards" / f"shard-{k:05d}.parquet").unlink()
    (out / "shards" / ".shard-00001.parquet.x.partial").write_bytes(b"half a file")
    resumed = onnxlrp.explain_dataset(analyzer, source=str(src), out=out, batch_size=3, shard_size=4,
                                      format="parquet", ray="auto")
    assert (resumed.skipped, resumed.rows) == (2, 8)
    assert _files(out) == _files(clean)
