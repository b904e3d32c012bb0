"""What a dataset is made of: the items a source lists, and how one item becomes a model input.

A source is a folder (recursive: image files and ``.npy`` arrays, hidden entries and symlinked folders
skipped), a glob (``data/**/*.jpg``), or a file: an image, a ``.npy`` array (one sample, or a batch whose
rows are samples) or a Parquet file (one sample per row, from an image column of encoded bytes, Hugging Face's
``{bytes, path}`` image struct, or a numeric list column holding the preprocessed sample). Items are listed
in natural order (img2 before img10), sources in the order given: the same source always gives the same
items in the same order, which is what lets a rerun skip the shards it finished.

Items are plain lists (kind, path, row, name), so that they travel to Ray workers as they are.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass

import numpy as np

from ..errors import InputError, LRPError
from ..files import natural_key, read_npy
from ..images import IMAGE_EXTENSIONS, detect_layout, is_image_path, load_image, normalize, split_shape, to_layout

#: Parquet columns taken as the input when ``column`` is not given, in this order
INPUT_COLUMNS = ("image", "input", "x", "pixel_values", "array")
#: Parquet columns taken as the item's name when ``id_column`` is not given
ID_COLUMNS = ("path", "id", "name", "file")
_GLOB = re.compile(r"[*?[]")
_IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
_GRAY = ((0.449,), (0.226,))


@dataclass(frozen=True)
class Preprocessing:
    """How an item becomes one sample of the model's data input."""
    sample_shape: tuple            # the sample's shape, without the batch axis
    dtype: str                     # numpy dtype string of the model input
    layout: str | None = None      # NCHW / NHWC for image models
    channels: int | None = None
    size: tuple | None = None      # (H, W) images are resized to
    mean: tuple | None = None      # per-channel normalization of images scaled to [0, 1]; None: none
    std: tuple | None = None

    def describe(self):
        return asdict(self)


def preprocessing_for(analyzer, *, input_shape=None, layout="auto", mean=None, std=None, normalize=True):
    """The Preprocessing for ``analyzer``'s data input: images resized to the model's size and normalized
    with ImageNet's statistics by default, as ``onnxlrp explain`` does."""
    shape = analyzer.input_shape
    where = analyzer.source
    if analyzer.token_input:
        raise LRPError(f"{where}: explain_dataset takes image and array inputs; the model's input "
                       f"'{analyzer.data_input}' takes token ids (use LRP.analyze on tokenized batches)")
    if shape is None:
        raise LRPError(f"{where}: the data input has no known rank; cannot prepare inputs for it")
    if input_shape is not None:
        input_shape = tuple(int(d) for d in input_shape)
        fits = len(input_shape) == len(shape) - 1 and all(
            not isinstance(w, int) or w == g for w, g in zip(shape[1:], input_shape))
        if not fits:
            raise LRPError(f"{where}: input_shape {input_shape} does not fit the model's input {tuple(shape)}")
        shape = (shape[0], *input_shape)
    dynamic = [i for i, d in enumerate(shape[1:], 1) if not isinstance(d, int)]
    if dynamic:
        raise LRPError(f"{where}: the model's input {tuple(shape)} has dynamic dims after the batch axis; pass "
                       "input_shape (--input-shape, e.g. 3,224,224): every sample of a dataset gets one shape")
    sample_shape = tuple(int(d) for d in shape[1:])
    dtype = np.dtype(analyzer.input_dtype).str
    if len(shape) != 4:
        return Preprocessing(sample_shape, dtype)
    layout = detect_layout(shape) if layout in (None, "auto") else layout.upper()
    c, h, w = split_shape(shape, layout)
    if normalize:
        default = _GRAY if c == 1 else _IMAGENET
        mean, std = tuple(mean or default[0]), tuple(std or default[1])
        for what, v in (("mean", mean), ("std", std)):
            if len(v) not in (1, c):
                raise LRPError(f"{what} has {len(v)} values for the model's {c}-channel images (give 1 or {c})")
        if any(s == 0 for s in std):
            raise LRPError("std must not be zero")
    elif mean is not None or std is not None:
        raise LRPError("normalize=False and mean/std exclude each other")
    else:
        mean = std = None
    return Preprocessing(sample_shape, dtype, layout, c, (h, w), mean, std)


# -- listing ------------------------------------------------------------------------------------------------
def _kind(path):
    low = path.lower()
    if low.endswith(".npy"):
        return "npy"
    if low.endswith((".parquet", ".pq")):
        return "parquet"
    return "image"


def _walk(folder, skip=()):
    found = []
    for root, dirs, files in os.walk(folder):  # followlinks=False: a linked folder cannot loop the walk
        dirs[:] = [d for d in dirs if not d.startswith(".") and os.path.realpath(os.path.join(root, d)) not in skip]
        for f in files:
            if not f.startswith(".") and (is_image_path(f) or f.lower().endswith((".npy", ".parquet", ".pq"))):
                found.append(os.path.join(root, f))
    return sorted(found, key=lambda p: natural_key(os.path.relpath(p, folder)))


