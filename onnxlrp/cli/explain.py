"""``onnxlrp explain``: images, folders or .npy arrays in; heatmaps, overlays and a summary out.

Everything that can fail on the user's side is checked before the first file is written: the rule
options, the model, every input (images are opened to their header, arrays to their shape), the output
selection, the labels, and the output folder (existing files are refused without --force). Files are
written under a temporary name and renamed, so an interrupted run leaves no partial file; an input's
files are written all or none. What only decoding can tell (an image over Pillow's pixel limit, a file
that does not decode) becomes an error row for that input, and the others are still explained. Worker
threads decode the next batches and write the previous batch's files while onnxruntime explains the current
one (for small pictures this thread decodes and writes while a thread beside it runs onnxruntime); the rows
stay in input order. Ctrl-C stops after the inputs explained so far (their files written):
their table (or JSON) is printed, and the exit code is 130.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import threading
import time
import warnings
from collections import Counter, deque
from dataclasses import dataclass, field

import click
import numpy as np

from ..files import atomic_write, natural_key, read_npy
from ..pipeline import loaded_ahead as _loaded_ahead
from ..pipeline import shut_down as _shut_down
from .app import (CLIError, CONTEXT_SETTINGS, FloatList, RULE_HELP, ShapeType, build_rules, cache_option, cli,
                  debug_option,
                  device_option, fmt_shape, load_analyzer, model_argument, output_name_option, pop_rule_kwargs,
                  precision_option, rule_options, skip_checks_option)

DEFAULT_OUT = "lrp_out"
GRAY_MEAN, GRAY_STD = (0.449,), (0.226,)  # the ImageNet statistics averaged over RGB, for 1-channel models


@dataclass
class Sample:
    path: str
    kind: str                      # "image" or "array"
    index: int | None = None       # position in a batched .npy file
    key: tuple = ()                # samples with equal keys can share a batch (same array shape)
    name: str = ""
    outputs: dict = field(default_factory=dict)  # "heatmap"/"overlay"/"relevance" -> path
    image_size: tuple | None = None  # (width, height) of an image file, from its header
    error: str | None = None       # why the input is not explained (found while validating)


# -- inputs -------------------------------------------------------------------------------------------------
def collect_inputs(paths):
    """(path, kind) for every input: files as given, folders expanded (sorted, not recursive)."""
    from ..images import is_image_path
    found = []
    for p in paths:
        if not os.path.exists(p):
            raise CLIError(f"{p}: no such file or folder")
        if os.path.isdir(p):
            entries = sorted((e for e in os.listdir(p) if not e.startswith(".")), key=natural_key)
            files = [os.path.join(p, e) for e in entries if os.path.isfile(os.path.join(p, e))
                     and (is_image_path(e) or e.lower().endswith(".npy"))]
            if not files:
                raise CLIError(f"{p}: the folder holds no images or .npy files")
            found.extend((f, "array" if f.lower().endswith(".npy") else "image") for f in files)
        else:
            found.append((p, "array" if p.lower().endswith(".npy") else "image"))
    return found


def _load_npy(path, mmap=True):
    from ..errors import InputError
    try:
        return read_npy(path, mmap)
    except InputError as exc:  # found while validating: the command stops, naming the file
        raise CLIError(str(exc)) from None


@dataclass
class InputSpec:
    """What the model's data input wants."""
    shape: tuple                   # the model's input shape, batch first ("batch" when dynamic)
    dtype: np.dtype
    image: bool                    # 4-D: images can be fed
    layout: str | None = None      # NCHW / NHWC
    channels: int | None = None
    size: tuple | None = None      # (H, W) images are resized to, None = keep each image's size

    def describe(self):
        return fmt_shape(self.shape)


def input_spec(analyzer, layout_opt, input_shape):
    from ..images import detect_layout, split_shape
    shape = analyzer.input_shape
    if shape is None:
        raise CLIError(f"{analyzer.source}: the data input has no known rank; cannot prepare inputs for it")
    if input_shape is not None:
        if len(input_shape) != len(shape) - 1:
            raise click.BadParameter(f"{len(input_shape)} dims given, the model's input {fmt_shape(shape)} has "
                                     f"{len(shape) - 1} after the batch axis", param_hint="--input-shape")
        for want, got in zip(shape[1:], input_shape):
            if isinstance(want, int) and want != got:
                raise click.BadParameter(f"{','.join(map(str, input_shape))} does not fit the model's input "
                                         f"{fmt_shape(shape)}", param_hint="--input-shape")
        shape = (shape[0], *input_shape)
    spec = InputSpec(shape=tuple(shape), dtype=analyzer.input_dtype, image=len(shape) == 4)
    if spec.image:
        spec.layout = detect_layout(shape) if layout_opt in (None, "auto") else layout_opt.upper()
        c, h, w = split_shape(shape, spec.layout)
        if c is None:
            raise CLIError(f"{analyzer.source}: the input {fmt_shape(shape)} has a dynamic channel dim; pass "
                           "--input-shape (e.g. 3,224,224) or --layout")
        spec.channels = c
        spec.size = (h, w) if h is not None and w is not None else None
    return spec


def _reason(exc, path):
    """An error message without its leading 'PATH: ' (the row names the input)."""
    text = str(exc)
    return text[len(path) + 2:] if text.startswith(f"{path}: ") else text


def validate_inputs(found, spec):
    """Open every input far enough to know it fits; returns the samples (one per image / array row)."""
    from ..images import ImageTooLargeError, check_channels, open_image
    from ..errors import InputError
    samples = []
    for path, kind in found:
        if kind == "image":
            if not spec.image:
                raise CLIError(f"{path}: the model's input {spec.describe()} is not an image; pass .npy arrays "
                               "of that shape (without or with the batch axis)")
            try:
                img = open_image(path)
                with img:
                    check_channels(img, spec.channels, path)
                    size = spec.size or (img.height, img.width)
                    image_size = img.size
            except ImageTooLargeError as exc:  # an image that fits, but too big to decode: an error row
                samples.append(Sample(path, "image", key=("image", spec.size), error=_reason(exc, path)))
                continue
            except InputError as exc:
                raise CLIError(str(exc)) from None
            samples.append(Sample(path, "image", key=("image", tuple(size)), image_size=image_size))
            continue
        arr = _load_npy(path)
        if not (np.issubdtype(arr.dtype, np.floating)):
            raise CLIError(f"{path}: dtype {arr.dtype}; .npy inputs must be floating-point arrays, already "
                           f"preprocessed for the model")
        rank = len(spec.shape)
        if arr.ndim == rank - 1:
            rows, shape = [None], arr.shape
        elif arr.ndim == rank:
            if arr.shape[0] == 0:
                raise CLIError(f"{path}: holds an empty batch")
            rows, shape = list(range(arr.shape[0])), arr.shape[1:]
        else:
            raise CLIError(f"{path}: shape {arr.shape} does not fit the model's input {spec.describe()} "
                           f"(give one sample of shape {_sample_shape(spec)} or a batch of them)")
        for want, got in zip(spec.shape[1:], shape):
            if isinstance(want, int) and want != got:
                what = "channel count" if spec.image and _is_channel_dim(spec, want, shape) else "shape"
                raise CLIError(f"{path}: wrong {what}: sample shape {tuple(shape)} does not fit the model's "
                               f"input {spec.describe()}")
        for i in rows:
            samples.append(Sample(path, "array", index=i, key=("array", tuple(shape))))
    return samples


