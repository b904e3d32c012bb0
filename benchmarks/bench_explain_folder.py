#!/usr/bin/env python
"""``onnxlrp explain`` on a folder of small images vs the Python API on the same inputs, in one process.

N random RGB PNGs (default 1000) of the model's input size are written to a temporary folder and explained
under EpsilonGammaBox(-3, 3). The model is by default a small CNN built here with torch (input 3x64x64:
conv 16-16, pool, conv 32-32, pool, conv 64, pool, dense 256-10, ReLUs; seeded random weights, exported
with ``torch.onnx.export(dynamo=False)``); ``--model PATH`` takes any model whose input is an image
(e.g. models_fixtures/vgg.onnx, 3x32x32, whose relevance run is so cheap that writing the two PNGs per
image is most of the command's time). Phases:

  api         ``onnxlrp.LRP(model, EpsilonGammaBox(-3, 3)).analyze(x)`` on the inputs decoded beforehand
              (as the CLI decodes them), in batches of --batch-size; the analyzer is built before timing
  cli         ``onnxlrp explain MODEL FOLDER -c EpsilonGammaBox --low -3 --high 3 -b B -q`` called in this
              process (``cli.main(..., standalone_mode=False)``), timed as a whole: model loading, reading
              every image's header, decoding, the relevance runs, writing a heatmap and an overlay PNG per
              image and the table; the next batches decode on worker threads and the previous batch's files
              are written on another while onnxruntime runs the current one
  cli-seq     the same with the threads off (``onnxlrp.cli.explain.THREADED = False``): every step in
              turn, as before the prefetch

For each CLI phase the time spent inside the explain loop alone (decode, relevance, files) is reported as
well ("loop"); building the analyzer (load, canonize, emit, session) is timed on its own. The phases run
interleaved, --repeats times; the best and the median images/s are printed, and the ratio CLI / API of
each. Other jobs on the machine slow some repeats down: the best is the least disturbed.

Usage:
  python benchmarks/bench_explain_folder.py                  # small CNN, 1000 images, batch 32, 5 repeats
  python benchmarks/bench_explain_folder.py --model models_fixtures/vgg.onnx -n 200 --repeats 3
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
from onnxlrp.images import IMAGENET_MEAN, IMAGENET_STD, load_image, normalize, to_layout  # noqa: E402

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
    from PIL import Image
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        path = folder / f"img{i:04d}.png"
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def decoded_batches(paths, size, batch_size):
    """The model inputs the CLI makes of the images (resize, ImageNet normalization, NCHW), batched."""
    xs = np.stack([to_layout(normalize(load_image(p, size=size), IMAGENET_MEAN, IMAGENET_STD), "NCHW")
                   for p in paths])
    return [xs[i:i + batch_size] for i in range(0, len(xs), batch_size)]


def time_api(analyzer, batches):
    start = time.perf_counter()
    for x in batches:
        analyzer.analyze(x)
    return time.perf_counter() - start


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


def time_cli(model, folder, out, batch_size, threaded, n):
    """(whole command, explain loop) seconds of one ``onnxlrp explain`` run, with threads or without."""
    args = ["explain", str(model), str(folder), "-c", "EpsilonGammaBox", "--low", "-3", "--high", "3",
            "-b", str(batch_size), "-o", str(out), "-q"]
    saved = explain_module.THREADED
    explain_module.THREADED = threaded
    table = io.StringIO()
    try:
        with LoopTimer() as loop, contextlib.redirect_stdout(table):
            start = time.perf_counter()
            cli.main(args, standalone_mode=False)
            total = time.perf_counter() - start
    finally:
        explain_module.THREADED = saved
        shutil.rmtree(out, ignore_errors=True)
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
    args = ap.parse_args(argv)
    n, b = args.images, args.batch_size

    work = Path(tempfile.mkdtemp(prefix="onnxlrp-bench-explain-"))
    try:
        model = Path(args.model) if args.model else small_cnn(work / "small_cnn.onnx")
        size = image_size(model)
        folder = work / "images"
        folder.mkdir()
        paths = write_images(folder, n, size)
        batches = decoded_batches(paths, size, b)
        start = time.perf_counter()
        analyzer = onnxlrp.LRP(str(model), onnxlrp.EpsilonGammaBox(-3, 3), verbose=False, device="cpu")
        build = time.perf_counter() - start
        analyzer.analyze(batches[0])  # the first run plans onnxruntime's memory: not part of the throughput
        time_cli(model, folder, work / "warm", b, True, n)  # imports, caches

        phases = {"api": [], "cli": [], "cli loop": []}
        if not args.no_sequential:
            phases.update({"cli-seq": [], "cli-seq loop": []})
        for r in range(args.repeats):
            phases["api"].append(time_api(analyzer, batches))
            total, loop = time_cli(model, folder, work / f"out{r}", b, True, n)
            phases["cli"].append(total)
            phases["cli loop"].append(loop)
            if not args.no_sequential:
                total, loop = time_cli(model, folder, work / f"seq{r}", b, False, n)
                phases["cli-seq"].append(total)
                phases["cli-seq loop"].append(loop)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"{n} images {size[1]}x{size[0]}, {model.name if args.model else 'small CNN'}, EpsilonGammaBox(-3, 3), "
          f"batch {b}, {args.repeats} repeats; "
          f"building the analyzer took {build:.2f} s (not in 'api'; in 'cli', not in 'loop')")
    api_best, api_median = n / min(phases["api"]), n / statistics.median(phases["api"])
    print(f"{'phase':<14}{'best img/s':>12}{'median img/s':>14}{'best / api':>12}{'median / api':>14}")
    for name, seconds in phases.items():
        best, median = n / min(seconds), n / statistics.median(seconds)
        print(f"{name:<14}{best:>12.0f}{median:>14.0f}{best / api_best:>12.2f}{median / api_median:>14.2f}")


if __name__ == "__main__":
    main()