def _files(source, skip=()):
    source = os.fspath(source)
    if os.path.isdir(source):
        files = _walk(source, skip)
        if not files:
            raise InputError(f"{source}: the folder holds no images, .npy or Parquet files "
                             f"(looked for {', '.join(IMAGE_EXTENSIONS[:4])}, ..., .npy, .parquet)")
        return files
    if os.path.exists(source):
        return [source]
    if _GLOB.search(source):
        files = sorted((p for p in glob.glob(source, recursive=True) if os.path.isfile(p)), key=natural_key)
        if not files:
            raise InputError(f"{source}: the pattern matches no files")
        return files
    raise InputError(f"{source}: no such file or folder")


def list_items(sources, prep, *, column=None, id_column=None, skip=None):
    """Every item of ``sources`` as [kind, path, row, name], checked far enough to know it fits ``prep``:
    arrays by their header, Parquet files by their schema (images are decoded only when explained).
    ``skip``: a folder left out of folder walks (the output folder, when it is inside a source)."""
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    skip = {os.path.realpath(skip)} if skip is not None else set()
    items = []
    for source in sources:
        for path in _files(source, skip):
            if skip and any(os.path.realpath(path).startswith(s + os.sep) for s in skip):
                continue  # a glob into the output folder
            kind = _kind(path)
            if kind == "image":
                if prep.channels is None:
                    raise InputError(f"{path}: the model's input {prep.sample_shape} is not an image; give .npy "
                                     "or Parquet arrays of that shape")
                items.append(["image", path, None, path])
            elif kind == "npy":
                items.extend(_npy_items(path, prep))
            else:
                items.extend(_parquet_items(path, prep, column, id_column))
    if not items:
        raise InputError(f"{', '.join(map(str, sources))}: no items to explain")
    return items


def items_digest(items):
    """A hash of the item list: a rerun into the same folder must see the same dataset."""
    digest = hashlib.sha256()
    for item in items:
        digest.update(json.dumps(item).encode() + b"\n")
    return digest.hexdigest()


def _npy_items(path, prep):
    arr = read_npy(path)
    if not np.issubdtype(arr.dtype, np.floating):
        raise InputError(f"{path}: dtype {arr.dtype}; .npy inputs must be floating-point arrays, already "
                         "preprocessed for the model")
    if arr.shape == prep.sample_shape:
        return [["npy", path, None, path]]
    if arr.ndim == len(prep.sample_shape) + 1 and arr.shape[1:] == prep.sample_shape:
        width = len(str(max(arr.shape[0] - 1, 0)))
        return [["npy", path, i, f"{path}#{i:0{width}d}"] for i in range(arr.shape[0])]
    raise InputError(f"{path}: shape {arr.shape} does not fit the model's sample shape {prep.sample_shape} "
                     "(give one sample or a batch of them)")


def _pyarrow(path):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise LRPError(f"{path}: Parquet needs pyarrow (pip install 'onnxlrp[parquet]')") from None
    return pq


def _column_kind(field_type):
    import pyarrow as pa
    t = field_type
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return "bytes"
    if pa.types.is_struct(t) and t.get_field_index("bytes") >= 0:
        return "struct"
    if isinstance(t, pa.ExtensionType):
        return "tensor"
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        return "list"
    return None


def _parquet_items(path, prep, column, id_column):
    pq = _pyarrow(path)
    try:
        meta = pq.ParquetFile(path)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several kinds for a file that is not Parquet
        raise InputError(f"{path}: not a readable Parquet file ({str(exc).splitlines()[0]})") from None
    schema = meta.schema_arrow
    names = schema.names
    if column is None:
        usable = [n for n in names if _column_kind(schema.field(n).type)]
        column = next((n for n in INPUT_COLUMNS if n in usable), usable[0] if usable else None)
        if column is None:
            raise InputError(f"{path}: no column holds images or arrays (columns: {', '.join(names)}); name one "
                             "with column=")
    elif column not in names:
        raise InputError(f"{path}: has no column {column!r} (columns: {', '.join(names)})")
    kind = _column_kind(schema.field(column).type)
    if kind is None:
        raise InputError(f"{path}: column {column!r} is {schema.field(column).type}, not image bytes or an array")
    if kind in ("bytes", "struct") and prep.channels is None:
        raise InputError(f"{path}: column {column!r} holds images, but the model's input {prep.sample_shape} "
                         "is not an image")
    if id_column is not None and id_column not in names:
        raise InputError(f"{path}: has no column {id_column!r} (columns: {', '.join(names)})")
    id_column = id_column or next((n for n in ID_COLUMNS if n in names and n != column), None)
    rows = meta.metadata.num_rows
    ids = None
    if id_column is not None:
        ids = [str(v) for v in meta.read(columns=[id_column]).column(id_column).to_pylist()]
    width = len(str(max(rows - 1, 0)))
    return [["parquet", path, i, ids[i] if ids else f"{path}#{i:0{width}d}", column] for i in range(rows)]