def image_options(f):
    """--mean, --std, --no-normalize, --layout: how image files become model inputs (explain, audit)."""
    opts = [
        click.option("--mean", type=FloatList(), default=None,
                     help="Per-channel mean subtracted from images scaled to [0, 1], e.g. 0.5 or 0.485,0.456,0.406. "
                          "Default: the ImageNet mean (its average for 1-channel models)."),
        click.option("--std", type=FloatList(), default=None,
                     help="Per-channel standard deviation images are divided by. Default: the ImageNet std."),
        click.option("--no-normalize", is_flag=True, help="Feed images scaled to [0, 1], without --mean/--std."),
        click.option("--layout", type=click.Choice(["auto", "NCHW", "NHWC"], case_sensitive=False), default="auto",
                     metavar="[auto|NCHW|NHWC]", show_default=True, help="Channel layout of the model's image input."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def load_input_batch(paths, analyzer, layout, input_shape, mean, std, no_normalize):
    """Every image and .npy sample under ``paths`` (files or folders) as one batch for ``analyzer``'s data
    input, preprocessed as ``explain`` does; CLIError naming the file that does not fit."""
    if no_normalize and (mean is not None or std is not None):
        raise click.UsageError("--no-normalize and --mean/--std exclude each other")
    spec = input_spec(analyzer, layout, input_shape)
    samples = validate_inputs(collect_inputs(paths), spec)
    bad = next((s for s in samples if s.error), None)
    if bad is not None:
        raise CLIError(f"{bad.path}: {bad.error}")
    keys = {s.key for s in samples}
    if len(keys) > 1:
        raise CLIError(f"{paths[0]}: the inputs have different shapes ({len(keys)} kinds); give inputs of one "
                       "size (or --input-shape, which images are resized to)")
    norm_mean, norm_std = image_normalization(spec, mean, std, no_normalize)
    arrays = {}
    try:
        return np.stack([_load_sample(s, spec, norm_mean, norm_std, arrays, False)[0] for s in samples])
    finally:
        arrays.clear()


def image_normalization(spec, mean, std, no_normalize):
    """(mean, std) that images are normalized with (ImageNet's by default), or (None, None)."""
    if not spec.image or no_normalize:
        return None, None
    c = spec.channels
    norm_mean = mean or (GRAY_MEAN if c == 1 else (0.485, 0.456, 0.406))
    norm_std = std or (GRAY_STD if c == 1 else (0.229, 0.224, 0.225))
    for name, v in (("--mean", norm_mean), ("--std", norm_std)):
        if len(v) not in (1, c):
            raise CLIError(f"{name} has {len(v)} values for the model's {c}-channel images (give 1 or {c})")
    if any(s == 0 for s in norm_std):
        raise click.BadParameter("must not be zero", param_hint="--std")
    return norm_mean, norm_std


def _sample_shape(spec):
    return "(" + ", ".join(str(d) if isinstance(d, int) else "?" for d in spec.shape[1:]) + ("," if len(spec.shape) == 2 else "") + ")"


def _is_channel_dim(spec, want, shape):
    ax = 0 if spec.layout == "NCHW" else 2
    return len(shape) == 3 and spec.shape[1 + ax] == want and shape[ax] != want


def assign_names(samples):
    """Output file stems: the input's name, '_<row>' for batched arrays, made unique."""
    def base(s):
        stem = os.path.splitext(os.path.basename(s.path))[0]
        if s.index is not None:
            stem = f"{stem}_{s.index:0{width[s.path]}d}"
        return stem

    width = {}
    for s in samples:
        if s.index is not None:
            width[s.path] = max(width.get(s.path, 1), len(str(s.index)))
    bases = [base(s) for s in samples]
    counts = Counter(bases)
    used = set()
    for s, b in zip(samples, bases):
        name = b
        if counts[b] > 1:
            ext = os.path.splitext(s.path)[1].lstrip(".").lower()
            name = f"{b}_{ext}" if ext else b
        k, unique = 2, name
        while unique in used:
            unique, k = f"{name}_{k}", k + 1
        used.add(unique)
        s.name = unique


#: a labels file larger than this is refused: ImageNet's 21k classes take ~0.5 MB
MAX_LABELS_BYTES = 16 << 20


def load_labels(path):
    """{class index: name} from a text file (one name per line) or JSON (a list, or an object of
    index -> name or -> [id, name]). Sparse on purpose: {"300000000": "x"} is one entry, not a 2 GB list."""
    try:
        if os.path.getsize(path) > MAX_LABELS_BYTES:
            raise CLIError(f"{path}: the labels file is over {MAX_LABELS_BYTES >> 20} MB")
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise CLIError(f"{path}: cannot read the labels file: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise CLIError(f"{path}: the labels file is not UTF-8 text") from None
    if not path.lower().endswith(".json"):
        return {i: line.strip() for i, line in enumerate(line for line in text.splitlines() if line.strip())}
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CLIError(f"{path}: not valid JSON: {exc}") from None
    if isinstance(data, list):
        data = dict(enumerate(data))
    elif isinstance(data, dict):  # {"0": "tench"} or {"0": ["n01440764", "tench"]}
        try:
            data = {int(k): v for k, v in data.items()}
        except ValueError:
            bad = next(k for k in data if not k.strip().lstrip("-").isdigit())
            raise CLIError(f"{path}: JSON label keys must be class indices, got {bad!r}") from None
        negative = sorted(k for k in data if k < 0)
        if negative:
            raise CLIError(f"{path}: label key {negative[0]} is negative; class indices start at 0")
    else:
        raise CLIError(f"{path}: JSON labels must be a list or an object of index -> name")
    return {k: str(v[-1] if isinstance(v, list) and v else v) for k, v in data.items()}


# -- output folder ------------------------------------------------------------------------------------------
def plan_outputs(samples, out, spec, save_npy):
    heat = spec.image
    for s in samples:
        s.outputs = {}
        if s.error is not None:
            continue
        if heat:
            s.outputs["heatmap"] = os.path.join(out, f"{s.name}_heatmap.png")
            if s.kind == "image":
                s.outputs["overlay"] = os.path.join(out, f"{s.name}_overlay.png")
        if save_npy or not heat:
            s.outputs["relevance"] = os.path.join(out, f"{s.name}_relevance.npy")


def prepare_out_dir(out, samples, force):
    """Refuse existing outputs without --force, create the folder, check that it is writable.
    Returns the folders created (removed again if the run fails before writing)."""
    # lexists: a dangling symlink counts as something there (writing would follow it)
    if os.path.lexists(out) and not os.path.isdir(out):
        raise CLIError(f"--out {out}: exists and is not a folder" if os.path.exists(out) else
                       f"--out {out}: is a symlink to nothing; remove it or choose another --out")
    targets = [p for s in samples for p in s.outputs.values()]
    if os.path.isdir(out) and not force:
        existing = [p for p in targets if os.path.lexists(p)]
        if existing:
            more = f" and {len(existing) - 1} more" if len(existing) > 1 else ""
            raise CLIError(f"{existing[0]}{more} exist already; pass --force to overwrite, or choose another --out")
    created, probe = [], os.path.abspath(out)
    while not os.path.exists(probe):
        created.append(probe)
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    try:
        os.makedirs(out, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".onnxlrp-write-test-"):
            pass
    except OSError as exc:
        remove_dirs(created)
        raise CLIError(f"--out {out}: cannot write there: {exc.strerror or exc}") from None
    return created


def remove_dirs(created):
    for d in created:  # innermost first; only if still empty
        try:
            os.rmdir(d)
        except OSError:
            pass


def save_png(pixels, target):
    """One picture (uint8 array or PIL image) as a PNG file (onnxlrp.png), at zlib level 1 as explain_dataset
    writes them: a smooth 224x224 heatmap encodes in 1.9 ms instead of level 6's 8.5 (Pillow's: 10.1 and 14.1
    ms), for a file of 30 instead of 21 kB (lossless either way)."""
    from ..png import write_png
    write_png(pixels, target, level=1)


def save_npy(arr, target):
    with atomic_write(target) as f:
        np.save(f, arr)


# -- progress -----------------------------------------------------------------------------------------------
class Progress:
    """click's progress bar on a terminal; with --progress on a pipe, one line per batch."""

    def __init__(self, total, mode, label):
        self.total, self.done = total, 0
        tty = sys.stderr.isatty()
        self.bar = None
        self.lines = False
        if mode is False:
            return
        if tty and (mode is True or mode is None):
            self.bar = click.progressbar(length=total, label=label, file=sys.stderr, show_pos=True,
                                         show_eta=True, width=30)
            self.bar.__enter__()
        elif mode is True:
            self.lines, self.label = True, label

    def update(self, n):
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.lines:
            click.echo(f"{self.label} {self.done}/{self.total} ({100 * self.done // max(self.total, 1)}%)", err=True)

    def close(self):
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar = None


# -- the command ----------------------------------------------------------------------------------------------
def _batches(samples, size):
    batch = []
    for s in samples:
        if batch and (len(batch) >= size or s.key != batch[0].key):
            yield batch
            batch = []
        batch.append(s)
    if batch:
        yield batch


#: batches decoded on worker threads ahead of the one onnxruntime runs: enough to keep it fed, few enough
#: that memory stays bounded whatever the number of inputs
PREFETCH_BATCHES = 2
#: threads drawing and writing the explained inputs' files while the next batch runs. One: the drawing holds
#: the GIL, and a second thread made 32x32 inputs on 2 cores slower, not faster (benchmarks/
#: bench_explain_folder.py)
WRITE_THREADS = 1
#: False runs every step in turn on the calling thread (decode a batch, explain it, write its files)
THREADED = True
#: relevance runs on the CPU at once, each on its own batch, while they are what sets the pace (small inputs,
#: _Run.onnxruntime_sets_the_pace): onnxruntime splits every op between its threads, and one whose core a
#: decoding or writing thread holds stalls the op; with a second run beside it, the other threads' time goes
#: to that run. Run is thread-safe, and the split is the session's, whatever else runs: the relevance is the
#: same bit for bit. A folder of 64x64 images on 2 cores ran 3-16 % faster, 9 % in the median of 7 runs
#: (benchmarks/bench_explain_folder.py --one-run)
RUNS_IN_FLIGHT = 2
#: inputs whose pictures (image file and model input; an .npy array's heatmap) are at most this many pixels
#: keep the loop's Python work on the calling thread: it decodes the next batch and writes the
#: previous one's files while a thread beside it runs the current batch's relevance (_Run.explain_all).
#: For such pictures that work is mostly Python holding the GIL: on loader and writer threads of their own
#: it went to handing the GIL between them (48 futex calls an input, 1.2-1.4 of 2 cores used), and a folder
#: of 32x32 images on 2 cores ran 31-43 % faster this way, of 64x64 ones 2-6 %. From 128x128 on, decoding,
#: resizing and encoding release the GIL long enough for the threads to win (128x128: 1-9 %, 224x224: 8 %)
#: (benchmarks/bench_explain_folder.py --both-designs)
ONE_PYTHON_THREAD_PIXELS = 64 * 64
#: batches of up to this many input values run beside another (above it a batch runs alone: two runs hold
#: two batches' activations, and large inputs keep onnxruntime's threads busy enough on their own)
OVERLAP_INPUT_ELEMENTS = 1 << 20


def _input_elements(items):
    """How many input values a batch's loaded ``items`` hold (those that failed to load hold none)."""
    return sum(item[0].size for item in items if not isinstance(item, str))


def _picture_pixels(s, channels):
    """The pixels of the largest picture an input's decoding and drawing handle: its image file's and the
    model input's; an .npy array's values over the model's ``channels`` (its heatmap's pixels)."""
    if s.kind != "image":
        return int(np.prod(s.key[1])) // (channels or 1)
    return max(int(np.prod(s.image_size or (0,))), int(np.prod(s.key[1] or (0,))))


def _wait_through_interrupts(tasks):
    """Wait for every one of ``tasks`` (concurrent.futures), a Ctrl-C meanwhile not cutting it short."""
    from concurrent.futures import wait
    while True:
        try:
            wait(tasks)
            return
        except KeyboardInterrupt:
            pass


def _run_now(fn, *args):
    """``fn(*args)`` as a finished Future (``pool.submit`` without a pool); an interrupt is raised here."""
    from concurrent.futures import Future
    task = Future()
    try:
        task.set_result(fn(*args))
    except Exception as exc:  # noqa: BLE001 - raised where the result is taken, as from a pool
        task.set_exception(exc)
    return task


#: pictures (heatmap and overlay) up to this size are drawn a batch at a time (_Run._draw_batch); larger ones
#: one by one
BATCH_DRAW_PIXELS = 1 << 16


#: pictures up to this size are kept from the decode that makes the model input; larger ones are read
#: again when their overlay is drawn, so that a batch of big photos does not sit in memory
KEEP_PICTURE_PIXELS = 1 << 20


def _load_sample(s, spec, mean, std, arrays, keep_picture):
    """(model input, the image's picture or None); InputError when the image does not decode."""
    from ..images import MAX_PICTURE_PIXELS, load_image, load_image_and_picture, normalize, picture_size, to_layout
    if s.kind == "image":
        pw, ph = picture_size(s.image_size, MAX_PICTURE_PIXELS)
        if keep_picture and pw * ph <= KEEP_PICTURE_PIXELS:
            arr, picture = load_image_and_picture(s.path, size=s.key[1], channels=spec.channels,
                                                  max_picture_pixels=MAX_PICTURE_PIXELS)
        else:
            arr, picture = load_image(s.path, size=s.key[1], channels=spec.channels), None
        x = normalize(arr, mean, std) if mean is not None else arr
        return to_layout(x, spec.layout).astype(spec.dtype), picture
    if s.path not in arrays:
        arrays.clear()  # keep one array file open at a time
        arrays[s.path] = _load_npy(s.path)
    a = arrays[s.path]
    x = a[s.index] if s.index is not None else a
    return np.asarray(x, dtype=spec.dtype), None


def _drawn_pair(drawing):
    """An input's (heatmap, overlay) from its batch's _draw_batch task, or None when that did not draw it (it
    is then drawn on its own, which raises its own error if there is one)."""
    if drawing is None:
        return None
    task, j = drawing
    try:
        return task.result().get(j)
    except Exception:  # noqa: BLE001 - the input's own drawing says what is wrong
        return None


def _label(labels, k):
    return (labels or {}).get(int(k)) or None


def _fmt_class(k, label):
    return f"{k} ({label})" if label else str(k)


def print_table(rows, explained_col):
    headers = ["input", "predicted", "score"] + (["explained", "score"] if explained_col else []) + ["relevance sum"]
    body = []
    for r in rows:
        name = r["input"] + (f"[{r['index']}]" if r["index"] is not None else "")
        if r["status"] != "ok":
            body.append([name, "error"] + [""] * (len(headers) - 2))
            continue
        line = [name, _fmt_class(r["predicted"], r["predicted_label"]), f"{r['score']:.4g}"]
        if explained_col:
            line += [_fmt_class(r["explained"], r["explained_label"]), f"{r['explained_score']:.4g}"]
        line.append(f"{r['relevance_sum']:.4g}")
        body.append(line)
    widths = [max([len(h)] + [len(b[i]) for b in body]) for i, h in enumerate(headers)]
    right = {i for i, h in enumerate(headers) if h in ("score", "relevance sum")}

    def fmt(cells):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    click.echo(fmt(headers))
    for b in body:
        click.echo(fmt(b))


EXPLAIN_EPILOG = RULE_HELP + """
\b
Inputs:
  Image files (PNG, JPEG, BMP, GIF, TIFF, WebP, PPM/PGM), folders (their
  images and .npy files, in natural order, not recursive), .npy arrays.
  Images are read with Pillow as RGB (grayscale repeated, palettes expanded,
  alpha dropped, 16-bit scaled by 65535; 1-channel models get grayscale and
  refuse color images), resized to the model's input size when it is static
  (bilinear, aspect ratio not kept; --input-shape for dynamic models),
  scaled to [0, 1] and normalized with --mean/--std (ImageNet statistics by
  default). NCHW or NHWC comes from the model's input shape (--layout).
  A .npy array is one preprocessed sample or a batch, used as it is; models
  whose input is not an image take only .npy arrays.

\b
Outputs, in --out (default ./lrp_out), for each input NAME:
  NAME_heatmap.png    relevance summed over channels: red positive (for the
                      explained class), blue negative (against it), white
                      zero; at the image file's own size (upsampled from
                      the model's input size), at the model's input size
                      for .npy inputs
  NAME_overlay.png    the heatmap over the (desaturated) image, at the
                      image's own size
  NAME_relevance.npy  the raw relevance at the model's input size
                      (--save-npy; always for models whose input is not an
                      image)
Pictures of images over 4096 x 4096 pixels are scaled down to that many
(aspect ratio kept). Each heatmap is scaled to its own range, or with
--shared-scale all to one; --colorbar labels the range. Existing files are
never overwritten without --force. A table goes to stdout: input,
predicted class, score (the model output before softmax), relevance sum
(close to 1 where the rules conserve relevance). --json prints the same as
JSON. An input that cannot be explained (NaN/Inf, over Pillow's pixel
limit, does not decode) gets an error row, the others are explained, and
the exit code is 1. Ctrl-C stops after the inputs finished so far, prints
their table and exits with 130.

\b
Examples:
  onnxlrp explain model.onnx cat.png
  onnxlrp explain model.onnx -c EpsilonGammaBox --low -3 --high 3 photos/
  onnxlrp explain model.onnx photos/ --labels classes.txt -k 281 -o maps
  onnxlrp explain model.onnx photos/ --shared-scale --colorbar
  onnxlrp explain model.onnx batch.npy --save-npy --json > results.json
"""


@cli.command(context_settings=CONTEXT_SETTINGS, epilog=EXPLAIN_EPILOG)
@model_argument
@click.argument("inputs", nargs=-1, required=False, metavar="INPUTS...", type=click.Path(path_type=str))
@rule_options
@click.option("--text", "-t", multiple=True, metavar="TEXT",
              help="Explain a model whose input is token ids on this text (repeatable); needs --tokenizer. "
                   "Default rules then: AttnLRP.")
@click.option("--text-file", type=click.Path(dir_okay=False, path_type=str), default=None,
              help="Explain every non-empty line of this UTF-8 file (like --text).")
@click.option("--tokenizer", type=click.Path(dir_okay=False, path_type=str), default=None,
              help="A local tokenizer.json (Hugging Face `tokenizers` format) for --text / --text-file.")
@click.option("--output-selection", "-k", type=click.IntRange(min=0), default=None, metavar="K",
              help="Explain output K (a class index) for every input. Default: each input's top class.")
@click.option("--labels", type=click.Path(dir_okay=False, path_type=str), default=None,
              help="Class names: a text file with one name per line (line i = class i), or JSON "
                   "(a list, or an object index -> name, e.g. imagenet_class_index.json).")
@click.option("--out", "-o", "out", type=click.Path(path_type=str), default=DEFAULT_OUT, metavar="DIR",
              show_default=True, help="Folder for the heatmaps, overlays and .npy files (created if needed).")
@click.option("--force", "-f", is_flag=True, help="Overwrite existing output files.")
@click.option("--save-npy", is_flag=True, help="Also write the raw relevance of each input as NAME_relevance.npy.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON on stdout instead of a table.")
@image_options
@click.option("--input-shape", type=ShapeType(), default=None,
              help="The input dims after the batch axis in the model's order (e.g. 3,224,224), for models "
                   "with dynamic height and width: images are resized to it.")
@click.option("--batch-size", "-b", type=click.IntRange(min=1), default=32, show_default=True,
              help="Inputs explained per onnxruntime run.")
@device_option
@click.option("--reduce", type=click.Choice(["sum", "norm", "maxabs", "sumabs", "abssum"]), default="sum",
              show_default=True, help="How the heatmap combines the channels of a pixel (sum keeps the sign).")
@click.option("--rangescale", type=click.Choice(["centered", "extrema"]), default="centered", show_default=True,
              help="centered: zero is the colormap's middle (white); extrema: min to max.")
@click.option("--colormap", default="seismic", show_default=True,
              help="A matplotlib colormap name (e.g. seismic, bwr, coolwarm, inferno).")
@click.option("--clip-percentile", type=click.FloatRange(0, 100, min_open=True), default=None, metavar="P",
              help="Clip the heatmap range at the P-th percentile (e.g. 99.5) so a few extreme pixels do not wash "
                   "out the rest.")
@click.option("--overlay-alpha", type=click.FloatRange(0, 1), default=0.6, show_default=True,
              help="Opacity of the heatmap over the image at the most relevant pixels.")
@click.option("--colorbar", is_flag=True,
              help="Draw a color bar next to each heatmap and overlay, its ends and middle labelled with the "
                   "relevance values they stand for.")
@click.option("--shared-scale", is_flag=True,
              help="One color scale for all inputs of the run, so that their heatmaps compare (default: each "
                   "input scaled to its own range). The pictures are drawn once every input is explained.")
@click.option("--progress/--no-progress", default=None,
              help="Show a progress bar on stderr. Default: on a terminal, when there is more than one batch.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar or notices on stderr (the results still print).")
@click.option("--profile", is_flag=True,
              help="Print on stderr the seconds of each construction phase (or the cache hit) and of the "
                   "relevance runs against the whole loop.")
@output_name_option
@precision_option
@skip_checks_option
@cache_option
@debug_option
def explain(model, inputs, text, text_file, tokenizer, output_selection, labels, out, force, save_npy, as_json, mean,
            std, no_normalize, layout, input_shape, batch_size, device, reduce, rangescale, colormap, clip_percentile,
            overlay_alpha, colorbar, shared_scale, progress, quiet, profile, output_name, precision, skip_checks,
            **kwargs):
    """Explain MODEL's predictions on INPUTS with LRP: heatmaps and overlays.

    INPUTS are image files, folders of images, or .npy arrays. For each input, onnxlrp runs the
    model, explains its top class (or --output-selection K) with the chosen LRP rules and writes a
    heatmap and an overlay PNG into --out. Without --composite or --rule the rules are EpsilonPlus;
    for images, EpsilonGammaBox with --low/--high bounding the normalized inputs is usually the
    better choice.

    Models whose input is token ids (BERT, GPT-2, ...) take --text or --text-file with --tokenizer:
    the coloured tokens are printed and an HTML heatmap is written into --out.
    """
    rule_kwargs = pop_rule_kwargs(kwargs)
    text_mode = bool(text) or text_file is not None
    if text_mode:
        if inputs:
            raise click.UsageError("give INPUTS or --text/--text-file, not both")
        if tokenizer is None:
            raise click.UsageError("--text and --text-file need --tokenizer tokenizer.json")
        if not rule_kwargs["composite"] and not rule_kwargs["rule"]:
            rule_kwargs["composite"] = "AttnLRP"
        if colorbar or shared_scale:
            raise click.UsageError("--colorbar and --shared-scale are for image heatmaps, not --text/--text-file")
    elif not inputs:
        raise click.UsageError("give INPUTS (images, folders, .npy arrays) or --text/--text-file")
    elif tokenizer is not None:
        raise click.UsageError("--tokenizer goes with --text or --text-file")
    spec_rules, desc = build_rules(**rule_kwargs)
    if no_normalize and (mean is not None or std is not None):
        raise click.UsageError("--no-normalize and --mean/--std exclude each other")
    from ..heatmaps import colormap_lut
    try:
        colormap_lut(colormap)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--colormap") from None

    if not os.path.isfile(model):  # the model first: its error is the one a user expects to read
        raise CLIError(f"{model}: no such file" if not os.path.exists(model) else f"{model}: is not a file")
    if text_mode:
        from .text import explain_text, read_lines
        lines = read_lines(text, text_file)
        label_names = load_labels(labels) if labels else None
        analyzer = load_analyzer(model, spec_rules, device=device, verbose=False, skip_checks=skip_checks,
                                 precision=precision, output_name=output_name, quiet=quiet)
        explain_text(analyzer, model, lines, tokenizer, output_selection, label_names, out, force, as_json,
                     batch_size, progress, quiet, desc,
                     dict(rangescale=rangescale, colormap=colormap, percentile=clip_percentile))
        return
    found = collect_inputs(inputs)
    label_names = load_labels(labels) if labels else None
    # Several batches: onnxruntime shares the cores with the threads that decode and write, so its idle
    # threads sleep instead of spinning (a folder of 32x32 or 64x64 images ran 11-15 % faster)
    spinning = not (THREADED and len(found) > batch_size)
    # verbose=False: the device is named in the closing line instead of a notice before any error
    analyzer = load_analyzer(model, spec_rules, device=device, verbose=False, skip_checks=skip_checks,
                             precision=precision, output_name=output_name, quiet=quiet, spinning=spinning)
    if analyzer.token_input:
        raise CLIError(f"{model}: the model's input '{analyzer.data_input}' is token ids: explain text with "
                       "--text or --text-file and --tokenizer tokenizer.json")
    if analyzer.other_inputs:
        raise CLIError(f"{model}: the model has more inputs ({', '.join(analyzer.other_inputs)}); "
                       "the command line explains single-input models (use the Python API)")
    spec = input_spec(analyzer, layout, input_shape)

    out_shape = analyzer.output_shape
    n_out = int(np.prod(out_shape[1:])) if out_shape and all(isinstance(d, int) for d in out_shape[1:]) else None
    if output_selection is not None and n_out is not None and output_selection >= n_out:
        raise CLIError(f"--output-selection {output_selection} is out of range: the model has {n_out} outputs per "
                       f"sample (valid: 0..{n_out - 1})")
    if label_names is not None and n_out is not None and not quiet:
        beyond = sorted(k for k in label_names if k >= n_out)
        if beyond:
            click.echo(f"onnxlrp: note: {labels} labels class {beyond[0]}, the model has {n_out} outputs "
                       f"(0..{n_out - 1})", err=True)
        elif len(label_names) != n_out:
            click.echo(f"onnxlrp: note: {labels} has {len(label_names)} labels for {n_out} outputs", err=True)

    samples = validate_inputs(found, spec)
    norm_mean, norm_std = image_normalization(spec, mean, std, no_normalize)
    if not spec.image and not quiet:
        click.echo(f"onnxlrp: note: the model's input {spec.describe()} is not an image; writing the relevance "
                   "as .npy files instead of heatmaps", err=True)

    assign_names(samples)
    plan_outputs(samples, out, spec, save_npy)
    created = prepare_out_dir(out, samples, force)

    run = _Run(analyzer, spec, output_selection, label_names, norm_mean, norm_std, overlay_alpha, shared_scale,
               dict(reduce=reduce, rangescale=rangescale, colormap=colormap, percentile=clip_percentile,
                    colorbar=colorbar))
    interrupted = False
    bar = Progress(len(samples), False if quiet else (progress if progress is not None
                                                      else (None if len(samples) > batch_size else False)),
                   "explaining")
    if profile:
        _print_construction(analyzer)
    loop_started = time.perf_counter()
    try:
        try:
            # runs at once only where they share the CPU's cores (not one GPU) and run on onnxruntime (float64
            # may run on onnx's reference evaluator)
            run.explain_all(_batches(samples, batch_size), bar, THREADED,
                            overlap=analyzer.execution_device == "cpu" and precision != "float64",
                            small=all(_picture_pixels(s, spec.channels) <= ONE_PYTHON_THREAD_PIXELS
                                      for s in samples if s.error is None))
        except KeyboardInterrupt:  # Ctrl-C: report what is finished
            interrupted = True
        finally:
            bar.close()
        if run.pending and not run.draw_pending():  # --shared-scale: the pictures, on the scale of all inputs
            interrupted = True
    except BaseException:
        if run.files == 0:
            remove_dirs(created)
        raise
    if interrupted and run.files == 0:
        remove_dirs(created)
    rows = run.rows
    if profile:
        loop = time.perf_counter() - loop_started
        click.echo(f"onnxlrp: profile: {len(rows)} inputs in {loop:.2f} s ({len(rows) / max(loop, 1e-9):.1f}/s); "
                   f"relevance runs {run.relevance_seconds:.2f} s ({run.relevance_seconds / max(loop, 1e-9):.0%}), "
                   "the rest decoding, drawing and writing", err=True)

    if as_json:  # strict JSON: no NaN
        click.echo(json.dumps({"model": model, "rules": desc, "device": analyzer.execution_device,
                               "out": out, "interrupted": interrupted, "inputs": len(samples), "results": rows},
                              indent=2, allow_nan=False))
    else:
        print_table(rows, explained_col=output_selection is not None)
    failed = [r for r in rows if r["status"] != "ok"]
    if not as_json:  # the JSON carries them
        for r in failed:
            click.echo(f"onnxlrp: error: {r['input']}: {r['error']}", err=True)
    if interrupted:
        click.echo(f"onnxlrp: interrupted after {len(rows)} of {len(samples)} inputs", err=True)
    if not quiet:
        kinds = Counter(k for r in rows for k in ("heatmap", "overlay", "relevance") if r[k] is not None)
        nouns = {"heatmap": ("heatmap", "heatmaps"), "overlay": ("overlay", "overlays"),
                 "relevance": ("relevance array", "relevance arrays")}
        what = ", ".join(f"{n} {nouns[k][n != 1]}" for k, n in kinds.items())
        click.echo(f"onnxlrp: {desc} on {analyzer.execution_device}; wrote {what or 'nothing'} to {out}{os.sep}",
                   err=True)
    if interrupted:
        raise click.exceptions.Exit(130)  # 128 + SIGINT, as shells report it
    if failed:
        raise click.exceptions.Exit(1)


def _print_construction(analyzer):
    phases = ", ".join(f"{k} {v:.2f}" for k, v in analyzer.construction_times.items())
    click.echo(f"onnxlrp: profile: construction {sum(analyzer.construction_times.values()):.2f} s ({phases}); "
               f"cache {analyzer.cache_status}", err=True)


def _row(s, error=None, **values):
    """One input's line of the results (table and --json): the explained values, or None everywhere with
    ``error`` saying why the input was not explained."""
    row = {"status": "ok" if error is None else "error", "error": error, "input": s.path, "index": s.index,
           "name": s.name}
    for key in ("predicted", "predicted_label", "score", "explained", "explained_label", "explained_score",
                "relevance_sum", "heatmap", "overlay", "relevance"):
        row[key] = values.pop(key, None)
    assert not values, f"unknown result fields {sorted(values)}"
    return row


class _Run:
    """The explain loop's state: one result row per finished input, in input order, and the files written.

    An input is finished when all its files are written (an interrupt or error midway removes the ones
    already there): on a writer thread (``_finish``), its result taken on the calling thread in input order
    (``_collect``). With --shared-scale the pictures wait in ``pending`` (the input's channel-reduced
    relevance map) until every input is explained, and are drawn on one color scale by ``draw_pending``.
    """

    def __init__(self, analyzer, spec, output_selection, labels, mean, std, alpha, shared, picture_opts):
        self.analyzer, self.spec, self.output_selection, self.labels = analyzer, spec, output_selection, labels
        self.mean, self.std, self.alpha, self.shared = mean, std, alpha, shared
        self.picture_opts = picture_opts  # reduce, rangescale, colormap, percentile, colorbar
        self.rows, self.pending, self.files = [], [], 0
        self.relevance_seconds = 0.0  # with some analyzer.analyze under way (--profile)
        self._timing, self._running, self._running_since = threading.Lock(), 0, 0.0
        # seconds and batches of the relevance runs and of the writer's work: whether a second run beside
        # the first can help (onnxruntime_sets_the_pace)
        self._run_time, self._runs, self._write_time, self._writes = 0.0, 0, 0.0, 0
        self._handed = 0  # batches handed over to the writer
        self._write_times = {}  # {batch handed over: writer seconds so far}, until its files are all written

    def explain_all(self, batches, progress, threaded, overlap=False, small=False):
        """Explain ``batches``, the rows in input order. ``threaded``: the inputs of the next batches are
        decoded on worker threads (PREFETCH_BATCHES ahead) while onnxruntime explains the current one (it
        releases the GIL), and the previous batch's files are written on WRITE_THREADS writer threads
        meanwhile; otherwise each step runs in turn on this thread. ``overlap`` (with ``threaded``): while
        onnxruntime sets the pace (onnxruntime_sets_the_pace), up to RUNS_IN_FLIGHT batches of at most
        OVERLAP_INPUT_ELEMENTS values each run at once, on threads of their own (a larger batch runs alone);
        the results are still taken in input order. ``small`` (with ``threaded`` and ``overlap``: every
        picture within ONE_PYTHON_THREAD_PIXELS): no loader or writer threads; this thread decodes each batch
        and writes the files of the one before while the relevance runs go on one thread beside it, one at
        a time, the next batch waiting its turn there.

        On Ctrl-C the decoding stops and the inputs explained before it are still written and reported; a
        second Ctrl-C cancels the writes not started yet.
        """
        from concurrent.futures import ThreadPoolExecutor
        from ..errors import LRPWarning
        stop_loading = threading.Event()
        with warnings.catch_warnings():
            # Set once here, around every thread: catch_warnings is not thread-safe, so the blocks that
            # images.py enters on the workers may restore each other's filters (never ones from outside
            # this block). A non-finite result becomes that input's error row, with the layer the warning
            # names; images above Pillow's warning size are decoded reduced without its warning.
            warnings.filterwarnings("ignore", message=r".*sample \d+: the (model's output|relevance) is not finite",
                                    category=LRPWarning)
            if self.spec.image:
                from PIL import Image
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            one_python_thread = threaded and overlap and small
            helpers = threaded and not one_python_thread  # loader and writer threads
            loaded = _loaded_ahead(batches, lambda batch: self._load(batch, stop_loading),
                                   PREFETCH_BATCHES if helpers else 0, stop_loading)
            writers = ThreadPoolExecutor(WRITE_THREADS, thread_name_prefix="onnxlrp-write") if helpers else None
            submit = writers.submit if writers else _run_now
            if one_python_thread:  # one run at a time: the batch after it is queued, so the thread never waits
                runs, limit = ThreadPoolExecutor(1, thread_name_prefix="onnxlrp-run"), 2
            else:
                runs = (ThreadPoolExecutor(RUNS_IN_FLIGHT, thread_name_prefix="onnxlrp-run")
                        if threaded and overlap and RUNS_IN_FLIGHT > 1 else None)
                limit = RUNS_IN_FLIGHT
            run = runs.submit if runs else _run_now
            writing = deque()  # (sample, its _finish task) of the explained inputs not reported yet
            try:
                try:
                    in_flight = deque()  # (batch, its items, its relevance task), oldest first
                    for batch, items in loaded:
                        alone = not one_python_thread and (
                            runs is None or _input_elements(items) > OVERLAP_INPUT_ELEMENTS
                            or not self.onnxruntime_sets_the_pace())
                        while in_flight and alone:
                            self._hand_over(*in_flight.popleft(), writing, submit, progress)
                        in_flight.append((batch, items, run(self._relevance, items)))
                        while in_flight and (alone or len(in_flight) >= limit):
                            self._hand_over(*in_flight.popleft(), writing, submit, progress)
                    while in_flight:
                        self._hand_over(*in_flight.popleft(), writing, submit, progress)
                    progress.update(self._collect(writing))
                except KeyboardInterrupt:
                    self._collect_interrupted(writing)
                    raise
            finally:
                loaded.close()
                if runs is not None:  # a run under way ends (onnxruntime cannot stop it); its result is dropped
                    _shut_down(runs)
                if writers is not None:
                    _shut_down(writers)

    def _hand_over(self, batch, items, task, writing, submit, progress):
        """A batch whose relevance ``task`` was started: once it is done, its pictures and files go to the
        writer (``submit``), each input's task appended to ``writing``, after the previous batch's results
        are taken (so that at most two batches' files wait)."""
        explained = task.result()
        index, self._handed = self._handed, self._handed + 1
        drawing = submit(self._timed_write, index, self._draw_batch, batch, items, explained)
        progress.update(self._collect(writing))  # the previous batch, written meanwhile
        with self._timing:  # so every writer task of the previous batch is done: its time is complete
            if index - 1 in self._write_times:
                self._write_time += self._write_times.pop(index - 1)
                self._writes += 1
        j = 0
        for s, item in zip(batch, items):
            if isinstance(item, str):
                s.error = item
                s.outputs.clear()
                writing.append((s, _run_now(lambda: (_row(s, error=item), 0, None))))
                continue
            outputs, rel, selections, nonfinite = explained
            # the warning's reason names the layer of the first non-finite input
            reason = nonfinite.get("reason") if nonfinite.get("first") == j else None
            writing.append((s, submit(self._timed_write, index, self._finish, s, outputs[j], rel[j],
                                      int(selections[j]), item[1], reason, (drawing, j))))
            j += 1

    def _timed_write(self, index, fn, *args):
        """``fn(*args)``: drawing or writing for the batch handed over as number ``index``, on the writer
        thread, its time counted to that batch."""
        started = time.perf_counter()
        try:
            return fn(*args)
        finally:
            with self._timing:
                self._write_times[index] = self._write_times.get(index, 0.0) + time.perf_counter() - started

    def onnxruntime_sets_the_pace(self):
        """Whether a batch's relevance run has taken longer than the writer's work on a batch (drawing and
        writing its files), on average over the batches finished so far. Only then can a second run beside
        it help: where the writer is slower (a 32x32 model whose run takes 0.8 ms an input against 1.5 ms
        of drawing and writing), it sets the pace, and a second run only takes cores and the GIL from it
        (2-7 % slower)."""
        with self._timing:
            return (self._runs > 0 and self._writes > 0
                    and self._run_time / self._runs > self._write_time / self._writes)

    def _collect(self, writing):
        """Take the results of the inputs in ``writing``, in order, waiting for each to be written; an error
        (or interrupt) leaves its input first in ``writing``. Returns how many were taken."""
        n = 0
        while writing:
            s, task = writing[0]
            result = task.result()
            writing.popleft()
            self._take(s, *result)
            n += 1
        return n

    def _take(self, s, row, files, heat_map):
        if heat_map is not None:  # --shared-scale: drawn by draw_pending
            self.pending.append((len(self.rows), s, heat_map))
        self.rows.append(row)
        self.files += files

    def _collect_interrupted(self, writing):
        """After a Ctrl-C: the results of the inputs explained before it, once written. A second Ctrl-C
        cancels the writes not started yet; the inputs from the first unfinished one on are not reported
        (nor is one whose write was interrupted), and the files of those among them written are removed."""
        try:
            self._collect(writing)
            return
        except KeyboardInterrupt:
            pass
        for _, task in writing:
            task.cancel()
        _wait_through_interrupts([task for _, task in writing])
        finished = True
        for s, task in writing:
            written = not task.cancelled() and task.exception() is None
            finished = finished and written
            if finished:
                self._take(s, *task.result())
            elif written:  # after one that is not: the rows stay the inputs' order
                row = task.result()[0]
                for key in ("heatmap", "overlay", "relevance"):
                    if row[key] is not None:
                        try:
                            os.remove(row[key])
                        except OSError:
                            pass
        writing.clear()

    def _load(self, batch, stop):
        """Each input of ``batch`` as (model input, picture) or an error string (a file that does not
        decode, non-finite values); on a loader thread, or the calling one. None once ``stop`` is set (the
        result is not used)."""
        from ..errors import InputError
        arrays = {}  # the batch's open .npy files
        loaded = []
        for s in batch:
            if stop.is_set():
                return None
            if s.error is not None:
                loaded.append(s.error)
                continue
            try:
                item = _load_sample(s, self.spec, self.mean, self.std, arrays, keep_picture=not self.shared)
            except InputError as exc:  # e.g. a truncated file: its own error row, the others go on
                loaded.append(_reason(exc, s.path))
                continue
            # NaN/Inf in an input gives NaN relevance, which a heatmap shows as "no relevance": refuse it
            # per input and explain the others
            loaded.append(item if np.all(np.isfinite(item[0])) else "the input holds NaN or infinite values")
        return loaded

    def _relevance(self, items):
        """The relevance run on a batch's loaded inputs: (outputs (n, -1), relevance, selections, nonfinite)
        for the n that loaded, None when none did."""
        kept = [item for item in items if not isinstance(item, str)]
        if not kept:
            return None
        x = np.stack([x for x, _ in kept])
        with self._timing:  # --profile: the time some run was under way (runs may overlap)
            if self._running == 0:
                self._running_since = time.perf_counter()
            self._running += 1
        started = time.perf_counter()
        try:
            expl = self.analyzer.analyze(x, self.output_selection)
        finally:
            with self._timing:
                self._running -= 1
                ended = time.perf_counter()
                if self._running == 0:
                    self.relevance_seconds += ended - self._running_since
                self._run_time += ended - started
                self._runs += 1
        return (np.asarray(expl.output).reshape(len(kept), -1), np.asarray(expl.val), expl.output_selection,
                expl.extras.get("nonfinite", {}))

    def _draw_batch(self, batch, items, explained):
        """The pictures of a batch's small explained inputs drawn together (heatmaps_and_overlays: one numpy
        pass over all of them instead of about 20 calls per picture; for 32x32 inputs 330 -> 110 us an
        input): {index among the explained: (heatmap, overlay)}. A task on the writer thread before the
        batch's inputs' own (each input's ``_finish`` takes its pair from it). Pictures over
        BATCH_DRAW_PIXELS, whose drawing is mostly arithmetic, and --shared-scale are drawn by ``_draw``, one
        at a time, so that a batch of photos never holds all its pictures at once."""
        from ..heatmaps import heatmaps_and_overlays, reduce_channels
        if explained is None or self.shared:
            return {}
        rel, axis = explained[1], 1 if self.spec.layout == "NCHW" else 3
        map_size = rel.shape[2:4] if axis == 1 else rel.shape[1:3]  # an .npy input's heatmap
        groups = {}  # (heatmap size, heatmaps?, overlays?) -> [(index, picture)]
        for j, (s, item) in enumerate((s, item) for s, item in zip(batch, items) if not isinstance(item, str)):
            kinds = ("heatmap" in s.outputs, "overlay" in s.outputs)
            if not any(kinds) or (kinds[1] and item[1] is None):
                continue
            size = self._heatmap_size(s)
            if int(np.prod(map_size if size is None else size)) <= BATCH_DRAW_PIXELS:
                groups.setdefault((size, *kinds), []).append((j, item[1]))
        opts = self._drawing_options()
        drawn = {}
        for (size, heatmaps, overlays), members in groups.items():
            index = [j for j, _ in members]
            maps = reduce_channels(rel[index], self.picture_opts["reduce"], axis=axis)
            heats, overs = heatmaps_and_overlays(maps, [p for _, p in members] if overlays else None, self.alpha,
                                                 size=size, draw_heatmaps=heatmaps, **opts)
            for k, j in enumerate(index):
                drawn[j] = (heats[k] if heats else None, overs[k] if overs else None)
        return drawn

    def _finish(self, s, output, rel, sel, picture, nonfinite_reason=None, drawing=None):
        """Write one explained input's files (on a writer thread, or on the caller's); returns its result
        row, the number of files written and, with --shared-scale, its map for draw_pending (else None).
        ``drawing``: (the _draw_batch task of its batch, its index there)."""
        from ..errors import InputError
        from ..heatmaps import reduce_channels
        if not (np.all(np.isfinite(rel)) and np.all(np.isfinite(output))):
            s.outputs.clear()  # no picture that looks valid
            what = "output" if not np.all(np.isfinite(output)) else "relevance"
            reason = nonfinite_reason or (f"the model's {what} is not finite (NaN or infinite values; check the "
                                          "input's range, or explain it with the Python API's layer_relevances)")
            return _row(s, error=reason), 0, None
        pred = int(np.argmax(output))
        row = _row(s, predicted=pred, predicted_label=_label(self.labels, pred), score=float(output[pred]),
                   explained=sel, explained_label=_label(self.labels, sel), explained_score=float(output[sel]),
                   relevance_sum=float(rel.sum(dtype=np.float64)), heatmap=s.outputs.get("heatmap"),
                   overlay=s.outputs.get("overlay"), relevance=s.outputs.get("relevance"))
        drawn = "heatmap" in s.outputs or "overlay" in s.outputs
        pair = _drawn_pair(drawing) if drawn and not self.shared else None
        heat_map = None
        if drawn and pair is None:  # the channel-reduced relevance, (H, W)
            heat_map = reduce_channels(rel, self.picture_opts["reduce"], axis=0 if self.spec.layout == "NCHW" else 2)
        if drawn and self.shared:
            files = 0
            if "relevance" in s.outputs:
                files = self._write(s, lambda: save_npy(rel, s.outputs["relevance"]), ["relevance"])
            return row, files, heat_map.astype(np.float32)
        writes = []
        if drawn:
            writes.append(lambda: self._draw(s, heat_map, picture, None, pair))
        if "relevance" in s.outputs:
            writes.append(lambda: save_npy(rel, s.outputs["relevance"]))
        try:
            files = self._write(s, lambda: [w() for w in writes], list(s.outputs))
        except InputError as exc:  # its picture no longer decodes (the file changed): an error row
            s.outputs.clear()
            return _row(s, error=_reason(exc, s.path)), 0, None
        return row, files, None

    def _write(self, s, write, kinds):
        """Run ``write`` (which writes s.outputs[kinds]): all or none, an error or interrupt midway removes
        the input's files (with --force, old ones of an earlier run too: they would not match). Returns the
        number of files written."""
        targets = [s.outputs[k] for k in kinds]
        try:
            write()
        except BaseException:
            for t in targets:
                try:
                    os.remove(t)
                except OSError:
                    pass
            raise
        return len(targets)

    def _draw(self, s, heat_map, picture, vrange, pair=None):
        """s's heatmap (at its image's own size, when it is an image) and overlay; ``pair``: the two drawn
        already (by _draw_batch)."""
        if pair is None:
            from ..heatmaps import heatmaps_and_overlays
            from ..images import MAX_PICTURE_PIXELS, load_picture
            if "overlay" in s.outputs and picture is None:
                picture = load_picture(s.path, self.spec.channels, MAX_PICTURE_PIXELS)
            heats, overlays = heatmaps_and_overlays(heat_map[None], [picture] if "overlay" in s.outputs else None,
                                                    self.alpha, size=self._heatmap_size(s),
                                                    draw_heatmaps="heatmap" in s.outputs, vrange=vrange,
                                                    **self._drawing_options())
            pair = (heats[0] if heats else None, overlays[0] if overlays else None)
        for kind, pixels in zip(("heatmap", "overlay"), pair):
            if pixels is not None:
                save_png(pixels, s.outputs[kind])

    @staticmethod
    def _heatmap_size(s):
        """(H, W) of s's heatmap: its image's own size (scaled down to MAX_PICTURE_PIXELS); None for .npy
        inputs (the model's size)."""
        from ..images import MAX_PICTURE_PIXELS, picture_size
        return picture_size(s.image_size, MAX_PICTURE_PIXELS)[::-1] if s.kind == "image" else None

    def _drawing_options(self):
        """heatmaps_and_overlays' options; the channels are reduced before (picture_opts' "reduce")."""
        return {k: v for k, v in self.picture_opts.items() if k != "reduce"}

    def draw_pending(self):
        """--shared-scale: draw every pending input on the value range of them all. False when interrupted:
        the rows from the first undrawn input on are dropped (and their .npy files removed)."""
        from ..errors import InputError
        from ..heatmaps import value_range
        o, k = self.picture_opts, 0
        try:
            vrange = value_range([m for _, _, m in self.pending], o["rangescale"], o["percentile"])
            for k, (i, s, heat_map) in enumerate(self.pending):
                kinds = [kind for kind in ("heatmap", "overlay") if kind in s.outputs]
                try:
                    self.files += self._write(s, lambda: self._draw(s, heat_map, None, vrange), kinds)
                except InputError as exc:  # the image no longer decodes: an error row after all
                    self._drop(self.rows[i])
                    self.rows[i] = _row(s, error=_reason(exc, s.path))
        except KeyboardInterrupt:  # a second Ctrl-C: keep the inputs drawn so far
            first = self.pending[k][0]
            for row in self.rows[first:]:
                self._drop(row)
            del self.rows[first:]
            return False
        finally:
            self.pending = []
        return True

    def _drop(self, row):
        if row["status"] == "ok" and row["relevance"] is not None:
            try:
                os.remove(row["relevance"])
                self.files -= 1
            except OSError:
                pass
