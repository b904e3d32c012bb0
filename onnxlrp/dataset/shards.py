"""The output folder of a dataset run: shards written atomically, a manifest, resuming.

    OUT/manifest.json                    the run: model, rules, preprocessing, source, shard count, totals
    OUT/shards/shard-00000.npy           relevance, (rows, *sample shape) float32 (format "npy")
    OUT/shards/shard-00000.rows.json     per row: input, class, score, predicted, relevance_sum, status, error
    OUT/shards/shard-00000.parquet       the same in one Parquet file (format "parquet"; relevance as a
                                         fixed-size float list, its shape in the schema metadata)
    OUT/heatmaps/shard-00000/*.png       with heatmaps=True

Shard k holds items k*shard_size .. (k+1)*shard_size - 1 of the source listing. Every file is written under
a temporary name and renamed (onnxlrp.files): a shard's last file (its rows, or its Parquet file) is its
completion mark, so a crash loses at most the shards in flight and a rerun with the same model, rules,
options and source skips the finished ones. A folder holding another run is refused (``force`` starts over,
removing only the files a run writes). A row that did not decode or whose relevance is not finite has status
"error", the reason, and NaN relevance: never zeros that would read as "no relevance".
"""
from __future__ import annotations

import json
import os
import re
import shutil

import numpy as np

from ..errors import InputError
from ..files import atomic_write

FORMAT_VERSION = 1
FORMATS = ("npy", "parquet")
MANIFEST = "manifest.json"
SHARDS, HEATMAPS = "shards", "heatmaps"
ROW_FIELDS = ("input", "class", "score", "predicted", "relevance_sum", "status", "error")
#: heatmaps of smaller inputs are upsampled to this many pixels on their short side
MIN_HEATMAP_SIDE = 256
_SHARD = re.compile(r"^(\.)?shard-\d{5,}")


def shard_name(k):
    return f"shard-{k:05d}"


class OutputFolder:
    """Where a run's files go, and which of its shards are done."""

    def __init__(self, out, fmt):
        if fmt not in FORMATS:
            raise InputError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
        self.out, self.format = os.fspath(out), fmt
        self.shards = os.path.join(self.out, SHARDS)
        self.heatmaps = os.path.join(self.out, HEATMAPS)
        self.manifest = os.path.join(self.out, MANIFEST)

    def files(self, k):
        base = os.path.join(self.shards, shard_name(k))
        if self.format == "npy":
            return {"relevance": base + ".npy", "rows": base + ".rows.json"}
        return {"parquet": base + ".parquet"}

    def is_done(self, k):
        return all(os.path.isfile(p) for p in self.files(k).values())

    def heatmap_folder(self, k):
        return os.path.join(self.heatmaps, shard_name(k))

    # -- starting and resuming --------------------------------------------------------------------------
    def prepare(self, run, force=False):
        """Create the folders; compare ``run`` (the manifest's config) with a previous run's. Returns the
        shards already done. Refuses a folder that holds another run unless ``force``."""
        for folder in (self.out, self.shards, self.heatmaps):
            if os.path.islink(folder) and folder != self.out:
                raise InputError(f"{folder}: is a symbolic link; onnxlrp writes its shards into folders it made")
            if os.path.exists(folder) and not os.path.isdir(folder):
                raise InputError(f"{folder}: exists and is not a folder")
        if force:
            self.clear()
        previous = self._previous(run)
        os.makedirs(self.shards, exist_ok=True)
        for entry in os.listdir(self.shards):  # what a killed run was writing (atomic_write's temporaries)
            if entry.startswith(".shard-") and entry.endswith(".partial"):
                os.unlink(os.path.join(self.shards, entry))
        if previous is None:
            self._check_no_strays()
            write_json(self.manifest, {**run, "status": "running"})
            return set()
        return {k for k in range(run["shards"]) if self.is_done(k)}

    def _previous(self, run):
        if not os.path.exists(self.manifest):
            return None
        try:
            with open(self.manifest) as f:
                old = json.load(f)
        except (OSError, ValueError) as exc:
            raise InputError(f"{self.manifest}: not a readable manifest ({exc}); use another output folder or "
                             "force=True (--force) to start over") from None
        differs = [k for k in run if old.get(k) != run[k]]
        if differs:
            what = ", ".join(differs[:4])
            raise InputError(f"{self.out}: holds a run of another configuration ({what} differ); use another "
                             "output folder, or force=True (--force) to replace it")
        return old

    def _check_no_strays(self):
        """Shards without a manifest are refused (``force`` has cleared them before this is asked)."""
        if any(_SHARD.match(e) for e in os.listdir(self.shards)):
            raise InputError(f"{self.shards}: holds shards but {self.manifest} is missing; use another output "
                             "folder, or force=True (--force) to replace them")

    def clear(self):
        """Remove what a run writes (the manifest, shard files, heatmap folders), nothing else."""
        if os.path.isfile(self.manifest):
            os.unlink(self.manifest)
        for folder in (self.shards, self.heatmaps):
            if not os.path.isdir(folder) or os.path.islink(folder):
                continue
            for entry in os.listdir(folder):
                if _SHARD.match(entry):
                    path = os.path.join(folder, entry)
                    if os.path.isdir(path) and not os.path.islink(path):
                        shutil.rmtree(path)
                    else:
                        os.unlink(path)

    def finish(self, run, totals):
        write_json(self.manifest, {**run, "status": "complete", **totals})

    # -- reading back -----------------------------------------------------------------------------------
    def read_rows(self, k):
        if self.format == "npy":
            with open(self.files(k)["rows"]) as f:
                return json.load(f)
        import pyarrow.parquet as pq
        return pq.read_table(self.files(k)["parquet"], columns=list(ROW_FIELDS)).to_pylist()

    def read_relevance(self, k, sample_shape):
        if self.format == "npy":
            return np.load(self.files(k)["relevance"], mmap_mode="r", allow_pickle=False)
        import pyarrow.parquet as pq
        column = pq.read_table(self.files(k)["parquet"], columns=["relevance"]).column("relevance").combine_chunks()
        return column.flatten().to_numpy().reshape((len(column), *sample_shape))