# -- decoding -----------------------------------------------------------------------------------------------
class Decoder:
    """Items -> model input samples. Keeps the last array / Parquet row group it read open, so that the
    items of one shard (consecutive rows) read their file once."""

    def __init__(self, prep):
        self.prep = prep
        self._npy = (None, None)
        self._group = (None, None, None)  # (path, column, (first row, rows, values))

    def image(self, data, name):
        p = self.prep
        arr = load_image(data, size=p.size, channels=p.channels, name=name)
        x = normalize(arr, p.mean, p.std) if p.mean is not None else arr
        return to_layout(x, p.layout).astype(p.dtype)

    def sample(self, item):
        """The model input for ``item``; InputError naming it when it does not decode or fit."""
        kind, path, row, name = item[:4]
        if kind == "image":
            x = self.image(path, name)
        elif kind == "npy":
            if self._npy[0] != path:
                self._npy = (path, read_npy(path))
            a = self._npy[1]
            x = np.asarray(a[row] if row is not None else a)
        else:
            x = self._parquet(path, item[4], row, name)
        x = np.asarray(x, dtype=self.prep.dtype)
        if x.shape != self.prep.sample_shape:
            raise InputError(f"{name}: shape {x.shape} does not fit the model's sample shape {self.prep.sample_shape}")
        if not np.all(np.isfinite(x)):  # NaN relevance would read as "no relevance"
            raise InputError(f"{name}: the input holds NaN or infinite values")
        return x

    def _parquet(self, path, column, row, name):
        path_, column_, group = self._group
        if path_ != path or column_ != column or not group[0] <= row < group[0] + group[1]:
            group = self._read_group(path, column, row)
            self._group = (path, column, group)
        value = group[2][row - group[0]]
        if value is None:
            raise InputError(f"{name}: the {column!r} value is null")
        if isinstance(value, dict):  # Hugging Face's image struct {bytes, path}
            value = value.get("bytes")
            if value is None:
                raise InputError(f"{name}: the image struct holds no bytes")
        if isinstance(value, (bytes, bytearray)):
            return self.image(value, name)
        x = np.asarray(value)
        if x.dtype.kind not in "biuf":
            raise InputError(f"{name}: the {column!r} value is not numeric ({x.dtype})")
        if x.size != int(np.prod(self.prep.sample_shape)):
            raise InputError(f"{name}: {x.size} values do not fit the model's sample shape {self.prep.sample_shape}")
        return x.reshape(self.prep.sample_shape)

    @staticmethod
    def _read_group(path, column, row):
        """(first row, rows, values) of the row group holding ``row``: encoded images as bytes (or
        Hugging Face's {bytes, path} dicts), arrays as flat numpy arrays, None for nulls."""
        pq = _pyarrow(path)
        f = pq.ParquetFile(path)
        first = 0
        for g in range(f.metadata.num_row_groups):
            group = f.metadata.row_group(g)
            n = group.num_rows
            if row < first + n:
                names = [group.column(c).path_in_schema.split(".")[0] for c in range(group.num_columns)]
                size = sum(group.column(c).total_uncompressed_size for c, name in enumerate(names) if name == column)
                if size > MAX_ROW_GROUP_BYTES:  # a small file must not make the reader allocate gigabytes
                    raise InputError(f"{path}: row group {g} holds {size:,} bytes of column {column!r} "
                                     f"uncompressed, over the limit of {MAX_ROW_GROUP_BYTES:,}; write it in "
                                     "smaller row groups")
                values = f.read_row_group(g, columns=[column]).column(column).combine_chunks()
                return first, n, _row_values(values)
            first += n
        raise InputError(f"{path}: has no row {row} (the file changed since it was listed)")


#: the most bytes one row group of the input column may take uncompressed (onnxlrp reads one at a time)
MAX_ROW_GROUP_BYTES = 1 << 30


def _row_values(values):
    import pyarrow as pa
    import pyarrow.compute as pc
    kind = _column_kind(values.type)
    if kind == "tensor":  # Ray's tensor extension column: an (n, ...) array
        return list(values.to_numpy())
    if kind != "list":
        return values.to_pylist()
    rows = []
    for i in range(len(values)):
        if not values[i].is_valid:
            rows.append(None)
            continue
        flat = values.slice(i, 1)
        while pa.types.is_list(flat.type) or pa.types.is_large_list(flat.type) or \
                pa.types.is_fixed_size_list(flat.type):
            flat = pc.list_flatten(flat)
        rows.append(flat.to_numpy(zero_copy_only=False))  # nulls inside become NaN: refused as non-finite
    return rows
