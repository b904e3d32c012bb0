"""``onnxlrp explain`` decodes the next batches on worker threads and writes the previous batch's files on
another while onnxruntime runs: the results are those of the sequential loop and of the Python API, the
prefetch stays bounded, and Ctrl-C leaves no thread behind."""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import onnxlrp
from onnxlrp.cli import main
import onnxlrp.cli.app  # first: importing the explain module alone is circular
from onnxlrp.images import IMAGENET_MEAN, IMAGENET_STD, load_image, normalize

import onnxlrp.cli.explain as explain_module

ROOT = Path(__file__).resolve().parent.parent
VGG = str(ROOT / "models_fixtures" / "vgg.onnx")
EGB = ["--composite", "EpsilonGammaBox", "--low", "-3", "--high", "3"]
CORRUPT = "img04.png"


def _folder(tmp_path, n=11):
    """n random 32x32 PNGs; the fifth (in the middle of the second batch of 3) truncated: its header reads,
    its pixels do not decode."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(12)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"img{i:02d}.png")
    data = (folder / CORRUPT).read_bytes()
    (folder / CORRUPT).write_bytes(data[: len(data) // 2])
    return folder


def _explain(folder, out, capsys, *extra):
    code = main(["explain", VGG, str(folder), *EGB, "--out", str(out), "-b", "3", "--save-npy", "--json", "-q",
                 *extra], standalone_mode=False)
    return code, json.loads(capsys.readouterr().out)


def test_threaded_results_equal_the_sequential_loop_and_the_api(tmp_path, monkeypatch, capsys):
    folder = _folder(tmp_path)
    loaders = set()
    real_load = explain_module._load_sample

    def load_sample(*args, **kwargs):
        loaders.add(threading.current_thread().name)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(explain_module, "_load_sample", load_sample)
    code, threaded = _explain(folder, tmp_path / "threaded", capsys)
    assert code == 1  # one input is an error row
    assert loaders and all(name.startswith("onnxlrp-load") for name in loaders)  # decoded off the main thread

    monkeypatch.setattr(explain_module, "THREADED", False)
    loaders.clear()
    code, sequential = _explain(folder, tmp_path / "sequential", capsys)
    assert code == 1 and loaders == {threading.main_thread().name}

    names = sorted(p.name for p in folder.iterdir())
    rows = threaded["results"]
    assert [Path(r["input"]).name for r in rows] == names  # input order, the error row in its place
    assert [r["status"] for r in rows] == ["error" if n == CORRUPT else "ok" for n in names]
    assert rows[4]["error"].startswith("cannot decode the image")
    assert threaded["interrupted"] is False and threaded["inputs"] == len(names)

    def relative(doc, out):
        return json.loads(json.dumps(doc["results"]).replace(str(out), "OUT"))

    assert relative(threaded, tmp_path / "threaded") == relative(sequential, tmp_path / "sequential")
    written = sorted(p.name for p in (tmp_path / "threaded").iterdir())
    assert written == sorted(p.name for p in (tmp_path / "sequential").iterdir())
    assert written == sorted(f"{Path(n).stem}_{kind}" for n in names if n != CORRUPT
                             for kind in ("heatmap.png", "overlay.png", "relevance.npy"))
    for name in written:  # the same bytes
        assert (tmp_path / "threaded" / name).read_bytes() == (tmp_path / "sequential" / name).read_bytes(), name

    good = [n for n in names if n != CORRUPT]
    x = np.stack([normalize(load_image(folder / n, size=(32, 32)), IMAGENET_MEAN, IMAGENET_STD).transpose(2, 0, 1)
                  for n in good])
    expl = onnxlrp.LRP(VGG, onnxlrp.EpsilonGammaBox(-3, 3), verbose=False, device="cpu").analyze(x)
    for i, n in enumerate(good):
        saved = np.load(tmp_path / "threaded" / f"{Path(n).stem}_relevance.npy")
        np.testing.assert_allclose(saved, expl.val[i], rtol=1e-4, atol=1e-6)
        row = next(r for r in rows if Path(r["input"]).name == n)
        assert row["predicted"] == int(np.argmax(expl.output[i]))


def test_the_prefetch_is_bounded(tmp_path, monkeypatch, capsys):
    """With a slow relevance run the loaders would run to the end of the folder; they stay
    PREFETCH_BATCHES batches ahead of the run (and get there, so the test sees a prefetch)."""
    folder = _folder(tmp_path, n=10)
    (folder / CORRUPT).unlink()
    bound = explain_module.PREFETCH_BATCHES
    lock, started, explained, at_start, during_run = threading.Lock(), [0], [0], [], []
    real_load, real_relevance = explain_module._Run._load, explain_module._Run._relevance

    def load(self, batch, stop):
        with lock:
            started[0] += 1
            at_start.append(started[0] - explained[0])
        return real_load(self, batch, stop)

    def relevance(self, items):
        with lock:
            explained[0] += 1
        deadline = time.monotonic() + 0.2  # time for the loads queued by now to start, and for any more
        while time.monotonic() < deadline and started[0] < min(explained[0] + bound, 9):
            time.sleep(0.005)
        time.sleep(0.02)
        with lock:
            during_run.append(started[0] - explained[0])
        return real_relevance(self, items)

    monkeypatch.setattr(explain_module._Run, "_load", load)
    monkeypatch.setattr(explain_module._Run, "_relevance", relevance)
    code = main(["explain", VGG, str(folder), "--out", str(tmp_path / "o"), "-b", "1", "-q"],
                standalone_mode=False)
    assert code == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 1 + 9
    assert started[0] == explained[0] == 9
    assert max(during_run) == bound  # batches loading or loaded beyond the one onnxruntime runs
    # a load may start as the run moves on to the next batch, before that run is counted
    assert max(at_start) <= bound + 1


@pytest.mark.parametrize("when", [1, 3])
def test_ctrl_c_cancels_the_loads_and_leaves_no_thread(tmp_path, monkeypatch, capsys, when):
    folder = _folder(tmp_path, n=10)
    (folder / CORRUPT).unlink()
    from onnxlrp.analyzer import LRP
    real, calls = LRP.analyze, []

    def analyze(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == when:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(LRP, "analyze", analyze)
    code = main(["explain", VGG, str(folder), "--out", str(tmp_path / "o"), "-b", "2", "--json", "-q"],
                standalone_mode=False)
    assert code == 130
    doc = json.loads(capsys.readouterr().out)
    explained = 2 * (when - 1)  # the batches whose relevance run finished: written and reported
    assert [Path(r["input"]).name for r in doc["results"]] == [f"img{i:02d}.png" for i in range(explained)]
    assert not [t.name for t in threading.enumerate() if t.name.startswith("onnxlrp-")]
    written = sorted(p.name for p in (tmp_path / "o").iterdir()) if explained else []
    assert written == sorted(f"img{i:02d}_{k}.png" for i in range(explained) for k in ("heatmap", "overlay"))


def test_onnxruntime_sleeps_when_idle_only_where_the_threads_run_beside_it(tmp_path, monkeypatch, capsys):
    """More inputs than a batch, threaded: the analyzer's onnxruntime threads sleep when idle (its decoding
    and writing threads need the cores); one batch, or the sequential loop: they spin, as by default."""
    folder = _folder(tmp_path)
    seen, real = [], explain_module.load_analyzer

    def load_analyzer(*args, **kwargs):
        seen.append(kwargs.get("spinning"))
        return real(*args, **kwargs)

    monkeypatch.setattr(explain_module, "load_analyzer", load_analyzer)
    _explain(folder, tmp_path / "threaded", capsys)
    main(["explain", VGG, *EGB, str(folder / "img00.png"), "--out", str(tmp_path / "one"), "-q"],
         standalone_mode=False)
    capsys.readouterr()
    monkeypatch.setattr(explain_module, "THREADED", False)
    _explain(folder, tmp_path / "sequential", capsys)
    assert seen == [False, True, True]