def write_json(target, data):
    with atomic_write(target, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, allow_nan=False)


class ShardWriter:
    """One shard's files, written as its batches come (bounded memory whatever the shard size) and made
    visible by ``commit``; ``abort`` leaves nothing behind."""

    def __init__(self, folder, k, n_rows, sample_shape, heatmap_options=None):
        self.folder, self.k, self.n = folder, k, n_rows
        self.shape = tuple(sample_shape)
        self.rows, self.written = [], 0
        self.heatmap_options = heatmap_options
        self._files = folder.files(k)
        self._open = []  # (context manager, file) of the temporary files being written
        if folder.format == "npy":
            f = self._start(self._files["relevance"])
            np.lib.format.write_array_header_1_0(f, {"descr": np.dtype(np.float32).str, "fortran_order": False,
                                                     "shape": (n_rows, *self.shape)})
            self._relevance_file = f
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq
            self.schema = pa.schema(
                [("input", pa.string()), ("class", pa.int64()), ("score", pa.float64()), ("predicted", pa.int64()),
                 ("relevance_sum", pa.float64()), ("status", pa.string()), ("error", pa.string()),
                 ("relevance", pa.list_(pa.float32(), int(np.prod(self.shape))))],
                metadata={"onnxlrp.relevance_shape": json.dumps(list(self.shape))})
            self._parquet = pq.ParquetWriter(self._start(self._files["parquet"]), self.schema)

    def _start(self, target):
        cm = atomic_write(target)
        f = cm.__enter__()
        self._open.append((cm, f))
        return f

    def add(self, rows, relevance):
        """Append rows (dicts with ROW_FIELDS) and their relevance, (len(rows), *sample shape)."""
        relevance = np.ascontiguousarray(relevance, dtype=np.float32)
        if relevance.shape != (len(rows), *self.shape):
            raise ValueError(f"relevance {relevance.shape} for {len(rows)} rows of {self.shape}")
        if self.written + len(rows) > self.n:
            raise ValueError(f"shard {self.k} holds {self.n} rows")
        if self.heatmap_options is not None:
            self._heatmaps(rows, relevance)
        if self.folder.format == "npy":
            self._relevance_file.write(memoryview(relevance).cast("B"))  # no copy
        else:
            import pyarrow as pa
            columns = {f: [r[f] for r in rows] for f in ROW_FIELDS}
            flat = pa.array(relevance.reshape(-1), pa.float32())
            columns["relevance"] = pa.FixedSizeListArray.from_arrays(flat, int(np.prod(self.shape)))
            self._parquet.write_table(pa.table(columns, schema=self.schema))
        self.rows.extend(rows)
        self.written += len(rows)

    def _heatmaps(self, rows, relevance):
        from ..heatmaps import heatmap
        from ..png import write_png
        folder = self.folder.heatmap_folder(self.k)
        os.makedirs(folder, exist_ok=True)
        if os.path.islink(folder):
            raise InputError(f"{folder}: is a symbolic link; onnxlrp writes heatmaps into folders it made")
        opts = dict(self.heatmap_options)
        layout = opts.pop("layout", "NCHW")
        h, w = self.shape[1:] if layout == "NCHW" else self.shape[:2]
        if "size" not in opts and min(h, w) < MIN_HEATMAP_SIDE:  # a 32x32 map is drawn large enough to read
            scale = MIN_HEATMAP_SIDE / min(h, w)
            opts["size"] = (round(h * scale), round(w * scale))
        for j, (row, rel) in enumerate(zip(rows, relevance)):
            if row["status"] != "ok":
                continue
            stem = re.sub(r"[^A-Za-z0-9._-]+", "_", os.path.splitext(os.path.basename(row["input"]))[0])[:80]
            write_png(heatmap(rel[None], layout=layout, **opts)[0],
                      os.path.join(folder, f"{self.written + j:05d}_{stem}_heatmap.png"), level=1)

    def commit(self):
        """Make the shard visible; returns its summary."""
        if self.written != self.n:
            raise ValueError(f"shard {self.k}: {self.written} of {self.n} rows written")
        if self.folder.format == "parquet":
            self._parquet.close()
        # the relevance file first, the rows (the completion mark) last
        while self._open:
            cm, _ = self._open.pop(0)
            cm.__exit__(None, None, None)
        if self.folder.format == "npy":
            write_json(self._files["rows"], self.rows)
        return {"shard": self.k, "rows": self.n, "errors": sum(r["status"] != "ok" for r in self.rows)}

    def abort(self):
        err = RuntimeError("shard aborted")
        while self._open:
            cm, _ = self._open.pop()
            try:
                cm.__exit__(RuntimeError, err, None)
            except RuntimeError:
                pass


