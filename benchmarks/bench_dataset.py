"""explain_dataset's throughput against a plain analyze loop, in one process, on the same images.

    python benchmarks/bench_dataset.py [--images 10000] [--ray]

The images are random PNGs (48x48, resized to the 32x32 VGG fixture's input) written to a temporary folder.
Three ways to explain them all, each writing the relevance to disk:

  loop      the loop a user writes: for each batch, decode its images (onnxlrp.images, one after another),
            LRP.analyze, np.save the batch's relevance (the baseline of the target)
  loop1     the same one image at a time (a script without batching; on the first 2000 images)
  pipeline  explain_dataset on this machine (decoding on worker threads beside the relevance runs, a writer
            thread, shards of 1024)
  ray       explain_dataset(ray="local") on a new 2-CPU Ray cluster here (actor start-up included)

It prints images/s for each and the ratios pipeline/loop and ray/pipeline.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import onnxlrp  # noqa: E402
from onnxlrp.images import IMAGENET_MEAN, IMAGENET_STD, load_image, normalize  # noqa: E402

MODEL = str(ROOT / "models_fixtures" / "vgg.onnx")


def make_images(folder, n):
    from PIL import Image
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(folder / f"img{i:05d}.png",
                                                                               compress_level=1)


def plain_loop(lrp, paths, out, batch_size):
    out.mkdir()
    for b, s in enumerate(range(0, len(paths), batch_size)):
        x = np.stack([normalize(load_image(p, (32, 32)), IMAGENET_MEAN, IMAGENET_STD).transpose(2, 0, 1)
                      for p in paths[s:s + batch_size]])
        np.save(out / f"batch{b:05d}.npy", lrp.analyze(x).val)


def timed(fn):
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=10000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--ray", action="store_true", help="also time the Ray path on a local 2-CPU cluster")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="onnxlrp-bench-dataset-"))
    try:
        (work / "imgs").mkdir()
        make_images(work / "imgs", args.images)
        paths = sorted(str(p) for p in (work / "imgs").iterdir())
        lrp = onnxlrp.LRP(MODEL, onnxlrp.EpsilonGammaBox(-3.0, 3.0), verbose=False, cache=False)
        lrp.analyze(np.zeros((args.batch_size, 3, 32, 32), np.float32))  # warm
        n, bs = args.images, args.batch_size
        print(f"{n} PNG images 48x48 -> {MODEL} (32x32), EpsilonGammaBox, batch {bs}, {os.cpu_count()} CPUs")
        loop = timed(lambda: plain_loop(lrp, paths, work / "loop", bs))
        runs = []
        pipeline = timed(lambda: runs.append(onnxlrp.explain_dataset(
            lrp, source=str(work / "imgs"), out=work / "pipeline", batch_size=bs, progress=False)))
        k = min(n, 2000)
        loop1 = timed(lambda: plain_loop(lrp, paths[:k], work / "loop1", 1))
        print(f"  loop1     {k / loop1:8.0f} images/s")
        print(f"  loop      {n / loop:8.0f} images/s")
        print(f"  pipeline  {n / pipeline:8.0f} images/s   {loop / pipeline:.2f}x the loop ({runs[0].backend})")
        if args.ray:
            import ray
            start = timed(lambda: ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False))
            ray_time = timed(lambda: onnxlrp.explain_dataset(lrp, source=str(work / "imgs"), out=work / "ray",
                                                             batch_size=bs, progress=False, ray="auto"))
            ray.shutdown()
            print(f"  ray       {n / ray_time:8.0f} images/s   {ray_time / pipeline:.2f}x the pipeline's time "
                  f"(a local 2-CPU cluster, 2 actors; actor start-up included, the cluster's own {start:.1f} s "
                  "not)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
