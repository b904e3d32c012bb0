#!/usr/bin/env python
"""``onnxlrp explain`` on a folder of small images vs the Python API on the same inputs, in one process.

N random RGB PNGs (default 1000) of the model's input size (or --picture-size) are written to a temporary
folder and explained under EpsilonGammaBox(-3, 3). The model is by default a small CNN built here with
torch (input 3x64x64: conv 16-16, pool, conv 32-32, pool, conv 64, pool, dense 256-10, ReLUs; seeded random
weights, exported with ``torch.onnx.export(dynamo=False)``); ``--model PATH`` takes any model whose input
is an image (e.g. models_fixtures/vgg.onnx, 3x32x32, whose relevance run is so cheap that decoding and
writing the two PNGs per image are most of the command's time). Phases:

  api         ``onnxlrp.LRP(model, EpsilonGammaBox(-3, 3)).analyze(x)`` on the inputs decoded beforehand
              (as the CLI decodes them), in batches of --batch-size; the analyzer is built before timing
  cli         ``onnxlrp explain MODEL FOLDER -c EpsilonGammaBox --low -3 --high 3 -b B -q`` called in this
              process (``cli.main(..., standalone_mode=False)``), timed as a whole: model loading, reading
              every image's header, decoding, the relevance runs, writing a heatmap and an overlay PNG per
              image and the table. Pictures up to ONE_PYTHON_THREAD_PIXELS (64x64): the calling thread
              decodes the next batch and draws and writes the previous one while a thread beside it runs
              the current one; larger: the next batches decode on worker threads and the previous batch's
              pictures are drawn and written on another
  cli-threads (--both-designs, pictures up to 64x64) the same with the worker threads for them too
              (``ONE_PYTHON_THREAD_PIXELS = 0``)
  cli-1thread (--both-designs, larger pictures) the same with them decoded and written on the calling thread
  cli-1run    (--one-run) the worker threads, whatever the pictures' size, with one relevance run at a
              time (``RUNS_IN_FLIGHT = 1``): what two runs at once bring there
  cli-seq     the same with the threads off (``onnxlrp.cli.explain.THREADED = False``): every step in
              turn, as before the prefetch

For each CLI phase the time spent inside the explain loop alone (decode, relevance, files) is reported as
well ("loop"); building the analyzer (load, canonize, emit, session) is timed on its own. The phases run
interleaved, --repeats times; the best and the median images/s are printed, and the ratio CLI / API of
each. Other jobs on the machine slow some repeats down: the best is the least disturbed.

Then the bound the cores set: the CPU time per input of each step besides the relevance (decoding,
drawing, encoding, writing the files; each alone on one thread) and of the relevance itself (every
onnxruntime thread, on a session whose idle threads sleep, as the CLI's), and the best ratio CLI / API that
the cores allow if they never idle: wall time of the API / max(that, total CPU time / cores); and the best
one with those steps on one thread (as for small pictures, where they mostly hold the GIL): wall time of
the API / max(that, the steps' time, total CPU time / cores).

The outputs stay until the end, and ``--dir`` says where the images and outputs go: on this machine's disk
(ext4 without a journal) a new inode skips those deleted in the last 1-6 minutes, and after thousands of
deletions (a test run, an earlier benchmark) creating a file costs up to 1 ms of kernel time instead of
50-70 us; /dev/shm leaves the disk out.

Usage:
  python benchmarks/bench_explain_folder.py                  # small CNN, 1000 images, batch 32, 5 repeats
  python benchmarks/bench_explain_folder.py --model models_fixtures/vgg.onnx -n 200 --repeats 3
  python benchmarks/bench_explain_folder.py --dir /dev/shm --no-sequential --one-run
  python benchmarks/bench_explain_folder.py --dir /dev/shm --both-designs --picture-size 128 128 -n 500
"""
from __future__ import annotations

import argparse
import contextlib
import io
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import onnxlrp  # noqa: E402
from onnxlrp.cli.app import cli  # noqa: E402  (first: it registers the commands)
import onnxlrp.cli.explain as explain_module  # noqa: E402
from onnxlrp.dataset.pipeline import cores  # noqa: E402
from onnxlrp.images import (IMAGENET_MEAN, IMAGENET_STD, MAX_PICTURE_PIXELS, load_image_and_picture,  # noqa: E402
                            normalize, to_layout)