def result_rows(names, outputs, relevance, selection, errors):
    """The rows of one explained batch: ``names`` per row, the model ``outputs`` (n, K), the explained
    ``selection`` per row, and ``errors`` (row -> reason) for rows that did not decode. Rows whose output or
    relevance is not finite become errors too. Returns (rows, relevance with NaN in the error rows)."""
    n = len(names)
    relevance = np.asarray(relevance, dtype=np.float32)
    flat = relevance.reshape(n, -1)
    out_ok = np.isfinite(outputs).all(1)
    rel_ok = np.isfinite(flat).all(1)
    sums = flat.sum(1, dtype=np.float64)
    predicted = np.argmax(np.where(np.isnan(outputs), -np.inf, outputs), 1)
    scores = outputs[np.arange(n), np.clip(selection, 0, None)]
    rows = []
    for i, name in enumerate(names):
        reason = errors.get(i)
        if reason is None and not (out_ok[i] and rel_ok[i]):
            reason = f"the model's {'output' if not out_ok[i] else 'relevance'} is not finite (NaN or infinite values)"
        if reason is not None:
            if not relevance.flags.writeable:
                relevance = relevance.copy()
                flat = relevance.reshape(n, -1)
            flat[i] = np.nan
            rows.append({"input": name, "class": None, "score": None, "predicted": None, "relevance_sum": None,
                         "status": "error", "error": reason})
            continue
        rows.append({"input": name, "class": int(selection[i]), "score": float(scores[i]),
                     "predicted": int(predicted[i]), "relevance_sum": float(sums[i]), "status": "ok", "error": None})
    return rows, relevance
