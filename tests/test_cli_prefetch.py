"""``onnxlrp explain`` decodes the next batches on worker threads and writes the previous batch's files on
another while onnxruntime runs, or, for pictures up to ONE_PYTHON_THREAD_PIXELS, decodes and writes on the
calling thread while the relevance runs on a thread beside it: the results are those of the sequential loop
and of the Python API, the prefetch stays bounded, and Ctrl-C leaves no thread behind."""
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

from .test_cli_pictures import _interrupt_on_call

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


DESIGNS = ["worker threads", "one Python thread"]


def _design(monkeypatch, design):
    """"worker threads": the loader and writer threads for the tests' 32x32 pictures too (they are below
    ONE_PYTHON_THREAD_PIXELS, which keeps that work on the calling thread)."""
    if design == "worker threads":
        monkeypatch.setattr(explain_module, "ONE_PYTHON_THREAD_PIXELS", 0)


@pytest.fixture
def worker_threads(monkeypatch):
    _design(monkeypatch, "worker threads")


def _threads_calling(monkeypatch, name):
    """The names of the threads that call the explain module's function ``name`` (a set, filled as they do)."""
    threads, real = set(), getattr(explain_module, name)

    def recorded(*args, **kwargs):
        threads.add(threading.current_thread().name)
        return real(*args, **kwargs)

    monkeypatch.setattr(explain_module, name, recorded)
    return threads


def _explain(folder, out, capsys, *extra):
    code = main(["explain", VGG, str(folder), *EGB, "--out", str(out), "-b", "3", "--save-npy", "--json", "-q",
                 *extra], standalone_mode=False)
    return code, json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("design", DESIGNS)
def test_threaded_results_equal_the_sequential_loop_and_the_api(tmp_path, monkeypatch, capsys, design):
    _design(monkeypatch, design)
    folder = _folder(tmp_path)
    loaders, writers = _threads_calling(monkeypatch, "_load_sample"), _threads_calling(monkeypatch, "save_png")
    runs = _watch_runs(monkeypatch)
    code, threaded = _explain(folder, tmp_path / "threaded", capsys)
    assert code == 1  # one input is an error row
    if design == "worker threads":  # decoded and written off the main thread
        assert loaders and all(name.startswith("onnxlrp-load") for name in loaders)
        assert writers and all(name.startswith("onnxlrp-write") for name in writers)
    else:  # decoded and written on it, the relevance beside it
        assert loaders == writers == {threading.main_thread().name}
        assert runs["threads"] == {"onnxlrp-run_0"} and runs["peak"] == 1

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


def test_the_prefetch_is_bounded(tmp_path, monkeypatch, capsys, worker_threads):
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


@pytest.mark.parametrize("design", DESIGNS)
@pytest.mark.parametrize("when", [1, 3])
def test_ctrl_c_cancels_the_loads_and_leaves_no_thread(tmp_path, monkeypatch, capsys, when, design):
    """Ctrl-C reaches the main thread while it waits for batch ``when``'s relevance (two runs may be under
    way): the batches before it are written and reported, the others not, and no thread is left."""
    _design(monkeypatch, design)
    folder = _folder(tmp_path, n=10)
    (folder / CORRUPT).unlink()
    _interrupt_on_call(monkeypatch, when)
    code = main(["explain", VGG, str(folder), "--out", str(tmp_path / "o"), "-b", "2", "--json", "-q"],
                standalone_mode=False)
    assert code == 130
    doc = json.loads(capsys.readouterr().out)
    explained = 2 * (when - 1)  # the batches handed over to the writer before it: written and reported
    assert [Path(r["input"]).name for r in doc["results"]] == [f"img{i:02d}.png" for i in range(explained)]
    assert not [t.name for t in threading.enumerate() if t.name.startswith("onnxlrp-")]
    written = sorted(p.name for p in (tmp_path / "o").iterdir()) if explained else []
    assert written == sorted(f"img{i:02d}_{k}.png" for i in range(explained) for k in ("heatmap", "overlay"))


