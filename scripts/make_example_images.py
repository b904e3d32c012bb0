#!/usr/bin/env python
"""Draw the example images shipped in ``models_fixtures/`` (deterministic, numpy + Pillow only).

* ``example.png``        32x32 RGB: the fixture models' input size
* ``example_large.png``  96x72 RGB: the same scene larger and not square (``onnxlrp explain`` resizes it)

A small landscape: sky gradient, a yellow sun, a red house with a dark door, a green hill and a few
seeded "grass" speckles, so that heatmaps have shapes and edges to land on.

Run:  python scripts/make_example_images.py [--out models_fixtures]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image


def draw(width: int, height: int) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    u, v = (x + 0.5) / width, (y + 0.5) / height            # resolution-free coordinates in (0, 1)
    img = np.empty((height, width, 3))
    img[..., 0] = 0.35 + 0.35 * v                             # sky: light blue, paler near the horizon
    img[..., 1] = 0.55 + 0.30 * v
    img[..., 2] = 0.95 - 0.10 * v
    sun = (u - 0.80) ** 2 + ((v - 0.20) * height / width) ** 2 < 0.11 ** 2
    img[sun] = (1.0, 0.85, 0.15)
    hill = v > 0.68 + 0.08 * np.cos(2.0 * np.pi * (u - 0.2))
    img[hill] = np.stack([0.20 + 0.0 * u, 0.55 + 0.15 * v, 0.20 + 0.0 * u], axis=-1)[hill]
    rng = np.random.default_rng(1234)                         # grass speckles, fixed seed
    speck = hill & (rng.random((height, width)) < 0.12)
    img[speck] = (0.10, 0.38, 0.10)
    wall = (u > 0.18) & (u < 0.48) & (v > 0.48) & (v < 0.78)
    img[wall] = (0.80, 0.15, 0.12)
    roof = (v > 0.30) & (v <= 0.48) & (np.abs(u - 0.33) < (v - 0.30) * 1.0)
    img[roof] = (0.35, 0.20, 0.15)
    door = (u > 0.29) & (u < 0.37) & (v > 0.62) & (v < 0.78)
    img[door] = (0.15, 0.10, 0.08)
    return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "models_fixtures"))
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, (w, h) in {"example.png": (32, 32), "example_large.png": (96, 72)}.items():
        Image.fromarray(draw(w, h)).save(out / name, optimize=True)
        print(f"wrote {out / name} ({w}x{h})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