def small_cnn(path, size=64, seed=0):
    """Write the default model: a small VGG-like CNN for (N, 3, size, size) inputs, 10 classes."""
    import torch
    from torch import nn
    torch.manual_seed(seed)

    def conv(cin, cout):
        return [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU()]

    model = nn.Sequential(*conv(3, 16), *conv(16, 16), nn.MaxPool2d(2), *conv(16, 32), *conv(32, 32),
                          nn.MaxPool2d(2), *conv(32, 64), nn.MaxPool2d(2), nn.Flatten(),
                          nn.Linear(64 * (size // 8) ** 2, 256), nn.ReLU(), nn.Linear(256, 10)).eval()
    torch.onnx.export(model, torch.randn(1, 3, size, size), str(path), input_names=["input"],
                      output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                      opset_version=17, dynamo=False)
    return path


def image_size(model):
    """(H, W) of the model's NCHW image input."""
    import onnx
    dims = onnx.load(str(model), load_external_data=False).graph.input[0].type.tensor_type.shape.dim
    if len(dims) != 4 or dims[1].dim_value != 3 or not (dims[2].dim_value and dims[3].dim_value):
        raise SystemExit(f"{model}: the input must be (N, 3, H, W) with a fixed H and W")
    return dims[2].dim_value, dims[3].dim_value


def write_images(folder, n, size, seed=0):
    """n random RGB PNGs of ``size`` (H, W) in ``folder``."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        path = folder / f"img{i:04d}.png"
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def decode(path, size):
    """(model input, picture) of one image as the CLI decodes it: one decode for both, resize, ImageNet
    normalization, NCHW."""
    arr, picture = load_image_and_picture(path, size=size, channels=3, max_picture_pixels=MAX_PICTURE_PIXELS)
    return to_layout(normalize(arr, IMAGENET_MEAN, IMAGENET_STD), "NCHW").astype(np.float32), picture


def decoded_batches(paths, size, batch_size):
    """The model inputs the CLI makes of the images, batched."""
    xs = np.stack([decode(p, size)[0] for p in paths])
    return [xs[i:i + batch_size] for i in range(0, len(xs), batch_size)]


def time_api(analyzer, batches):
    """(wall seconds, CPU seconds of the whole process) of the API's relevance runs on ``batches``."""
    start, cpu = time.perf_counter(), time.process_time()
    for x in batches:
        analyzer.analyze(x)
    return time.perf_counter() - start, time.process_time() - cpu


def per_input_costs(analyzer, paths, size, picture_size, folder, batch_size, k=256):
    """CPU seconds per input of what the command does besides the relevance, each step on its own on this
    thread (the first ``k`` images): decoding (the model input and the picture, as the CLI decodes them),
    drawing the heatmap and the overlay (pixels, a batch at a time), encoding the two PNGs, and writing the two files into a
    fresh folder under ``folder`` (exclusive temporary file and rename, as every output is written)."""
    from onnxlrp.files import write_bytes
    from onnxlrp.heatmaps import heatmaps_and_overlays, reduce_channels
    from onnxlrp.png import encode_png
    paths = paths[:k]
    costs = {}

    def step(name, fn, items):  # this thread's CPU time: onnxruntime's threads, spinning after a run, are not
        start = time.thread_time()  # counted
        out = [fn(item) for item in items]
        costs[name] = (time.thread_time() - start) / len(items)
        return out

    decoded = step("decode", lambda p: decode(p, size), paths)
    rel = np.asarray(analyzer.analyze(np.stack([x for x, _ in decoded])).val)

    def draw(i):  # a batch of inputs from i on, as the CLI draws them
        heats, overlays = heatmaps_and_overlays(reduce_channels(rel[i:i + batch_size], "sum", axis=1),
                                                [p for _, p in decoded[i:i + batch_size]], 0.6,
                                                size=picture_size)
        return list(zip(heats, overlays))

    starts = range(0, len(paths), batch_size)
    pictures = [pair for pairs in step("draw", draw, starts) for pair in pairs]
    costs["draw"] *= len(starts) / len(paths)
    files = step("encode", lambda pair: [encode_png(a) for a in pair], pictures)
    out = folder / "files"
    out.mkdir()
    names = iter(range(2 * len(paths)))

    def write(data):
        for d in data:
            write_bytes(out / f"{next(names)}.png", d)

    step("write files", write, files)
    return costs


class LoopTimer:
    """Wraps ``_Run.explain_all`` to time the explain loop on its own (the rest of the command excluded)."""

    def __init__(self):
        self.seconds = None
        self.real = explain_module._Run.explain_all

    def __enter__(self):
        timer = self

        def explain_all(run, *args, **kwargs):
            start = time.perf_counter()
            try:
                return timer.real(run, *args, **kwargs)
            finally:
                timer.seconds = time.perf_counter() - start

        explain_module._Run.explain_all = explain_all
        return self

    def __exit__(self, *exc):
        explain_module._Run.explain_all = self.real


def time_cli(model, folder, out, batch_size, n, **settings):
    """(whole command, explain loop) seconds of one ``onnxlrp explain`` run; ``settings``: values of the
    explain module's constants for it (THREADED=False: without threads, RUNS_IN_FLIGHT=1: one relevance run
    at a time, ONE_PYTHON_THREAD_PIXELS=0: worker threads for the smallest pictures too)."""
    args = ["explain", str(model), str(folder), "-c", "EpsilonGammaBox", "--low", "-3", "--high", "3",
            "-b", str(batch_size), "-o", str(out), "-q"]
    saved = {name: getattr(explain_module, name) for name in settings}
    table = io.StringIO()
    try:
        for name, value in settings.items():
            setattr(explain_module, name, value)
        with LoopTimer() as loop, contextlib.redirect_stdout(table):
            start = time.perf_counter()
            cli.main(args, standalone_mode=False)
            total = time.perf_counter() - start
    finally:
        for name, value in saved.items():
            setattr(explain_module, name, value)
    # ``out`` stays until the end (see the module docstring: creating files right after thousands were
    # removed measures the disk, not onnxlrp)
    rows = table.getvalue().strip().splitlines()
    if len(rows) != n + 1:  # the header and one row per image
        raise SystemExit(f"onnxlrp explain printed {len(rows) - 1} rows for {n} images")
    return total, loop.seconds


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="an ONNX model with an (N, 3, H, W) input (default: a small "
                    "CNN built with torch, 3x64x64)")
    ap.add_argument("-n", "--images", type=int, default=1000, help="number of PNGs (default 1000)")
    ap.add_argument("-b", "--batch-size", type=int, default=32, help="batch size, the CLI's default 32")
    ap.add_argument("--repeats", type=int, default=5, help="interleaved repeats of every phase (default 5)")
    ap.add_argument("--no-sequential", action="store_true", help="skip the CLI run without threads")
    ap.add_argument("--one-run", action="store_true", help="also time the CLI on worker threads with one "
                    "relevance run at a time (RUNS_IN_FLIGHT = 1, ONE_PYTHON_THREAD_PIXELS = 0: 'cli-1run')")
    ap.add_argument("--both-designs", action="store_true", help="also time the CLI with the design it does not "
                    "choose for the pictures' size: worker threads ('cli-threads') or the calling thread "
                    "('cli-1thread')")
    ap.add_argument("--picture-size", type=int, nargs=2, metavar=("H", "W"), default=None,
                    help="the images' size (default: the model's input size; the CLI resizes them to it)")
    ap.add_argument("--dir", default=None, help="where the images and the outputs go (default: the system's "
                    "temporary folder; /dev/shm leaves the disk out)")
    args = ap.parse_args(argv)
    n, b = args.images, args.batch_size

    work = Path(tempfile.mkdtemp(prefix="onnxlrp-bench-explain-", dir=args.dir))
    try:
        model = Path(args.model) if args.model else small_cnn(work / "small_cnn.onnx")
        size = image_size(model)
        picture = tuple(args.picture_size) if args.picture_size else size
        folder = work / "images"
        folder.mkdir()
        paths = write_images(folder, n, picture)
        batches = decoded_batches(paths, size, b)
        start = time.perf_counter()
        analyzer = onnxlrp.LRP(str(model), onnxlrp.EpsilonGammaBox(-3, 3), verbose=False, device="cpu")
        build = time.perf_counter() - start
        analyzer.analyze(batches[0])  # the first run plans onnxruntime's memory: not part of the throughput
        time_cli(model, folder, work / "warm", b, n)  # imports, caches

        costs = per_input_costs(analyzer, paths, size, picture, work, b)
        # the CPU time the relevance needs: a session whose idle threads sleep (the CLI's) spends less of it
        # than the spinning one the API's throughput is timed with
        sleeping = onnxlrp.LRP(str(model), onnxlrp.EpsilonGammaBox(-3, 3), verbose=False, device="cpu",
                               spinning=False)
        sleeping.analyze(batches[0])
        needed_cpu = time_api(sleeping, batches)[1]
        del sleeping

        phases = {"api": [], "cli": [], "cli loop": []}
        if args.one_run:
            phases.update({"cli-1run": [], "cli-1run loop": []})
        one_thread = picture[0] * picture[1] <= explain_module.ONE_PYTHON_THREAD_PIXELS
        other = ("cli-threads", {"ONE_PYTHON_THREAD_PIXELS": 0}) if one_thread else (
            "cli-1thread", {"ONE_PYTHON_THREAD_PIXELS": picture[0] * picture[1]})
        if args.both_designs:
            phases.update({other[0]: [], f"{other[0]} loop": []})
        if not args.no_sequential:
            phases.update({"cli-seq": [], "cli-seq loop": []})
        api_cpu = []
        for r in range(args.repeats):
            wall, cpu = time_api(analyzer, batches)
            phases["api"].append(wall)
            api_cpu.append(cpu)
            variants = [("cli", {})]
            if args.one_run:
                variants.append(("cli-1run", {"RUNS_IN_FLIGHT": 1, "ONE_PYTHON_THREAD_PIXELS": 0}))
            if args.both_designs:
                variants.append(other)
            if not args.no_sequential:
                variants.append(("cli-seq", {"THREADED": False}))
            for name, settings in variants:
                total, loop = time_cli(model, folder, work / f"{name}{r}", b, n, **settings)
                phases[name].append(total)
                phases[f"{name} loop"].append(loop)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"{n} images {picture[1]}x{picture[0]}, {model.name if args.model else 'small CNN'} "
          f"({size[1]}x{size[0]}), EpsilonGammaBox(-3, 3), "
          f"batch {b}, {args.repeats} repeats; "
          f"building the analyzer took {build:.2f} s (not in 'api'; in 'cli', not in 'loop'); 'cli' "
          + ("decodes and writes on the calling thread, the relevance beside it" if one_thread
             else "decodes and writes on worker threads"))
    api_best, api_median = n / min(phases["api"]), n / statistics.median(phases["api"])
    print(f"{'phase':<18}{'best img/s':>12}{'median img/s':>14}{'best / api':>12}{'median / api':>14}")
    for name, seconds in phases.items():
        best, median = n / min(seconds), n / statistics.median(seconds)
        print(f"{name:<18}{best:>12.0f}{median:>14.0f}{best / api_best:>12.2f}{median / api_median:>14.2f}")

    # The bound: the cores can at best run the relevance (the CPU time it takes with idle threads asleep,
    # every onnxruntime thread counted) and the command's other work at once, with nothing idle.
    wall, spinning = statistics.median(phases["api"]) / n * 1e3, statistics.median(api_cpu) / n * 1e3
    needed, extra = needed_cpu / n * 1e3, sum(costs.values()) * 1e3
    print(f"per input, ms of CPU: relevance {needed:.3f} with idle threads asleep ({spinning:.3f} spinning, "
          f"{wall:.3f} of wall time), " + ", ".join(f"{name} {sec * 1e3:.3f}" for name, sec in costs.items())
          + f"; the others {extra:.3f}")
    n_cores = cores()
    bound = wall / max(wall, (needed + extra) / n_cores)
    one_thread_bound = wall / max(wall, extra, (needed + extra) / n_cores)
    print(f"bound on {n_cores} cores with every core busy: cli / api <= {bound:.2f}; with the steps besides the "
          f"relevance on one thread: <= {one_thread_bound:.2f}")


if __name__ == "__main__":
    main()