@pytest.mark.parametrize("design", DESIGNS)
def test_an_error_in_a_relevance_run_leaves_no_thread(tmp_path, monkeypatch, capsys, design):
    """A run that fails on its own thread fails the command as on the main thread (its one-line error), the
    other run under way is waited for, and no thread is left."""
    _design(monkeypatch, design)
    folder = _folder(tmp_path, n=10)
    (folder / CORRUPT).unlink()
    from onnxlrp.analyzer import LRP
    real, calls = LRP.analyze, []

    def analyze(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("onnxruntime failed")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(LRP, "analyze", analyze)
    code = main(["explain", VGG, str(folder), "--out", str(tmp_path / "o"), "-b", "2", "-q"], standalone_mode=False)
    assert code == 1
    assert "RuntimeError: onnxruntime failed" in capsys.readouterr().err
    assert not [t.name for t in threading.enumerate() if t.name.startswith("onnxlrp-")]


def _watch_runs(monkeypatch, wait_in_call=None, seconds=0.0):
    """Wrap LRP.analyze to record how many runs are under way at once and on which threads. Run number
    ``wait_in_call`` waits (up to 10 s) for the next to start, so that a loop that runs one batch at a time
    is seen as such instead of by chance; every run takes at least ``seconds``."""
    from onnxlrp.analyzer import LRP
    real, lock, next_started = LRP.analyze, threading.Lock(), threading.Event()
    seen = {"active": 0, "peak": 0, "calls": 0, "threads": set()}

    def analyze(self, *args, **kwargs):
        with lock:
            seen["active"] += 1
            seen["calls"] += 1
            seen["peak"] = max(seen["peak"], seen["active"])
            seen["threads"].add(threading.current_thread().name)
            call = seen["calls"]
        if wait_in_call is not None and call == wait_in_call + 1:
            next_started.set()
        try:
            if call == wait_in_call:
                next_started.wait(10)
            time.sleep(seconds)
            return real(self, *args, **kwargs)
        finally:
            with lock:
                seen["active"] -= 1

    monkeypatch.setattr(LRP, "analyze", analyze)
    return seen


def test_small_batches_run_two_at_once(tmp_path, monkeypatch, capsys, worker_threads):
    """Batches of small inputs on the CPU: RUNS_IN_FLIGHT relevance runs at once, on threads of their own, and
    the results are those of one run at a time (the rows and the files' bytes)."""
    folder = _folder(tmp_path)
    monkeypatch.setattr(explain_module._Run, "onnxruntime_sets_the_pace", lambda self: True)
    seen = _watch_runs(monkeypatch, wait_in_call=1)
    code, overlapped = _explain(folder, tmp_path / "overlapped", capsys)
    assert code == 1  # the corrupt input's row
    assert seen["peak"] == explain_module.RUNS_IN_FLIGHT == 2
    assert all(name.startswith("onnxlrp-run") for name in seen["threads"])

    monkeypatch.setattr(explain_module, "RUNS_IN_FLIGHT", 1)
    seen = _watch_runs(monkeypatch)
    code, alone = _explain(folder, tmp_path / "alone", capsys)
    assert code == 1 and seen["peak"] == 1
    assert (json.loads(json.dumps(overlapped["results"]).replace(str(tmp_path / "overlapped"), "OUT"))
            == json.loads(json.dumps(alone["results"]).replace(str(tmp_path / "alone"), "OUT")))
    written = sorted(p.name for p in (tmp_path / "overlapped").iterdir())
    assert written == sorted(p.name for p in (tmp_path / "alone").iterdir()) and len(written) == 30
    for name in written:
        assert (tmp_path / "overlapped" / name).read_bytes() == (tmp_path / "alone" / name).read_bytes(), name


def test_profile_counts_overlapping_runs_once(tmp_path, monkeypatch, capsys, worker_threads):
    """--profile's relevance time is the time some run was under way: with two runs at once it stays
    within the loop's time (their sum would not: 4 runs of 0.3 s, two at a time, in a loop of ~0.7 s)."""
    import re
    folder = _folder(tmp_path)
    monkeypatch.setattr(explain_module._Run, "onnxruntime_sets_the_pace", lambda self: True)
    seen = _watch_runs(monkeypatch, wait_in_call=1, seconds=0.3)
    code = main(["explain", VGG, str(folder), "--out", str(tmp_path / "o"), "-b", "3", "-q", "--profile"],
                standalone_mode=False)
    assert code == 1 and seen["peak"] == 2 and seen["calls"] == 4
    found = re.search(r"inputs in ([\d.]+) s .*relevance runs ([\d.]+) s \((\d+)%\)", capsys.readouterr().err)
    assert found, "no profile line"
    loop, runs, share = float(found[1]), float(found[2]), int(found[3])
    assert 0.5 <= runs <= loop and share <= 100


def test_two_runs_only_while_onnxruntime_sets_the_pace(tmp_path, monkeypatch, capsys, worker_threads):
    """The first batches run one at a time and measure the pace: while a run takes longer than the writer's
    work on a batch, the next batches run two at once; while the writer is the slower, one at a time (a
    second run would take its cores)."""
    folder = _folder(tmp_path, n=15)
    seen = _watch_runs(monkeypatch, wait_in_call=3, seconds=0.2)  # slow runs
    assert _explain(folder, tmp_path / "slow_runs", capsys)[0] == 1
    assert seen["peak"] == 2 and seen["calls"] == 5

    real = explain_module.save_png

    def slow_save(*args):
        time.sleep(0.05)
        return real(*args)

    monkeypatch.setattr(explain_module, "save_png", slow_save)  # a slow writer
    seen = _watch_runs(monkeypatch)
    assert _explain(folder, tmp_path / "slow_writer", capsys)[0] == 1
    assert seen["peak"] == 1 and seen["calls"] == 5


def test_large_batches_run_alone(tmp_path, monkeypatch, capsys, worker_threads):
    """A batch of more than OVERLAP_INPUT_ELEMENTS values runs with no other beside it (two would hold two
    batches' activations); the sequential loop, too, runs one at a time on the calling thread."""
    folder = _folder(tmp_path)
    monkeypatch.setattr(explain_module._Run, "onnxruntime_sets_the_pace", lambda self: True)
    monkeypatch.setattr(explain_module, "OVERLAP_INPUT_ELEMENTS", 2 * 3 * 32 * 32)  # batches of 3 are larger
    seen = _watch_runs(monkeypatch)
    assert _explain(folder, tmp_path / "large", capsys)[0] == 1
    assert seen["peak"] == 1 and seen["calls"] == 4

    monkeypatch.setattr(explain_module, "OVERLAP_INPUT_ELEMENTS", 1 << 20)
    monkeypatch.setattr(explain_module, "THREADED", False)
    seen = _watch_runs(monkeypatch)
    assert _explain(folder, tmp_path / "sequential", capsys)[0] == 1
    assert seen["peak"] == 1 and seen["threads"] == {threading.main_thread().name}


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


def test_small_pictures_decode_while_the_relevance_runs_beside_them(tmp_path, monkeypatch, capsys):
    """Pictures up to ONE_PYTHON_THREAD_PIXELS: the calling thread decodes the next batch while the current
    one's relevance runs on its own thread (one run at a time), so the two overlap; one larger image in the
    folder (its picture, not the model's input, is what counts) brings the worker threads back."""
    folder = _folder(tmp_path)
    (folder / CORRUPT).unlink()
    seen = _watch_runs(monkeypatch, seconds=0.1)
    during_run, real_load = [], explain_module._Run._load

    def load(self, batch, stop):
        during_run.append(seen["active"])
        return real_load(self, batch, stop)

    monkeypatch.setattr(explain_module._Run, "_load", load)
    assert _explain(folder, tmp_path / "small", capsys)[0] == 0
    assert seen["peak"] == 1 and seen["calls"] == 4 and seen["threads"] == {"onnxlrp-run_0"}
    assert during_run[0] == 0 and all(during_run[1:])  # every load after the first beside a run

    side = int(explain_module.ONE_PYTHON_THREAD_PIXELS ** 0.5) + 1
    Image.fromarray(np.zeros((side, side, 3), np.uint8)).save(folder / "img99.png")
    loaders = _threads_calling(monkeypatch, "_load_sample")
    assert _explain(folder, tmp_path / "one_larger", capsys)[0] == 0
    assert loaders and all(name.startswith("onnxlrp-load") for name in loaders)


def test_small_arrays_load_on_the_calling_thread(tmp_path, monkeypatch, capsys):
    """.npy inputs count their heatmap's pixels (values over the channels): 3x32x32 arrays are small, and
    load on the calling thread while the relevance runs beside it."""
    folder = tmp_path / "arrays"
    folder.mkdir()
    rng = np.random.default_rng(3)
    for i in range(4):
        np.save(folder / f"x{i}.npy", rng.standard_normal((3, 32, 32)).astype(np.float32))
    loaders = _threads_calling(monkeypatch, "_load_sample")
    seen = _watch_runs(monkeypatch)
    assert main(["explain", VGG, str(folder), *EGB, "--out", str(tmp_path / "o"), "-b", "2", "-q"],
                standalone_mode=False) == 0
    assert loaders == {threading.main_thread().name} and seen["threads"] == {"onnxlrp-run_0"}
    monkeypatch.setattr(explain_module, "ONE_PYTHON_THREAD_PIXELS", 32 * 32 - 1)
    loaders.clear()
    assert main(["explain", VGG, str(folder), *EGB, "--out", str(tmp_path / "o2"), "-b", "2", "-q"],
                standalone_mode=False) == 0
    assert loaders and all(name.startswith("onnxlrp-load") for name in loaders)
