"""Explaining whole datasets: ``explain_dataset(model, composite, source, out)``.

The items of ``source`` (onnxlrp.dataset.sources) are cut into shards of ``shard_size`` rows; each shard's
relevance and per-row results are written to ``out`` (onnxlrp.dataset.shards) by a streaming pipeline
(onnxlrp.dataset.pipeline) on this machine, or by an actor pool on a Ray cluster (``ray=``,
onnxlrp.dataset.ray_data). A rerun with the same model, rules, options and source skips the finished
shards. ``load_results(out)`` reads a run back.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass

import numpy as np

from ..errors import InputError, LRPError
from .shards import FORMAT_VERSION, OutputFolder
from .sources import items_digest, list_items, preprocessing_for

__all__ = ["DatasetResults", "explain_dataset", "load_results"]


def _sha256_text(text):
    return hashlib.sha256(text.encode()).hexdigest()


def _model_hash(analyzer):
    from ..cache import ModelCache, content_hash
    if isinstance(analyzer._cache, ModelCache) and analyzer._cache.content is not None:
        return analyzer._cache.content  # the cache's key already holds the file's SHA-256: not read again
    if isinstance(analyzer._model, (str, os.PathLike)):
        found = content_hash(os.fspath(analyzer._model))
        if found is None:
            raise InputError(f"{analyzer.source}: the file changed while it was read")
        return found[0]
    return hashlib.sha256(analyzer._model.SerializeToString()).hexdigest()


def _rules_key(analyzer):
    from ..cache import ModelCache, Uncacheable
    try:
        description = (analyzer._cache.description if isinstance(analyzer._cache, ModelCache)
                       else analyzer._cache_description())
    except Uncacheable:  # a rule with a lambda: what its listing says is all there is to compare
        description = analyzer.rules_listing()
    return _sha256_text(json.dumps(description, sort_keys=True, default=str))


def _run_record(analyzer, prep, sources, items, shard_size, fmt, output_selection, heatmaps):
    """What the results depend on: a rerun into the same folder must match it to resume."""
    from .. import __version__
    return json.loads(json.dumps({"format_version": FORMAT_VERSION, "onnxlrp": __version__,
            "model": {"path": analyzer.source, "sha256": _model_hash(analyzer), "output": analyzer.output_name},
            "rules": analyzer.rules_listing().splitlines(), "rules_sha256": _rules_key(analyzer),
            "normalize_output_relevance": analyzer.normalize_output_relevance, "precision": analyzer.precision,
            "output_selection": output_selection, "preprocessing": prep.describe(),
            "source": {"sources": [os.fspath(s) for s in sources], "items": len(items),
                       "sha256": items_digest(items)},
            "shard_size": shard_size, "format": fmt, "heatmaps": bool(heatmaps),
            "shards": -(-len(items) // shard_size)}))  # as the manifest reads back: lists, not tuples


@dataclass
class DatasetRun:
    """What ``explain_dataset`` did."""
    out: str
    items: int
    shards: int
    skipped: int          # shards a previous run had finished
    rows: int             # rows explained by this run
    errors: int           # of them, rows with status "error"
    seconds: float
    backend: str = ""     # where the relevance ran: "ray", or how the local pipeline split the cores

    @property
    def rate(self):
        return self.rows / self.seconds if self.seconds > 0 else float("nan")


def explain_dataset(model, composite=None, source=None, out=None, *, batch_size=32, shard_size=1024, format="npy",
                    output_selection=None, heatmaps=False, input_shape=None, layout="auto", mean=None, std=None,
                    normalize=True, column=None, id_column=None, force=False, progress=None, ray=None,
                    workers=None, gpus_per_worker=0.0, cpus_per_worker=1.0, **lrp_options) -> DatasetRun:
    """Explain every item of ``source`` and write the results to the folder ``out``.

    ``model``: an ``.onnx`` path (with ``composite`` and ``lrp_options`` as for :class:`onnxlrp.LRP`) or an
    LRP analyzer. ``source``: a folder (recursive), a glob, an image / ``.npy`` / Parquet file, or a list of
    them. Images are preprocessed as ``onnxlrp explain`` does (resized to the model's input size, ImageNet
    ``mean``/``std`` unless ``normalize=False``; ``input_shape`` for models with dynamic sizes); ``.npy`` and
    numeric Parquet columns are taken as preprocessed samples. ``column`` / ``id_column`` name the Parquet
    columns holding the input and its name.

    Results: shards of ``shard_size`` rows in ``format`` "npy" (relevance .npy + rows .json) or "parquet";
    ``heatmaps=True`` adds one PNG per row (a dict of :func:`onnxlrp.heatmap` options also works). Memory
    stays bounded by a few batches whatever the dataset size. A rerun skips the shards already written;
    a folder holding another run is refused unless ``force``. ``progress``: a line with rows, rate and ETA on
    stderr (default: on a terminal). ``output_selection``: one class for every row (default: each row's top).

    ``ray``: "auto" (the cluster this process is connected to, or the one ``ray start`` made), an address,
    or "local" (a new one here) runs the shards on a Ray Data actor pool instead: ``workers`` actors (default:
    as many as the cluster's CPUs, or GPUs, allow), ``gpus_per_worker`` GPUs and ``cpus_per_worker`` CPUs
    each; ``out`` must then be on storage every node sees.
    """
    from ..analyzer import LRP
    from .pipeline import CoreSplit, Progress, ShardExplainer
    from .ray_data import cluster_address, run_on_ray
    if source is None or out is None:
        raise InputError("explain_dataset needs a source and an output folder (out=)")
    if isinstance(model, LRP):
        if composite is not None or lrp_options:
            raise InputError("explain_dataset: give the composite and LRP options to LRP(...), not beside an "
                             "analyzer")
        analyzer = model
    else:
        analyzer = LRP(model, composite, **lrp_options)
    if analyzer.other_inputs:
        raise LRPError(f"{analyzer.source}: explain_dataset feeds one data input; the model has other inputs "
                       f"{analyzer.other_inputs}")
    if int(batch_size) < 1 or int(shard_size) < 1:
        raise InputError(f"batch_size and shard_size must be at least 1 (got {batch_size}, {shard_size})")
    shard_size = int(shard_size)
    prep = preprocessing_for(analyzer, input_shape=input_shape, layout=layout, mean=mean, std=std,
                             normalize=normalize)
    heatmap_options = None
    if heatmaps:
        if prep.channels is None:
            raise InputError(f"{analyzer.source}: heatmaps need an image model; its input is {prep.sample_shape}")
        heatmap_options = {"colorbar": True, **(heatmaps if isinstance(heatmaps, dict) else {}),
                           "layout": prep.layout}
    if output_selection is not None:
        output_selection = int(analyzer._selection(output_selection, 1, _n_outputs(analyzer))[0])
    sources = [source] if isinstance(source, (str, os.PathLike)) else list(source)
    folder = OutputFolder(os.path.abspath(os.fspath(out)), format)
    items = list_items(sources, prep, column=column, id_column=id_column, skip=folder.out)
    if format == "parquet":
        from .sources import _pyarrow
        _pyarrow(folder.out)
    run = _run_record(analyzer, prep, sources, items, shard_size, format, output_selection, heatmaps)
    done = folder.prepare(run, force=force)
    todo = [(k, items[k * shard_size:(k + 1) * shard_size]) for k in range(run["shards"]) if k not in done]
    bar = Progress(sum(len(i) for _, i in todo), enabled=progress)
    started = time.perf_counter()
    address, backend = cluster_address(ray), "ray"
    try:
        if address is None:
            summaries = []
            if todo:
                split = CoreSplit(analyzer, prep, int(batch_size))
                explainer = ShardExplainer(split, prep, folder, batch_size, output_selection, heatmap_options,
                                           split.decoders, split.observe)
                summaries = explainer.run(todo, on_rows=bar.update)
                backend = split.chosen
        else:
            graph = analyzer._export(analyzer._build(prep.sample_shape)).SerializeToString() if todo else b""
            summaries = run_on_ray(analyzer, graph, todo, folder, prep, int(batch_size), output_selection,
                                   heatmap_options, address=address, workers=workers,
                                   gpus_per_worker=gpus_per_worker, cpus_per_worker=cpus_per_worker,
                                   on_shard=lambda s: bar.update(s["rows"])) if todo else []
    finally:
        bar.close()
    seconds = time.perf_counter() - started
    result = DatasetRun(folder.out, len(items), run["shards"], len(done), sum(s["rows"] for s in summaries),
                        sum(s["errors"] for s in summaries), seconds, backend if todo else "nothing to do")
    totals = _totals(folder, done, summaries)
    folder.finish(run, {"totals": totals, "last_run": {"rows": result.rows, "errors": result.errors,
                                                       "seconds": round(seconds, 3), "skipped_shards": len(done),
                                                       "backend": backend}})
    return result


def _n_outputs(analyzer):
    shape = analyzer.output_shape
    if shape and all(isinstance(d, int) for d in shape[1:]):
        return int(np.prod(shape[1:]))
    return None


def _totals(folder, done, summaries):
    """Rows and errors over every shard: this run's from their summaries, a previous run's read back."""
    rows, errors = sum(s["rows"] for s in summaries), sum(s["errors"] for s in summaries)
    for k in done:
        shard_rows = folder.read_rows(k)
        rows += len(shard_rows)
        errors += sum(r["status"] != "ok" for r in shard_rows)
    return {"rows": rows, "errors": errors}


class DatasetResults:
    """A finished run read back: ``rows`` (a dict per item, in source order, with its ``shard``) and the
    relevance per shard (``relevance(k)``, memory-mapped for the npy format) or per row (``[i]``)."""

    def __init__(self, out):
        self.out = os.fspath(out)
        manifest = os.path.join(self.out, "manifest.json")
        try:
            with open(manifest) as f:
                self.manifest = json.load(f)
        except (OSError, ValueError) as exc:
            raise InputError(f"{manifest}: not a readable manifest ({exc})") from None
        self.folder = OutputFolder(self.out, self.manifest["format"])
        self.sample_shape = tuple(self.manifest["preprocessing"]["sample_shape"])
        self.shard_size = self.manifest["shard_size"]
        missing = [k for k in range(self.manifest["shards"]) if not self.folder.is_done(k)]
        if missing:
            raise InputError(f"{self.out}: shards {missing[:5]} are not written (an interrupted run: rerun it to "
                             "finish)")
        self._rows = None

    @property
    def rows(self):
        if self._rows is None:
            self._rows = [{**row, "shard": k} for k in range(self.manifest["shards"])
                          for row in self.folder.read_rows(k)]
        return self._rows

    def relevance(self, k):
        return self.folder.read_relevance(k, self.sample_shape)

    def __len__(self):
        return self.manifest["source"]["items"]

    def __getitem__(self, i):
        if not 0 <= i < len(self):
            raise IndexError(i)
        return np.asarray(self.relevance(i // self.shard_size)[i % self.shard_size])


def load_results(out) -> DatasetResults:
    """Read back what ``explain_dataset`` wrote to ``out``."""
    return DatasetResults(out)
